"""passes/collapse_head_grad.py and its op: a chain head's stream gradient written summed over the n streams.

The op against the reference (float64: the same sum as proj_pre_backward's dx summed over its streams; the Triton
path under the interpreter on broadcast and dense streams); the pass on a hand-built graph in the shape of
Inductor's backward graph at a chain head, run before and after on random inputs; and end to end, a compiled model's
gradients with the pass on and off.
"""

from __future__ import annotations

import operator

import pytest
import torch

from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tk
from mhc_compile.kernels.triton_common import is_broadcast
from mhc_compile.passes import collapse_head_grad, inplace_stream_grads
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)
from models import compiled_nanogpt_grads, rel_err

OPS = torch.ops.mhc_compile
aten = torch.ops.aten


def _operands(t, n, c, dtype, broadcast, acc, seed):
    """A head call's operands: x broadcast over its n streams (one dense row a token) or dense, dout and acc in the
    stream dtype, fp32 phi, dp, dsq, h_pre."""
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)
    row, dense = torch.randn(t, 1, c, generator=g), torch.randn(t, n, c, generator=g)
    phi = torch.randn(n * c, m, generator=g) * (n * c) ** -0.5
    dp, dsq = torch.randn(t, m, generator=g), torch.randn(t, generator=g) * 1e-2
    h_pre, dout = torch.rand(t, n, generator=g), torch.randn(t, c, generator=g).to(dtype)
    a = torch.randn(t, n, c, generator=g).to(dtype) if acc else None
    x = row.to(dtype).expand(t, n, c) if broadcast else dense.to(dtype)
    return x, phi, dp, dsq, h_pre, dout, a


