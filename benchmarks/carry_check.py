"""The n streams carried across graph breaks on a GPU (runtime/carry.py): bench_training's stack compiled block by
block (as torchtitan compiles its blocks) against the same stack in one graph, backend="mhc", bf16, the default
kernels. Checks the output and every gradient against the one-graph model, then times a training step of each.
``--mode reduce-overhead`` runs both under CUDA graphs, which replay into the same memory every step: the check then
comes after three steps, so that the streams a block takes are the ones this step's previous block gave.

    PYTHONPATH=. python benchmarks/carry_check.py --d 4096 --layers 4 [--mode reduce-overhead]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mhc_compile  # noqa: E402
from benchmarks.bench_training import Stack, loss_of  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mode", default=None, help="torch.compile's mode for both models (e.g. reduce-overhead)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("carry_check: needs a CUDA device")
        return 2
    torch.manual_seed(0)
    stack = Stack(args.d, args.layers).cuda().bfloat16()
    x = torch.randn(args.batch, args.seq, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mhc_compile.prepare(stack, x, n=4)
    with torch.no_grad():  # mixing away from the identity-like init, so that carrying or not shows
        for p in mhc_compile.mhc_parameters(stack):
            p.add_(0.3 * torch.randn_like(p))
    whole = torch.compile(stack, backend="mhc", options={"n": 4}, mode=args.mode)
    blocks = [torch.compile(b, backend="mhc", options={"n": 4}, mode=args.mode) for b in stack.h]

    def by_block(v):
        for b in blocks:
            v = b(v)
        return stack.ln_f(v)

    def step(fn):
        if args.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(x)
        loss_of(out).backward()
        return out

    results = {}
    for name, fn in (("one graph", whole), ("block by block", by_block)):
        for _ in range(3 if args.mode else 1):  # CUDA graphs record at the second call, replay from the third
            for p in stack.parameters():
                p.grad = None
            x.grad = None
            out = step(fn)
        results[name] = (out.detach().float(), {k: p.grad.float() for k, p in stack.named_parameters()},
                         x.grad.float())
    ref_out, ref_grads, ref_dx = results["one graph"]
    got_out, got_grads, got_dx = results["block by block"]
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    errs = {"output": rel(got_out, ref_out), "dx": rel(got_dx, ref_dx)}
    errs["worst parameter"] = max(rel(got_grads[k], g) for k, g in ref_grads.items())
    errs["worst mHC parameter"] = max(rel(got_grads[k], g) for k, g in ref_grads.items() if ".mhc_" in k)
    ok = all(e < 2e-2 for e in errs.values())

    def time_of(fn):
        for _ in range(3):
            step(fn)
        times = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(fn)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    times = {name: time_of(fn) for name, fn in (("one graph", whole), ("block by block", by_block))}
    lines = [f"# carry_check, {datetime.date.today()}", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}, d = {args.d}, {args.layers} layers, "
             f"seq {args.seq} x batch {args.batch}, bf16, n = 4, mode {args.mode or 'default'}", "",
             "block by block against one graph (relative L2 error): "
             + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + (" ok" if ok else " FAILED"), "",
             "| model | step (ms, median) |", "|---|---|"]
    lines += [f"| {name} | {t:.2f} |" for name, t in times.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.environ.get("OUT", "bench_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"carry-check{'-' + args.mode if args.mode else ''}.md"), "w") as f:
        f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
