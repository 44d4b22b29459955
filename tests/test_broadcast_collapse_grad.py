"""passes/broadcast_collapse_grad.py: the mean collapse's gradient stays a broadcast view of one row a token.

Graphs are built by hand in the shape of Inductor's backward graphs at a chain's tail (the head's LayerNorm
gradient dz, divided by n over the expanded streams, read by the last site's post_res backward), given fake values
as Inductor's nodes carry them, and run before and after the pass on random inputs. End to end through Inductor:
test_inductor.py.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from mhc_compile.passes import broadcast_collapse_grad, inplace_stream_grads
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)

OPS = torch.ops.mhc_compile
aten = torch.ops.aten
B, S, N, C = 2, 3, 4, 10


def _graph(fold_pre=True, second_reader=False):
    """dz -> div(expand(unsqueeze(dz, -2)), n) -> the last site's post_res backward (+ a second reader)."""
    g = torch.fx.Graph()
    x, h_res, h_post, y, h_pre, dz = (g.placeholder(k) for k in ("x", "h_res", "h_post", "y", "h_pre", "dz"))
    u = g.call_function(aten.unsqueeze.default, (dz, -2))
    e = g.call_function(aten.expand.default, (u, [B, S, N, C]))
    div = g.call_function(aten.div.Scalar, (e, N))
    if fold_pre:
        bwd = g.call_function(OPS.post_res_backward_pre.default, (x, h_res, h_post, y, div, h_pre, "reference"))
        outs = [g.call_function(operator.getitem, (bwd, i)) for i in range(5)]
    else:
        bwd = g.call_function(OPS.post_res_backward.default, (x, h_res, h_post, y, div, "reference"))
        outs = [g.call_function(operator.getitem, (bwd, i)) for i in range(4)]
    if second_reader:
        outs.append(g.call_function(aten.mul.Tensor, (div, 2.0)))
    g.output(tuple(outs))
    return g


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, S, N, C, generator=gen), torch.rand(B, S, N, N, generator=gen), torch.rand(B, S, N, generator=gen),
            torch.randn(B, S, C, generator=gen), torch.rand(B, S, N, generator=gen), torch.randn(B, S, C, generator=gen)]


def _module(graph, inputs):
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm).propagate(*inputs)
    return gm


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("fold_pre", [True, False], ids=["post_res_backward_pre", "post_res_backward"])
def test_the_division_moves_before_the_expand_and_values_are_unchanged(fold_pre):
    inputs = _inputs()
    gm = _module(_graph(fold_pre), inputs)
    want = gm(*inputs)
    assert broadcast_collapse_grad.apply(gm.graph) == 1
    gm.recompile()
    targets = _targets(gm.graph)
    assert targets.index(aten.div.Scalar) < targets.index(aten.unsqueeze.default) < targets.index(aten.expand.default)
    bwd = next(n for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "mhc_compile")
    dout = bwd.args[4]
    assert dout.target is aten.expand.default and dout.meta["val"].stride(-2) == 0
    assert tuple(dout.meta["val"].shape) == (B, S, N, C)
    got = gm(*inputs)
    for w, o in zip(want, got):
        assert torch.equal(w, o)


def test_a_division_with_another_reader_is_left_alone():
    gm = _module(_graph(second_reader=True), _inputs())
    before = _targets(gm.graph)
    assert broadcast_collapse_grad.apply(gm.graph) == 0
    assert _targets(gm.graph) == before


def test_an_expand_over_another_dim_is_left_alone():
    g = torch.fx.Graph()
    dz = g.placeholder("dz")
    u = g.call_function(aten.unsqueeze.default, (dz, 1))
    e = g.call_function(aten.expand.default, (u, [B, N, S, C]))
    div = g.call_function(aten.div.Scalar, (e, N))
    g.output((g.call_function(aten.mul.Tensor, (div, 2.0)),))
    gm = _module(g, [torch.randn(B, S, C)])
    assert broadcast_collapse_grad.apply(gm.graph) == 0


def test_the_inplace_pass_then_leaves_the_view_alone():
    """The view is not a private dense buffer: the post_res backward keeps its own output buffer."""
    gm = _module(_graph(), _inputs())
    broadcast_collapse_grad.apply(gm.graph)
    assert inplace_stream_grads.apply(gm.graph) == 0
    assert OPS.post_res_backward_pre.default in _targets(gm.graph)
