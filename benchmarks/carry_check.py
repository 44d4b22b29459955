"""The n streams carried across graph breaks on a GPU (runtime/carry.py): bench_training's stack compiled block by
block (as torchtitan compiles its blocks) against the same stack in one graph, backend="mhc", bf16, the default
kernels. Checks the output and every gradient against the one-graph model, then times a training step of each.
``--mode reduce-overhead`` runs both under CUDA graphs, which replay into the same memory every step: the check then
comes after three steps, so that the streams a block takes are the ones this step's previous block gave.
``--dtype float32`` runs both models in fp32 against a float64 copy: there the rounding of a sum over all tokens that
nearly cancels (an alpha's gradient) is about 2^16 times smaller than in bf16, so a gap that is bf16 noise in the
default run goes away, and one that a wrong carry makes does not.

    PYTHONPATH=. python benchmarks/carry_check.py --d 4096 --layers 4 [--mode reduce-overhead] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mhc_compile  # noqa: E402
from benchmarks.bench_training import Stack, loss_of  # noqa: E402


# the copy both models are measured against: well above the models' own precision
_REFERENCE_DTYPE = {"bfloat16": torch.float32, "float32": torch.float64}


def further_than_one_graph(errs: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The entries (name -> (one graph's error, block by block's), both against the reference copy) where carrying
    the streams lost accuracy: block by block further from it than 1.5x the one-graph error + 2e-3, a margin that
    bf16 noise between two orders of the same sums should stay under, and a wrong carry (streams dropped or mixed
    twice at a block boundary) does not."""
    return {k: e for k, e in errs.items() if e[1] > 1.5 * e[0] + 2e-3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the check on the reference kernels "
                    "(its times mean nothing)")
    ap.add_argument("--mode", default=None, help="torch.compile's mode for both models (e.g. reduce-overhead)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_REFERENCE_DTYPE),
                    help="both models' dtype (the reference copy: fp32 for bf16, float64 for fp32)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ref_dtype = _REFERENCE_DTYPE[args.dtype]
    ref_name = str(ref_dtype).removeprefix("torch.")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("carry_check: needs a CUDA device (or --device cpu)")
        return 2
    torch.manual_seed(0)
    stack = Stack(args.d, args.layers).to(dev, dtype)
    x = torch.randn(args.batch, args.seq, args.d, device=dev, dtype=dtype, requires_grad=True)
    mhc_compile.prepare(stack, x, n=4)
    with torch.no_grad():  # mixing away from the identity-like init, so that carrying or not shows
        for p in mhc_compile.mhc_parameters(stack):
            p.add_(0.3 * torch.randn_like(p))
    exact = copy.deepcopy(stack).to(ref_dtype)
    # the float64 copy without Inductor: torch 2.11's Inductor builds a float64 split reduction whose accumulator
    # starts as fp32, which Triton rejects (session 38's GPU run); the copy's own speed does not matter
    inner = "aot_eager" if ref_dtype == torch.float64 else "inductor"
    exact_fn = torch.compile(exact, backend="mhc", options={"n": 4, "inner_backend": inner})
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

    def grads_of(fn, model, v):
        for p in model.parameters():
            p.grad = None
        v.grad = None
        out = fn(v)
        loss_of(out).backward()
        return out

    xf = x.detach().to(ref_dtype).requires_grad_()
    out = grads_of(exact_fn, exact, xf)
    results = {"reference": (out.detach(), {k: p.grad.clone() for k, p in exact.named_parameters()}, xf.grad.clone())}
    del exact, exact_fn, out
    for name, fn in (("one graph", whole), ("block by block", by_block)):
        for _ in range(3 if args.mode else 1):  # CUDA graphs record at the second call, replay from the third
            for p in stack.parameters():
                p.grad = None
            x.grad = None
            out = step(fn)
        results[name] = (out.detach().to(ref_dtype), {k: p.grad.to(ref_dtype) for k, p in stack.named_parameters()},
                         x.grad.to(ref_dtype))
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    ref_grads = results["reference"][1]
    errs = {}  # name -> (one graph's error, block by block's), both against the reference copy
    for what, i in (("output", 0), ("dx", 2)):
        errs[what] = tuple(rel(results[m][i], results["reference"][i]) for m in ("one graph", "block by block"))
    for k, g in ref_grads.items():
        errs[k] = tuple(rel(results[m][1][k], g) for m in ("one graph", "block by block"))
    bad = further_than_one_graph(errs)
    ok = not bad
    worst = max((k for k in ref_grads), key=lambda k: errs[k][1])
    worst_mhc = max((k for k in ref_grads if ".mhc_" in k), key=lambda k: errs[k][1])

    def time_of(fn):
        for _ in range(3):
            step(fn)
        times = []
        for _ in range(args.iters):
            if dev.type != "cuda":
                start = time.perf_counter()
                step(fn)
                times.append((time.perf_counter() - start) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(fn)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    times = {name: time_of(fn) for name, fn in (("one graph", whole), ("block by block", by_block))}
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    verdict = ("ok: every error of the block-by-block model is within 1.5x + 2e-3 of the one-graph model's" if ok else
               f"FAILED, further from the {ref_name} copy than the one graph: "
               + ", ".join(f"{k} {e[1]:.2e} against {e[0]:.2e}" for k, e in bad.items()))
    lines = [f"# carry_check, {datetime.date.today()}", "",
             f"{where}, torch {torch.__version__}, d = {args.d}, {args.layers} layers, "
             f"seq {args.seq} x batch {args.batch}, {args.dtype}, n = 4, mode {args.mode or 'default'}", "",
             f"| relative L2 error against the {ref_name} stack (one graph) | one graph | block by block |",
             "|---|---|---|"]
    lines += [f"| {k} | {errs[k][0]:.2e} | {errs[k][1]:.2e} |" for k in ("output", "dx")]
    lines += [f"| worst parameter ({worst}) | {errs[worst][0]:.2e} | {errs[worst][1]:.2e} |",
              f"| worst mHC parameter ({worst_mhc}) | {errs[worst_mhc][0]:.2e} | {errs[worst_mhc][1]:.2e} |", "",
              verdict, "",
             "| model | step (ms, median) |", "|---|---|"]
    lines += [f"| {name} | {t:.2f} |" for name, t in times.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.environ.get("OUT", "bench_out")
    os.makedirs(out, exist_ok=True)
    tags = [v for v in (args.mode, args.dtype if args.dtype != "bfloat16" else None) if v]
    with open(os.path.join(out, "-".join(["carry-check", *tags]) + ".md"), "w") as f:
        f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
