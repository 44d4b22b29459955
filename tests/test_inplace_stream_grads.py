"""passes/inplace_stream_grads.py: each site's backward writes the stream gradient over the one it reads.

Graphs are built by hand in the shape Inductor's backward graphs have them after fold_stream_grads (two sites of a
chain), given fake values as Inductor's nodes carry them, and run before and after the pass on random inputs. The
end-to-end case, through Inductor's lowering of the mutating ops, is in test_inductor.py.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from mhc_compile.passes import inplace_stream_grads
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)

OPS = torch.ops.mhc_compile
T, N, C = 6, 3, 11
M = N * N + 2 * N


def _site(g, impl, x, dout, p, fold_pre=False):
    """One site's backward: post_res_backward(_pre), then proj_pre_backward with the residual part as acc.
    Returns (the stream gradient, [other outputs])."""
    h_res, h_post, y, phi, dp, dsq, h_pre, dx_in = p
    if fold_pre:
        bwd = g.call_function(OPS.post_res_backward_pre.default, (x, h_res, h_post, y, dout, h_pre, impl))
        outs = [g.call_function(operator.getitem, (bwd, i)) for i in range(5)]
    else:
        bwd = g.call_function(OPS.post_res_backward.default, (x, h_res, h_post, y, dout, impl))
        outs = [g.call_function(operator.getitem, (bwd, i)) for i in range(4)]
    proj = g.call_function(OPS.proj_pre_backward.default, (x, phi, dp, dsq, h_pre, dx_in, outs[0], impl))
    dx, dphi = (g.call_function(operator.getitem, (proj, i)) for i in range(2))
    return dx, outs[1:] + [dphi]


def _graph(impl, fold_pre=False, extra_reader=False):
    """Two sites, the later one's stream gradient arriving as a graph input (a tangent). ``extra_reader``: the
    first site's residual gradient is also a graph output (read twice)."""
    g = torch.fx.Graph()
    x1, x2, g0 = g.placeholder("x1"), g.placeholder("x2"), g.placeholder("g0")
    p = [g.placeholder(k) for k in ("h_res", "h_post", "y", "phi", "dp", "dsq", "h_pre", "dx_in")]
    d2, out2 = _site(g, impl, x2, g0, p, fold_pre)
    d1, out1 = _site(g, impl, x1, d2, p, fold_pre)
    extra = []
    if extra_reader:
        res = next(u for u in d2.users if u.target is OPS.post_res_backward.default)
        extra = [next(u for u in res.users if u.args[1] == 0)]
    g.output(tuple([d1] + out1 + out2 + extra))
    return g


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def r(*shape, dt=dtype, pos=False):
        v = torch.rand(*shape, generator=gen) if pos else torch.randn(*shape, generator=gen)
        return v.to(dt)

    return [r(T, N, C), r(T, N, C), r(T, N, C), r(T, N, N, dt=acc, pos=True), r(T, N, dt=acc, pos=True),
            r(T, C), r(N * C, M, dt=acc) * 0.1, r(T, M, dt=acc), r(T, dt=acc), r(T, N, dt=acc, pos=True), r(T, C)]


def _module(graph, inputs):
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm).propagate(*inputs)  # the fake values Inductor's nodes carry
    return gm


def _run(graph, inputs):
    return torch.fx.GraphModule(torch.nn.Module(), graph)(*[t.clone() for t in inputs])


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("impl,dtype,fold_pre", [("reference", torch.float64, False), ("triton", torch.float32, False),
                                                 ("triton", torch.bfloat16, True)])
def test_in_place_chain_gives_the_same_values(impl, dtype, fold_pre):
    inputs = _inputs(dtype)
    gm = _module(_graph(impl, fold_pre), inputs)
    want = _run(gm.graph, inputs)
    # the later site's post_res backward reads the tangent (a graph input): left alone; the three after it chain
    assert inplace_stream_grads.apply(gm.graph) == 3
    targets = _targets(gm.graph)
    bwd, into = ((OPS.post_res_backward_pre, OPS.post_res_backward_pre_into) if fold_pre
                 else (OPS.post_res_backward, OPS.post_res_backward_into))
    assert targets.count(bwd.default) == 1 and targets.count(into.default) == 1
    assert targets.count(OPS.proj_pre_backward_into.default) == 2 and OPS.proj_pre_backward.default not in targets
    got = _run(gm.graph, inputs)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same kernels' arithmetic, in the same order


def test_inputs_are_not_written():
    inputs = _inputs(torch.float32)
    gm = _module(_graph("triton"), inputs)
    inplace_stream_grads.apply(gm.graph)
    kept = [t.clone() for t in inputs]
    torch.fx.GraphModule(torch.nn.Module(), gm.graph)(*inputs)
    for a, e in zip(inputs, kept):
        assert torch.equal(a, e)


