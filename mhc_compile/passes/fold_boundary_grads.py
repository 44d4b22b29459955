"""Fold each boundary between two sites into one backward op (a pass over Inductor's backward graph).

After ``fold_stream_grads`` and ``fold_pre_recompute``, the backward of the boundary between sites l and l+1 is two
stream passes, the first one's stream gradient the second one's dout:

    dX_l, dphi                  = proj_pre_backward(X_l, phi, dp, dsq, h_pre, dx_in, acc)        (site l+1)
    dX_prev, dh_res, dh_post, dy(, x_in)
                                = post_res_backward(_pre)(X_prev, h_res, h_post, y, dX_l(, h_pre_prev))   (site l)

This pass rewrites the pair to ``boundary_backward`` (kernels/triton_boundary.py), which on an sm_90 GPU is one
pass: dX_l is never written nor read back (2n elements of C a token), and stays in fp32 until it is mixed into
dX_prev. The op's own outputs are the pair's: getitem i of the post_res backward becomes getitem i of the new op
(x_in at 4), proj_pre_backward's dphi getitem 5.

Matched: a proj_pre_backward (not a chain head's collapsed one) whose dx has one reader, a post_res backward that
takes it as dout and does not collapse its dx (``collapse_dx``: a chain head's, left to its own kernels), both with
one kernel implementation. The new op stands where proj_pre_backward stood when the post_res backward's other
inputs are all defined by then, else where the post_res backward stood (the recompute of the block before can sit
between the two) when proj_pre_backward's dphi is first read after it; anything else is left alone, which is always
correct. It runs after ``collapse_head_grad`` (which leaves the head's post_res backward collapsed, and so out of
this pass's reach) and before ``inplace_stream_grads``, which then writes dX_prev over acc
(``boundary_backward_into``).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg, collapses_dx, move_getitems

log = logging.getLogger("mhc_compile")

_PRE_ARGS = ("x", "phi", "dp", "dsq", "h_pre", "dout", "acc")  # proj_pre_backward's, in boundary_backward's order
_RES_ARGS = ("x", "h_res", "h_post", "y")  # the post_res backward's stream and mixing inputs


def _getitems(node: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in node.users if u.target is operator.getitem and u.args[1] == index]


def _impl(res: fx.Node) -> str:
    """A post_res backward's kernel implementation (post_res_backward_pre takes h_pre before it)."""
    return arg(res, 6 if res.target is OPS.post_res_backward_pre.default else 5, "impl")


def _match(op: fx.Node) -> fx.Node | None:
    """The post_res backward that reads ``op``'s dx as its dout and can be folded with it, if any."""
    if any(u.target is not operator.getitem for u in op.users):
        return None
    items = _getitems(op, 0)
    if len(items) != 1 or len(items[0].users) != 1:
        return None
    res = next(iter(items[0].users))
    if res.target not in (OPS.post_res_backward.default, OPS.post_res_backward_pre.default):
        return None
    if arg(res, 4, "dout") is not items[0] or collapses_dx(res) or any(u.target is not operator.getitem
                                                                      for u in res.users):
        return None
    if _impl(res) != arg(op, 7, "impl"):
        return None
    return res


def _place(op: fx.Node, res: fx.Node, order: dict) -> fx.Node | None:
    """The node the new op goes before: ``op`` where ``res``'s other inputs all come before it, else ``res`` where
    every reader of ``op``'s other outputs comes after ``res``; None where neither holds."""
    inputs = [a for a in res.all_input_nodes if a.target is not operator.getitem or a.args[0] is not op]
    if all(order[a] < order[op] for a in inputs):
        return op
    readers = [u for item in op.users if item.args[1] != 0 for u in item.users]
    if all(order[u] > order[res] for u in readers):
        return res
    return None


def _rewrite(graph: fx.Graph, op: fx.Node, res: fx.Node, where: fx.Node) -> None:
    pre = res.target is OPS.post_res_backward_pre.default
    args = (*(arg(op, i, name) for i, name in enumerate(_PRE_ARGS)),
            *(arg(res, i, name) for i, name in enumerate(_RES_ARGS)), arg(res, 5, "h_pre") if pre else None,
            _impl(res))
    with graph.inserting_before(where):
        new = graph.call_function(OPS.boundary_backward.default, args)
    if "val" in op.meta and "val" in res.meta:
        rv, pv = res.meta["val"], op.meta["val"]
        with rv[0].fake_mode:
            x_in = rv[4] if pre else rv[0].new_empty(rv[0].shape[:-2] + (0,))
        new.meta["val"] = (*rv[:4], x_in, pv[1])
    # the post_res backward's outputs keep their indices (x_in at 4); dphi (proj_pre_backward's 1) moves to 5. Each
    # getitem goes right after the new op: every reader of them comes later (``_place``)
    move_getitems(graph, res, new, after=new)
    graph.erase_node(res)
    for item in _getitems(op, 0):  # dX_l, which only res read
        graph.erase_node(item)
    move_getitems(graph, op, new, offset=4, after=new)
    graph.erase_node(op)


def apply(graph: fx.Graph) -> int:
    """Fold every matching boundary; returns how many."""
    ops = [n for n in graph.nodes if n.op == "call_function" and n.target is OPS.proj_pre_backward.default]
    if not ops:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    plan = [(op, res, where) for op in ops for res in [_match(op)] if res is not None
            for where in [_place(op, res, order)] if where is not None]
    for op, res, where in plan:
        _rewrite(graph, op, res, where)
    graph.lint()
    log.info("mhc: folded %d of %d site boundaries' backward into one op each", len(plan), len(ops))
    return len(plan)
