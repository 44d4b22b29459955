"""Every private torch internal mhc-compile leans on, in one place, each with a test.

A torch upgrade that moves one of these breaks loudly here (tests/test_compat.py) instead of deep
inside a pass.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable

import torch
from torch import nn


def dynamo_frame_locals() -> dict[str, Any] | None:
    """The locals of the frame Dynamo is compiling, when called from inside a backend.

    Dynamo hands a backend only the graph and the example tensors; the user's module objects (where
    the mHC parameters must live) are reachable from the frame being compiled.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return None
    return getattr(tx, "f_locals", None)


def _local_source(obj: Any, f_locals: dict[str, Any]):
    """Dynamo's Source for where the frame holds ``obj``: a local, or an item of a local tuple / list / dict (a
    decorator's wrapper frame holds the model in ``args``). None when it is not there."""
    from torch._dynamo.source import GetItemSource, LocalSource

    for name, value in f_locals.items():
        if value is obj:
            return LocalSource(name)
    for name, value in f_locals.items():
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (tuple, list)) else ()
        for key, item in items:
            if item is obj:
                return GetItemSource(LocalSource(name), key)
    return None


def guard_identity(obj: Any) -> bool:
    """Make Dynamo recompile the frame being compiled when the local now holding ``obj`` holds another
    object (an ID_MATCH guard). Returns False when no local holds it or this torch lacks the API."""
    try:
        from torch._dynamo.guards import GuardBuilder, install_guard

        source = _local_source(obj, dynamo_frame_locals() or {})
        if source is None:
            return False
        install_guard(source.make_guard(GuardBuilder.ID_MATCH))
    except Exception:  # pragma: no cover - depends on torch internals
        return False
    return True


_ACCESSOR = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)")


def _accessors(qualified: str) -> list[tuple[str, Any]] | None:
    """ "L['args'][0].model.h.0" -> [("local", "args"), ("item", 0), ("attr", "model"), ...], or None."""
    if not qualified.startswith("L["):
        return None
    out, pos = [], 1
    while pos < len(qualified):
        m = _ACCESSOR.match(qualified, pos)
        if m is None:
            return None
        key, index, attr = m.groups()
        if not out:
            if key is None:
                return None
            out.append(("local", key))
        elif attr is not None:
            out.append(("attr", attr))
        else:
            out.append(("item", int(index) if index is not None else key))
        pos = m.end()
    return out


def resolve_module(qualified: str, f_locals: dict[str, Any]) -> tuple[nn.Module, str] | None:
    """Split an nn_module_stack path into (the first module on it, the dotted path below that module).

    "L['self'].h.0" -> (self, "h.0"). A forward wrapped by a decorator is compiled as the wrapper's frame, whose
    locals hold the model inside ``args`` (transformers 5.24's top-level models): "L['args'][0].model.layers.0"
    -> (args[0], "model.layers.0").
    """
    steps = _accessors(qualified)
    if steps is None or steps[0][1] not in f_locals:
        return None
    obj = f_locals[steps[0][1]]
    rest = steps[1:]
    while not isinstance(obj, nn.Module):
        if not rest:
            return None
        kind, key = rest.pop(0)
        try:
            obj = getattr(obj, key) if kind == "attr" else obj[key]
        except (AttributeError, KeyError, IndexError, TypeError):
            return None
    return obj, ".".join(str(key) for _, key in rest)


def size_hint(value: Any) -> int:
    """The example value of a (possibly symbolic) size, without installing a guard on it: a planner that
    compares symbolic sizes would specialise the graph on them, and Dynamo would recompile per shape."""
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)
    if hint is None:
        raise ValueError(f"no example value for the size {value!r}")
    return int(hint)


def inductor_compile_fx() -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx


_FALLBACK_CALLS: dict = {}  # op -> what its registered fallback lowering calls


