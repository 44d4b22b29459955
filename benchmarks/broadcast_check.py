"""The kernels on a stream broadcast over its n streams (a chain's head, X_BCAST; a mean collapse's gradient,
G_BCAST) against the same kernels on its dense copy, compiled for the GPU: equal outputs, and each one's GPU time
(median of CUDA-event timed calls). The CPU tests check the same equalities under the interpreter; this is the
sm_90 build, TMA included.

    PYTHONPATH=. OUT=dir python benchmarks/broadcast_check.py [--t 8192] [--c 4096 7168] [--no-fp-fusion]

The G_BCAST row also gives each side's largest error against the float64 reference, in units of the bf16 spacing
at that element (ulp), for its bf16 outputs. --no-fp-fusion builds every kernel with Triton's
enable_fp_fusion=False (no multiply-add contraction): if the two sides then agree, the compiled difference came
from ptxas contracting different products into FMAs in the two builds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mhc_compile.kernels import launch as launch_mod  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_proj_bwd as proj_bwd  # noqa: E402

N = 4


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def _equal(a, b):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(torch.equal(u, v) for u, v in zip(a, b)), max((u.float() - v.float()).abs().max().item()
                                                           for u, v in zip(a, b))


def _ulps(out, exact):
    """Largest |out - exact| over the bf16 spacing at exact (2^(exponent - 7)), for a bf16 output."""
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs().clamp_min(2.0 ** -126))[1] - 8)
    return ((out.double() - exact) / spacing).abs().max().item()


def _no_fp_fusion():
    """Every launch of triton_ops and of proj's one-pass backward (triton_proj_bwd, which bf16 proj_pre_backward
    calls) builds with enable_fp_fusion=False (a compile option, part of the launch key)."""
    plain = launch_mod.launch

    def launch(kernel, grid, args, meta, shrink_stages=True, **options):
        return plain(kernel, grid, args, meta, shrink_stages, enable_fp_fusion=False, **options)

    for module in (*tk.LAUNCHING, proj_bwd):
        module.launch = launch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--c", type=int, nargs="*", default=[4096, 7168])
    ap.add_argument("--no-fp-fusion", action="store_true", help="build every kernel without FMA contraction")
    args = ap.parse_args()
    if args.no_fp_fusion:
        _no_fp_fusion()
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# Broadcast streams on the GPU — {datetime.date.today()}\n",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
             f"n = {N}, bf16 streams, {args.t} tokens{'; enable_fp_fusion=False' if args.no_fp_fusion else ''}\n",
             "| C | op | equal | max abs diff | broadcast us | dense us |", "|---|---|---|---|---|---|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for c in args.c:
        t, m = args.t, ref.num_coeffs(N)

        def r(*shape, dtype=torch.bfloat16, pos=False):
            v = torch.rand(*shape, generator=g, device="cuda") if pos else torch.randn(*shape, generator=g,
                                                                                      device="cuda")
            return v.to(dtype)

        s = r(t, c)
        xb = s.unsqueeze(-2).expand(t, N, c)
        xd = xb.contiguous()
        h_pre, h_post = r(t, N, dtype=torch.float32, pos=True), 2 * r(t, N, dtype=torch.float32, pos=True)
        h_res, y, dy = r(t, N, N, dtype=torch.float32, pos=True), r(t, c), r(t, c)
        phi = r(N * c, m, dtype=torch.float32) / (N * c) ** 0.5
        dp, dsq, dout, acc = r(t, m, dtype=torch.float32), r(t, dtype=torch.float32), r(t, N, c), r(t, N, c)
        gb = dy.unsqueeze(-2).expand(t, N, c)
        cases = {
            "pre (X_BCAST)": lambda x: tk.pre(x, h_pre),
            "pre_backward_dh (X_BCAST)": lambda x: tk.pre_backward_dh(x, h_pre, dy),
            "post_res (X_BCAST)": lambda x: tk.post_res(x, h_res, h_post, y),
            "post_res_backward_pre (X_BCAST)": lambda x: tk.post_res_backward_pre(x, h_res, h_post, y, dout, h_pre),
            "proj (X_BCAST)": lambda x: tk.proj(x, phi),
            "proj_pre_backward, acc (X_BCAST)": lambda x: tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dy, acc),
        }
        for name, fn in cases.items():
            ok, diff = _equal(fn(xb), fn(xd))
            lines.append(f"| {c} | {name} | {ok} | {diff:.3g} | {_time(lambda: fn(xb)):.1f} | "
                         f"{_time(lambda: fn(xd)):.1f} |")
            print(lines[-1], flush=True)
        gd = gb.contiguous()
        fn = lambda d: tk.post_res_backward_pre(xd, h_res, h_post, y, d, h_pre)  # noqa: E731
        ok, diff = _equal(fn(gb), fn(gd))
        lines.append(f"| {c} | post_res_backward_pre (G_BCAST) | {ok} | {diff:.3g} | {_time(lambda: fn(gb)):.1f} | "
                     f"{_time(lambda: fn(gd)):.1f} |")
        print(lines[-1], flush=True)
        exact = ref.post_res_backward_pre(*(v.double() for v in (xd, h_res, h_post, y, gd, h_pre)))
        for side, d in (("G_BCAST", gb), ("dense", gd)):
            outs = fn(d)
            ulps = [f"{_ulps(o, e):.2f}" for o, e in zip(outs, exact) if o.dtype == torch.bfloat16]
            rel = max(((o.double() - e).abs().max() / e.abs().max()).item()
                      for o, e in zip(outs, exact) if o.dtype == torch.float32)
            lines.append(f"<!-- C = {c}, {side}: bf16 outputs' largest error against float64, in ulps: "
                         f"{', '.join(ulps)}; fp32 outputs' max |error| / max |value|: {rel:.2e} -->")
            print(lines[-1], flush=True)
    with open(os.path.join(out_dir, "broadcast_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
