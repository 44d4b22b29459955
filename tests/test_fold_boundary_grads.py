"""passes/fold_boundary_grads.py and its op: a site's proj_pre_backward and the post_res backward it feeds as one op.

The op against the reference (float64: the reference is the two ops' composition without the rounding between
them; the Triton path under the interpreter runs the two Triton kernels, as off sm_90), its in-place twin, and end to
end a compiled model's gradients with the pass on and off. The one-pass Gluon kernel (sm_90) is built for sm_90a in
tests/test_gluon_step_bwd.py and checked on a GPU by benchmarks/gluon_step_bwd_check.py --boundary.
"""

from __future__ import annotations

import pytest
import torch

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tk
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)
from models import compiled_nanogpt_grads, rel_err

OPS = torch.ops.mhc_compile


def _operands(t, n, c, dtype, pre, acc, seed):
    """A boundary's operands: X_l and X_prev, dout (site l+1's dx_in), acc and y in the stream dtype; fp32 phi, dp,
    dsq and coefficients; h_pre_prev when ``pre`` (post_res_backward_pre's x_in)."""
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)

    def r(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return (r(t, n, c, dtype=dtype), r(n * c, m, scale=(n * c) ** -0.5), r(t, m), r(t, scale=1e-2),
            torch.rand(t, n, generator=g), r(t, c, dtype=dtype), r(t, n, c, dtype=dtype) if acc else None,
            r(t, n, c, dtype=dtype), ref.sinkhorn(r(t, n, n), 20), 2 * torch.rand(t, n, generator=g),
            r(t, c, dtype=dtype), torch.rand(t, n, generator=g) if pre else None)


def _double(args):
    return tuple(v if v is None else v.double() for v in args)


@pytest.mark.parametrize("pre", [True, False])
@pytest.mark.parametrize("acc", [True, False])
def test_the_reference_is_the_two_ops_without_the_rounding_between(pre, acc):
    args = _double(_operands(9, 3, 16, torch.float32, pre, acc, seed=1))
    x, phi, dp, dsq, h_pre, dout, a, x_prev, h_res, h_post, y, h_pre_prev = args
    dx_prev, dh_res, dh_post, dy, x_in, dphi = ref.boundary_backward(*args)
    g, want_dphi = ref.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, a)  # float64: its rounding is exact
    want = ref.post_res_backward(x_prev, h_res, h_post, y, g)
    for got, w in zip((dx_prev, dh_res, dh_post, dy, dphi), want + (want_dphi,)):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    if pre:
        torch.testing.assert_close(x_in, ref.pre(x_prev, h_pre_prev), rtol=1e-12, atol=1e-12)
    else:
        assert x_in.shape == (9, 0)


@pytest.mark.parametrize("t, n, c, dtype, pre, acc", [
    (37, 4, 128, torch.bfloat16, True, True),   # the default path's boundary: bf16's one-pass proj backward
    (37, 4, 128, torch.bfloat16, False, True),  # recompute="none": post_res_backward without x_in
    (13, 3, 33, torch.float32, True, True),     # a ragged C, the dx + dphi kernel pair
    (9, 1, 16, torch.float32, True, False),     # one stream, no acc
    (5, 2, 48, torch.bfloat16, True, True),
])
def test_the_triton_op_matches_the_reference(t, n, c, dtype, pre, acc):
    args = _operands(t, n, c, dtype, pre, acc, seed=t + n + c)
    got = tk.boundary_backward(*args)
    want = ref.boundary_backward(*_double(args))
    assert [v.dtype for v in got] == [dtype, torch.float32, torch.float32, dtype, dtype, torch.float32]
    assert got[4].shape == ((t, c) if pre else (t, 0))
    budget = 3e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: the two kernels round G to bf16 between them
    for name, a, w in zip(("dx_prev", "dh_res", "dh_post", "dy", "x_in", "dphi"), got, want):
        if a.numel():
            assert rel_err(a.double(), w) < budget, name


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_the_in_place_twin_writes_dx_prev_over_acc(impl):
    args = _operands(11, 4, 64, torch.float32, True, True, seed=3)
    want = OPS.boundary_backward(*args, impl)
    acc = args[6].clone()
    rest = OPS.boundary_backward_into(*args[:6], acc, *args[7:], impl)
    assert torch.equal(acc, want[0])
    for a, b in zip(rest, want[1:]):
        assert torch.equal(a, b)


