"""Data-parallel training step under DistributedDataParallel: residual vs backend="mhc" with and without the
bucket split (passes/schedule.py), on WORLD processes of one host.

The same GPT-style pre-norm stack as bench_training.py (bf16 on CUDA). Every rank runs forward + backward of its own
batch; DDP's all-reduces are part of the step. Variants:

    residual       the plain stack, torch.compile (Inductor), Dynamo's DDPOptimizer splitting it at DDP's buckets
    mhc            backend="mhc", optimize_ddp off: the backend splits the rewritten graph at the same buckets
    mhc-one-graph  the same with ddp_buckets=False: one graph, every all-reduce after the backward

Each mHC variant is checked first: its gradients are the same on every rank (an all-reduce of their checksums), and
the mHC parameters got them. Then the ranks time --iters steps after warm-up, interleaved variant by variant for
--rounds rounds; rank 0 writes a markdown table (median step, overhead over residual, peak memory) to $OUT.

    python benchmarks/bench_ddp.py --world 2 --d 4096 --layers 4           # 2 GPUs, NCCL
    python benchmarks/bench_ddp.py --device cpu --world 2 --d 64 --seq 16  # gloo, a smoke run (as CI does)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mhc_compile  # noqa: E402
from benchmarks.bench_training import Stack, loss_of  # noqa: E402

VARIANTS = ("residual", "mhc", "mhc-one-graph")


def _build(variant: str, args, device, dtype):
    """(the compiled DDP step function, the module whose parameters it trains)."""
    torch.manual_seed(0)
    stack = Stack(args.d, args.layers).to(device=device, dtype=dtype)
    options = {"n": args.n, "inner_backend": args.inner}
    if variant != "residual":
        x = torch.randn(1, args.seq, args.d, device=device, dtype=dtype)
        mhc_compile.prepare(stack, x, **options)
    ddp = torch.nn.parallel.DistributedDataParallel(stack, device_ids=[device.index] if device.type == "cuda" else None)
    if variant == "residual":
        return torch.compile(ddp, backend=args.inner), stack
    options["ddp_buckets"] = variant == "mhc"
    return torch.compile(ddp, backend="mhc", options=options), stack


def _step(fn, stack, x):
    for p in stack.parameters():
        p.grad = None
    loss_of(fn(x)).backward()


def _check(fn, stack, x, variant: str) -> None:
    _step(fn, stack, x)
    grads = [p.grad for p in stack.parameters() if p.grad is not None]
    mhc = [p for p in mhc_compile.mhc_parameters(stack)]
    if variant != "residual" and (not mhc or any(p.grad is None for p in mhc)):
        raise RuntimeError(f"{variant}: the mHC parameters got no gradient")
    total = torch.stack([g.float().sum() for g in grads]).sum()
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    if any(not torch.isfinite(t) or abs((t - gathered[0]).item()) > 1e-3 * (abs(gathered[0].item()) + 1e-6)
           for t in gathered):
        raise RuntimeError(f"{variant}: the ranks' gradients differ after DDP's all-reduce: {gathered}")


def _time(fn, stack, x, iters: int, warmup: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        _step(fn, stack, x)
    sync()
    dist.barrier()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        _step(fn, stack, x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rank(rank: int, args, rendezvous: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=args.world)
    try:
        times, peaks = _measure(args, device, cuda)
        if rank == 0:
            _write(args, times, peaks)
        dist.barrier()
    finally:
        # every DDP (and its reducer) is gone before the process group: torn down after it, a gloo rank could hang
        # at exit (seen once in four CPU runs)
        gc.collect()
        dist.destroy_process_group()


def _measure(args, device, cuda: bool) -> tuple[dict, dict]:
    """Build, check and time every variant on this rank: (step times a round, peak GiB) by variant."""
    dtype = torch.bfloat16 if cuda else torch.float32
    built = {}
    torch.manual_seed(1 + dist.get_rank())
    x = torch.randn(args.batch, args.seq, args.d, device=device, dtype=dtype, requires_grad=True)
    for variant in args.variants:  # the residual stack keeps Dynamo's DDPOptimizer; the mhc ones need it off
        with torch._dynamo.config.patch(optimize_ddp=variant == "residual"):
            fn, stack = _build(variant, args, device, dtype)
            _check(fn, stack, x, variant)
        built[variant] = (fn, stack)
    times = {v: [] for v in args.variants}
    peaks = {}
    for _ in range(args.rounds):
        for variant, (fn, stack) in built.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[variant].append(_time(fn, stack, x, args.iters, args.warmup, device))
            peaks[variant] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return times, peaks


def _write(args, times: dict, peaks: dict) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    base = statistics.median(times["residual"]) if "residual" in times else None
    lines = [f"# DDP training step, {datetime.date.today()}", "",
             f"{args.world} x {device}, torch {torch.__version__}, d = {args.d}, {args.layers} layers, "
             f"seq {args.seq} x batch {args.batch} a rank, n = {args.n}, inner {args.inner}, "
             f"{args.rounds} rounds of {args.iters} steps", "",
             "| variant | step (ms, median of rounds) | rounds | over residual | peak GiB |", "|---|---|---|---|---|"]
    for variant, ts in times.items():
        med = statistics.median(ts)
        over = f"{100 * (med / base - 1):+.1f} %" if base and variant != "residual" else ""
        lines.append(f"| {variant} | {med:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {over} | {peaks[variant]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.environ.get("OUT", "bench_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"ddp-{datetime.date.today()}.md"), "w") as f:
        f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--world", type=int, default=0, help="processes (default: every GPU, or 2 on the CPU)")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ddp: no CUDA device; --device cpu runs it on gloo")
        return 2
    args.world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args, os.path.join(tmp, "rendezvous")), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
