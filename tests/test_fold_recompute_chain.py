"""passes/fold_recompute_chain.py and its op, ``post_res_chain``: a recompute block's streams rebuilt by one kernel
from one read of the block's input, each X' kept in registers as the next step's X.

The op against k post_res calls: the Triton kernel bit for bit (odd shapes, n = 1 to 5, a broadcast first stream,
bf16 / fp16 / fp32 / fp64, chains longer than one launch takes), the reference in float64; the pass on hand-built
graphs (what it folds and what it leaves alone); and end to end, a compiled model's output and gradients with the
pass on and off."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import mhc_compile
from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tk
from mhc_compile.kernels import triton_post_res
from mhc_compile.passes import fold_recompute_chain
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)
from models import NanoGPT, perturb_mhc, rel_err

OPS = torch.ops.mhc_compile


def _operands(t, n, c, k, dtype, broadcast=False, seed=0):
    """A first stream and k steps' (h_res, h_post, y): fp32 coefficients beside any lower stream dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, c, generator=g)
    if broadcast:  # a chain head's stream: the embedding expanded over the streams
        x = x[:, :1].contiguous().expand(t, n, c)
    coef = torch.float64 if dtype == torch.float64 else torch.float32
    h_res, h_post, y = [], [], []
    for _ in range(k):
        hr = torch.rand(t, n, n, generator=g)
        h_res.append((hr / hr.sum(-1, keepdim=True)).to(coef))
        h_post.append((2 * torch.rand(t, n, generator=g)).to(coef))
        y.append(torch.randn(t, c, generator=g).to(dtype))
    return x.to(dtype), h_res, h_post, y


def test_the_reference_is_post_res_applied_k_times():
    x, h_res, h_post, y = _operands(9, 4, 7, 3, torch.float64)
    want, cur = [], x
    for hr, hp, yk in zip(h_res, h_post, y):
        cur = ref.post_res(cur, hr, hp, yk)
        want.append(cur)
    got = ref.post_res_chain(x, h_res, h_post, y)
    assert len(got) == 3
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("t, n, c, k, dtype, broadcast", [
    (37, 4, 33, 3, torch.float32, False), (5, 1, 16, 2, torch.float32, False), (19, 3, 40, 5, torch.float32, True),
    (64, 4, 96, 6, torch.bfloat16, False), (20, 5, 24, 4, torch.bfloat16, True), (3, 2, 8, 1, torch.float64, False),
    (17, 4, 48, 9, torch.float16, False)])
def test_the_triton_op_is_k_post_res_calls_bit_for_bit(t, n, c, k, dtype, broadcast):
    """Each step's X' as the separate kernel writes it (k > CHAIN_STEPS: several launches, each reading the last X'
    the one before wrote), and within rounding of the float64 composition."""
    x, h_res, h_post, y = _operands(t, n, c, k, dtype, broadcast, seed=t + n + k)
    got = tk.post_res_chain(x, h_res, h_post, y)
    assert len(got) == k
    cur, exact = x, x.double()
    for step, (a, hr, hp, yk) in enumerate(zip(got, h_res, h_post, y)):
        cur = tk.post_res(cur, hr, hp, yk)
        exact = ref.post_res(exact, hr.double(), hp.double(), yk.double())
        assert a.shape == (t, n, c) and a.dtype == dtype and a.is_contiguous()
        assert torch.equal(_bits(a), _bits(cur)), f"step {step}"
        tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        assert rel_err(a.double(), exact) < tol, f"step {step}"


def _bits(v):
    return v.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_signed_zeros_pass_from_step_to_step(dtype):
    """A zero stream and a -0.0 sublayer output make every X' -0.0 (h_post y = -0.0, and h x + -0.0 = -0.0 for
    x = -0.0). A step that picked X_j out of the register tile by a float sum from +0.0 turned -0.0 into +0.0
    there, and its X' into +0.0 where post_res writes -0.0: the chain compares bits here, not values."""
    t, n, c, k = 9, 4, 16, 3
    x, h_res, h_post, _ = _operands(t, n, c, k, dtype)
    x = torch.full_like(x, -0.0)
    y = [torch.full((t, c), -0.0, dtype=dtype) for _ in range(k)]
    got = tk.post_res_chain(x, h_res, h_post, y)
    cur = x
    for step, (a, hr, hp, yk) in enumerate(zip(got, h_res, h_post, y)):
        cur = tk.post_res(cur, hr, hp, yk)
        assert torch.signbit(cur).all(), f"step {step}: post_res writes -0.0 here"
        assert torch.equal(_bits(a), _bits(cur)), f"step {step}"


def test_leading_token_dims_empty_tokens_and_bad_lists():
    x, h_res, h_post, y = _operands(12, 4, 16, 2, torch.float32)
    got = tk.post_res_chain(x.reshape(3, 4, 4, 16), [h.reshape(3, 4, 4, 4) for h in h_res],
                            [h.reshape(3, 4, 4) for h in h_post], [v.reshape(3, 4, 16) for v in y])
    for a, w in zip(got, tk.post_res_chain(x, h_res, h_post, y)):
        assert a.shape == (3, 4, 4, 16)
        torch.testing.assert_close(a.reshape(12, 4, 16), w, rtol=0, atol=0)
    empty = tk.post_res_chain(x[:0], [h[:0] for h in h_res], [h[:0] for h in h_post], [v[:0] for v in y])
    assert [e.shape for e in empty] == [(0, 4, 16)] * 2
    with pytest.raises(ValueError, match="post_res_chain: 2 h_res, 1 h_post and 2 y"):
        tk.post_res_chain(x, h_res, h_post[:1], y)
    with pytest.raises(ValueError, match="post_res_chain: 0 h_res"):
        OPS.post_res_chain(x, [], [], [], "reference")


