"""Launch one row of bench_kernels' table a few times, for Nsight Compute.

    ncu -k regex:_post_res_proj_kernel --launch-skip 2 --launch-count 1 --set full \\
        python benchmarks/ncu_case.py post_res_proj fwd [--t 32768] [--c 4096] [--cfg post_res_proj:one_dot=1]

The case runs on the shipped tiles unless ``--cfg KERNEL:FIELDS`` (bench_training's ``tune:`` syntax, checked
against the kernel's config fields, e.g. ``post_res_proj:bk=64,num_warps=8``) changes one kernel's tile first. Three launches: ncu's --launch-skip
then profiles a warm one (compiled, its phi split cached like in training).

    python benchmarks/ncu_case.py "step (head, row)" bwd --split    # each kernel's share of the row, no ncu

``--split`` times the row's kernels itself instead (torch.profiler over ``--launches`` warm launches; each kernel's
device time a launch of the row and its share): whether a row's gap to its floor is in its main kernel or in the
passes and small ops around it. On a CPU (``--device cpu``, the interpreter) it lists the row's ops' CPU time.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.against import kernel_times  # noqa: E402
from benchmarks.bench_kernels import _call, cases, make_inputs  # noqa: E402
from benchmarks.bench_training import tune_fields  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", help="a bench_kernels row's kernel name, e.g. post_res_proj or 'enter'")
    ap.add_argument("direction", choices=["fwd", "bwd"])
    ap.add_argument("--t", type=int, default=32768)
    ap.add_argument("--c", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--cfg", action="append", default=[], help="KERNEL:FIELDS, a triton_ops tile to use")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: under TRITON_INTERPRET=1, to test this script")
    ap.add_argument("--split", action="store_true", help="print each kernel's time a launch of the row (torch.profiler)")
    args = ap.parse_args(argv)
    for spec in args.cfg:
        kernel, fields = tune_fields(f"tune:{spec}")
        tk.configure(kernel, **fields)
    inp = make_inputs(args.t, args.n, args.c, torch.bfloat16, args.device)
    found = [c for c in cases(inp) if (c.kernel, c.direction) == (args.kernel, args.direction)]
    if not found:
        names = sorted({f"{c.kernel} {c.direction}" for c in cases(inp)})
        ap.error(f"no bench_kernels row '{args.kernel} {args.direction}'; rows: {', '.join(names)}")
    if args.split:
        print("\n".join(split(found[0], args.launches, args.device)))
        return 0
    for _ in range(args.launches):
        _call(found[0], tk)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return 0


def split(case, launches: int, device: str) -> list[str]:
    """The row's kernels (on a CPU: its ops) by device time a launch of the row, largest first, as table lines."""
    times, calls = kernel_times(lambda: _call(case, tk), launches, on_gpu=device == "cuda", width=90)
    total = sum(times.values())
    lines = [f"| {case.kernel} {case.direction}: kernel | calls a launch | us a launch | share |", "|---|---|---|---|"]
    for name, us in times.most_common():
        lines.append(f"| {name} | {calls[name]:g} | {us:.1f} | {100 * us / total:.1f} % |")
    lines.append(f"| all | | {total:.1f} | |")
    return lines

if __name__ == "__main__":
    sys.exit(main())