def test_a_gradient_read_twice_is_left_alone():
    inputs = _inputs(torch.float32)
    gm = _module(_graph("triton", extra_reader=True), inputs)
    want = _run(gm.graph, inputs)
    # the first site's residual gradient is also an output: its proj_pre_backward keeps a new buffer
    assert inplace_stream_grads.apply(gm.graph) == 2
    assert _targets(gm.graph).count(OPS.proj_pre_backward.default) == 1
    for a, e in zip(_run(gm.graph, inputs), want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _headed_graph(head):
    """One site whose stream gradient comes from the head's ``head(g, tangent)`` (g: a [T, n*C] tangent)."""
    g = torch.fx.Graph()
    x1, x2, g0 = g.placeholder("x1"), g.placeholder("x2"), g.placeholder("g0")
    p = [g.placeholder(k) for k in ("h_res", "h_post", "y", "phi", "dp", "dsq", "h_pre", "dx_in")]
    flat = g.placeholder("flat")
    grad, extra = head(g, g0, flat)
    d, out = _site(g, "reference", x2, grad, p)
    g.output(tuple([d] + out + extra))
    return g


def _divided_broadcast(g, g0, flat):
    """The mean collapse's backward: a broadcast gradient divided by n, a buffer of its own."""
    return g.call_function(torch.ops.aten.div.Scalar, (g0, 4.0)), []


def _view_of_an_input(g, g0, flat):
    """A view of a tangent (a graph input): never written."""
    return g.call_function(torch.ops.aten.view.default, (flat, [T, N, C])), []


def _unsafe_view_read_twice(g, g0, flat):
    """_unsafe_view has no alias annotation, yet Inductor lowers it to a view of its input, read again here."""
    base = g.call_function(torch.ops.aten.mul.Tensor, (flat, 2.0))
    return g.call_function(torch.ops.aten._unsafe_view.default, (base, [T, N, C])), [base]


def _another_dtype(g, g0, flat):
    """fp32 gradients of a bf16 stream: dx (bf16) cannot go over them."""
    wide = g.call_function(torch.ops.prims.convert_element_type.default, (g0, torch.float32))
    return g.call_function(torch.ops.aten.mul.Tensor, (wide, 2.0)), []


# head -> rewrites expected: the post_res backward's (over the head's gradient), then proj's (over its fresh dx)
HEADS = {_divided_broadcast: 2, _view_of_an_input: 1, _unsafe_view_read_twice: 1, _another_dtype: 1}


@pytest.mark.parametrize("head", list(HEADS), ids=[h.__name__.strip("_") for h in HEADS])
def test_the_last_sites_gradient_is_written_over_only_when_private(head):
    expected = HEADS[head]
    inputs = _inputs(torch.bfloat16) + [torch.randn(T, N * C).to(torch.bfloat16)]
    gm = _module(_headed_graph(head), inputs)
    want = _run(gm.graph, inputs)
    assert inplace_stream_grads.apply(gm.graph) == expected
    for a, e in zip(_run(gm.graph, inputs), want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_forward_graphs_are_left_alone():
    g = torch.fx.Graph()
    x, h = g.placeholder("x"), g.placeholder("h")
    g.output(g.call_function(OPS.pre.default, (x, h, "reference")))
    assert inplace_stream_grads.apply(g) == 0


def _fused_graph(impl):
    """fuse=True: two boundaries' step_backward, the later one's stream gradient a graph input (a tangent), the
    earlier one's the later one's dx_prev. Returns the graph and its placeholders' names."""
    g = torch.fx.Graph()
    names = ("x2", "x1", "h_res", "h_post", "y", "phi", "bias", "alpha", "h_pre", "p", "sq", "g0", "dx_in")
    v = dict(zip(names, (g.placeholder(k) for k in names)))
    static = (N, N * C, 1e-6, 5, "mhc", impl)
    outs = []
    dx = v["g0"]
    for x in (v["x2"], v["x1"]):
        bwd = g.call_function(OPS.step_backward.default, (
            x, v["h_res"], v["h_post"], v["y"], v["phi"], v["bias"], v["alpha"], v["h_pre"], v["p"], v["sq"], dx,
            v["dx_in"], v["h_post"], v["h_res"], *static))
        items = [g.call_function(operator.getitem, (bwd, i)) for i in range(7)]
        dx = items[0]
        outs += items[1:]
    g.output(tuple([dx] + outs))
    return g


def _fused_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def r(*shape, dt=dtype, pos=False):
        return (torch.rand(*shape, generator=gen) if pos else torch.randn(*shape, generator=gen)).to(dt)

    return [r(T, N, C), r(T, N, C), r(T, N, N, dt=acc, pos=True), r(T, N, dt=acc, pos=True), r(T, C),
            r(N * C, M, dt=acc) * 0.1, r(M, dt=acc), r(3, dt=acc, pos=True), r(T, N, dt=acc, pos=True),
            r(T, M, dt=acc), r(T, dt=acc, pos=True) + 1, r(T, N, C), r(T, C)]


@pytest.mark.parametrize("impl,dtype", [("reference", torch.float64), ("triton", torch.bfloat16)])
def test_fused_step_backward_writes_over_the_gradient_it_reads(impl, dtype):
    """fuse=True's step_backward: the earlier boundary writes G and dX_prev over the later one's dX_prev (its dx),
    the later one reads the tangent and keeps its own buffer; the values do not change by a bit."""
    inputs = _fused_inputs(dtype)
    gm = _module(_fused_graph(impl), inputs)
    want = _run(gm.graph, inputs)
    assert inplace_stream_grads.apply(gm.graph) == 1
    targets = _targets(gm.graph)
    assert targets.count(OPS.step_backward.default) == 1 and targets.count(OPS.step_backward_into.default) == 1
    kept = [t.clone() for t in inputs]
    got = torch.fx.GraphModule(torch.nn.Module(), gm.graph)(*inputs)
    for a, e in zip(inputs, kept):  # the tangent and every other input unwritten
        assert torch.equal(a, e)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
