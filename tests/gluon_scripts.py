"""For the Gluon kernels' tests: their benchmarks/*_check.py scripts run in a subprocess without Triton's
interpreter (Gluon kernels do not run under it: ``--build`` compiles them for sm_90a on a CPU), and the skip for the
GPU-only check."""

import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(script: str, *args: str, ptxas_log: bool = False) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> args`` with TRITON_INTERPRET unset; stdout and stderr captured. ``ptxas_log``:
    every kernel built afresh (an empty Triton cache) with ptxas's log in the output (``serialized`` reads it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        if ptxas_log:
            env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)
        return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], env=env,
                              capture_output=True, text=True, timeout=900)


def serialized(proc: subprocess.CompletedProcess) -> list[str]:
    """ptxas's "Potential Performance Loss" lines in a ``run_check(..., ptxas_log=True)`` run: where it serializes
    a kernel's wgmmas (C7513 / C7515: registers a wgmma reads or accumulates into, set by other instructions inside
    the pipeline). The Gluon kernels exist to keep them in flight; Triton 3.9's PTX of the Gluon proj once had such
    a path (session 32)."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Potential Performance Loss" in line]


def on_sm90_gpu() -> bool:
    """An sm_90 GPU: where the Gluon kernels run and their check scripts compare them with the reference."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def failing_build(calls: list):
    """A stand-in for a Gluon kernel's launcher whose build fails, as on a GPU whose shared memory is too small:
    each call's (args, kwargs) goes into ``calls``, then Triton's OutOfResources is raised (before any launch, as
    a build error is), for the fallback tests of each Gluon kernel."""
    from triton.runtime.errors import OutOfResources

    def fails(*args, **kwargs):
        calls.append((args, kwargs))
        raise OutOfResources(240000, 232448, "shared memory")

    return fails


GPU_ONLY = "needs an sm_90 GPU (Gluon kernels do not run under the interpreter)"
