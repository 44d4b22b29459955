"""For the Gluon kernels' tests: their benchmarks/*_check.py scripts run in a subprocess without Triton's
interpreter (Gluon kernels do not run under it: ``--build`` compiles them for sm_90a on a CPU), and the skip for the
GPU-only check."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> args`` with TRITON_INTERPRET unset; stdout and stderr captured."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def on_sm90_gpu() -> bool:
    """An sm_90 GPU: where the Gluon kernels run and their check scripts compare them with the reference."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


GPU_ONLY = "needs an sm_90 GPU (Gluon kernels do not run under the interpreter)"