def test_one_launch_takes_at_most_chain_steps(monkeypatch):
    """Nine steps: three launches of 4, 4 and 1 steps (K), the second and third reading the X' before them."""
    seen = []
    real = triton_post_res.launch
    monkeypatch.setattr(triton_post_res, "launch",
                        lambda kernel, grid, args, meta, **kw: seen.append((args[0], meta["K"]))
                        or real(kernel, grid, args, meta, **kw))
    x, h_res, h_post, y = _operands(8, 4, 16, 9, torch.float32)
    got = tk.post_res_chain(x, h_res, h_post, y)
    assert [k for _, k in seen] == [4, 4, 1]
    assert seen[0][0] is x and seen[1][0] is got[3] and seen[2][0] is got[7]


# --- the pass on hand-built graphs ---------------------------------------------------------------------------------
N, C, T = 4, 16, 6


def _graph(k=3, impls=None, forward_at=None, branch=False):
    """A backward-like graph: X_0 and every step's coefficients and y are inputs, post_res k times, each X read by a
    later op too. ``forward_at=s``: step s's y computed from the stream before it (a forward graph's shape);
    ``branch``: X_1 taken as the stream of a second post_res too."""
    g = torch.fx.Graph()
    cur = g.placeholder("x0")
    steps = [tuple(g.placeholder(f"{name}{s}") for name in ("h_res", "h_post", "y")) for s in range(k)]
    streams = []
    for s, (hr, hp, y) in enumerate(steps):
        if s == forward_at:
            y = g.call_function(torch.ops.aten.sum.dim_IntList, (cur, [-2]))
        cur = g.call_function(OPS.post_res.default, (cur, hr, hp, y, (impls or ["reference"] * k)[s]))
        streams.append(cur)
    outs = [g.call_function(torch.ops.aten.mul.Tensor, (s, 2.0)) for s in streams]
    if branch:
        outs.append(g.call_function(OPS.post_res.default, (streams[0], *steps[0], "reference")))
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _inputs(k=3):
    x, h_res, h_post, y = _operands(T, N, C, k, torch.float64, seed=3)
    return [x] + [v for step in zip(h_res, h_post, y) for v in step]


def _run_pass(gm, inputs):
    FakeTensorProp(gm).propagate(*inputs)
    folded = fold_recompute_chain.apply(gm.graph)
    gm.recompile()
    return folded


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_run_of_post_res_becomes_one_chain_with_the_same_values():
    gm, inputs = _graph(k=3), _inputs(3)
    want = gm(*inputs)
    assert _run_pass(gm, inputs) == 3
    targets = _targets(gm)
    assert targets.count(OPS.post_res_chain.default) == 1 and OPS.post_res.default not in targets
    chain = next(n for n in gm.graph.nodes if n.target is OPS.post_res_chain.default)
    assert [type(v) for v in chain.meta["val"]] and len(chain.meta["val"]) == 3
    getitems = [u for u in chain.users if u.target is operator.getitem]
    assert sorted(u.args[1] for u in getitems) == [0, 1, 2]
    got = gm(*inputs)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("case, folded", [(dict(k=2, forward_at=1), 0), (dict(forward_at=2), 2),
                                          (dict(forward_at=1), 2), (dict(impls=["reference", "triton", "triton"]), 2),
                                          (dict(branch=True), 2)])
def test_what_cannot_stand_at_the_run_s_start_is_left_alone(case, folded):
    """A step whose y is made from the stream before it (a forward graph) ends the run before it (and may start
    one); so does another kernel implementation; a stream that two post_res take links no run; a single post_res
    is never a chain."""
    gm, inputs = _graph(**case), _inputs(case.get("k", 3))
    want = gm(*inputs)
    assert _run_pass(gm, inputs) == folded
    assert _targets(gm).count(OPS.post_res_chain.default) == (1 if folded else 0)
    for a, w in zip(gm(*inputs), want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


# --- end to end ---------------------------------------------------------------------------------------------------
def _run(options, dtype):
    torch.manual_seed(0)
    model = NanoGPT(d=32, layers=2).to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    mhc_compile.prepare(model, idx, n=4)
    perturb_mhc(model)
    # one recompute block of the four sites: its backward rebuilds X_1..X_3 from the broadcast embedding
    compiled = torch.compile(model, backend="mhc", options={"n": 4, "recompute": 4, **options})
    out = compiled(idx)
    out.float().sum().backward()
    return out.detach().double(), {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels, dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_a_compiled_model_gives_the_same_output_and_gradients_with_the_pass(monkeypatch, kernels, dtype):
    """The block's three rebuilt streams made by one chain (on) against three post_res calls (off): the same output
    and gradients, bit for bit."""
    module = {"reference": ops._REFERENCE_OPS, "triton": tk}[kernels]
    calls, real = [], module.post_res_chain
    monkeypatch.setattr(module, "post_res_chain", lambda x, *a: calls.append(len(a[2])) or real(x, *a))
    out_on, on = _run({"kernels": kernels, "fold_recompute_chain": True}, dtype)
    assert calls == [3]
    out_off, off = _run({"kernels": kernels, "fold_recompute_chain": False}, dtype)
    assert calls == [3]
    assert torch.equal(out_on, out_off)
    assert on.keys() == off.keys() and len(on) > 0
    for k in on:
        assert torch.equal(on[k], off[k]), k
