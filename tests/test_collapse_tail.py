"""passes/collapse_tail.py and its op, ``post_res_collapse``: a chain's last post_res and the collapse after it as
one kernel that never writes the n streams.

The op against post_res followed by the mean (or sum) in float64, for the reference and the Triton kernel (odd
shapes, n = 1 to 5, a broadcast stream, bf16 / fp32); the pass on hand-built forward graphs; and end to end, a
compiled model's output and gradients with the pass on and off."""

from __future__ import annotations

import pytest
import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import mhc_compile
from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tk
from mhc_compile.passes import collapse_tail
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)
from models import NanoGPT, perturb_mhc, rel_err

OPS = torch.ops.mhc_compile
aten = torch.ops.aten


def _operands(t, n, c, dtype, broadcast=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, c, generator=g)
    if broadcast:  # a chain of one site: its tail is its head, the embedding expanded over the streams
        x = x[:, :1].contiguous().expand(t, n, c)
    h_res = torch.rand(t, n, n, generator=g)
    h_res = h_res / h_res.sum(-1, keepdim=True)
    h_post = 2 * torch.rand(t, n, generator=g)
    coef = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 coefficients beside any lower stream
    return x.to(dtype), h_res.to(coef), h_post.to(coef), torch.randn(t, c, generator=g).to(dtype)


def _want(x, h_res, h_post, y, mean):
    """post_res's n streams, unrounded, collapsed: the composition the op stands for."""
    d = torch.float64
    streams = torch.einsum("tij,tjc->tic", h_res.to(d), x.to(d)) + h_post.to(d)[:, :, None] * y.to(d)[:, None, :]
    return streams.mean(-2) if mean else streams.sum(-2)


