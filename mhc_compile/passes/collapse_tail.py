"""Collapse a chain's tail in the kernel that mixes it (a pass over Inductor's forward graph).

A chain ends where its n streams are collapsed for the layers after it (the final norm): passes/rewrite.py gives
every reader outside the chain ``mean(X, -2)`` (or the sum). In the forward graph the last site's post_res writes
the n streams and the collapse reads them straight back:

    X = post_res(x_prev, h_res, h_post, y)          reads n + 1 rows, writes n
    c = mean(X, [-2])                               reads n again, writes 1

Nothing else reads that X: the backward of the last post_res reads x_prev and y, and the collapse keeps no input
(``recompute._save_collapses`` saves c itself). This pass rewrites the pair to ``post_res_collapse``, which sums
the streams in registers, (sum_j (sum_i h_res[i, j]) X[j] + (sum_i h_post[i]) y), divided by n for a mean: n + 2
elements of C a token instead of 3n + 2, once a chain and step. The values are rounded once, where post_res rounded
each stream before the collapse summed them.

It runs after AOTAutograd's partition (``post_grad_custom_post_pass``), like fold_post_res_proj: the backward was
built from post_res and the collapse apart and is unchanged, and the new op needs no autograd formula.

Matched: a mean or sum over the stream dim (-2, no dtype, keepdim or not) whose input is a post_res with no other
reader. Anything else (a carried chain that also returns its streams, an observer of a middle stream) is left alone,
which is always correct.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg

log = logging.getLogger("mhc_compile")

aten = torch.ops.aten
_COLLAPSES = {aten.mean.dim: True, aten.sum.dim_IntList: False}  # op -> whether it is a mean


def _match(node: fx.Node) -> tuple[fx.Node, bool, bool] | None:
    """(the post_res it collapses, mean?, keepdim?) for a collapse of a post_res's streams, or None."""
    if node.target not in _COLLAPSES or node.kwargs.get("dtype") is not None:
        return None
    stream, dims = arg(node, 0, "self"), arg(node, 1, "dim")
    if not isinstance(stream, fx.Node) or stream.target is not OPS.post_res.default or len(stream.users) != 1:
        return None
    val = stream.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    if dims[0] % val.dim() != val.dim() - 2:
        return None
    return stream, _COLLAPSES[node.target], bool(arg(node, 2, "keepdim", False))


def _rewrite(graph: fx.Graph, collapse: fx.Node, post_res: fx.Node, mean: bool, keepdim: bool) -> None:
    x, h_res, h_post, y, impl = (arg(post_res, i, k) for i, k in enumerate(("x", "h_res", "h_post", "y", "impl")))
    with graph.inserting_before(collapse):
        fused = graph.call_function(OPS.post_res_collapse.default, (x, h_res, h_post, y, mean, impl))
        out = graph.call_function(aten.unsqueeze.default, (fused, -2)) if keepdim else fused
    val = collapse.meta.get("val")
    if isinstance(val, torch.Tensor):
        with getattr(val, "fake_mode", None) or torch.no_grad():
            fused.meta["val"] = val.squeeze(-2) if keepdim else val
        out.meta["val"] = val
    collapse.replace_all_uses_with(out)
    graph.erase_node(collapse)
    graph.erase_node(post_res)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching tail; returns how many."""
    found = [(n, m) for n in graph.nodes if n.op == "call_function" for m in [_match(n)] if m]
    for collapse, (post_res, mean, keepdim) in found:
        _rewrite(graph, collapse, post_res, mean, keepdim)
    if found:
        graph.lint()
        log.info("mhc: collapsed %d chain tail(s) in the kernel that mixes them", len(found))
    return len(found)
