"""User-facing entry points besides the backend itself."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mhc_compile import distributed
from mhc_compile.config import MHCConfig


def prepare(model: nn.Module, *example_inputs: Any, example_kwargs: dict[str, Any] | None = None,
            **options: Any) -> nn.Module:
    """Create the mHC parameters of ``model`` now, before an optimizer is built.

    Traces ``model(*example_inputs)`` with Dynamo exactly as ``torch.compile(model, backend="mhc")``
    will, runs the detection, and registers one ``MHCSite`` (phi, bias, alpha) on the module that owns
    each residual add. Nothing is compiled and the model's forward is unchanged. Calling it again with
    the same options is a no-op; with another n or mode it raises. Returns ``model``.

    Keyword inputs of the model (``decoder_input_ids=`` of an encoder-decoder, say) go in
    ``example_kwargs``, since the other keywords are the backend's options.
    """
    from mhc_compile.backend import REPORTS, compile_graph

    config = MHCConfig.from_options(options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc_compile.prepare expects an nn.Module, got {type(model).__name__}")

    def plan_backend(gm, inputs):
        return compile_graph(gm, list(inputs), config, plan_only=True, lazily=False)

    start = len(REPORTS)
    _run_once(distributed.unwrap(model), example_inputs, plan_backend, example_kwargs)
    _check_wrapper_synced(model)
    if not any(r.detection.sites for r in REPORTS[start:]):
        # Not an error (a model may have no residual stream), but never a silent no-op: a model whose blocks
        # Dynamo ran eagerly would otherwise train as it was, with no mHC and no message.
        warnings.warn(
            f"mhc_compile.prepare: no residual add x + f(x) in the graphs Dynamo captured from "
            f"{type(model).__name__}; no mHC parameters were created and the model will train unchanged. Code "
            f"that Dynamo runs eagerly is not seen: a graph break inside a loop or a checkpointed region skips "
            f"the whole frame (TORCH_LOGS=graph_breaks lists them).", stacklevel=2)
    return model


def _run_once(model: nn.Module, example_inputs: tuple, backend, example_kwargs: dict[str, Any] | None = None) -> None:
    """Run ``model`` once under Dynamo with one of our own backends, then forget what was compiled.

    Forgetting matters: every such run would otherwise stay in Dynamo's cache for the model's code and
    count against its recompile limit, past which Dynamo runs frames eagerly, so that a later
    ``torch.compile(model, backend="mhc")`` would silently run the unconverted model.
    """
    from mhc_compile import _compat

    codes = []

    def recording_backend(gm, inputs, **_):
        codes.append(_compat.compiling_code())
        return backend(gm, inputs)

    try:
        with torch.no_grad(), _compat.without_module_compile(model):
            torch.compile(model, backend=recording_backend, dynamic=False)(*example_inputs, **(example_kwargs or {}))
    except _compat.backend_compiler_failed() as e:
        # Our own call: give the user our error, not Dynamo's wrapper around it.
        raise e.inner_exception from None
    finally:
        _compat.forget_compiled(codes)


@dataclass
class TracedGraph:
    """One Dynamo graph after the mhc passes: the FX graph, its example inputs (graph inputs, then the
    mHC parameters), and the backend's report for it."""

    gm: torch.fx.GraphModule
    example_inputs: list
    report: Any


def trace(model: nn.Module, *example_inputs: Any, **options: Any) -> list[TracedGraph]:
    """Run the backend's passes on ``model(*example_inputs)`` and return the rewritten graphs.

    Like ``prepare`` it creates missing mHC parameters on ``model``; nothing is compiled (the graphs run
    eagerly once). Used by ``explain`` and ``export_mlir``.
    """
    from mhc_compile.backend import compile_graph

    config = MHCConfig.from_options(options, inner_backend="eager")
    traced: list[TracedGraph] = []

    def trace_backend(gm, inputs):
        return compile_graph(gm, list(inputs), config, lazily=False,
                             on_graph=lambda g, i, r: traced.append(TracedGraph(g, list(i), r)))

    _run_once(distributed.unwrap(model), example_inputs, trace_backend)
    _check_wrapper_synced(model)
    return traced


def _check_wrapper_synced(model: nn.Module) -> None:
    """A DDP given to ``prepare`` / ``trace`` (which run the module it wraps) must synchronise every mHC parameter
    of that module; those just created there it does not (``distributed.check_synced``)."""
    from mhc_compile.runtime.params import record_for

    record = record_for(distributed.unwrap(model)) if distributed.is_ddp(model) else None
    if record is not None:
        distributed.check_synced({path: list(site.parameters()) for path, site in record.sites.items()}, ddp=model)


def load_state_dict(model: nn.Module, state_dict: Any, strict: bool = True, assign: bool = False):
    """Load a converted model's checkpoint into ``model``, prepared or not.

    ``model.load_state_dict`` needs the mHC sites to exist (``mhc_compile.prepare`` with the checkpoint's
    options); this helper creates the sites the checkpoint holds from the layout (n, width, mode) each site
    carries, so no example input is needed, then calls ``model.load_state_dict``. A model prepared with
    another n or mode, a checkpoint site whose owner module does not exist, or (``strict``) a model with
    mHC sites the checkpoint lacks raise a ValueError naming the site. Returns what
    ``nn.Module.load_state_dict`` returns.
    """
    from mhc_compile.runtime.checkpoint import sites_from_checkpoint

    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc_compile.load_state_dict expects an nn.Module, got {type(model).__name__}")
    sites_from_checkpoint(model, state_dict, strict=strict)
    return model.load_state_dict(state_dict, strict=strict, assign=assign)