def test_leading_token_dims_pass_through():
    args = _operands(12, 4, 32, torch.float32, True, True, seed=5)
    lead = tuple(v if v is None or v.dim() == 2 and v.shape[0] == 4 * 32 else v.reshape(3, 4, *v.shape[1:])
                 for v in args)
    got = OPS.boundary_backward(*lead, "triton")
    want = OPS.boundary_backward(*args, "triton")
    for a, b in zip(got[:5], want[:5]):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=0, atol=0)
    assert got[0].shape == (3, 4, 4, 32) and got[4].shape == (3, 4, 32)
    torch.testing.assert_close(got[5], want[5], rtol=0, atol=0)
    ref_got = OPS.boundary_backward(*lead, "reference")
    assert [tuple(v.shape) for v in ref_got] == [tuple(v.shape) for v in got]


def test_the_fallback_reads_acc_before_it_writes_over_it():
    """out=acc on the two-kernel path (off sm_90): proj_pre_backward writes G over acc, then the post_res backward
    reads G and writes dx_prev over it; the same values as a new buffer."""
    args = _operands(10, 4, 64, torch.bfloat16, True, True, seed=7)
    want = tk.boundary_backward(*args)
    acc = args[6].clone()
    got = tk.boundary_backward(*args[:6], acc, *args[7:], out=acc)
    assert got[0].data_ptr() == acc.data_ptr()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels, dtype, tol", [("reference", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)])
def test_a_compiled_model_trains_to_the_same_gradients_with_the_pass(monkeypatch, kernels, dtype, tol):
    """Two layers, four sites: three boundaries, of which the head's (its post_res backward writes the head's
    gradient summed, collapse_head_grad) is left to its own kernels, so the op runs twice a step, each time with x_in
    (recompute's sublayer input) and, on the Triton path, in place over acc; not at all with the pass off (counted
    where it runs: a cached graph skips the pass)."""
    module = {"reference": ref, "triton": tk}[kernels]
    calls, real = [], module.boundary_backward
    monkeypatch.setattr(module, "boundary_backward",
                        lambda *a, **k: calls.append((a[-1] is not None, "out" in k)) or real(*a, **k))
    on = compiled_nanogpt_grads({"kernels": kernels}, dtype)  # on by default since session 41
    assert calls == [(True, kernels == "triton")] * 2
    off = compiled_nanogpt_grads({"kernels": kernels, "fold_boundary_grads": False}, dtype)
    assert len(calls) == 2
    assert on.keys() == off.keys() and len(on) > 0
    for k in on:
        assert rel_err(on[k], off[k]) < tol, k


@pytest.mark.parametrize("options, folds, x_in", [
    ({"recompute": "none"}, 2, False),       # nothing recomputed: post_res_backward, no sublayer input to write
    ({"collapse_head_grad": False}, 3, True),  # the head's post_res backward writes n rows: its boundary folds too
])
def test_other_configurations_fold_what_they_can(monkeypatch, options, folds, x_in):
    calls, real = [], ref.boundary_backward
    monkeypatch.setattr(ref, "boundary_backward", lambda *a, **k: calls.append(a[-1] is not None) or real(*a, **k))
    on = compiled_nanogpt_grads({"kernels": "reference", **options}, torch.float64)
    assert calls == [x_in] * folds
    off = compiled_nanogpt_grads({"kernels": "reference", "fold_boundary_grads": False, **options}, torch.float64)
    assert on.keys() == off.keys() and len(on) > 0
    for k in on:
        assert rel_err(on[k], off[k]) < 1e-10, k


# --- the pass on hand-built graphs --------------------------------------------------------------------------------
def _boundary_graph(recompute_between: bool, dphi_read_early: bool = False):
    """A GraphModule in the shape of a backward graph's boundary: proj_pre_backward (site l + 1), then the post_res
    backward of site l reading its dx; with ``recompute_between`` the stream that backward reads is made between the
    two (a block's recompute), so the folded op can only stand where the post_res backward stood."""
    import operator

    from torch import fx

    g = fx.Graph()
    names = ("x", "phi", "dp", "dsq", "h_pre", "dout", "acc", "x_prev", "h_res", "h_post", "y", "h_pre_prev")
    ph = {k: g.placeholder(k) for k in names}
    pre = g.call_function(OPS.proj_pre_backward.default, tuple(ph[k] for k in names[:7]) + ("reference",))
    dx, dphi = (g.call_function(operator.getitem, (pre, i)) for i in (0, 1))
    early = g.call_function(torch.ops.aten.mul.Tensor, (dphi, 2.0)) if dphi_read_early else None
    x_prev = g.call_function(torch.ops.aten.mul.Tensor, (ph["x_prev"], 1.0)) if recompute_between else ph["x_prev"]
    res = g.call_function(OPS.post_res_backward_pre.default, (x_prev, ph["h_res"], ph["h_post"], ph["y"], dx,
                                                               ph["h_pre_prev"], "reference"))
    outs = [g.call_function(operator.getitem, (res, i)) for i in range(5)]
    g.output((*outs, early if early is not None else dphi))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("recompute_between", [False, True])