@pytest.mark.parametrize("acc", [True, False])
def test_the_reference_is_proj_pre_backwards_dx_summed_over_the_streams(acc):
    x, phi, dp, dsq, h_pre, dout, a = (v if v is None else v.double()
                                       for v in _operands(9, 3, 16, torch.float32, True, acc, seed=0))
    dx, dphi = ref.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, a)
    ds, dphi_c = ref.proj_pre_backward_collapsed(x, phi, dp, dsq, h_pre, dout, a)
    assert ds.shape == (9, 1, 16)
    torch.testing.assert_close(ds, dx.sum(1, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dphi_c, dphi, rtol=0, atol=0)


@pytest.mark.parametrize("t, n, c, dtype, broadcast, acc", [
    (37, 4, 128, torch.bfloat16, True, True),    # the default path's chain head: bf16's one-pass kernel
    (37, 4, 128, torch.bfloat16, True, False),
    (29, 3, 48, torch.float32, True, True),      # the dx + dphi kernel pair, a ragged C
    (13, 8, 64, torch.bfloat16, True, True),     # 80 coefficients on the one row (the Gluon kernel takes 32)
    (17, 1, 64, torch.bfloat16, True, True),     # one stream: not broadcast, the dense route
    (23, 2, 64, torch.bfloat16, False, True),    # a dense stream: proj_pre_backward, then the sum
    (11, 4, 32, torch.float32, False, False),
])
def test_the_triton_op_matches_the_reference(t, n, c, dtype, broadcast, acc):
    args = _operands(t, n, c, dtype, broadcast, acc, seed=t + n)
    ds, dphi = tk.proj_pre_backward_collapsed(*args)
    want_ds, want_dphi = ref.proj_pre_backward_collapsed(*(v if v is None else v.double() if v.is_floating_point()
                                                           else v for v in args))
    assert ds.dtype == args[0].dtype and ds.shape == (t, 1, c) and dphi.dtype == args[1].dtype
    budget = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bench_kernels' budgets (tf32 dx dot, bf16 rounding)
    assert rel_err(ds.double(), want_ds) < budget
    assert rel_err(dphi.double(), want_dphi) < budget


def test_leading_token_dims_pass_through():
    x, phi, dp, dsq, h_pre, dout, a = _operands(12, 4, 64, torch.float32, True, True, seed=5)
    lead = lambda v: v.reshape(3, 4, *v.shape[1:])  # noqa: E731
    ds, dphi = tk.proj_pre_backward_collapsed(x.reshape(3, 4, 4, 64), phi, lead(dp), dsq.reshape(3, 4), lead(h_pre),
                                              lead(dout), lead(a))
    want, want_dphi = tk.proj_pre_backward_collapsed(x, phi, dp, dsq, h_pre, dout, a)
    torch.testing.assert_close(ds, want.reshape(3, 4, 1, 64))
    torch.testing.assert_close(dphi, want_dphi)


@pytest.mark.parametrize("broadcast", [True, False])
def test_acc_given_as_its_sum_is_the_same_as_its_rows(broadcast):
    """acc as one row a token (post_res_backward's collapse_dx) against its n rows, reference and Triton."""
    args = list(_operands(19, 4, 64, torch.float32, broadcast, True, seed=2))
    rows = args[-1]
    for module, tol in ((ref, 1e-12), (tk, 1e-5)):
        cast = (lambda v: v.double()) if module is ref else (lambda v: v)  # noqa: E731
        want = module.proj_pre_backward_collapsed(*(cast(v) for v in args))
        got = module.proj_pre_backward_collapsed(*(cast(v) for v in args[:-1]), cast(rows).sum(1, keepdim=True))
        for g, w in zip(got, want):
            assert rel_err(g.double(), w.double()) < tol


def test_an_acc_of_another_shape_is_named():
    x, phi, dp, dsq, h_pre, dout, a = _operands(5, 4, 32, torch.float32, True, True, seed=1)
    with pytest.raises(ValueError, match="acc has shape"):
        tk.proj_pre_backward_collapsed(x, phi, dp, dsq, h_pre, dout, a[:, :2])


def _post_res_operands(t, n, c, dtype, broadcast, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, c, generator=g)
    x = (x[:, :1].expand(t, n, c) if broadcast else x).to(dtype)
    h_res, h_post = torch.rand(t, n, n, generator=g), torch.rand(t, n, generator=g)
    h_pre, y = torch.rand(t, n, generator=g), torch.randn(t, c, generator=g).to(dtype)
    return x, h_res, h_post, y, torch.randn(t, n, c, generator=g).to(dtype), h_pre


@pytest.mark.parametrize("t, n, c, dtype, broadcast, two_d", [
    (37, 4, 64, torch.bfloat16, True, True),     # the chain head: x broadcast, the 2-D kernel (n <= 4)
    (21, 3, 40, torch.float32, False, True),
    (19, 5, 48, torch.float32, True, False),     # n > 4: the 1-D kernel
    (13, 4, 32, torch.bfloat16, False, False),
])
@pytest.mark.parametrize("pre", [False, True])
def test_post_res_backward_writes_dx_summed_over_the_streams(t, n, c, dtype, broadcast, two_d, pre):
    """collapse_dx: dx summed over its n rows before rounding, every other output as without it, for both kernels
    (PostResBwdCfg.two_d) and post_res_backward_pre."""
    x, h_res, h_post, y, dout, h_pre = _post_res_operands(t, n, c, dtype, broadcast, seed=t + n)
    extra = (h_pre,) if pre else ()
    name = "post_res_backward_pre" if pre else "post_res_backward"
    with tk.tuning("post_res_backward", two_d=two_d):
        got = getattr(tk, name)(x, h_res, h_post, y, dout, *extra, collapse_dx=True)
        rows = getattr(tk, name)(x, h_res, h_post, y, dout, *extra)
    want = getattr(ref, name)(*(v.double() for v in (x, h_res, h_post, y, dout, *extra)), collapse_dx=True)
    assert got[0].shape == (t, 1, c) and got[0].dtype == dtype
    budget = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(got[0].double(), want[0]) < budget
    torch.testing.assert_close(want[0], ref.post_res_backward(*(v.double() for v in (x, h_res, h_post, y, dout)))[0]
                               .sum(1, keepdim=True))
    for a, b in zip(got[1:], rows[1:]):  # dh_res, dh_post, dy (and x_in): the same kernel work as without
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="collapse_dx"):
        tk.post_res_backward(x, h_res, h_post, y, dout, out=dout.clone(), collapse_dx=True)


