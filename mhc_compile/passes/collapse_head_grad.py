"""Write a chain head's stream gradient summed over its n streams (a pass over Inductor's backward graph).

A chain's head stream is its embedding expanded over the n streams (passes/rewrite.py), so its gradient is the sum
of the n rows of the stream gradient. In the backward graph the head site's proj backward writes those rows and the
expand's backward sums them at once:

    dX, dphi = proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc)     x broadcast; writes n rows
    dx       = sum(dX, [-2], keepdim)                                      reads them back, writes 1

This pass rewrites the pair to ``proj_pre_backward_collapsed``, which writes the sum directly. On a broadcast x
that sum is proj_pre_backward on the one row with the n streams' parts of phi, h_pre and acc summed first
(``triton_proj.proj_pre_backward_collapsed``): dX's n-wide write and its read back go, 2n elements of C a token
at each chain head (the head's acc is still read n-wide, to sum it). The values are the same sum, rounded once
instead of after each row.

Matched: a proj_pre_backward whose x is broadcast over its streams (stride 0, from the graph's fake tensors) and
whose dx has one reader, a sum over the stream dim. It runs before ``inplace_stream_grads``, which then finds no
stream-sized output of that op to write in place. Anything else is left alone, which is always correct.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg, move_getitems

log = logging.getLogger("mhc_compile")

aten = torch.ops.aten


def _is_broadcast_stream(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (isinstance(val, torch.Tensor) and val.dim() >= 3 and val.shape[-2] > 1 and val.stride(-2) == 0)


def _match(op: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(dx's getitem, the sum that reads it) of a proj_pre_backward on a broadcast stream, or None."""
    if not _is_broadcast_stream(arg(op, 0, "x")):
        return None
    items = [u for u in op.users if u.target is operator.getitem and u.args[1] == 0]
    if len(items) != 1 or len(items[0].users) != 1:
        return None
    item = items[0]
    total = next(iter(item.users))
    if total.target is not aten.sum.dim_IntList or total.args[0] is not item or total.kwargs.get("dtype"):
        return None
    ndim = item.meta["val"].dim() if "val" in item.meta else None
    dims = total.args[1] if len(total.args) > 1 else None
    if ndim is None or not isinstance(dims, (list, tuple)) or [d % ndim for d in dims] != [ndim - 2]:
        return None
    return item, total


def _rewrite(graph: fx.Graph, op: fx.Node, item: fx.Node, total: fx.Node) -> None:
    keepdim = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
    ndim = item.meta["val"].dim()
    with graph.inserting_before(op):
        collapsed = graph.call_function(OPS.proj_pre_backward_collapsed.default, op.args, dict(op.kwargs))
        row = graph.call_function(operator.getitem, (collapsed, 0))
        out = row if keepdim else graph.call_function(aten.squeeze.dim, (row, ndim - 2))
    if "val" in op.meta:
        dx_val, dphi_val = op.meta["val"]
        with dx_val.fake_mode:
            row.meta["val"] = dx_val.new_empty(dx_val.shape[:-2] + (1, dx_val.shape[-1]))
            collapsed.meta["val"] = (row.meta["val"], dphi_val)
            if out is not row:
                out.meta["val"] = row.meta["val"].squeeze(ndim - 2)
    total.replace_all_uses_with(out)
    graph.erase_node(total)
    graph.erase_node(item)
    move_getitems(graph, op, collapsed)
    graph.erase_node(op)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching head; returns how many."""
    found = [(n, m) for n in graph.nodes
             if n.op == "call_function" and n.target is OPS.proj_pre_backward.default for m in [_match(n)] if m]
    for op, (item, total) in found:
        _rewrite(graph, op, item, total)
    if found:
        graph.lint()
        log.info("mhc: wrote %d chain head gradient(s) summed over the streams", len(found))
    return len(found)
