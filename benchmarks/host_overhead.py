"""Host (Python / dispatch / launch) cost of the mHC ops per training step: tiny tensors on a GPU.

With a 20 ms GPU step (d = 2048 in bench_training) the host has to issue every launch in time; if the mHC
ops' dispatch and Triton launches cost more than the GPU work they stand for, the GPU waits. With tensors
this small the GPU work is negligible, so the step time is (almost) all host time, and the difference
between the converted and the plain model is what the bookkeeping costs the host per step.

Meant for a CUDA machine (Triton kernels). On the CPU it still runs, but it then measures the reference
kernels' many small torch ops (20 Sinkhorn iterations and their backward), which is not the GPU path's
host cost: on a 2-core CPU on 2026-11-23 it gave +27 ms per step for 8 sites, almost all reference math.

    PYTHONPATH=. python benchmarks/host_overhead.py [--layers 4] [--iters 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mhc_compile  # noqa: E402
from bench_training import Stack, loss_of  # noqa: E402


def step_ms(fn, x, iters, sync):
    for _ in range(5):
        loss_of(fn(x)).backward()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        loss_of(fn(x)).backward()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--inner-backend", default="inductor")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    x = torch.randn(1, 8, 128, device=dev, requires_grad=True)
    plain = Stack(128, args.layers).to(dev)
    rows = []
    rows.append(("residual", step_ms(torch.compile(plain, backend=args.inner_backend), x, args.iters, sync)))
    for recompute in ("auto", "none"):
        model = Stack(128, args.layers).to(dev)
        mhc_compile.prepare(model, x.detach())
        fn = torch.compile(model, backend="mhc", options={"recompute": recompute, "inner_backend": args.inner_backend})
        rows.append((f"mhc recompute={recompute}", step_ms(fn, x, args.iters, sync)))
    sites = 2 * args.layers
    base = rows[0][1]
    print(f"host time per fwd+bwd step on {dev}, {sites} sites, tiny tensors, torch {torch.__version__}")
    for name, ms in rows:
        print(f"  {name:<22} {ms:7.2f} ms   (+{ms - base:6.2f} ms, {1e3 * (ms - base) / sites:6.0f} us per site)")


if __name__ == "__main__":
    main()