def _step_operands(t, n, c, dtype, seed):
    """step_backward's operands: the streams in ``dtype``, the forward's coefficients as the reference makes them."""
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    x_prev, y = r(t, n, c).to(dtype), r(t, c).to(dtype)
    h_res, h_post = torch.softmax(r(t, n, n), -1), 2 * torch.sigmoid(r(t, n))
    phi, bias, alpha = r(n * c, m, scale=(n * c) ** -0.5), r(m, scale=0.1), r(3, scale=0.1).abs() + 0.01
    _, _, h_pre, _, _, p, sq = ref.step(x_prev.double(), h_res.double(), h_post.double(), y.double(), phi.double(),
                                        bias.double(), alpha.double(), n, n * c, 1e-6, 20, "mhc")
    grads = r(t, n, c).to(dtype), r(t, c).to(dtype), r(t, n, scale=0.1), r(t, n, n, scale=0.1)
    return (x_prev, h_res, h_post, y, phi, bias, alpha, h_pre.float(), p.float(), sq.float(), *grads)


@pytest.mark.parametrize("t, n, c, dtype", [(37, 4, 64, torch.bfloat16), (21, 3, 40, torch.float32),
                                              (9, 1, 32, torch.float32)])
def test_step_backward_writes_dx_prev_summed_over_the_streams(t, n, c, dtype):
    """collapse_dx (under fuse=True the head's acc, the next step's dx_prev): dx_prev summed over its n rows before
    rounding, against the float64 reference; every other output as without it (the three Triton passes here, the
    Gluon pass on an sm_90 GPU: benchmarks/gluon_step_bwd_check.py)."""
    from mhc_compile.kernels import triton_fused as tf

    args = _step_operands(t, n, c, dtype, seed=t + n)
    static = (n, n * c, 1e-6, 20, "mhc")
    got = tf.step_backward(*args, *static, collapse_dx=True)
    rows = tf.step_backward(*args, *static)
    want = ref.step_backward(*(v.double() for v in args), *static, collapse_dx=True)
    assert got[0].shape == (t, 1, c) and got[0].dtype == dtype
    assert rel_err(got[0].double(), want[0]) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    torch.testing.assert_close(want[0], ref.step_backward(*(v.double() for v in args), *static)[0].sum(1, keepdim=True))
    for a, b in zip(got[1:], rows[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="collapse_dx"):
        tf.step_backward(*args, *static, out=args[10].clone(), collapse_dx=True)


# --- the pass on a hand-built graph ------------------------------------------------------------------------------
B, S, N, C = 2, 3, 4, 16


def _graph(keepdim=True, dx_reader="sum", sum_dim=2):
    """row -> expand over the streams -> the head's proj_pre_backward -> sum of its dx over the streams."""
    g = torch.fx.Graph()
    row, phi, dp, dsq, h_pre, dout, acc = (g.placeholder(k) for k in ("row", "phi", "dp", "dsq", "h_pre", "dout",
                                                                       "acc"))
    x = g.call_function(aten.expand.default, (g.call_function(aten.unsqueeze.default, (row, -2)), [B, S, N, C]))
    op = g.call_function(OPS.proj_pre_backward.default, (x, phi, dp, dsq, h_pre, dout, acc, "reference"))
    dx, dphi = (g.call_function(operator.getitem, (op, i)) for i in range(2))
    outs = [dphi]
    if dx_reader == "sum":
        outs.append(g.call_function(aten.sum.dim_IntList, (dx, [sum_dim], keepdim)))
    else:  # a second reader of the n rows
        outs += [g.call_function(aten.sum.dim_IntList, (dx, [sum_dim], keepdim)),
                 g.call_function(aten.mul.Tensor, (dx, 2.0))]
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _inputs():
    g = torch.Generator().manual_seed(1)
    m = ref.num_coeffs(N)
    return [torch.randn(B, S, C, generator=g).double(), torch.randn(N * C, m, generator=g).double() * 0.1,
            torch.randn(B, S, m, generator=g).double(), torch.randn(B, S, generator=g).double() * 1e-2,
            torch.rand(B, S, N, generator=g).double(), torch.randn(B, S, C, generator=g).double(),
            torch.randn(B, S, N, C, generator=g).double()]


def _run_pass(gm, inputs):
    FakeTensorProp(gm).propagate(*inputs)  # the fake values Inductor's nodes carry
    rewritten = collapse_head_grad.apply(gm.graph)
    gm.recompile()
    return rewritten


@pytest.mark.parametrize("keepdim, sum_dim", [(True, 2), (False, 2), (True, -2)])
def test_the_head_gradient_is_written_summed_and_values_are_unchanged(keepdim, sum_dim):
    gm, inputs = _graph(keepdim=keepdim, sum_dim=sum_dim), _inputs()
    want = gm(*inputs)
    assert _run_pass(gm, inputs) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert OPS.proj_pre_backward_collapsed.default in targets and OPS.proj_pre_backward.default not in targets
    assert aten.sum.dim_IntList not in targets
    got = gm(*inputs)
    assert got[1].shape == want[1].shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _graph_from_post_res(acc_readers=1):
    """The head's post_res backward (its x the expand) -> its dx as the head op's acc -> the head op -> the sum."""
    g = torch.fx.Graph()
    row, h_res, h_post, y, dnext, phi, dp, dsq, h_pre, dout = (g.placeholder(k) for k in (
        "row", "h_res", "h_post", "y", "dnext", "phi", "dp", "dsq", "h_pre", "dout"))
    x = g.call_function(aten.expand.default, (g.call_function(aten.unsqueeze.default, (row, -2)), [B, S, N, C]))
    dnext = g.call_function(aten.mul.Tensor, (dnext, 1.0))  # a buffer of the graph's own, which inplace may take
    pr = g.call_function(OPS.post_res_backward_pre.default, (x, h_res, h_post, y, dnext, h_pre, "reference"))
    acc, *rest = (g.call_function(operator.getitem, (pr, i)) for i in range(5))
    op = g.call_function(OPS.proj_pre_backward.default, (x, phi, dp, dsq, h_pre, dout, acc, "reference"))
    dx, dphi = (g.call_function(operator.getitem, (op, i)) for i in range(2))
    return _module(g, [dphi, g.call_function(aten.sum.dim_IntList, (dx, [2], True)), *rest],
                   acc if acc_readers == 2 else None)


def _module(g, outs, read_again=None):
    """The graph's module returning ``outs``, and ``read_again`` times 2 where given (a second reader of it)."""
    if read_again is not None:
        outs.append(g.call_function(aten.mul.Tensor, (read_again, 2.0)))
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _post_res_inputs():
    g = torch.Generator().manual_seed(4)
    m = ref.num_coeffs(N)
    r = lambda *shape: torch.randn(*shape, generator=g).double()  # noqa: E731
    return [r(B, S, C), r(B, S, N, N).abs(), r(B, S, N).abs(), r(B, S, C), r(B, S, N, C), r(N * C, m) * 0.1,
            r(B, S, m), r(B, S) * 1e-2, r(B, S, N).abs(), r(B, S, C)]


def _collapses_acc(gm, inputs, target, index):
    """Run the pass on ``gm`` (one head), its values unchanged on ``inputs``: (whether the ``target`` node, the op
    writing the head op's acc, now takes collapse_dx = True at argument ``index``; the values before)."""
    want = gm(*inputs)
    assert _run_pass(gm, inputs) == 1
    (node,) = [n for n in gm.graph.nodes if n.target is target]
    for a, b in zip(gm(*inputs), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    return len(node.args) > index and node.args[index] is True, want


@pytest.mark.parametrize("acc_readers", [1, 2])
def test_the_post_res_backward_before_the_head_writes_its_dx_summed(acc_readers):
    """Its dx, read only by the head op as acc, is written summed (collapse_dx); with a second reader it stays n
    rows. Values unchanged either way."""
    gm, inputs = _graph_from_post_res(acc_readers), _post_res_inputs()
    collapsed, want = _collapses_acc(gm, inputs, OPS.post_res_backward_pre.default, 7)
    assert collapsed == (acc_readers == 1)
    inplace_stream_grads.apply(gm.graph)  # leaves the collapsed call alone (its dx is not the buffer's shape)
    gm.recompile()
    assert (OPS.post_res_backward_pre_into.default in [n.target for n in gm.graph.nodes]) == (not collapsed)
    for a, b in zip(gm(*inputs), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _graph_fused_head(dx_prev_readers=1):
    """Under fuse=True: the next step's step_backward -> its dx_prev, added to the head's enter_backward dx (x the
    expand) -> the sum over the streams."""
    g = torch.fx.Graph()
    names = ("row", "x_prev", "h_res", "h_post", "y", "phi", "bias", "alpha", "h_pre", "p", "sq", "dx", "dx_in",
             "dh_post", "dh_res", "h_pre0", "p0", "sq0", "dx_in0", "dh_post0", "dh_res0")
    (row, x_prev, h_res, h_post, y, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post, dh_res,
     h_pre0, p0, sq0, dx_in0, dh_post0, dh_res0) = (g.placeholder(k) for k in names)
    static = (N, N * C, 1e-6, 20, "mhc", "reference")
    step = g.call_function(OPS.step_backward.default, (x_prev, h_res, h_post, y, phi, bias, alpha, h_pre, p, sq, dx,
                                                        dx_in, dh_post, dh_res, *static))
    dx_prev, *rest = (g.call_function(operator.getitem, (step, i)) for i in range(7))
    x = g.call_function(aten.expand.default, (g.call_function(aten.unsqueeze.default, (row, -2)), [B, S, N, C]))
    op = g.call_function(OPS.enter_backward.default, (x, phi, bias, alpha, h_pre0, p0, sq0, dx_in0, dh_post0,
                                                      dh_res0, *static))
    dx0, *grads0 = (g.call_function(operator.getitem, (op, i)) for i in range(4))
    total = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.add.Tensor, (dx0, dx_prev)), [2], True))
    return _module(g, [total, *rest, *grads0], dx_prev if dx_prev_readers == 2 else None)