def register_inductor_fallbacks(ops, calls=None) -> None:
    """Give each custom op an explicit Inductor fallback lowering (an extern kernel call, as implicit
    fallbacks get). Without one, Inductor's implicit-fallback path formats the op's arguments for a log
    line; in torch 2.11 that string is built eagerly, and for a backward op whose inputs are deep
    unrealised pointwise IR (a LayerNorm backward) it took minutes (seen on the H100, 2026-11-23).
    The ops make their inputs contiguous themselves, so no layout constraint is needed.

    ``calls`` maps an op to the op the generated code calls in its place (same schema and fake: the direct
    twins of ``runtime/ops.py``, which skip the custom op's Python autograd layer); an op not in it calls
    itself. Registering again with other ``calls`` re-points the lowering."""
    from torch._inductor.lowering import add_needs_realized_inputs, fallback_handler, lowerings, register_lowering

    calls = calls or {}
    for op in ops:
        call = calls.get(op, op)
        if op not in lowerings or _FALLBACK_CALLS.get(op) is not call:
            add_needs_realized_inputs(op)
            register_lowering(op, type_promotion_kind=None)(fallback_handler(call))
            _FALLBACK_CALLS[op] = call


def lookup_backend(name: str) -> Callable:
    from torch._dynamo.backends.registry import lookup_backend as _lookup

    return _lookup(name)


def checkpoint_policy():
    """``CheckpointPolicy``: tags the min-cut partitioner honours in ``node.meta["recompute"]``."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy


def meta_fields_copied_to_aot() -> list[str]:
    """The FX node meta keys that survive AOTAutograd's retrace (so a Dynamo-level tag reaches the
    joint graph)."""
    import torch.fx.proxy as proxy

    return list(getattr(proxy, "_COPY_META_FIELDS", []))


def backend_compiler_failed() -> type[BaseException]:
    """Dynamo wraps an exception raised in a backend in this type (``.inner_exception`` holds it)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return BackendCompilerFailed


def modules_on_call_stack() -> list[nn.Module]:
    """``self`` of every Python frame below us that runs an nn.Module method, outermost first.

    When a graph break sits inside a loop over blocks, Dynamo runs the model's own forward eagerly and
    compiles each block's frame alone; the model is then only reachable as an eager caller frame.
    """
    import sys

    from torch._dynamo.eval_frame import OptimizedModule

    found: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(candidate, OptimizedModule):  # torch.compile's wrapper: the model is inside
            candidate = candidate._orig_mod
        if isinstance(candidate, nn.Module) and all(candidate is not m for m in found):
            found.append(candidate)
        frame = frame.f_back
    return found[::-1]


def graph_break_reasons(model: nn.Module, example_inputs) -> list[str]:
    """Dynamo's own account of where and why ``model(*example_inputs)`` breaks into several graphs."""
    out = torch._dynamo.explain(model)(*example_inputs)
    reasons = []
    for brk in out.break_reasons:
        where = ""
        if getattr(brk, "user_stack", None):
            frame = brk.user_stack[-1]
            where = f" at {frame.filename}:{frame.lineno} ({frame.name})"
        reasons.append(f"{str(brk.reason).splitlines()[0]}{where}")
    return reasons


def trace_artifact(name: str, payload: Callable[[], str]) -> None:
    """Put a string artifact into the structured trace (TORCH_TRACE / tlparse)."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload)


def compiling_code():
    """The code object Dynamo is compiling, when called from inside a backend (else None)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_code
    except Exception:
        return None


def forget_compiled(codes) -> None:
    """Drop Dynamo's cache entries for these code objects.

    prepare/trace/explain compile with a backend of their own; each such entry counts against Dynamo's
    recompile limit (8 per code object), past which Dynamo silently runs a frame eagerly, i.e. a later
    torch.compile(model, backend="mhc") would run the unconverted model. Entries of other backends for the
    same code are dropped too and simply recompile on their next call.
    """
    from torch._dynamo.eval_frame import reset_code

    for code in set(codes):
        if code is not None:
            reset_code(code)


