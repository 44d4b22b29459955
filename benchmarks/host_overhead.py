"""Host (Python / dispatch / launch) cost of the mHC ops per training step: tiny tensors on a GPU.

With a 20 ms GPU step (d = 2048 in bench_training) the host has to issue every launch in time; if the mHC
ops' dispatch and Triton launches cost more than the GPU work they stand for, the GPU waits. With tensors
this small the GPU work is negligible, so the step time is (almost) all host time, and the difference
between the converted and the plain model is what the bookkeeping costs the host per step.

Meant for a CUDA machine (Triton kernels). On the CPU it still runs, but it then measures the reference
kernels' many small torch ops (20 Sinkhorn iterations and their backward), which is not the GPU path's
host cost: on a 2-core CPU on 2026-11-23 it gave +27 ms per step for 8 sites, almost all reference math.
--stub-launches (CPU) runs the Triton path instead with every Triton launch replaced by a no-op: what is left
is the host work around the launches (dispatch, the ops' wrappers, Inductor's generated code); the outputs
are garbage, the host time is not.

    PYTHONPATH=. python benchmarks/host_overhead.py [--layers 4] [--iters 50] [--rounds 1] [--ops] [--stub-launches]
        [--dtype bfloat16] [--cprofile N]

One round gave differences of a few ms between repeated runs on the GPU machine (session 10, call 5): use
--rounds 5 or more to judge a host change of ~1 ms.

--ops adds a table of each mHC op's host cost a call (tiny bf16 tensors): the op through torch.ops.mhc_compile (the
custom op, with its Python autograd layer), through its direct twin (what Inductor's generated code calls), the
kernel wrapper of kernels/triton_ops.py alone, and a bare Triton launch of a one-line kernel for scale.
"""

from __future__ import annotations

import argparse
import collections
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


