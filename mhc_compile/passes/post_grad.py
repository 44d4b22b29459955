"""The backend's passes over Inductor's post-grad graphs, as one cacheable custom pass.

Backward graphs only exist inside Inductor (AOTAutograd builds them after our rewrite), so the passes that
change them run as Inductor's ``post_grad_custom_post_pass`` (``backend._inner_compile``), in order, then
the pass the user configured there, if any. So do forward-graph rewrites that must not change what the
partition saw (``fold_post_res_proj``). Each pass module has ``apply(graph) -> int`` and ``__file__``.
The object is installed even with no pass to run: its ``uuid`` is how the backend's code enters the keys of
Inductor's graph caches.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

try:  # torch >= 2.6: a cacheable pass object (a bare callable would bypass the FX graph cache)
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - older torch
    CustomGraphPass = object

OPS = torch.ops.mhc_compile


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` / keyword ``name`` of a call node (post-grad graphs may hold either form)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def schema_index(target, name: str) -> int | None:
    """Where an op takes its argument ``name``, from the op's schema; None for a target without it."""
    schema = getattr(target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    return names.index(name) if name in names else None


def collapse_dx_index(target) -> int | None:
    """Where a post_res backward op or step_backward takes ``collapse_dx`` (its dx summed over the streams: a chain
    head's, set by passes/collapse_head_grad.py); None for an op without it."""
    return schema_index(target, "collapse_dx")


def collapses_dx(node: fx.Node) -> bool:
    """Whether ``node`` writes its dx summed over the streams (one row a token, not the stream's n)."""
    index = collapse_dx_index(node.target)
    return index is not None and bool(arg(node, index, "collapse_dx", False))


def move_getitems(graph: fx.Graph, old: fx.Node, new: fx.Node, offset: int = 0, after: fx.Node | None = None) -> None:
    """Point every getitem(old, i) at getitem(new, offset + i), keeping each one's meta and place (or, with
    ``after``, putting it right after that node: where ``new`` stands later than some of them); ``old`` is left
    without getitem users (the caller erases it)."""
    for item in list(old.users):
        with graph.inserting_before(item) if after is None else graph.inserting_after(after):
            moved = graph.call_function(operator.getitem, (new, offset + item.args[1]))
        moved.meta.update(item.meta)
        item.replace_all_uses_with(moved)
        graph.erase_node(item)


class PostGradPasses(CustomGraphPass):
    """Run ``passes`` (modules with ``apply``), then ``then`` (the user's post-grad pass) on each graph."""

    def __init__(self, passes, then=None):
        self.passes = tuple(passes)
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p.apply(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        from torch._inductor.custom_graph_pass import get_hash_for_files

        from mhc_compile import _compat
        from mhc_compile.runtime import ops

        # also the files that decide what the generated code calls (the ops' lowering to their direct twins):
        # a cached graph compiled against other ones would otherwise come back unchanged
        files = (__file__, ops.__file__, _compat.__file__) + tuple(p.__file__ for p in self.passes)
        mine = get_hash_for_files(files)
        if self.then is None:
            return mine
        theirs = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if theirs is None else (mine, theirs)  # None: not cacheable, as theirs is not
