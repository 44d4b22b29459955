"""Where a training step's GPU time goes: CUDA kernel time by kernel, plain residual stack vs backend="mhc".

For each width: the step's wall time (CUDA events, not under the profiler), the summed kernel time of one step
(the difference is time the GPU waited on the host), kernel time by category (GEMM, attention, Inductor's
generated kernels, ATen kernels, the mHC kernels) for both models and the difference, and every mHC kernel with
its calls, time and in-step bandwidth: its bytes (each stream tensor read or written once, ``KERNEL_BYTES``) over
its time, as a share of the copy bandwidth measured in the same run. This is the profile behind
benchmarks/results/*: what a step spends its overhead on, not just the total.

    PYTHONPATH=. OUT=dir python benchmarks/profile_step.py [d ...] [--nofoldpre] [--foldprp] [--tune SPEC ...]

--nofoldpre also profiles backend="mhc" with fold_pre_recompute=False (the default before session 16), its mHC
kernels listed beside the default's;
--foldprp likewise with fold_post_res_proj=True (post_res + the next proj as one forward kernel).
--fused likewise with fuse=True (the cross-layer ``step`` / ``enter`` ops); --fusedws with fuse=True and the Gluon
kernels (sm_90): step's forward through DotCfg.ws (the default since session 27), its backward in two passes
(StepBwdCfg.ws, opt-in).
--opt <option>=<v>,... (bench_training's opt: syntax, without the prefix) likewise with those backend options, e.g.
--opt collapse_tail=0,collapse_head_grad=0: a pass judged by the mHC kernels' summed time a step, which resolves
far less than the step's run-to-run spread.
--tune tune:<kernel>:<field>=<v>,... (bench_training's syntax) profiles the same compiled model again with that
kernel's config changed, and tabulates every mHC kernel's in-step time a call for the default and each
alternative side by side: a tile or kernel change judged where it runs (power-capped clocks, other kernels
around it, the step's own shapes), with per-kernel times that resolve far less than the step's run-to-run spread.
"""
import argparse
import collections
import contextlib
import datetime
import os
import statistics
import sys
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mhc_compile  # noqa: E402
from benchmarks.bench_training import Stack, _step, gluon_step  # noqa: E402
from benchmarks.gpu_clocks import ClockLog  # noqa: E402
from benchmarks.gpu_clocks import describe as describe_clocks  # noqa: E402

N = 4
# bytes of one call in units of one C-wide token row of the stream dtype (S = the n-row stream, v = one row):
# what each kernel must read and write at least; per-token coefficients and fp32 partials are left out
KERNEL_BYTES = {
    "_post_res_fwd_kernel": lambda S, v: 2 * S + v,          # X, y -> X'
    "_pre_fwd_kernel": lambda S, v: S + v,                   # X -> x_in
    "_proj_fwd_kernel": lambda S, v: S,                      # X -> p, sq
    "_proj_ws_kernel": lambda S, v: S,                       # the Gluon proj forward (DotCfg.ws)
    "_post_res_proj_kernel": lambda S, v: 2 * S + v,         # X, y -> X', p', sq' (fold_post_res_proj)
    "_post_res_collapse_kernel": lambda S, v: S + 2 * v,     # X, y -> the mean of X' (a chain's tail, collapse_tail)
    # dX', X, y -> dX, dy; with fold_pre_recompute (the default) also x_in, a v more that this leaves out (a kernel
    # name does not say which op launched it); and the chain head's call (collapse_dx, a broadcast X) moves 2 (S - v)
    # less, which this counts as moved: its average over the calls is a little high
    "_post_res_bwd_kernel": lambda S, v: 3 * S + 2 * v,
    "_post_res_bwd_2d_kernel": lambda S, v: 3 * S + 2 * v,   # the same op's 2-D kernel (the default)
    "_pre_bwd_kernel": lambda S, v: S + v,                   # X, dx_in -> dh_pre (pre_backward_dh)
    "_proj_dx_dphi_kernel": lambda S, v: 3 * S + v,          # X, dx_in, acc -> dX (and dphi)
    "_proj_dx_kernel": lambda S, v: 3 * S + v,
    "_proj_dphi_kernel": lambda S, v: S,
    "_proj_bwd_ws_kernel": lambda S, v: 3 * S + v,           # the Gluon one-pass backward, as _proj_dx_dphi_kernel
    "_post_res_proj_ws_kernel": lambda S, v: 2 * S + v,      # the Gluon post_res_proj (DotCfg.ws)
    # boundary_backward's one pass (fold_boundary_grads, the default since session 41): X, X_prev, acc, y, dx_in ->
    # dX_prev, dy, x_in. The same kernel runs fuse=True's step backward pass 2 (X rebuilt, no x_in: 3 S + 3 v), which
    # its name does not tell apart: under fuse=True its efficiency here reads 4 / 3 of the true one
    "_step_bwd_ws_kernel": lambda S, v: 4 * S + 4 * v,
}


