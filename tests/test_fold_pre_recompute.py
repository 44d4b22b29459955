"""passes/fold_pre_recompute.py: the recomputed sublayer input comes out of the post_res backward.

Graphs are built by hand in the shape Inductor's backward graphs have them (the end-to-end case, a real
recompute graph through Inductor, is in test_inductor.py), run before and after the pass on random inputs.
"""

from __future__ import annotations

import operator

import pytest
import torch

from mhc_compile.passes import fold_pre_recompute
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)

OPS = torch.ops.mhc_compile


def _backward_graph(impl="reference", reader_first=False, check_finite=False):
    """post_res_backward of X, then a recomputed pre of the same X read by what follows (as in Inductor's
    backward graph of a recompute block); ``reader_first`` puts a reader of the pre before the backward."""
    g = torch.fx.Graph()
    x, h_res, h_post, y, dout, h_pre = (g.placeholder(k) for k in ("x", "h_res", "h_post", "y", "dout", "h_pre"))
    pre = g.call_function(OPS.pre.default, (x, h_pre, impl, "site", check_finite))
    early = g.call_function(torch.ops.aten.mul.Tensor, (pre, 2.0)) if reader_first else None
    bwd = g.call_function(OPS.post_res_backward.default, (x, h_res, h_post, y, dout, impl))
    dx, dh_res, dh_post, dy = (g.call_function(operator.getitem, (bwd, i)) for i in range(4))
    late = g.call_function(torch.ops.aten.mul.Tensor, (pre, dy))  # the sublayer's backward meets x_in
    g.output((dx, dh_res, dh_post, late) + ((early,) if early is not None else ()))
    return g


def _inputs(dtype, t=6, n=3, c=11):
    gen = torch.Generator().manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.randn(2, t, n, c, generator=gen).to(dtype), torch.rand(2, t, n, n, generator=gen).to(acc),
            torch.rand(2, t, n, generator=gen).to(acc), torch.randn(2, t, c, generator=gen).to(dtype),
            torch.randn(2, t, n, c, generator=gen).to(dtype), torch.rand(2, t, n, generator=gen).to(acc)]


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("impl,dtype", [("reference", torch.float64), ("triton", torch.float32),
                                        ("triton", torch.bfloat16)])
def test_folded_pre_gives_the_same_values(impl, dtype):
    graph = _backward_graph(impl)
    inputs = _inputs(dtype)
    want = torch.fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    assert fold_pre_recompute.apply(graph) == 1
    targets = _targets(graph)
    assert OPS.post_res_backward_pre.default in targets
    assert OPS.pre.default not in targets and OPS.post_res_backward.default not in targets
    got = torch.fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same kernels' arithmetic, in the same order


@pytest.mark.parametrize("case", ["reader before the backward", "check_finite"])
def test_what_cannot_move_is_left_alone(case):
    graph = _backward_graph(reader_first=case == "reader before the backward", check_finite=case == "check_finite")
    before = _targets(graph)
    assert fold_pre_recompute.apply(graph) == 0
    assert _targets(graph) == before


def test_forward_graphs_are_left_alone():
    g = torch.fx.Graph()
    x, h = g.placeholder("x"), g.placeholder("h")
    g.output(g.call_function(OPS.pre.default, (x, h, "reference")))
    assert fold_pre_recompute.apply(g) == 0
