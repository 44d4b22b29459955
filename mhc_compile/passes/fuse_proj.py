"""Fuse each new stream's projection into the post_res that writes it (runs after ``fuse``, before ``recompute``).

Between two sites of a chain the rewrite emits

    X_l = post_res(X_{l-1}, H_res, H_post, y)      (site l-1)
    p, sq = proj(X_l, phi_l)                       (site l)

so X_l is written, then read straight back by proj. This pass replaces the pair with

    X_l, p, sq = post_res_proj(X_{l-1}, H_res, H_post, y, phi_l)

whose kernel projects each tile of X_l while it is still on chip: one stream read (n C elements a token)
fewer per site, in the forward and again wherever the backward recomputes X_l. The op's backward is
proj_backward then post_res_backward, the same ops the unfused pair has, so ``fold_stream_grads`` folds
it the same way. A proj that does not read a post_res's output directly (a chain head reads expand's,
a fused ``step`` already has its own) is left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from mhc_compile.config import MHCConfig

OPS = torch.ops.mhc_compile


def _match(proj: fx.Node, order: dict[fx.Node, int]) -> fx.Node | None:
    """The post_res whose output ``proj`` reads, if the pair can become one op at post_res's place."""
    x, phi, impl = proj.args
    if x.op != "call_function" or x.target is not OPS.post_res.default or x.args[4] != impl:
        return None
    if any(u.target is not operator.getitem for u in proj.users):
        return None
    if isinstance(phi, fx.Node) and order[phi] > order[x]:
        return None  # phi computed after X_l (never emitted by rewrite): the fused op could not sit at X_l's place
    return x


def _fuse(graph: fx.Graph, post_res: fx.Node, proj: fx.Node) -> None:
    x_prev, h_res, h_post, y, impl = post_res.args
    with graph.inserting_before(post_res):
        node = graph.call_function(OPS.post_res_proj.default, (x_prev, h_res, h_post, y, proj.args[1], impl))
        items = [graph.call_function(operator.getitem, (node, i)) for i in range(3)]
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in post_res.meta:
            node.meta[key] = post_res.meta[key]
    # The op and its stream output keep post_res's labels (site l-1, recomputed with its block); p and sq
    # keep proj's (site l, saved): passes/recompute.py tags by these roles.
    node.meta["mhc"] = {**post_res.meta["mhc"], "role": "post_res_proj"}
    items[0].meta.update(post_res.meta)
    post_res.replace_all_uses_with(items[0])
    for user in list(proj.users):
        new = items[user.args[1] + 1]  # proj (p, sq) -> post_res_proj (X, p, sq)
        new.meta.update(user.meta)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    graph.erase_node(proj)
    graph.erase_node(post_res)


def apply(gm: fx.GraphModule, config: MHCConfig) -> int:
    """Fuse in place; return how many post_res -> proj pairs became one op."""
    if not config.fuse_proj:
        return 0
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    pairs = []
    for proj in graph.nodes:
        if proj.op == "call_function" and proj.target is OPS.proj.default:
            post_res = _match(proj, order)
            if post_res is not None:
                pairs.append((post_res, proj))
    for post_res, proj in pairs:
        _fuse(graph, post_res, proj)
    if pairs:
        graph.lint()
        gm.recompile()
    return len(pairs)