def cprofile_table(fn, x, top: int, title: str) -> None:
    """The ``top`` functions by own host time over 20 steps: where a step's host time goes, by Python function
    and builtin (Triton's launch path, torch calls, the ops' wrappers, Inductor's generated code)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        loss_of(fn(x)).backward()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    print(f"\n{title}: {stats.total_tt / 20 * 1e3:.2f} ms a step under cProfile; top {top} by own time")
    stats.sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


def op_costs(dev: str, iters: int = 2000) -> list[tuple[str, float, float, float]]:
    """(op, us a call as custom op, as direct twin, as the bare kernel wrapper) for the ops of a training step."""
    import triton
    import triton.language as tl

    from mhc_compile.kernels import triton_ops as tk

    t, n, c = 64, 4, 128
    bf = dict(device=dev, dtype=torch.bfloat16)
    x, y, g = torch.randn(t, n, c, **bf), torch.randn(t, c, **bf), torch.randn(t, n, c, **bf)
    f32 = dict(device=dev)
    m = 2 * n + n * n
    phi, bias, alpha = torch.randn(n * c, m, **f32) * 0.1, torch.randn(m, **f32), torch.rand(3, **f32)
    p, sq = torch.randn(t, m, **f32), torch.rand(t, **f32) + 1
    h_pre, h_post, h_res = torch.rand(t, n, **f32), torch.rand(t, n, **f32), torch.rand(t, n, n, **f32)
    coeff = (n, n * c, 1e-6, 20, "mhc")
    cases = [
        ("proj", (x, phi)),
        ("coeffs", (p, sq, bias, alpha, *coeff)),
        ("coeffs_backward", (p, sq, bias, alpha, h_pre, h_post, h_res, *coeff)),
        ("pre", (x, h_pre)),
        ("pre_backward_dh", (x, h_pre, y)),
        ("post_res", (x, h_res, h_post, y)),
        ("post_res_backward", (x, h_res, h_post, y, g)),
        ("proj_pre_backward", (x, phi, p, sq, h_pre, y, g)),
    ]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def per_call(fn):
        for _ in range(20):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters * 1e6

    @triton.jit
    def _copy(src, dst, N, B: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(dst + o, tl.load(src + o, mask=o < N), mask=o < N)

    rows = []
    with torch.no_grad():
        src, dst = torch.randn(1024, device=dev), torch.empty(1024, device=dev)
        rows.append(("bare Triton launch (3 args)", float("nan"), float("nan"),
                     per_call(lambda: _copy[(1,)](src, dst, 1024, B=1024))))
        for name, args in cases:
            fn = getattr(tk, name)
            custom = getattr(torch.ops.mhc_compile, name).default
            direct = getattr(getattr(torch.ops, "mhc_compile_direct", None), name, None)
            rows.append((name, per_call(lambda: custom(*args, "triton")),
                         per_call(lambda: direct.default(*args, "triton")) if direct is not None else float("nan"),
                         per_call(lambda: fn(*args))))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the three models this many times, in turn; report medians and the extra's range")
    ap.add_argument("--inner-backend", default="inductor")
    ap.add_argument("--ops", action="store_true", help="also time each op's host cost a call")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the models' dtype: bfloat16 takes the kernels training takes (proj's one-pass backward)")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also print the N functions with the most host time (cProfile, tottime) in 20 steps of "
                         "the residual model and of backend=mhc (recompute auto)")
    ap.add_argument("--stub-launches", action="store_true",
                    help="CPU: the Triton kernels path with every launch a no-op (host work around the launches)")
    args = ap.parse_args()
    options = {}
    launches: collections.Counter = collections.Counter()
    if args.stub_launches:
        from triton.runtime.jit import JITFunction

        def stub(self, grid):
            return lambda *a, **k: launches.update([self.fn.__name__])

        JITFunction.__getitem__ = stub
        options["kernels"] = "triton"
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(1, 8, 128, device=dev, dtype=dtype, requires_grad=True)
    plain = Stack(128, args.layers).to(dev, dtype)
    plain_fn = torch.compile(plain, backend=args.inner_backend)
    variants = [("residual", plain_fn)]
    for recompute in ("auto", "none"):
        model = Stack(128, args.layers).to(dev, dtype)
        mhc_compile.prepare(model, x.detach())
        fn = torch.compile(model, backend="mhc",
                           options={"recompute": recompute, "inner_backend": args.inner_backend, **options})
        variants.append((f"mhc recompute={recompute}", fn))
    # rounds: every variant timed once a round, in turn, so that a drift of the machine (clocks, other load) hits
    # all of them alike; each round's extra is against that round's residual step
    times = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, fn in variants:
            times[name].append(step_ms(fn, x, args.iters, sync))
    if args.cprofile:
        cprofile_table(variants[0][1], x, args.cprofile, "residual")
        cprofile_table(variants[1][1], x, args.cprofile, "backend=mhc, recompute auto")
    if launches:
        for name, fn in variants[1:]:
            launches.clear()
            loss_of(fn(x)).backward()
            print(f"Triton launches a step, {name}: {sum(launches.values())} "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(launches.items()))})")
    sites = 2 * args.layers
    base = times["residual"]
    print(f"host time per fwd+bwd step on {dev}, {sites} sites, tiny tensors, torch {torch.__version__}"
          + (f"; medians of {args.rounds} interleaved rounds, extra's range over the rounds" if args.rounds > 1 else ""))
    for name, ms in times.items():
        extra = [m - b for m, b in zip(ms, base)]
        med = statistics.median(extra)
        spread = f"  [{min(extra):+.2f} .. {max(extra):+.2f}]" if args.rounds > 1 and name != "residual" else ""
        print(f"  {name:<22} {statistics.median(ms):7.2f} ms   (+{med:6.2f} ms, {1e3 * med / sites:6.0f} us per site)"
              + spread)
    if args.ops and dev == "cuda":
        print("\nhost us a call (tiny bf16 tensors): custom op | direct twin | triton_ops wrapper alone")
        for name, custom, direct, bare in op_costs(dev):
            print(f"  {name:<28} {custom:7.1f} {direct:7.1f} {bare:7.1f}")


if __name__ == "__main__":
    main()