def category(name: str) -> str:
    if name.split("_0d1d")[0] in KERNEL_BYTES or name.startswith(("_coeffs", "hi_lo", "_post_res", "_pre_",
                                                                   "_proj", "_dh_pre", "_step", "_enter",
                                                                   "_pack_tokens", "_phi_rows")):
        return "mHC kernels"
    if name.startswith(("nvjet", "sm90_xmma", "cutlass", "void cutlass", "ampere", "sm80")) or "gemm" in name:
        return "GEMM"
    if "sdpa" in name or "flash" in name or "cudnn" in name:
        return "attention"
    if name.startswith("triton_"):
        return "Inductor (generated)"
    if "at::native" in name:
        return "ATen (reductions, copies, fills)"
    return "other"


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * 10 / (start.elapsed_time(end) / 1e3)


class Profile(NamedTuple):
    """One model's profiled step: wall ms (median of unprofiled steps), kernel us a step and calls a step by name,
    the SM clock summary, and gaps() of its profiled steps."""

    wall: float
    us: dict
    calls: dict
    clocks: object
    gaps: tuple = (0.0, 0.0, {})


def profile(fn, x, steps=3, context=contextlib.nullcontext) -> Profile:
    with context():
        return _profile(fn, x, steps)


def _profile(fn, x, steps):
    for _ in range(3):
        _step(fn, x)
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, x)
        end.record()
        torch.cuda.synchronize()
        walls.append(start.elapsed_time(end))
    # the SM clock while the kernels are timed: under the power cap it falls well below the boost clock, and
    # the latency-bound kernels' in-step efficiency with it (gpu_clocks.py)
    with ClockLog() as clocks, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _step(fn, x)
        torch.cuda.synchronize()
    us, calls = collections.Counter(), collections.Counter()
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us[e.name[:90]] += e.device_time_total / steps
            calls[e.name[:90]] += 1
            spans.append((e.time_range.start, e.time_range.end, e.name[:60]))
    return Profile(statistics.median(walls), us, {k: v // steps for k, v in calls.items()}, clocks.summary(),
                   gaps(spans, steps))


def gaps(spans, steps, least_us=5.0):
    """Where the GPU sat idle inside the profiled steps: every gap of at least ``least_us`` between one kernel's
    end (the latest end so far) and the next kernel's start, summed a step, and the kernel pairs it fell between.
    A gap the size of a launch means the host was late (launch-bound stretch or a synchronisation)."""
    spans.sort()
    total, count, by_pair = 0.0, 0, collections.Counter()
    end, prev = None, None
    for start, stop, name in spans:
        if end is not None and start - end >= least_us:
            total += start - end
            count += 1
            by_pair[(prev, name)] += start - end
        if end is None or stop > end:
            end, prev = stop, name
    return total / steps, count / steps, {k: v / steps for k, v in by_pair.most_common(8)}


def report(d, bw, results, emit):
    (_, (wall_r, us_r, _, clk_r, gaps_r)), (_, (wall_m, us_m, calls_m, clk_m, gaps_m)) = results[:2]
    emit(f"\n## d = {d}\n")
    emit("| | residual (Inductor) | backend=mhc | difference |")
    emit("|---|---|---|---|")
    emit(f"| step wall time, ms | {wall_r:.2f} | {wall_m:.2f} | {wall_m - wall_r:+.2f} ({100 * (wall_m / wall_r - 1):+.1f} %) |")
    kr, km = sum(us_r.values()) / 1e3, sum(us_m.values()) / 1e3
    emit(f"| kernel time a step, ms | {kr:.2f} | {km:.2f} | {km - kr:+.2f} |")
    emit(f"| GPU idle in the step, ms | {wall_r - kr:.2f} | {wall_m - km:.2f} | {(wall_m - km) - (wall_r - kr):+.2f} |")
    emit(f"| SM clock while profiled | {describe_clocks(clk_r)} | {describe_clocks(clk_m)} | |")
    (gap_r, n_r, _), (gap_m, n_m, pairs_m) = gaps_r, gaps_m
    emit(f"| GPU gaps >= 5 us between kernels, ms a step (count) | {gap_r / 1e3:.2f} ({n_r:.0f}) | "
         f"{gap_m / 1e3:.2f} ({n_m:.0f}) | {(gap_m - gap_r) / 1e3:+.2f} |")
    cats = collections.defaultdict(lambda: [0.0, 0.0])
    for k, v in us_r.items():
        cats[category(k)][0] += v
    for k, v in us_m.items():
        cats[category(k)][1] += v
    for cat, (a, b) in sorted(cats.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0])):
        emit(f"| {cat}, ms | {a / 1e3:.2f} | {b / 1e3:.2f} | {(b - a) / 1e3:+.2f} |")
    t = 2048 * 4
    v = t * d * 2  # one bf16 token row
    S = N * v
    emit("\nmHC kernels (bytes: each stream tensor once; efficiency against the copy bandwidth above):\n")
    emit("| kernel | calls | us a step | us a call | GB a call | GB/s | eff |")
    emit("|---|---|---|---|---|---|---|")
    for k, total in sorted(us_m.items(), key=lambda kv: -kv[1]):
        if category(k) != "mHC kernels":
            continue
        base = k.split("_0d1d")[0]
        per_call = total / max(1, calls_m[k])
        if base in KERNEL_BYTES:
            gb = KERNEL_BYTES[base](S, v) / 1e9
            rate = gb / (per_call / 1e6)
            emit(f"| {base} | {calls_m[k]} | {total:.1f} | {per_call:.1f} | {gb:.3f} | {rate:.0f} | {100 * rate * 1e9 / bw:.0f} % |")
        else:
            emit(f"| {base} | {calls_m[k]} | {total:.1f} | {per_call:.1f} | | | |")
    if pairs_m:
        emit("\nbackend=mhc: the largest gaps a step, by the kernels they fell between:\n")
        emit("| after | before | us a step |")
        emit("|---|---|---|")
        for (a, b), v in pairs_m.items():
            emit(f"| {a} | {b} | {v:.0f} |")
    emit("\nOther kernels whose time differs by more than 50 us a step (by name):\n")
    emit("| kernel | residual us (calls) | backend=mhc us (calls) |")
    emit("|---|---|---|")
    for k in sorted(set(us_r) | set(us_m), key=lambda k: -abs(us_m.get(k, 0) - us_r.get(k, 0))):
        if category(k) == "mHC kernels" or abs(us_m.get(k, 0) - us_r.get(k, 0)) < 50:
            continue
        emit(f"| {k} | {us_r.get(k, 0):.0f} | {us_m.get(k, 0):.0f} ({calls_m.get(k, 0)}) |")


