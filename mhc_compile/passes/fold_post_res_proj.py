"""Compute each site's projection in the pass that writes its stream (a pass over Inductor's forward graph).

In the forward graph a site's stream X_l is written by the previous site's post_res and read back at once by
this site's proj:

    x        = post_res(x_prev, h_res, h_post, y)          reads n + 1 rows, writes n
    p, sq    = proj(x, phi)                                 reads n rows again

This pass rewrites the pair to ``post_res_proj`` (``triton_ops.post_res_proj``, the kernel ``fuse=True``'s
``step`` runs), which projects each X tile while it is still in registers: n C elements a token less to read
(H200, 8192 x 7168: 347.9 us against 267.8 + 132.8 us for the two kernels, benchmarks/results/
kernels-2026-12-03-h200-s15-call2.md). Opt-in (``fold_post_res_proj=True``): in the power-capped d = 7168
training step the fused kernel, bound by instruction issue rather than bytes, lost to the two it replaces
(+8.6 against +7.5 % over the residual model, session15-2026-12-03-h200.md).

It runs after AOTAutograd's partition (``post_grad_custom_post_pass``), so the recompute plan is the one the
unfused ops got: the backward graph still rebuilds X with post_res alone from the saved p and sq, and no new
op needs an autograd formula. Only the values' rounding can differ: X is mixed in the same order as post_res's,
and on the GPU the compilers contract the two kernels' arithmetic differently in a few elements per million
(near-cancellations, 1 ulp); p sums the same products in another order.

Matched: a proj whose stream is a post_res output of the same kernel implementation, with phi defined before
that post_res (so the fused node can stand where post_res stood, ahead of every reader of x). Anything else is
left alone, which is always correct.
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg, move_getitems

log = logging.getLogger("mhc_compile")


def _match(proj: fx.Node, order: dict) -> fx.Node | None:
    """The post_res whose output ``proj`` projects, if the pair can be fused."""
    x, phi, impl = arg(proj, 0, "x"), arg(proj, 1, "phi"), arg(proj, 2, "impl")
    if not isinstance(x, fx.Node) or x.target is not OPS.post_res.default or arg(x, 4, "impl") != impl:
        return None
    if isinstance(phi, fx.Node) and order[phi] > order[x]:
        return None
    if any(u.target is not operator.getitem for u in proj.users):
        return None
    return x


def _rewrite(graph: fx.Graph, proj: fx.Node, post_res: fx.Node) -> None:
    x_prev, h_res, h_post, y, impl = (arg(post_res, i, k) for i, k in
                                      enumerate(("x", "h_res", "h_post", "y", "impl")))
    with graph.inserting_before(post_res):
        fused = graph.call_function(OPS.post_res_proj.default, (x_prev, h_res, h_post, y, arg(proj, 1, "phi"), impl))
        stream = graph.call_function(operator.getitem, (fused, 0))
    if "val" in post_res.meta and "val" in proj.meta:
        fused.meta["val"] = (post_res.meta["val"],) + tuple(proj.meta["val"])
    stream.meta.update(post_res.meta)
    move_getitems(graph, proj, fused, offset=1)
    graph.erase_node(proj)
    post_res.replace_all_uses_with(stream)
    graph.erase_node(post_res)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching site in ``graph``; returns how many were fused."""
    projs = [n for n in graph.nodes if n.op == "call_function" and n.target is OPS.proj.default]
    if not projs:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    fused = 0
    for proj in projs:
        post_res = _match(proj, order)
        if post_res is not None:
            _rewrite(graph, proj, post_res)
            fused += 1
    if fused:
        graph.lint()
        log.info("mhc: projected %d of %d site(s) in the post_res pass that writes their stream", fused, len(projs))
    return fused
