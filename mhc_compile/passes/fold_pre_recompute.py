"""Make each site's recomputed sublayer input in the pass its post_res backward makes over the stream.

With recompute on (``passes/recompute.py``), the sublayer input x_in = pre(X_l, H_pre) is not saved: the
backward graph recomputes it before the sublayer's backward reaches its first op (the LayerNorm's backward
needs it), one more read of the n-row stream X_l. The site's ``post_res_backward`` reads the same X_l (for
dH_res) earlier in the same backward: the sublayer's backward starts from the dy it returns. This pass turns

    dX, dh_res, dh_post, dy = post_res_backward(x, h_res, h_post, y, dout)
    x_in                    = pre(x, h_pre)                                   (recomputed, later)

into one ``post_res_backward_pre(x, h_res, h_post, y, dout, h_pre)`` that also writes x_in from the x rows
it loads anyway: n C elements a token less to read. The price: x_in now exists from the start of the
sublayer's backward instead of from its end, one C-wide tensor more alive through it.

Measured on an H200 (benchmarks/results/session7-2026-12-02-h200.md): at d = 7168 the step's mHC kernels
took 16.85 ms instead of 17.56 (the post_res backward 47 us a site slower, the 139 us pre gone), but the
step time moved less than its run-to-run spread, while activation memory rose by 1.4-1.5 points (to +21.2 %
at d = 2048, past the 20 % target). It was opt-in until ``passes/inplace_stream_grads.py`` freed one n-stream
gradient a site (session 16): now on by default, at +17.1 / +17.7 / +19.1 % activation memory (d = 2048 / 4096 /
7168); ``fold_pre_recompute=False`` turns it off.

It only rewrites a pre whose every reader comes after the post_res backward in the graph (and whose H_pre
is computed before it), so the new node can stand where the post_res backward stood; anything else is left
alone, which is always correct. A pre with ``check_finite`` keeps its own op (and its check). It runs inside
Inductor (``passes/post_grad.py``) after ``fold_stream_grads``; the forward graphs it also sees hold no
``post_res_backward``.
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg, move_getitems

log = logging.getLogger("mhc_compile")


def _match(pre: fx.Node, order: dict) -> fx.Node | None:
    """The post_res_backward that can make ``pre``'s value, if any."""
    x, h_pre, impl = arg(pre, 0, "x"), arg(pre, 1, "h_pre"), arg(pre, 2, "impl")
    if arg(pre, 4, "check_finite", False):
        return None
    first_reader = min((order[u] for u in pre.users), default=None)
    for node in x.users:
        if node.target is not OPS.post_res_backward.default or arg(node, 0, "x") is not x:
            continue
        if arg(node, 5, "impl") != impl or first_reader is None or first_reader < order[node]:
            continue
        if isinstance(h_pre, fx.Node) and order[h_pre] > order[node]:
            continue
        if any(u.target is not operator.getitem for u in node.users):
            continue
        return node
    return None


def _rewrite(graph: fx.Graph, pre: fx.Node, bwd: fx.Node) -> None:
    x, h_res, h_post, y, dout, impl = (arg(bwd, i, k) for i, k in
                                       enumerate(("x", "h_res", "h_post", "y", "dout", "impl")))
    with graph.inserting_before(bwd):
        fused = graph.call_function(OPS.post_res_backward_pre.default,
                                    (x, h_res, h_post, y, dout, arg(pre, 1, "h_pre"), impl))
        x_in = graph.call_function(operator.getitem, (fused, 4))
    if "val" in bwd.meta and "val" in pre.meta:
        fused.meta["val"] = tuple(bwd.meta["val"]) + (pre.meta["val"],)
    x_in.meta.update(pre.meta)
    move_getitems(graph, bwd, fused)
    pre.replace_all_uses_with(x_in)
    graph.erase_node(pre)
    graph.erase_node(bwd)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching site in ``graph``; returns how many were folded."""
    pres = [n for n in graph.nodes if n.op == "call_function" and n.target is OPS.pre.default]
    if not any(n.target is OPS.post_res_backward.default for n in graph.nodes):
        return 0  # a forward graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    folded = 0
    for pre in pres:
        bwd = _match(pre, order)
        if bwd is not None:
            _rewrite(graph, pre, bwd)
            folded += 1
    if pres:
        graph.lint()
        log.info("mhc: made the recomputed sublayer input of %d of %d site(s) in their post_res backward",
                 folded, len(pres))
    return folded
