"""passes/fold_post_res_proj.py: a site's projection made in the post_res pass that writes its stream.

Graphs are built by hand in the shape Inductor's forward graphs have them (the end-to-end case through Inductor is
in test_inductor.py), run before and after the pass on random inputs.
"""

from __future__ import annotations

import operator

import pytest
import torch

from mhc_compile.passes import fold_post_res_proj
from mhc_compile.runtime import ops  # noqa: F401  (registers the ops)

OPS = torch.ops.mhc_compile


def _forward_graph(impl="reference", proj_impl=None, phi_after=False, raw_proj_user=False):
    """post_res of the previous site, then this site's proj and pre of its output, as a forward graph holds them;
    ``phi_after``: phi is computed after the post_res; ``raw_proj_user``: something reads proj's tuple itself."""
    g = torch.fx.Graph()
    x, h_res, h_post, y, phi, h_pre = (g.placeholder(k) for k in ("x", "h_res", "h_post", "y", "phi", "h_pre"))
    if not phi_after:
        phi = g.call_function(torch.ops.aten.mul.Tensor, (phi, 1.0))
    stream = g.call_function(OPS.post_res.default, (x, h_res, h_post, y, impl))
    if phi_after:
        phi = g.call_function(torch.ops.aten.mul.Tensor, (phi, 1.0))
    proj = g.call_function(OPS.proj.default, (stream, phi, proj_impl or impl))
    p, sq = (g.call_function(operator.getitem, (proj, i)) for i in range(2))
    x_in = g.call_function(OPS.pre.default, (stream, h_pre, impl))
    outs = (stream, p, sq, x_in) + ((g.call_function(len, (proj,)),) if raw_proj_user else ())
    g.output(outs)
    return g


def _inputs(dtype, t=7, n=4, c=16):
    gen = torch.Generator().manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = n * n + 2 * n
    return [torch.randn(2, t, n, c, generator=gen).to(dtype), torch.rand(2, t, n, n, generator=gen).to(acc),
            torch.rand(2, t, n, generator=gen).to(acc), torch.randn(2, t, c, generator=gen).to(dtype),
            (torch.randn(n * c, m, generator=gen) / (n * c) ** 0.5).to(acc), torch.rand(2, t, n, generator=gen).to(acc)]


def _targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("impl,dtype", [("reference", torch.float64), ("triton", torch.float32),
                                        ("triton", torch.bfloat16)])
def test_fused_pair_gives_the_same_values(impl, dtype):
    graph = _forward_graph(impl)
    inputs = _inputs(dtype)
    want = torch.fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    assert fold_post_res_proj.apply(graph) == 1
    targets = _targets(graph)
    assert OPS.post_res_proj.default in targets
    assert OPS.proj.default not in targets and OPS.post_res.default not in targets
    got = torch.fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the stream: post_res's order of sums
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=0)  # pre of it
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=0)  # sq: another order of the same squares
    # p: the same products summed in another order (bf16: phi's hi and lo halves, as proj multiplies them)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["other implementation", "phi computed after post_res", "proj tuple read"])
def test_what_cannot_fuse_is_left_alone(case):
    graph = _forward_graph(proj_impl="triton" if case == "other implementation" else None,
                           phi_after=case == "phi computed after post_res", raw_proj_user=case == "proj tuple read")
    before = _targets(graph)
    assert fold_post_res_proj.apply(graph) == 0
    assert _targets(graph) == before


def test_the_op_alone_matches_the_reference_pair():
    """The custom op (reference and Triton) against post_res then proj of the reference."""
    x, h_res, h_post, y, phi, _ = _inputs(torch.float32)
    want = OPS.post_res.default(x, h_res, h_post, y, "reference")
    want = (want, *OPS.proj.default(want, phi, "reference"))
    for impl in ("reference", "triton"):
        got = OPS.post_res_proj.default(x, h_res, h_post, y, phi, impl)
        assert [tuple(v.shape) for v in got] == [tuple(v.shape) for v in want]
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
