"""Fold each site's stream-gradient sum into one kernel (a pass over Inductor's backward graph).

The stream X_l of a site has three readers in the forward (proj, pre, post_res), so AOTAutograd's
backward graph holds three stream-sized partial gradients and sums them with pointwise adds:

    dX_pre, dh_pre = pre_backward(x, h_pre, dout)
    dp, dsq, ...   = coeffs_backward(..., dh_pre, ...)
    dX_proj, dphi  = proj_backward(x, phi, dp, dsq)
    dX             = dX_pre + dX_proj + dX_res            (dX_res: post_res_backward of the same site)

Each partial is written to memory, then read back by the add: at n = 4 and bf16 that is 4 stream
passes (~2 nC bytes a token each) on top of the kernels' own reads of X. This pass rewrites it to

    dh_pre         = pre_backward_dh(x, h_pre, dout)      (reads X and dout, writes [.., n])
    dX, dphi       = proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc=dX_res)

so X's gradient is written once, the remaining partials enter as ``acc`` and the sum is rounded once in
fp32. The pattern is a plain function over the graph; anything else (an add with alpha, a partial read
twice, pre and proj of different streams) is left alone, which is always correct.

It runs as Inductor's ``post_grad_custom_post_pass`` (``passes/post_grad.py``): the backward graph
only exists inside Inductor. The forward graphs it also sees hold no ``*_backward`` op.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

log = logging.getLogger("mhc_compile")
OPS = torch.ops.mhc_compile
ADD = torch.ops.aten.add.Tensor


def _output(node: fx.Node, index: int) -> fx.Node | None:
    """The single getitem(node, index) user, if there is exactly one."""
    found = [u for u in node.users if u.target is operator.getitem and u.args[1] == index]
    return found[0] if len(found) == 1 else None


def _plain_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is ADD and not node.kwargs and len(node.args) == 2


def _sum_tree(leaf: fx.Node) -> tuple[fx.Node, list[fx.Node], list[fx.Node]] | None:
    """(root, leaves, inner adds) of the largest tree of plain adds above ``leaf`` in which every value
    but the root has one user: the sum autograd builds for a tensor read several times."""
    if len(leaf.users) != 1 or not _plain_add(next(iter(leaf.users))):
        return None
    root = next(iter(leaf.users))
    while len(root.users) == 1 and _plain_add(next(iter(root.users))):
        root = next(iter(root.users))
    leaves, adds, stack = [], [], [root]
    while stack:
        node = stack.pop()
        if _plain_add(node) and (node is root or len(node.users) == 1):
            adds.append(node)
            stack.extend(a for a in node.args if isinstance(a, fx.Node))
        else:
            leaves.append(node)
    if any(not isinstance(a, fx.Node) for add in adds for a in add.args):
        return None  # a scalar in the sum
    return root, leaves, adds


def _match(pre_bwd: fx.Node) -> dict | None:
    x, h_pre, dout, impl = pre_bwd.args
    dx_pre, dh = _output(pre_bwd, 0), _output(pre_bwd, 1)
    if dx_pre is None or dh is None or len(pre_bwd.users) != 2:
        return None
    tree = _sum_tree(dx_pre)
    if tree is None:
        return None
    root, leaves, adds = tree
    for proj_bwd in x.users:
        if proj_bwd.target is not OPS.proj_backward.default or proj_bwd.args[0] is not x:
            continue
        dx_proj, dphi = _output(proj_bwd, 0), _output(proj_bwd, 1)
        if dx_proj is None or dx_proj not in leaves or len(proj_bwd.users) != 2 or proj_bwd.args[4] != impl:
            continue
        _, phi, dp, dsq, _ = proj_bwd.args
        others = [leaf for leaf in leaves if leaf is not dx_pre and leaf is not dx_proj]
        return dict(x=x, h_pre=h_pre, dout=dout, impl=impl, phi=phi, dp=dp, dsq=dsq, pre_bwd=pre_bwd,
                    dx_pre=dx_pre, dh=dh, proj_bwd=proj_bwd, dx_proj=dx_proj, dphi=dphi, root=root, adds=adds,
                    others=others)
    return None


def _rewrite(graph: fx.Graph, m: dict) -> None:
    with graph.inserting_before(m["pre_bwd"]):
        dh = graph.call_function(OPS.pre_backward_dh.default, (m["x"], m["h_pre"], m["dout"], m["impl"]))
    dh.meta.update(m["dh"].meta)
    m["dh"].replace_all_uses_with(dh)
    with graph.inserting_before(m["root"]):
        acc = None
        for leaf in m["others"]:  # what the residual path (and any other reader) contributes
            acc = leaf if acc is None else graph.call_function(ADD, (acc, leaf))
            if acc is not leaf:
                acc.meta.update(m["root"].meta)
        fused = graph.call_function(OPS.proj_pre_backward.default,
                                    (m["x"], m["phi"], m["dp"], m["dsq"], m["h_pre"], m["dout"], acc, m["impl"]))
        dx = graph.call_function(operator.getitem, (fused, 0))
        dphi = graph.call_function(operator.getitem, (fused, 1))
    dx.meta.update(m["root"].meta)
    dphi.meta.update(m["dphi"].meta)
    if "val" in m["root"].meta and "val" in m["dphi"].meta:
        fused.meta["val"] = (m["root"].meta["val"], m["dphi"].meta["val"])
    m["root"].replace_all_uses_with(dx)
    m["dphi"].replace_all_uses_with(dphi)
    for node in [*m["adds"], m["dx_pre"], m["dx_proj"], m["dphi"], m["proj_bwd"], m["dh"], m["pre_bwd"]]:
        if not node.users:
            graph.erase_node(node)


def apply(graph: fx.Graph) -> int:
    """Rewrite every matching site in ``graph``; returns how many were folded."""
    folded = 0
    candidates = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is OPS.pre_backward.default:
            candidates += 1
            match = _match(node)
            if match is not None:
                _rewrite(graph, match)
                folded += 1
    if candidates:
        graph.lint()
        log.info("mhc: folded the stream-gradient sums of %d of %d site(s) in a backward graph", folded, candidates)
    return folded

