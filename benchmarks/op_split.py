"""The boundary's one pass split into its kernels, with the clock each ran at: is its gap to the floor in the kernel,
in the small ops around it, or in the clock?

    PYTHONPATH=. python benchmarks/op_split.py --out DIR [--shapes 32768x4096 8192x7168]
    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum -k regex:"_step_bwd_ws|copy" \\
        python benchmarks/op_split.py --launch-only          # the same launches, for Nsight Compute

Why: Nsight Compute (session 41, its SM clock held at 1.44 GHz) timed the kernel alone at 2.00 ms at 32768 x 4096,
2.69 TB/s or 89 % of the copy bandwidth, where the benchmarks' CUDA-graph timing of the whole op gave 2224-2254 us
(78-79 %). For each shape this prints, side by side in one run:

- the whole op (``triton_ops.boundary_backward``, the default config) under ``do_bench_cudagraph``, with the SM
  clock, power and clock event reasons nvidia-smi reported meanwhile (``gpu_clocks.ClockLog``);
- each kernel's device time under torch.profiler (mean a call over ``--calls`` eager calls), so that the Gluon
  kernel's share and the packing, zeroing and sums around it are apart;
- the copy bandwidth the efficiencies are taken against (``bench_kernels.copy_bandwidth``, as the check scripts
  take it; a memcpy captured in a CUDA graph ran at 2450 GB/s against about 3040 outside one, session 45), with its
  clock;
- with ``--tune``, each config's outputs against the first's: dX_prev, dy and x_in bit-equal (no config changes
  their arithmetic), dphi and dH by their largest relative difference (the token splits and L2's order of adds).

Efficiency is the op's 4n + 4 elements of C a token over (time x copy bandwidth), as in gluon_step_bwd_check.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.against import Lines, kernel_times, parse_tune  # noqa: E402
from benchmarks.gluon_step_bwd_check import B_NAMES as NAMES  # noqa: E402  boundary_backward's outputs
from benchmarks.gluon_step_bwd_check import _boundary_inputs  # noqa: E402
from benchmarks.gpu_clocks import ClockLog, describe  # noqa: E402

COPY_BYTES = 2 << 30  # bench_kernels.copy_bandwidth's
EXACT = ("dx_prev", "dy", "x_in")


def parse_shape(text: str) -> tuple[int, int]:
    t, c = text.lower().split("x")
    return int(t), int(c)


def timed(fn) -> tuple[float, dict | None]:
    """(us a call under CUDA graphs, the clock meanwhile)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    with ClockLog(interval_ms=20) as clocks:
        us = triton.testing.do_bench_cudagraph(fn, rep=500) * 1e3
    return us, clocks.summary()


def kernels(fn, calls: int) -> dict[str, float]:
    """Each kernel's device time, us a call, over ``calls`` eager calls under torch.profiler."""
    return dict(kernel_times(fn, calls)[0].most_common())


def same_as(outs: dict, first: dict, first_fields: dict) -> str:
    """One line: whether this config's outputs are the first config's (EXACT ones bit for bit)."""
    cells, ok = [], True
    for name in NAMES:
        a, b = outs[name], first[name]
        if not b.numel():
            continue
        if name in EXACT:
            eq = torch.equal(a, b)
            ok &= eq
            cells.append(f"{name} {'bit-equal' if eq else 'DIFFERS'}")
        else:
            rel = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            ok &= rel < 1e-3
            cells.append(f"{name} {rel:.1e}")
    label = ",".join(f"{key}={v}" for key, v in first_fields.items()) or "the default config"
    return f"- against {label}: {'ok' if ok else 'FAIL'} ({'; '.join(cells)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["32768x4096", "8192x7168"], help="T x C each, n = 4")
    ap.add_argument("--calls", type=int, default=20, help="eager calls under the profiler")
    ap.add_argument("--rounds", type=int, default=2, help="CUDA-graph timings a config, the configs interleaved")
    ap.add_argument("--tune", nargs="*", default=[""], help="BoundaryBwdCfg fields a row each ('' = the default), "
                    "e.g. '' walk_tiles=32")
    ap.add_argument("--launch-only", action="store_true", help="three launches of each op and a copy: for ncu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from mhc_compile.kernels import triton_ops as tk

    tunes = [parse_tune(spec, "--tune") for spec in args.tune]
    if args.launch_only:  # the copy as a kernel, since Nsight Compute profiles no memcpy (neg: a copy's bytes, a
        # kernel name to pick out)
        src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        for _ in range(3):
            torch.neg(src, out=dst)
        for shape in args.shapes:
            t, c = parse_shape(shape)
            ops = _boundary_inputs(t, 4, c, seed=1)
            for fields in tunes:
                with tk.tuning("boundary_backward", **fields):
                    for _ in range(3):
                        tk.boundary_backward(*ops)
        torch.cuda.synchronize()
        return 0

    import triton

    from benchmarks.bench_kernels import copy_bandwidth

    path = os.path.join(args.out, "op_split.md") if args.out else None
    lines = Lines(path, [f"# The boundary's one pass split into kernels, {datetime.date.today()}, "
                         f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}\n"])
    with ClockLog(interval_ms=20) as clocks:
        bw = copy_bandwidth("cuda", COPY_BYTES)
    lines.append(f"copy bandwidth (bench_kernels.copy_bandwidth, {COPY_BYTES >> 20} MiB): {bw / 1e9:.0f} GB/s; "
                 f"{describe(clocks.summary())}\n")
    for shape in args.shapes:
        t, c = parse_shape(shape)
        n = 4
        ops = _boundary_inputs(t, n, c, seed=1)
        nbytes = (4 * n + 4) * t * c * 2

        def op(fields):
            with tk.tuning("boundary_backward", **fields):
                return tk.boundary_backward(*ops)

        lines.append(f"\n## {t} x {c}\n")
        first, times = None, [[] for _ in tunes]
        for _ in range(args.rounds):  # the configs interleaved: a drift in clock or heat reaches each alike
            for k, fields in enumerate(tunes):
                times[k].append(timed(lambda fields=fields: op(fields))[0])
        for k, fields in enumerate(tunes):
            _, clk = timed(lambda fields=fields: op(fields))
            ks = kernels(lambda fields=fields: op(fields), args.calls)
            label = ",".join(f"{key}={v}" for key, v in fields.items()) or "default config"
            effs = ", ".join(f"{u:.1f} us ({100 * nbytes / (u * 1e-6) / bw:.1f} %)" for u in times[k])
            lines.append(f"\n### {label}\n")
            lines.append(f"- whole op (CUDA graph, {args.rounds} interleaved rounds): {effs}; {describe(clk)}")
            lines.append(f"- kernels under the profiler, {sum(ks.values()):.1f} us a call in all:\n")
            lines.append("| kernel | us a call | efficiency if it were the op |")
            lines.append("|---|---|---|")
            for name, k_us in ks.items():
                eff = f"{100 * nbytes / (k_us * 1e-6) / bw:.1f} %" if "_step_bwd_ws" in name else ""
                lines.append(f"| {name} | {k_us:.1f} | {eff} |")
            outs = dict(zip(NAMES, op(fields)))
            if first is None:
                first = outs
            else:
                lines.append("\n" + same_as(outs, first, tunes[0]))
            print("\n".join(lines[-len(ks) - 7:]), flush=True)
        del ops
    return 0


if __name__ == "__main__":
    sys.exit(main())