@pytest.mark.parametrize("mean", [True, False])
def test_the_reference_is_post_res_then_the_collapse(mean):
    x, h_res, h_post, y = _operands(9, 4, 7, torch.float64)
    streams = ref.post_res(x, h_res, h_post, y)
    want = streams.mean(-2) if mean else streams.sum(-2)
    torch.testing.assert_close(ref.post_res_collapse(x, h_res, h_post, y, mean), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("t, n, c, dtype, broadcast", [
    (37, 4, 33, torch.float32, False), (5, 1, 16, torch.float32, False), (19, 3, 40, torch.float32, True),
    (64, 4, 96, torch.bfloat16, False), (20, 5, 24, torch.bfloat16, True), (3, 2, 8, torch.float64, False)])
@pytest.mark.parametrize("mean", [True, False])
def test_the_triton_op_matches_the_reference(t, n, c, dtype, broadcast, mean):
    x, h_res, h_post, y = _operands(t, n, c, dtype, broadcast, seed=t + n)
    got = tk.post_res_collapse(x, h_res, h_post, y, mean)
    assert got.shape == (t, c) and got.dtype == dtype and got.is_contiguous()
    tol = {torch.bfloat16: 8e-3, torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    assert rel_err(got.double(), _want(x, h_res, h_post, y, mean)) < tol


def test_leading_token_dims_and_empty_tokens():
    x, h_res, h_post, y = _operands(12, 4, 16, torch.float32)
    got = tk.post_res_collapse(x.reshape(3, 4, 4, 16), h_res.reshape(3, 4, 4, 4), h_post.reshape(3, 4, 4),
                               y.reshape(3, 4, 16), True)
    torch.testing.assert_close(got.reshape(12, 16), tk.post_res_collapse(x, h_res, h_post, y, True))
    assert tk.post_res_collapse(x[:0], h_res[:0], h_post[:0], y[:0], True).shape == (0, 16)


# --- the pass on a hand-built forward graph ------------------------------------------------------------------------
B, S, N, C = 2, 3, 4, 16


def _graph(collapse=aten.mean.dim, dim=-2, keepdim=False, readers=1, dtype=None):
    """x -> post_res -> a collapse over the streams (and, readers=2, a second reader of the streams)."""
    g = torch.fx.Graph()
    x, h_res, h_post, y = (g.placeholder(k) for k in ("x", "h_res", "h_post", "y"))
    streams = g.call_function(OPS.post_res.default, (x, h_res, h_post, y, "reference"))
    kwargs = {} if dtype is None else {"dtype": dtype}
    outs = [g.call_function(collapse, (streams, [dim], keepdim), kwargs)]
    if readers == 2:
        outs.append(g.call_function(aten.mul.Tensor, (streams, 2.0)))
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _inputs():
    x, h_res, h_post, y = _operands(B * S, N, C, torch.float64, seed=5)
    return [x.reshape(B, S, N, C), h_res.reshape(B, S, N, N), h_post.reshape(B, S, N), y.reshape(B, S, C)]


def _run_pass(gm, inputs):
    FakeTensorProp(gm).propagate(*inputs)  # the fake values Inductor's nodes carry
    rewritten = collapse_tail.apply(gm.graph)
    gm.recompile()
    return rewritten


@pytest.mark.parametrize("collapse, dim, keepdim", [(aten.mean.dim, -2, False), (aten.mean.dim, 2, True),
                                                    (aten.sum.dim_IntList, -2, False)])
def test_the_tail_is_collapsed_in_one_op_and_values_are_unchanged(collapse, dim, keepdim):
    gm, inputs = _graph(collapse, dim, keepdim), _inputs()
    want = gm(*inputs)
    assert _run_pass(gm, inputs) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert OPS.post_res_collapse.default in targets
    assert OPS.post_res.default not in targets and collapse not in targets
    got = gm(*inputs)
    assert got[0].shape == want[0].shape
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [dict(readers=2), dict(dim=-1), dict(dim=1), dict(dtype=torch.float64)])
def test_streams_with_another_reader_or_another_reduction_are_left_alone(case):
    gm = _graph(**case)
    assert _run_pass(gm, _inputs()) == 0
    assert OPS.post_res.default in [n.target for n in gm.graph.nodes]


# --- end to end ---------------------------------------------------------------------------------------------------
def _run(options, dtype):
    torch.manual_seed(0)
    model = NanoGPT(d=32, layers=2).to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    mhc_compile.prepare(model, idx, n=4, **({"collapse": options["collapse"]} if "collapse" in options else {}))
    perturb_mhc(model)  # mixing away from its identity-like init
    compiled = torch.compile(model, backend="mhc", options={"n": 4, **options})
    out = compiled(idx)
    out.float().sum().backward()
    return out.detach().double(), {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels, dtype, tol", [("reference", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)])
@pytest.mark.parametrize("fuse", [False, True])
def test_a_compiled_model_gives_the_same_output_and_gradients_with_the_pass(monkeypatch, kernels, dtype, tol, fuse):
    """The tail collapsed by the op (on) against post_res and the mean (off), default path and fuse=True; the op ran
    once a step (one chain) with the pass on and not at all with it off (counted where it runs: a cached graph skips
    the pass)."""
    module = {"reference": ref, "triton": tk}[kernels]
    calls, real = [], module.post_res_collapse
    monkeypatch.setattr(module, "post_res_collapse", lambda *a: calls.append(a[0].shape) or real(*a))
    out_on, on = _run({"kernels": kernels, "fuse": fuse}, dtype)
    assert len(calls) == 1
    out_off, off = _run({"kernels": kernels, "fuse": fuse, "collapse_tail": False}, dtype)
    assert len(calls) == 1
    assert rel_err(out_on, out_off) < tol
    assert on.keys() == off.keys() and len(on) > 0
    for k in on:
        assert rel_err(on[k], off[k]) < tol, k


def test_a_sum_collapse_is_collapsed_too(monkeypatch):
    """collapse="sum": the tail's sum over the streams becomes post_res_collapse(mean=False); same output and
    gradients as post_res and the sum (float64 reference kernels)."""
    calls, real = [], ref.post_res_collapse
    monkeypatch.setattr(ref, "post_res_collapse", lambda *a: calls.append(a[4]) or real(*a))
    out_on, on = _run({"kernels": "reference", "collapse": "sum"}, torch.float64)
    assert calls == [False]
    out_off, off = _run({"kernels": "reference", "collapse": "sum", "collapse_tail": False}, torch.float64)
    assert calls == [False] and rel_err(out_on, out_off) < 1e-10
    for k in on:
        assert rel_err(on[k], off[k]) < 1e-10, k