def test_the_pass_folds_the_pair_where_its_inputs_are_defined(recompute_between):
    from mhc_compile.passes import fold_boundary_grads

    gm = _boundary_graph(recompute_between)
    args = _double(_operands(7, 4, 16, torch.float32, True, True, seed=11))
    want = gm(*args)
    assert fold_boundary_grads.apply(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes]
    assert OPS.boundary_backward.default in targets and OPS.proj_pre_backward.default not in targets
    assert OPS.post_res_backward_pre.default not in targets
    if recompute_between:  # after the recomputed stream, not before it
        order = {n.target: i for i, n in enumerate(gm.graph.nodes)}
        assert order[OPS.boundary_backward.default] > order[torch.ops.aten.mul.Tensor]
    for a, b in zip(gm(*args), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_pass_leaves_a_pair_it_cannot_place_alone():
    """The stream is made between the two ops and proj_pre_backward's dphi is read before it: the op fits neither
    place, so the graph stays as it was."""
    from mhc_compile.passes import fold_boundary_grads

    gm = _boundary_graph(recompute_between=True, dphi_read_early=True)
    before = [n.target for n in gm.graph.nodes]
    assert fold_boundary_grads.apply(gm.graph) == 0
    assert [n.target for n in gm.graph.nodes] == before


@pytest.mark.parametrize("pre", [True, False])
def test_the_one_pass_route_hands_its_kernel_token_major_operands(monkeypatch, pre):
    """The sm_90 route (``gluon_step_bwd.boundary_grads``, faked here by the reference on what it is handed): operands
    with leading token dims reach it as [T, ...], its outputs come back with those dims, dx_prev into ``out``; the
    config's launch fields reach it too (BoundaryBwdCfg's walk cap and pacing)."""
    from mhc_compile.kernels import gluon_step_bwd as gs
    from mhc_compile.kernels import triton_boundary as tb

    launch = {}

    def fake(x, x_prev, h_res, h_post, y, phi, h_pre, dp, dsq, acc, dx_in, h_pre_prev=None, out=None, **kw):
        launch.update(kw)
        assert x.dim() == 3 and dx_in.dim() == 2 and dsq.dim() == 1
        dx_prev, dh_res, dh_post, dy, x_in, dphi = ref.boundary_backward(x, phi, dp, dsq, h_pre, dx_in, acc, x_prev,
                                                                         h_res, h_post, y, h_pre_prev)
        if out is not None:
            out.copy_(dx_prev)
        return dx_prev if out is None else out, dh_res, dh_post, dy, dphi, x_in if h_pre_prev is not None else None

    monkeypatch.setattr(tb, "_gluon_runs", lambda *a: True)
    monkeypatch.setattr(gs, "boundary_grads", fake)
    args = _operands(12, 4, 32, torch.float32, pre, True, seed=13)
    lead = tuple(v if v is None or v.dim() == 2 and v.shape[0] == 4 * 32 else v.reshape(3, 4, *v.shape[1:])
                 for v in args)
    want = ref.boundary_backward(*args)
    acc = lead[6].clone()
    got = tb.boundary_backward(*lead[:6], acc, *lead[7:], out=acc)
    assert got[0] is acc and got[0].shape == (3, 4, 4, 32) and got[4].shape == (3, 4, 32 if pre else 0)
    for a, w in zip(got[:5], want[:5]):
        torch.testing.assert_close(a, w.reshape(a.shape), rtol=0, atol=0)
    torch.testing.assert_close(got[5], want[5], rtol=0, atol=0)
    assert (launch["walk_tiles"], launch["long_walk"], launch["dh_atomic"], launch["pace"], launch["pace_waves"]) == (
        64, 128, True, 3, 64)