@contextlib.contextmanager
def without_module_compile(model: nn.Module):
    """``model`` called as its plain self for the block: ``nn.Module.compile()`` keeps its compiled call in the
    private ``_compiled_call_impl``, which ``__call__`` would otherwise run (prepare's own trace would then go through
    the user's backend)."""
    compiled = model.__dict__.get("_compiled_call_impl")
    if compiled is None:
        yield
        return
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def checkpoint_context_fn(body) -> Any:
    """The ``context_fn`` of a selective-activation-checkpoint region Dynamo captured, if any (Dynamo
    keeps it in the region body's ``meta``, not in the higher-order op's kwargs)."""
    return getattr(body, "meta", {}).get("_checkpoint_context_fn")


def active_ddp_module() -> nn.Module | None:
    """The DistributedDataParallel whose forward is running (DDP marks itself around its module's call, and
    Dynamo compiles the module's frames inside that call), or None."""
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()


def ddp_synced_parameters(ddp: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradients ``ddp`` averages across ranks: those its module had when DDP was built,
    less the ones it was told to ignore, plus the delayed all-reduce ones (ignored by the reducer, reduced
    apart)."""
    return list(ddp._module_parameters) + list(getattr(ddp, "_delay_all_reduce_params", ()))


def split_by_ddp_optimizer() -> bool:
    """Whether this backend call compiles one piece of a graph that Dynamo's DDPOptimizer split at DDP's
    gradient-bucket boundaries (``torch._dynamo.config.optimize_ddp``): it compiles each piece through a
    ``SubmodCompiler`` on the call stack. A graph of one bucket is handed over whole, with no such frame."""
    import sys

    try:
        from torch._dynamo.backends.distributed import SubmodCompiler
    except ImportError:  # a torch built without distributed
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if "self" in frame.f_code.co_varnames and isinstance(frame.f_locals.get("self"), SubmodCompiler):
            return True
        frame = frame.f_back
    return False


def optimize_ddp_mode() -> str:
    """Dynamo's DDP mode (``torch._dynamo.config.optimize_ddp``, booleans resolved): "ddp_optimizer" (split each
    graph at DDP's buckets before the backend sees it), "no_optimization", or a compiled-autograd mode."""
    from torch._dynamo.utils import get_optimize_ddp_mode

    return get_optimize_ddp_mode()


def ddp_bucket_compiler(bucket_bytes_cap: int, compile_piece: Callable) -> tuple[Callable, Callable[[], int]]:
    """Dynamo's DDPOptimizer as a backend of its own: (``compile(gm, example_inputs)``, which splits ``gm`` at DDP's
    gradient-bucket boundaries, in reverse graph order as DDP's reducer fills them, and compiles each piece with
    ``compile_piece``; ``buckets()``, how many pieces the last call made). A graph of one bucket goes to
    ``compile_piece`` whole."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    optimizer = DDPOptimizer(bucket_bytes_cap=bucket_bytes_cap, backend_compile_fn=compile_piece)

    def compile_split(gm, example_inputs):
        # It hands each piece the graph's Dynamo metadata: every placeholder's source and the parameters'
        # sources. The backend's rewritten copy carries neither (its pieces then compile as the whole copy does,
        # as graphs not captured by Dynamo): no source for any of them.
        for node in gm.graph.find_nodes(op="placeholder"):
            if not hasattr(node, "_dynamo_source"):
                node._dynamo_source = None
        if not hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source = {}
        return optimizer.compile_fn(gm, example_inputs)

    return compile_split, lambda: len(getattr(optimizer, "buckets", ()))


def dynamo_restart() -> type[BaseException]:
    """The exceptions with which a compile inside a backend asks Dynamo to trace the frame again: AOTAutograd raises
    one, for instance, to have float inputs specialised (``TensorifyScalarRestartAnalysis``). A backend that
    caught it as a failure would run the frame's graph uncompiled from then on."""
    from torch._dynamo.exc import RestartAnalysis

    return RestartAnalysis


def compiling_resume_function() -> bool:
    """Whether Dynamo is compiling the rest of a frame after a graph break inside it (a resume function it
    generated, whose inputs are the live values the graph before it left), not a frame of the user's code."""
    code = compiling_code()
    return code is not None and code.co_name.startswith("torch_dynamo_resume_in_")
