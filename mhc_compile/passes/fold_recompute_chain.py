"""Rebuild a recompute block's streams in one pass over the block's input (a pass over Inductor's backward graph).

With recompute on (``passes/recompute.py``), the backward rebuilds the streams inside each recompute block from the
block's stored input stream and the saved sublayer outputs y, one post_res a site, each reading back the stream the
one before it wrote:

    X_1 = post_res(X_0, h_res_0, h_post_0, y_0)        reads n + 1 rows, writes n
    X_2 = post_res(X_1, h_res_1, h_post_1, y_1)        reads X_1 back, n + 1 rows, writes n
    ...

This pass rewrites such a run of k to one ``post_res_chain(X_0, [h_res_0, ...], [h_post_0, ...], [y_0, ...])``,
whose kernel keeps each X' in registers as the next step's X: (n + 1) k + n elements of C a token instead of
(2n + 1) k (the first block's X_0 is the embedding broadcast over the streams: one row). The bench's d = 7168 stack
(eight sites, blocks of 4, 3 and 1) rebuilds X_1..X_3 and X_5, X_6: 12 C a token fewer a step.
The values are post_res's bit for bit: each step rounds X' to the stream dtype before it mixes it again, as a store
and a reload would.

Matched: post_res nodes of one kernel implementation, each taking the one before's output as its stream, whose other
inputs (h_res, h_post, y) are all defined before the run's first node, so the chain op can stand where that first
post_res stood, ahead of every reader of every X. Memory: the backward reads a block's streams last one first, and
the last one is made from all the others, so by its first reader every stream of the run exists with separate calls
too; a stream that a separate call made later than the run's first would now be made earlier, but in the
partitioner's backward graphs the rebuilt streams stand together (a four-layer stack's six post_res calls, all at
the start of its backward, torch 2.13). In a forward graph each y is
computed from the stream before it (through the sublayer), so nothing there matches. Anything else is left alone,
which is always correct. It runs first of the post-grad passes.
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx

from mhc_compile.passes.post_grad import OPS, arg

log = logging.getLogger("mhc_compile")

_STEP_ARGS = ((1, "h_res"), (2, "h_post"), (3, "y"))


def _ready_before(node: fx.Node, head: fx.Node, order: dict) -> bool:
    """Whether ``node``'s mixing inputs are all defined before ``head``."""
    return all(not isinstance(a, fx.Node) or order[a] < order[head] for a in (arg(node, i, k) for i, k in _STEP_ARGS))


def _next_step(last: fx.Node, head: fx.Node, order: dict, impl: str) -> fx.Node | None:
    """The one post_res that takes ``last``'s output as its stream and can join the run, if any."""
    steps = [u for u in last.users if u.target is OPS.post_res.default and arg(u, 0, "x") is last]
    if len(steps) != 1:
        return None
    step = steps[0]
    if arg(step, 4, "impl") != impl or not _ready_before(step, head, order):
        return None
    return step


def _runs(graph: fx.Graph) -> list[list[fx.Node]]:
    """Runs of two or more post_res nodes that one ``post_res_chain`` can stand for, in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    taken: set[fx.Node] = set()
    runs = []
    for head in graph.nodes:
        if head.op != "call_function" or head.target is not OPS.post_res.default or head in taken:
            continue
        run, impl = [head], arg(head, 4, "impl")
        while (step := _next_step(run[-1], head, order, impl)) is not None:
            run.append(step)
        if len(run) > 1:
            runs.append(run)
            taken.update(run)
    return runs


def _rewrite(graph: fx.Graph, run: list[fx.Node]) -> None:
    head = run[0]
    lists = tuple([arg(node, i, k) for node in run] for i, k in _STEP_ARGS)
    with graph.inserting_before(head):
        chain = graph.call_function(OPS.post_res_chain.default, (arg(head, 0, "x"), *lists, arg(head, 4, "impl")))
        outs = [graph.call_function(operator.getitem, (chain, k)) for k in range(len(run))]
    if all("val" in node.meta for node in run):
        chain.meta["val"] = [node.meta["val"] for node in run]
    for node, out in zip(run, outs):
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
    for node in reversed(run):
        graph.erase_node(node)


def apply(graph: fx.Graph) -> int:
    """Rewrite every run in ``graph``; returns how many post_res calls were folded into chains."""
    runs = _runs(graph)
    for run in runs:
        _rewrite(graph, run)
    folded = sum(len(run) for run in runs)
    if runs:
        graph.lint()
        log.info("mhc: rebuilt %d recomputed stream(s) in %d chain(s), each from one read of its first stream",
                 folded, len(runs))
    return folded
