"""Fuse each sublayer boundary's mHC bookkeeping into one op (runs after ``rewrite``, before ``recompute``).

The rewrite emits, per site, ``proj -> coeffs -> pre`` before the sublayer and ``post_res`` after it.
Between two sites of a pre-norm chain the stream X_l has three readers: ``proj`` (l), ``pre`` (l) and
``post_res`` (l). Left as they are, the backward produces three stream-sized partial gradients of X_l
that autograd sums as separate tensors, and every kernel reads X_l again. This pass replaces:

    post_res(l-1) -> X_l -> proj(l), coeffs(l), pre(l)    with    step(l)   (X_l, x_in, H of site l)
    X -> proj, coeffs, pre  (any other X: a chain head, a post-norm output)  with  enter

so that one op owns X_l's gradient (``runtime/ops.py``, ``kernels/reference.py``). Patterns are plain
functions over the graph; anything that does not match exactly (an extra reader of p or H_pre, a
post_res whose stream is read by something between it and the next site) is left unfused, which is
always correct.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from mhc_compile.config import MHCConfig

OPS = torch.ops.mhc_compile


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    """{index: getitem node} if every user of a multi-output ``node`` is a getitem, else None."""
    out: dict[int, fx.Node] = {}
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] in out:
            return None
        out[user.args[1]] = user
    return out


def _match_enter(pre: fx.Node) -> dict | None:
    """pre(x, getitem(coeffs(getitem(proj(x, phi), 0), getitem(proj, 1), ...), 0)) -> its parts."""
    x, h_pre = pre.args[0], pre.args[1]
    if h_pre.target is not operator.getitem or h_pre.args[1] != 0 or len(h_pre.users) != 1:
        return None
    coeffs = h_pre.args[0]
    if coeffs.target is not OPS.coeffs.default:
        return None
    coeff_items = _getitems(coeffs)
    p, sq = coeffs.args[0], coeffs.args[1]
    if coeff_items is None or p.target is not operator.getitem or sq.target is not operator.getitem:
        return None
    proj = p.args[0]
    if proj.target is not OPS.proj.default or sq.args[0] is not proj or proj.args[0] is not x:
        return None
    proj_items = _getitems(proj)
    if proj_items is None or any(set(g.users) != {coeffs} for g in proj_items.values()):
        return None
    return {"x": x, "pre": pre, "coeffs": coeffs, "coeff_items": coeff_items, "proj": proj,
            "proj_items": proj_items}


def _fused_call(graph: fx.Graph, target, args: tuple, like: fx.Node, role: str, outputs: int) -> list[fx.Node]:
    node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    node.meta["mhc"] = {**like.meta["mhc"], "role": role}
    items = []
    for i in range(outputs):
        with graph.inserting_after(items[-1] if items else node):
            g = graph.call_function(operator.getitem, (node, i))
        g.meta["mhc"] = dict(node.meta["mhc"])
        items.append(g)
    return [node, *items]


def _replace(old: fx.Node | None, new: fx.Node) -> None:
    if old is not None:
        old.replace_all_uses_with(new)


def _fuse_site(graph: fx.Graph, m: dict) -> str:
    """Replace one matched site; return "step" or "enter"."""
    x, pre, coeffs, proj = m["x"], m["pre"], m["coeffs"], m["proj"]
    phi = proj.args[1]
    bias, alpha, n, nc, eps, iters, mode, impl, site, check_finite = coeffs.args[2:12]
    tail = (phi, bias, alpha, n, nc, eps, iters, mode, impl, site, check_finite)
    items = m["coeff_items"]
    if x.target is OPS.post_res.default and x.args[4] == impl:
        x_prev, h_res_prev, h_post_prev, y_prev = x.args[:4]
        with graph.inserting_before(x):
            node, x_new, x_in, _h_pre, h_post, h_res, _p, _sq = _fused_call(
                graph, OPS.step.default, (x_prev, h_res_prev, h_post_prev, y_prev, *tail), pre, "step", 7)
        x_new.meta["mhc"]["role"] = "post_res"  # the stream X_l itself (for reports and recompute)
        _replace(x, x_new)
        kind, dead = "step", [x]
    else:
        with graph.inserting_before(proj):
            node, x_in, _h_pre, h_post, h_res, _p, _sq = _fused_call(graph, OPS.enter.default, (x, *tail), pre,
                                                                     "enter", 6)
        kind, dead = "enter", []
    _replace(pre, x_in)
    _replace(items.get(1), h_post)
    _replace(items.get(2), h_res)
    # Erase users before producers.
    for old in [pre, *items.values(), coeffs, *m["proj_items"].values(), proj, *dead]:
        graph.erase_node(old)
    return kind


def apply(gm: fx.GraphModule, config: MHCConfig) -> dict[str, int]:
    """Fuse in place; return how many sites became ``step`` / ``enter`` (the rest stay unfused)."""
    counts = {"step": 0, "enter": 0}
    if not config.fuse:
        return counts
    graph = gm.graph
    for pre in [node for node in graph.nodes if node.target is OPS.pre.default]:
        m = _match_enter(pre)
        if m is not None:
            counts[_fuse_site(graph, m)] += 1
    graph.lint()
    gm.recompile()
    return counts
