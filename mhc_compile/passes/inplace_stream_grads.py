"""Write each site's stream gradient over the stream gradient it is computed from (Inductor's backward graph).

A site's backward reads one stream-sized gradient and writes the next:

    dX_res, dh_res, dh_post, dy = post_res_backward(x, h_res, h_post, y, dX_next)
    ...                                                         (the sublayer's backward, from dy)
    dX, dphi                    = proj_pre_backward(x, phi, dp, dsq, h_pre, dx_in, acc=dX_res)

and the buffer read is dead once the op has run. Each op keeps it alive beside the one it allocates, so every
site peaks at two stream-sized gradients (2 n C elements a token; the residual model's backward holds C). This
pass rewrites them to

    dh_res, dh_post, dy = post_res_backward_into(x, h_res, h_post, y, dX_next)      (dX_res over dX_next)
    dphi                = proj_pre_backward_into(x, phi, dp, dsq, h_pre, dx_in, dX_next)   (dX over it)

so one buffer carries the stream gradient down the whole chain of sites. With ``fuse=True`` a boundary's whole
backward is one ``step_backward``, which reads the stream gradient dX and writes G and dX_prev: its twin
``step_backward_into`` writes both over dX (three stream-sized gradients alive in the op become one). The kernels are safe in place: the
program that stores a gradient tile has read that tile of the buffer first, and no other program reads it.

It rewrites an op only where the buffer it reads is provably private: made by one of the mhc ops (their outputs
are fresh allocations, never views) or by pointwise arithmetic (the last site's gradient, from the head), a
contiguous tensor of the stream's shape and dtype, read by nothing else in the graph (not a graph input or
output, no second reader). Anything else is left alone, which is always
correct (the kernels also reuse a dense copy they had to make of a strided gradient, without this pass). It runs
last of the backend's passes in ``passes/post_grad.py``, before Inductor's own reinplacing; the graphs it sees
are functional, so "read by nothing else" is a use count.
"""

from __future__ import annotations

import functools
import logging
import operator

import torch
import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg, collapses_dx

log = logging.getLogger("mhc_compile")


@functools.cache
def _into() -> dict:
    """op -> (its in-place twin, the index and name of the gradient argument it writes over, the name of its stream
    argument, index 0); built on first use, once runtime/ops.py has registered the ops."""
    return {
        OPS.post_res_backward.default: (OPS.post_res_backward_into.default, 4, "dout", "x"),
        OPS.post_res_backward_pre.default: (OPS.post_res_backward_pre_into.default, 4, "dout", "x"),
        OPS.proj_pre_backward.default: (OPS.proj_pre_backward_into.default, 6, "acc", "x"),
        OPS.step_backward.default: (OPS.step_backward_into.default, 10, "dx", "x_prev"),  # fuse=True
        OPS.boundary_backward.default: (OPS.boundary_backward_into.default, 6, "acc", "x"),  # fold_boundary_grads
    }


_MHC_NAMESPACE = "mhc_compile"


@functools.cache
def _arithmetic() -> frozenset:
    """Pointwise arithmetic whose Inductor lowering always computes a new value (``make_pointwise``), never returns
    an input: the head of a backward makes the last site's stream gradient with one (the mean collapse's
    backward: a broadcast gradient divided by n)."""
    aten = torch.ops.aten
    return frozenset((aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
                      aten.div.Scalar, aten.neg.default))


def _fresh(node: fx.Node) -> bool:
    """``node``'s value is a buffer of its own: getitem(op, i) of an mhc op (custom ops allocate their outputs and
    never return views) or a pointwise arithmetic op's result."""
    if node.op != "call_function":
        return False
    if node.target in _arithmetic():
        return True
    if node.target is not operator.getitem:
        return False
    src = node.args[0]
    return (isinstance(src, fx.Node) and src.op == "call_function"
            and getattr(src.target, "namespace", None) == _MHC_NAMESPACE)


def _same_layout(buf: fx.Node, x: fx.Node) -> bool:
    """Fake values say ``buf`` is a contiguous tensor of x's shape, dtype and device."""
    b, v = buf.meta.get("val"), x.meta.get("val") if isinstance(x, fx.Node) else None
    if b is None or v is None:
        return False
    return (b.shape == v.shape and b.dtype == v.dtype and b.device == v.device and b.is_contiguous())


def _target(node: fx.Node) -> fx.Node | None:
    """The gradient buffer ``node`` may write over, if it can."""
    _, index, name, stream = _into()[node.target]
    if collapses_dx(node):  # dx is one row a token, not the buffer's n
        return None
    buf = arg(node, index, name)
    if not isinstance(buf, fx.Node) or not _fresh(buf) or len(buf.users) != 1:
        return None
    if not _same_layout(buf, arg(node, 0, stream)):
        return None
    if any(u.target is not operator.getitem for u in node.users):
        return None
    return buf


def _rewrite(graph: fx.Graph, node: fx.Node) -> None:
    into, index, name, _ = _into()[node.target]
    buf = arg(node, index, name)  # read now: an earlier rewrite may have made it the buffer that op wrote over
    # the twin takes the op's arguments in the op's order (the graph may hold some as keywords), up to its own last
    # (post_res's backwards end with collapse_dx, which the twins do not take: _target left out the calls that set it)
    count = len(into._schema.arguments)
    args = tuple(arg(node, i, a.name, a.default_value) for i, a in enumerate(node.target._schema.arguments[:count]))
    with graph.inserting_before(node):
        new = graph.call_function(into, args)
    rest = tuple(node.meta["val"][1:]) if "val" in node.meta else None
    one = len(into._schema.returns) == 1  # proj_pre_backward_into returns dphi alone
    if rest is not None:
        new.meta["val"] = rest[0] if one else rest
    for item in list(node.users):
        i = item.args[1]
        if i == 0:  # the stream gradient: the buffer, now holding it
            item.replace_all_uses_with(buf)
        elif one:
            item.replace_all_uses_with(new)
        else:
            with graph.inserting_before(item):
                moved = graph.call_function(operator.getitem, (new, i - 1))
            moved.meta.update(item.meta)
            item.replace_all_uses_with(moved)
        graph.erase_node(item)
    graph.erase_node(node)


def apply(graph: fx.Graph) -> int:
    """Rewrite every op whose gradient buffer is private; returns how many were rewritten."""
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in _into()]
    if not nodes:
        return 0
    # decided on the functional graph first: each rewrite makes its buffer the value of the op's gradient output,
    # which the next op in the chain then reads
    plan = [n for n in nodes if _target(n) is not None]
    for node in plan:
        _rewrite(graph, node)
    graph.lint()
    log.info("mhc: wrote the stream gradient of %d of %d backward op(s) over the gradient they read",
             len(plan), len(nodes))
    return len(plan)
