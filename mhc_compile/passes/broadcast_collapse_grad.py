"""Keep the stream gradient that a mean collapse hands back as a broadcast view (Inductor's backward graph).

A chain's tail collapses its n streams with a mean, whose backward gives every stream the same row:

    dX_last = div(expand(unsqueeze(dz, -2), [..., n, C]), n)

Inductor computes that division over the expanded shape: an n-wide buffer written (n C elements a token) only for
the last site's post_res backward to read every one of its n equal rows. This pass divides first and expands
after,

    dX_last = expand(unsqueeze(div(dz, n), -2), [..., n, C])

a C-wide result and a stride-0 view of it, which the post_res backward's kernels read as one row a token (the same
values: each element is divided once either way). The post_res backward then writes its stream gradient into a
buffer of its own instead of over this one (``inplace_stream_grads`` only writes over private dense buffers), so
the head's n-wide write is gone and the read shrinks to one row.

It rewrites only that shape of graph, and only where every reader of the division is an op of ``_readers()``, whose
kernels take the broadcast stream as it is (``triton_common.stream_arg``). It runs before ``inplace_stream_grads``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx

from mhc_compile.passes.post_grad import OPS

log = logging.getLogger("mhc_compile")

aten = torch.ops.aten


@functools.cache
def _readers() -> dict:
    """op -> the index of the stream-gradient argument it may read as a broadcast view."""
    return {OPS.post_res_backward.default: 4, OPS.post_res_backward_pre.default: 4}


def _match(div: fx.Node) -> tuple[fx.Node, int, list] | None:
    """(dz, the unsqueezed dim, the expanded size) of ``div`` = div.Scalar(expand(unsqueeze(dz, d), size), s) whose
    readers all take it as their stream gradient, or None."""
    if div.target is not aten.div.Scalar or not div.users:
        return None
    expand = div.args[0]
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default or len(expand.users) != 1:
        return None
    unsqueeze = expand.args[0]
    if not isinstance(unsqueeze, fx.Node) or unsqueeze.target is not aten.unsqueeze.default:
        return None
    dz, dim = unsqueeze.args[0], unsqueeze.args[1]
    val = div.meta.get("val")
    if not isinstance(dz, fx.Node) or val is None or dim % val.dim() != val.dim() - 2:  # the stream dim
        return None
    for user in div.users:
        index = _readers().get(user.target)
        if index is None or len(user.args) <= index or user.args[index] is not div:
            return None
        if any(a is div for i, a in enumerate(user.args) if i != index) or div in user.kwargs.values():
            return None
    return dz, dim, list(expand.args[1])


def _rewrite(graph: fx.Graph, div: fx.Node, dz: fx.Node, dim: int, size: list) -> None:
    with graph.inserting_before(div):
        row = graph.call_function(aten.div.Scalar, (dz, div.args[1]))
        unsqueezed = graph.call_function(aten.unsqueeze.default, (row, dim))
        view = graph.call_function(aten.expand.default, (unsqueezed, size))
    zval = dz.meta.get("val")
    if zval is not None:
        with zval.fake_mode:
            row.meta["val"] = torch.div(zval, div.args[1])
            unsqueezed.meta["val"] = row.meta["val"].unsqueeze(dim)
            view.meta["val"] = unsqueezed.meta["val"].expand(div.meta["val"].shape)
    div.replace_all_uses_with(view)
    expand = div.args[0]
    unsqueeze = expand.args[0]
    graph.erase_node(div)
    graph.erase_node(expand)
    if not unsqueeze.users:
        graph.erase_node(unsqueeze)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching division; returns how many."""
    found = [(n, m) for n in graph.nodes if n.op == "call_function" for m in [_match(n)] if m is not None]
    for div, (dz, dim, size) in found:
        _rewrite(graph, div, dz, dim, size)
    if found:
        graph.lint()
        log.info("mhc: kept %d collapse gradient(s) as a broadcast view of one row a token", len(found))
    return len(found)
