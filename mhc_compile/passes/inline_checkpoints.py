"""Inline activation-checkpoint regions into the graph before detection.

A model that checkpoints its blocks (``torch.utils.checkpoint``, HF ``gradient_checkpointing_enable()``)
reaches the backend with each block's body in a ``tag_activation_checkpoint`` subgraph, so the residual
stream crosses every region boundary and no chain is visible. Inlining the bodies (each node tagged
``recompute`` / ``ac_graph_id``, the tags AOTAutograd gives the region itself) lets detection see whole
chains while the partitioner still recomputes the region in backward.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx as fx

from mhc_compile import _compat
from mhc_compile.passes.detect import Unconverted, detect, innermost_module


# ac_graph_id of inlined checkpoint regions: a range of their own (the recompute pass counts from 10000).
_CHECKPOINT_IDS = itertools.count(1_000_000)


def apply(gm: fx.GraphModule) -> list[Unconverted]:
    """Inline the bodies of activation-checkpoint regions (``torch.utils.checkpoint`` inside the model, e.g.
    HF ``gradient_checkpointing_enable()``) into the graph, each node tagged to be recomputed in backward
    (``meta["recompute"]`` / ``ac_graph_id``, the tags AOTAutograd gives the region itself). The residual
    stream crosses every region's boundary; inlined, the passes see whole chains, and the partitioner still
    recomputes the region's activations.

    Returns the regions left as they are (selective checkpointing with a ``context_fn`` keeps its own
    policy; nested higher-order ops) that hold residual sites: those sites are not converted and are
    reported as such, never skipped silently."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    policy = _compat.checkpoint_policy()
    count = 0
    left: list[Unconverted] = []
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        body_attr, *args = node.args
        if body_attr.op != "get_attr":
            continue
        body = getattr(gm, body_attr.target)
        reason = _why_left(node, body, args)
        if reason is not None:
            sites = detect(body).sites if isinstance(body, fx.GraphModule) else []
            if sites:
                names = ", ".join(s.out.name for s in sites)
                left.append(Unconverted(node.name, innermost_module(node), f"{reason}; its residual adds ({names}) are not converted"))
            continue
        _inline(gm, node, body, args, policy)
        count += 1
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
    if count:
        gm.graph.lint()
        gm.recompile()
    return left


def _why_left(node: fx.Node, body: fx.GraphModule, args: list) -> str | None:
    """Why the region ``node`` calls is left as it is, or None when it can be inlined."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if node.kwargs.get("context_fn") is not None or _compat.checkpoint_context_fn(body) is not None:
        return "selective activation checkpointing (context_fn) region is left as it is"
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
           for n in body.graph.nodes) or any(n.op == "get_attr" for n in body.graph.nodes):
        return "checkpoint region with nested higher-order ops is left as it is"
    if len(placeholders) != len(args):
        return "checkpoint region whose inputs do not match its body is left as it is"
    if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
        return "checkpoint region whose result is used whole is left as it is"
    return None


def _inline(gm: fx.GraphModule, node: fx.Node, body: fx.GraphModule, args: list, policy) -> None:
    """Copy the region's body in place of ``node``, each copy tagged to be recomputed (one ``ac_graph_id`` a
    region), and point the getitems that read its result at the copied outputs."""
    graph_id = next(_CHECKPOINT_IDS)
    env: dict[fx.Node, Any] = dict(zip((n for n in body.graph.nodes if n.op == "placeholder"), args))
    result = None
    with gm.graph.inserting_before(node):
        for bn in body.graph.nodes:
            if bn.op == "placeholder":
                continue
            if bn.op == "output":
                result = fx.map_arg(bn.args[0], lambda a: env[a])
                break
            new = gm.graph.node_copy(bn, lambda a: env[a])
            new.meta["recompute"] = policy.PREFER_RECOMPUTE
            new.meta["ac_graph_id"] = graph_id
            env[bn] = new
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(result, (tuple, list)):
            user.replace_all_uses_with(result[user.args[1]])
            gm.graph.erase_node(user)
    if node.users:  # _why_left's getitem check rules this out; fail loudly rather than leave a wrong graph
        raise RuntimeError(f"mhc: checkpoint region {node.name} still has readers after inlining")
    gm.graph.erase_node(node)


