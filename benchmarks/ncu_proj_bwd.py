"""Launch proj's one-pass backward (the step's folded proj + pre backward) at 8192 tokens, for Nsight Compute.

    ncu -k regex:_proj_dx_dphi --launch-skip 1 --launch-count 1 --set full \\
        python benchmarks/ncu_proj_bwd.py [C ...]            (default C = 4096; n = 4, bf16)

The profile in benchmarks/results/session7-2026-12-02-h200.md was taken this way at C = 7168.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.lab_dx_dphi import _args, make  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402

for c in [int(a) for a in sys.argv[1:]] or [4096]:
    inputs = make(8192, 4, c, "cuda")
    for _ in range(3):
        tk.proj_pre_backward(*_args(inputs))
    torch.cuda.synchronize()