def sync_check(fn, x, emit):
    """One step of ``fn`` (after a warm-up step) with CUDA's sync debug mode on: every operation that made the host
    wait for the GPU warns; they are listed (a step should have none)."""
    import warnings

    _step(fn, x)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(fn, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
    emit(f"\nsync check (one backend=mhc step): {len(syncs)} synchronizing operations")
    for line in collections.Counter(syncs).most_common(10):
        emit(f"- {line[1]} x {line[0]}")


def compare(d, bw, results, emit):
    """Every mHC kernel's in-step us a call (and efficiency where its bytes are known) under each profiled
    backend=mhc variant, the default first."""
    v = 2048 * 4 * d * 2
    S = N * v
    mhc = results[1:]
    names = sorted({k for _, prof in mhc for k in prof.us if category(k) == "mHC kernels"},
                   key=lambda k: -mhc[0][1].us.get(k, 0))
    emit(f"\n### d = {d}: mHC kernels in the step, us a call (efficiency) under each variant\n")
    emit("| kernel | calls | " + " | ".join(name for name, _ in mhc) + " |")
    emit("|---|---|" + "---|" * len(mhc))
    for k in names:
        base = k.split("_0d1d")[0]
        cells = []
        for _, prof in mhc:
            us, calls = prof.us, prof.calls
            if k not in us:
                cells.append("-")
                continue
            per_call = us[k] / max(1, calls[k])
            eff = f" ({100 * KERNEL_BYTES[base](S, v) / (per_call * 1e-6) / bw:.0f} %)" if base in KERNEL_BYTES else ""
            # a variant with other ops (fuse=True) calls a kernel a different number of times, and on other
            # shapes, where its efficiency (bytes of the default's call) means little: say how many calls
            times = f" x {calls[k]}" if calls[k] != mhc[0][1].calls.get(k) else ""
            cells.append(f"{per_call:.1f}{eff}{times}")
        emit(f"| {base} | {mhc[0][1].calls.get(k, '-')} | " + " | ".join(cells) + " |")
    totals = [sum(t for k, t in prof.us.items() if category(k) == "mHC kernels") / 1e3 for _, prof in mhc]
    emit("| **mHC kernels, ms a step** | | " + " | ".join(f"**{t:.2f}**" for t in totals) + " |")
    # every other kernel too, by category: a pass that moves work between the mHC kernels and Inductor's or ATen's
    # (a sum or mean it takes over) is judged by the whole step's kernel time, not the mHC kernels' alone
    for cat in ("Inductor (generated)", "ATen (reductions, copies, fills)", "GEMM", "attention", "other"):
        cells = [sum(t for k, t in prof.us.items() if category(k) == cat) / 1e3 for _, prof in mhc]
        if any(cells):
            emit(f"| {cat}, ms a step | | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    emit("| **kernel time a step, ms** | | " + " | ".join(f"**{sum(prof.us.values()) / 1e3:.2f}**" for _, prof in mhc)
         + " |")
    emit("| step wall time, ms (5 unprofiled steps' median) | | "
         + " | ".join(f"{prof.wall:.2f}" for _, prof in mhc) + " |")
    emit("| SM clock while profiled | | " + " | ".join(describe_clocks(prof.clocks) for _, prof in mhc) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("widths", type=int, nargs="*", default=[4096])
    ap.add_argument("--nofoldpre", action="store_true")
    ap.add_argument("--foldprp", action="store_true")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--fusedws", action="store_true")
    ap.add_argument("--opt", nargs="*", default=[], metavar="SPEC")
    ap.add_argument("--tune", nargs="*", default=[], metavar="SPEC")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps a variant (kernel times are averaged)")
    ap.add_argument("--sync-check", action="store_true",
                    help="run one backend=mhc step under torch.cuda.set_sync_debug_mode('warn') and list what synced")
    args = ap.parse_args()
    from benchmarks.bench_training import _parse_options, tune_fields
    from mhc_compile.kernels import triton_ops

    tunes = [(spec, *tune_fields(spec)) for spec in args.tune]  # checked before anything is compiled
    opts = [(spec, _parse_options(spec)) for spec in args.opt]
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "profile_step.md")
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    import triton

    bw = copy_bandwidth()
    emit(f"# Profile of one training step — {datetime.date.today()}\n")
    emit(f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
         f"copy bandwidth {bw / 1e9:.0f} GB/s")
    emit(f"- bench_training's stack: 4 layers, seq 2048 x batch 4, bf16, n = 4, default options; kernel time "
         f"averaged over {args.steps} profiled steps, wall time the median of 5 unprofiled steps")
    for d in args.widths:
        torch.manual_seed(0)
        torch._dynamo.reset()
        x = torch.randn(4, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        residual = Stack(d, 4).to("cuda", torch.bfloat16)
        m = Stack(d, 4).to("cuda", torch.bfloat16)
        m.load_state_dict(residual.state_dict())
        mhc_compile.prepare(m, x.detach(), n=N)
        mhc = torch.compile(m, backend="mhc", options={"n": N})
        variants = [("residual (Inductor)", torch.compile(residual), contextlib.nullcontext),
                    ("backend=mhc", mhc, contextlib.nullcontext)]
        if args.nofoldpre:
            variants.append(("fold_pre_recompute=False",
                             torch.compile(m, backend="mhc", options={"n": N, "fold_pre_recompute": False}),
                             contextlib.nullcontext))
        if args.foldprp:
            variants.append(("fold_post_res_proj=True",
                             torch.compile(m, backend="mhc", options={"n": N, "fold_post_res_proj": True}),
                             contextlib.nullcontext))
        if args.fused or args.fusedws:
            fused = torch.compile(m, backend="mhc", options={"n": N, "fuse": True})
            if args.fused:
                variants.append(("fuse=True", fused, contextlib.nullcontext))
            if args.fusedws:
                variants.append(("fuse=True, Gluon step", fused, gluon_step))
        for spec, options in opts:
            variants.append((spec, torch.compile(m, backend="mhc", options={"n": N, **options}),
                             contextlib.nullcontext))
        for spec, kernel, fields in tunes:  # the same compiled model, one kernel's config changed around it
            variants.append((f"{kernel} {spec.split(':', 2)[2]}", mhc,
                             lambda kernel=kernel, fields=fields: triton_ops.tuning(kernel, **fields)))
        if args.sync_check:
            sync_check(mhc, x, emit)
        results = []
        for name, fn, context in variants:
            try:
                results.append((name, profile(fn, x, args.steps, context)))
            except Exception as exc:  # a tile that does not compile or fit: reported, the others still run
                emit(f"\n{name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
        report(d, bw, results, emit)
        if len(results) > 2:
            compare(d, bw, results, emit)
        del variants, results, mhc
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
