"""Write a chain head's stream gradient summed over its n streams (a pass over Inductor's backward graph).

A chain's head stream is its embedding expanded over the n streams (passes/rewrite.py), so its gradient is the sum
of the n rows of the stream gradient. In the backward graph the head site's proj backward writes those rows and the
expand's backward sums them at once:

    dX, dphi = proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc)     x broadcast; writes n rows
    dx       = sum(dX, [-2], keepdim)                                      reads them back, writes 1

This pass rewrites the pair to ``proj_pre_backward_collapsed``, which writes the sum directly. On a broadcast x
that sum is proj_pre_backward on the one row with the n streams' parts of phi, h_pre and acc summed first
(``triton_proj.proj_pre_backward_collapsed``): dX's n-wide write and its read back go, 2n elements of C a token
at each chain head. The values are the same sum, rounded once instead of after each row.

The head op's acc (the site's residual-path gradient) is the head's post_res backward's dx, n rows that only that
sum reads: the pass has that op write it summed too (``collapse_dx``, its row sums of H_res applied to dout), so it
writes 1 row instead of n and the head op reads 1 instead of summing n ((n - 1) + (n + 1) = 2n elements of C a
token less again).

Under ``fuse=True`` the head's op is ``enter_backward``, whose dx is first added to the stream's other gradient (the
next step's dx_prev) and then summed: ``enter_backward_collapsed`` takes that gradient as its acc, and the n-wide add
goes too. That acc is the next step_backward's dx_prev, read by nothing else: it is written summed as well
(``collapse_dx``; session 38 measured enter's collapsed backward at 67 % of its floor with acc's n rows summed by
torch in it).

Matched: one of those ops whose x is broadcast over its streams (``triton_common.is_broadcast`` on the graph's fake
tensors: stride 0 over dense rows) and
whose dx has one reader, a sum over the stream dim. It runs before ``inplace_stream_grads``, which then finds no
stream-sized output of that op to write in place. Anything else is left alone, which is always correct.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg, collapse_dx_index, collapses_dx, move_getitems, schema_index

log = logging.getLogger("mhc_compile")

aten = torch.ops.aten


def _collapsed() -> dict:
    """op -> its twin that writes dx summed over the streams (x is argument 0 and dx output 0 of both)."""
    return {OPS.proj_pre_backward.default: OPS.proj_pre_backward_collapsed.default,
            OPS.enter_backward.default: OPS.enter_backward_collapsed.default}


def _match(op: fx.Node, order: dict, is_broadcast) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(dx's getitem, the sum that reads it, the stream's other gradient added to dx before the sum or None) of a
    ``_collapsed`` op on a broadcast stream, or None. That other gradient (under fuse=True the next step's dx_prev:
    ``sum(dx + dx_prev)``) is taken by enter_backward_collapsed as acc, where it is defined before the op."""
    x = arg(op, 0, "x")
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not (isinstance(val, torch.Tensor) and val.dim() >= 3 and is_broadcast(val)):
        return None
    items = [u for u in op.users if u.target is operator.getitem and u.args[1] == 0]
    if len(items) != 1 or len(items[0].users) != 1 or "val" not in items[0].meta:
        return None
    item, other = items[0], None
    total = next(iter(item.users))
    if total.target is aten.add.Tensor and op.target is OPS.enter_backward.default and len(total.users) == 1:
        a, b = total.args[:2] if len(total.args) >= 2 else (None, None)
        other = b if a is item else a if b is item else None
        val = other.meta.get("val") if isinstance(other, fx.Node) else None
        if (other is None or total.kwargs or not isinstance(val, torch.Tensor) or order[other] > order[op]
                or val.shape != item.meta["val"].shape or val.dtype != item.meta["val"].dtype):
            return None
        total = next(iter(total.users))
    if total.target is not aten.sum.dim_IntList or total.kwargs.get("dtype"):
        return None
    ndim = item.meta["val"].dim()
    dims = total.args[1] if len(total.args) > 1 else None
    if not isinstance(dims, (list, tuple)) or [d % ndim for d in dims] != [ndim - 2]:
        return None
    return item, total, other


def _collapse_acc(op: fx.Node) -> bool:
    """Have the op whose dx is the collapsed head op's acc, read by nothing else, write that dx summed over the
    streams too (``collapse_dx``): its n rows were written only for the head op to sum them. That op is the head's
    post_res backward (post_res_backward or _pre) on the default path, the next step's step_backward under
    fuse=True."""
    index = schema_index(op.target, "acc") if op.target in _collapsed().values() else None
    acc = arg(op, index, "acc") if index is not None else None
    if not isinstance(acc, fx.Node):
        return False
    if acc.target is not operator.getitem or acc.args[1] != 0 or len(acc.users) != 1:
        return False
    src = acc.args[0]
    index = collapse_dx_index(getattr(src, "target", None))  # the ops that take collapse_dx, by their schema
    if index is None or collapses_dx(src):
        return False
    if len(src.args) == index:
        src.args = (*src.args, True)
    else:
        src.kwargs = {**src.kwargs, "collapse_dx": True}
    if "val" in src.meta and "val" in acc.meta:
        dx_val = acc.meta["val"]
        with dx_val.fake_mode:
            acc.meta["val"] = dx_val.new_empty(dx_val.shape[:-2] + (1, dx_val.shape[-1]))
        src.meta["val"] = (acc.meta["val"], *src.meta["val"][1:])
    return True


def _rewrite(graph: fx.Graph, op: fx.Node, item: fx.Node, total: fx.Node, other: fx.Node | None) -> bool:
    """Rewrite the head; whether its acc is now written summed too (``_collapse_acc``)."""
    keepdim = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
    ndim = item.meta["val"].dim()
    kwargs = dict(op.kwargs) if other is None else {**op.kwargs, "acc": other}
    with graph.inserting_before(op):
        collapsed = graph.call_function(_collapsed()[op.target], op.args, kwargs)
        row = graph.call_function(operator.getitem, (collapsed, 0))
        out = row if keepdim else graph.call_function(aten.squeeze.dim, (row, ndim - 2))
    if "val" in op.meta:
        dx_val, *rest = op.meta["val"]
        with dx_val.fake_mode:
            row.meta["val"] = dx_val.new_empty(dx_val.shape[:-2] + (1, dx_val.shape[-1]))
            collapsed.meta["val"] = (row.meta["val"], *rest)
            if out is not row:
                out.meta["val"] = row.meta["val"].squeeze(ndim - 2)
    added = total.args[0] if other is not None else None
    total.replace_all_uses_with(out)
    graph.erase_node(total)
    if added is not None:
        graph.erase_node(added)
    graph.erase_node(item)
    move_getitems(graph, op, collapsed)
    graph.erase_node(op)
    return _collapse_acc(collapsed)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching head; returns how many."""
    # the kernels' own test of a stream they read as one row a token (here on the graph's fake values), so that
    # every head the pass rewrites takes the collapsed op's one-row route; imported here, where Inductor has
    # already imported Triton
    from mhc_compile.kernels.triton_common import is_broadcast

    ops, order = _collapsed(), {n: i for i, n in enumerate(graph.nodes)}
    found = [(n, m) for n in graph.nodes if n.op == "call_function" and n.target in ops
             for m in [_match(n, order, is_broadcast)] if m]
    accs = sum(_rewrite(graph, op, item, total, other) for op, (item, total, other) in found)
    if found:
        graph.lint()
        log.info("mhc: wrote %d chain head gradient(s) summed over the streams (%d with the residual path's part "
                 "summed by the op that writes it)", len(found), accs)
    return len(found)
