"""post_res_proj's kernel built for sm_90a on a machine without a GPU: registers, spills, shared memory and, in
its channel loop, the SASS opcodes that bound it (tensor-core ops and their waits, barriers, TMA loads), per tile
configuration.

    python benchmarks/post_res_proj_build.py [--c 4096] [--configs default one_dot one_dot,num_warps=8]

The wrapper picks the tile and flags as it would on the GPU; its launch is replaced by ``JITFunction.warmup``
under ``sm90_build.cpu_target``. The GPU's Triton may build differently from this machine's (see the output's
version line): counts compare configurations, not GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sm90_build  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_post_res_proj as tprp  # noqa: E402

OPCODES = ("HGMMA", "WARPGROUP.DEPBAR", "BAR.SYNC", "SYNCS", "UTMALDG", "STG", "FFMA")


def parse_config(text: str) -> dict:
    """'default' -> {}; 'one_dot,num_warps=8' -> {'one_dot': True, 'num_warps': 8}; 'tma=False' -> {'tma': False}."""
    cfg = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "default":
            continue
        if not value:
            cfg[key] = True
        elif value in ("True", "False"):
            cfg[key] = value == "True"
        else:
            cfg[key] = int(value)
    return cfg


def build(cfg: dict, n: int = 4, c: int = 4096, t: int = 256, arch: int = 90):
    """The compiled kernel the wrapper would launch under these DotCfg fields (tensors on the CPU, never run)."""
    m = n * n + 2 * n
    x, y = torch.zeros(t, n, c, dtype=torch.bfloat16), torch.zeros(t, c, dtype=torch.bfloat16)
    with sm90_build.builds_of(tprp, tprp._post_res_proj_kernel, arch) as built, tk.tuning("post_res_proj", **cfg):
        tk.post_res_proj(x, torch.zeros(t, n, n), torch.zeros(t, n), y, torch.zeros(n * c, m))
    return built[0]


def describe(compiled, arch: int = 90) -> dict:
    """Registers, spills, shared memory, and the opcode counts of the channel loop (one chunk of the steady state;
    'loop' is its instruction count) and of the whole binary ('total')."""
    regs, stack = sm90_build.resources(compiled, arch)
    text = sm90_build.sass(compiled, arch)
    loop = sm90_build.opcode_counts(sm90_build.main_loop(text), OPCODES)
    return dict(regs=regs, spills=stack, smem_kb=round(compiled.metadata.shared / 1024),
                **{op: loop[op] for op in OPCODES}, loop=loop["total"],
                total=sm90_build.opcode_counts(text, ())["total"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--c", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["default", "one_dot"])
    args = ap.parse_args()
    print(f"sm_90a builds by triton {triton.__version__}, n = {args.n}, C = {args.c}, bf16")
    for text in args.configs:
        print(f"{text}: {describe(build(parse_config(text), args.n, args.c))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
