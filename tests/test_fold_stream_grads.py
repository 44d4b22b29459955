"""passes/fold_stream_grads.py: a site's backward writes the stream gradient once.

The backward graph comes from AOTAutograd (aot_function) over one site built from the mHC ops, the
pass runs on it as Inductor would run it, and the gradients are compared with the same graph unpassed.
"""

from __future__ import annotations

import operator

import pytest
import torch
from functorch.compile import aot_function, make_boxed_func

from mhc_compile.kernels import reference as ref
from mhc_compile.passes import fold_stream_grads
from mhc_compile.runtime import ops

OPS = torch.ops.mhc_compile


def _site(impl: str, extra_reader: bool):
    """One mHC site: X -> proj, coeffs, pre -> f -> post_res, as the rewrite emits it."""

    def run(x, phi, bias, alpha, w):
        n, c = x.shape[-2:]
        p, sq = ops.proj(x, phi, impl)
        h_pre, h_post, h_res = ops.coeffs(p, sq, bias, alpha, n, n * c, 1e-6, 5, "mhc", impl)
        y = torch.tanh(ops.pre(x, h_pre, impl) @ w)
        out = ops.post_res(x, h_res, h_post, y, impl)
        if extra_reader:  # a fourth reader of X: its gradient joins the sum too
            out = out + x.sin()
        return (out.square().sum(),)

    return run


def _inputs(dtype, t=5, n=3, c=7):
    g = torch.Generator().manual_seed(0)
    m = ref.num_coeffs(n)
    acc = ref.acc_dtype(dtype)
    return [torch.randn(2, t, n, c, generator=g, dtype=dtype).requires_grad_(),
            (0.1 * torch.randn(n * c, m, generator=g)).to(acc).requires_grad_(),
            torch.randn(m, generator=g).to(acc).requires_grad_(),
            (0.1 + torch.rand(3, generator=g)).to(acc).requires_grad_(),
            (torch.randn(c, c, generator=g) / c**0.5).to(dtype).requires_grad_()]


def _grads(fn, inputs, fold: bool):
    seen = {}

    def bw(gm, _):
        seen["before"] = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        if fold:
            seen["folded"] = fold_stream_grads.apply(gm.graph)
            gm.recompile()
        seen["after"] = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        return make_boxed_func(gm.forward)

    args = [a.detach().clone().requires_grad_() for a in inputs]
    (loss,) = aot_function(fn, fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw)(*args)
    loss.backward()
    return [a.grad for a in args], seen


@pytest.mark.parametrize("impl,dtype", [("reference", torch.float64), ("triton", torch.float64),
                                        ("triton", torch.float32)])
@pytest.mark.parametrize("extra_reader", [False, True], ids=["3 readers", "4 readers"])
def test_folded_backward_matches_the_separate_ops(impl, dtype, extra_reader):
    fn, inputs = _site(impl, extra_reader), _inputs(dtype)
    want, plain = _grads(fn, inputs, fold=False)
    got, folded = _grads(fn, inputs, fold=True)
    assert OPS.pre_backward.default in plain["before"] and OPS.proj_backward.default in plain["before"]
    assert folded["folded"] == 1
    assert OPS.proj_pre_backward.default in folded["after"] and OPS.pre_backward_dh.default in folded["after"]
    assert OPS.pre_backward.default not in folded["after"] and OPS.proj_backward.default not in folded["after"]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_a_partial_gradient_read_twice_is_left_alone():
    """If dX_pre had another reader, folding it away would change that reader: no match, no change."""
    graph = torch.fx.Graph()
    x, h, d, phi, dp, dsq, other = (graph.placeholder(k) for k in ("x", "h", "d", "phi", "dp", "dsq", "other"))
    pre = graph.call_function(OPS.pre_backward.default, (x, h, d, "reference"))
    dx_pre, dh = (graph.call_function(operator.getitem, (pre, i)) for i in (0, 1))
    proj = graph.call_function(OPS.proj_backward.default, (x, phi, dp, dsq, "reference"))
    dx_proj, dphi = (graph.call_function(operator.getitem, (proj, i)) for i in (0, 1))
    total = graph.call_function(torch.ops.aten.add.Tensor, (graph.call_function(torch.ops.aten.add.Tensor,
                                                                                (dx_pre, dx_proj)), other))
    graph.output((total, dh, dphi, dx_pre))  # dx_pre escapes
    assert fold_stream_grads.apply(graph) == 0
    assert any(n.target is OPS.pre_backward.default for n in graph.nodes)
