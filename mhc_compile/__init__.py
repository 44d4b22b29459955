"""mhc-compile: a torch.compile backend that rewrites residual streams into n-stream mHC.

    import torch
    model = ...                                   # any transformer, unmodified
    mhc_compile.prepare(model, example_batch)     # optional: create the mHC parameters now
    opt = torch.optim.AdamW(model.parameters())
    step = torch.compile(model, backend="mhc", options={"n": 4})

The backend is registered under the name "mhc" through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="mhc")`` works without importing this package first.
"""

from __future__ import annotations

from mhc_compile.api import TracedGraph, load_state_dict, prepare, trace
from mhc_compile.backend import REPORTS, MHCConversionError, mhc_backend
from mhc_compile import diagnostics
from mhc_compile.config import MHCConfig
from mhc_compile.diagnostics import Diagnostics, amax_gain, collect, composite, composite_gains, stream_divergence
from mhc_compile.export import export_mlir
from mhc_compile.explain import ExplainReport, explain
from mhc_compile.runtime.checkpoint import load_sites
from mhc_compile.runtime.params import MHCSite, MissingMHCParametersError, init_sites, mhc_parameters

__all__ = [
    "Diagnostics",
    "amax_gain",
    "collect",
    "composite",
    "composite_gains",
    "diagnostics",
    "export_mlir",
    "stream_divergence",
    "ExplainReport",
    "explain",
    "MHCConfig",
    "MHCConversionError",
    "MHCSite",
    "MissingMHCParametersError",
    "REPORTS",
    "init_sites",
    "load_sites",
    "load_state_dict",
    "mhc_backend",
    "mhc_parameters",
    "prepare",
    "trace",
    "TracedGraph",
]

__version__ = "0.1.0"


def _register() -> None:
    # Importing the package directly (no entry-point lookup yet) must register the name too.
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "mhc" not in _BACKENDS or _BACKENDS["mhc"] is None:
        register_backend(mhc_backend, name="mhc")


_register()