def _fused_head_inputs():
    """Float64 operands of ``_graph_fused_head``: the step's from ``_step_operands``, the head's alike."""
    g = torch.Generator().manual_seed(5)
    step = [v.double().reshape(B, S, *v.shape[1:]) if v.dim() and v.shape[0] == B * S else v.double()
            for v in _step_operands(B * S, N, C, torch.float64, seed=6)]
    head = [step[7] * 0.5, step[8] * 1.1, step[9] * 0.9]  # h_pre, p, sq
    head += [torch.randn(B, S, C, generator=g).double(), torch.randn(B, S, N, generator=g).double() * 0.1,
             torch.randn(B, S, N, N, generator=g).double() * 0.1]
    return [torch.randn(B, S, C, generator=g).double(), *step, *head]


@pytest.mark.parametrize("dx_prev_readers", [1, 2])
def test_under_fuse_the_next_step_backward_writes_its_dx_prev_summed(dx_prev_readers):
    """enter_backward_collapsed takes the next step's dx_prev as acc; that step_backward, read by nothing else, writes
    it summed (collapse_dx); with a second reader it stays n rows. Values unchanged either way."""
    gm, inputs = _graph_fused_head(dx_prev_readers), _fused_head_inputs()
    collapsed, want = _collapses_acc(gm, inputs, OPS.step_backward.default, 20)
    assert collapsed == (dx_prev_readers == 1)
    targets = [n.target for n in gm.graph.nodes]
    assert OPS.enter_backward_collapsed.default in targets and aten.add.Tensor not in targets
    inplace_stream_grads.apply(gm.graph)  # leaves a collapsed step alone (its dx_prev is not the buffer's shape)
    gm.recompile()
    for a, b in zip(gm(*inputs), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rows_with_another_reader_or_another_sum_are_left_alone():
    for gm in (_graph(dx_reader="two"), _graph(sum_dim=3)):
        assert _run_pass(gm, _inputs()) == 0
        assert OPS.proj_pre_backward.default in [n.target for n in gm.graph.nodes]


def test_a_dense_stream_is_left_alone():
    g = torch.fx.Graph()
    x, phi, dp, dsq, h_pre, dout, acc = (g.placeholder(k) for k in ("x", "phi", "dp", "dsq", "h_pre", "dout", "acc"))
    op = g.call_function(OPS.proj_pre_backward.default, (x, phi, dp, dsq, h_pre, dout, acc, "reference"))
    dx = g.call_function(operator.getitem, (op, 0))
    g.output((g.call_function(aten.sum.dim_IntList, (dx, [2], True)), g.call_function(operator.getitem, (op, 1))))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    inputs = _inputs()
    inputs[0] = torch.randn(B, S, N, C).double()
    assert _run_pass(gm, inputs) == 0


def test_the_inplace_pass_then_leaves_the_head_alone():
    gm, inputs = _graph(), _inputs()
    want = gm(*inputs)
    _run_pass(gm, inputs)
    inplace_stream_grads.apply(gm.graph)
    gm.recompile()
    assert OPS.proj_pre_backward_into.default not in [n.target for n in gm.graph.nodes]
    for a, b in zip(gm(*inputs), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels, dtype, tol", [("reference", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)])
@pytest.mark.parametrize("fuse", [False, True])
def test_a_compiled_model_trains_to_the_same_gradients_with_the_pass(monkeypatch, kernels, dtype, tol, fuse):
    """The head's gradient summed by the op (on) against the n rows summed after (off), in the default path and
    under fuse=True; the op ran once a step (one chain) with the pass on and not at all with it off (counted where it
    runs: a cached graph skips the pass)."""
    from mhc_compile.kernels import triton_fused

    name = "enter_backward_collapsed" if fuse else "proj_pre_backward_collapsed"
    module = {("reference", False): ref, ("triton", False): tk, ("reference", True): ref,
              ("triton", True): triton_fused}[kernels, fuse]
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a[0].shape) or real(*a))
    unfused = {"reference": ref, "triton": tk}[kernels]  # post_res's backward runs unfused on both paths
    summed, real_prb = [], unfused.post_res_backward_pre  # the head's post_res backward writing its dx summed
    monkeypatch.setattr(unfused, "post_res_backward_pre",
                        lambda *a, **k: summed.append(k.get("collapse_dx", False)) or real_prb(*a, **k))
    fused = {"reference": ref, "triton": triton_fused}[kernels]  # under fuse=True the head's acc: the next step's
    steps, real_step = [], fused.step_backward  # dx_prev, written summed too
    heads = []  # whether that call's X_prev, the embedding, reached the kernels broadcast (not made dense)
    monkeypatch.setattr(fused, "step_backward", lambda *a, **k: steps.append(k.get("collapse_dx", False))
                        or (k.get("collapse_dx") and heads.append(is_broadcast(a[0]))) or real_step(*a, **k))
    on = compiled_nanogpt_grads({"kernels": kernels, "fuse": fuse}, dtype)
    assert len(calls) == 1
    assert summed.count(True) == (0 if fuse else 1) and steps.count(True) == (1 if fuse else 0)
    assert heads == ([True] if fuse else [])
    off = compiled_nanogpt_grads({"kernels": kernels, "fuse": fuse, "collapse_head_grad": False}, dtype)
    assert len(calls) == 1 and summed.count(True) == (0 if fuse else 1) and steps.count(True) == (1 if fuse else 0)
    assert on.keys() == off.keys() and len(on) > 0
    for k in on:
        assert rel_err(on[k], off[k]) < tol, k
