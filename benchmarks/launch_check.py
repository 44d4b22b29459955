"""The direct launch path (kernels/launch.py) on a GPU: bit-equal to Triton's path, and its host cost a call.

1. Correctness: every op of triton_ops and triton_fused, bf16 and fp32 streams, at token counts that reuse cached
   launchers across shapes (37 then 41: one argument class) and that change class (48, 1000). Each op runs
   with the direct path off (Triton's ``kernel[grid]`` every launch), then twice with it on (the first call fills
   the cache, the second replays it); all three results must be bit-equal. It runs under
   ``torch.use_deterministic_algorithms``, which turns off the Gluon backward's dH added in L2 (atomics: another
   order of adds each run).
2. Host cost: us a call of each op (tiny bf16 tensors, so the GPU work is negligible), direct path on and off.

    PYTHONPATH=. python benchmarks/launch_check.py [--iters 300] [--quick] [--gluon]

--quick checks bf16 streams at C = 128 only, at three token counts: fewer builds, for a short device call.
--gluon puts the Gluon kernels (sm_90) on the direct path too (``launch.enable_gluon``; on by default since this
check passed on an H100 in session 49; without --gluon they take Triton's path); at C = 128 every one of them runs.

Writes $OUT/launch_check.md (or ./launch_check.md) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mhc_compile.kernels import launch as L  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_fused as tf  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402


def cases(t: int, n: int, c: int, dtype: torch.dtype, dev: str):
    """(name, thunk) for every op, on fresh inputs of T tokens."""
    g = torch.Generator(device=dev).manual_seed(1000 * t + c)
    f32 = dict(device=dev, dtype=torch.float32)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, **f32) * scale).to(dt)

    m = ref.num_coeffs(n)
    x, dout, y = rnd(t, n, c), rnd(t, n, c), rnd(t, c)
    phi, bias, alpha = rnd(n * c, m, dt=torch.float32, scale=0.05), rnd(m, dt=torch.float32), torch.rand(3, **f32)
    static = (n, n * c, 1e-6, 20, "mhc")
    p, sq = tk.proj(x, phi)
    hp, hq, hr = tk.coeffs(p, sq, bias, alpha, *static)
    step = tf.step(x, hr, hq, y, phi, bias, alpha, *static)
    x1, x_in, h_pre, h_post, h_res, p1, sq1 = step
    _, h_pre0, _, _, p0, sq0 = tf.enter(x, phi, bias, alpha, *static)
    return [
        ("proj", lambda: tk.proj(x, phi)),
        ("coeffs", lambda: tk.coeffs(p, sq, bias, alpha, *static)),
        ("coeffs_backward", lambda: tk.coeffs_backward(p, sq, bias, alpha, hp, hq, hr, *static)),
        ("pre", lambda: tk.pre(x, hp)),
        ("pre_backward", lambda: tk.pre_backward(x, hp, y)),
        ("pre_backward_dh", lambda: tk.pre_backward_dh(x, hp, y)),
        ("post_res", lambda: tk.post_res(x, hr, hq, y)),
        ("post_res_backward", lambda: tk.post_res_backward(x, hr, hq, y, dout)),
        ("post_res_backward_pre", lambda: tk.post_res_backward_pre(x, hr, hq, y, dout, hp)),
        ("post_res_proj", lambda: tk.post_res_proj(x, hr, hq, y, phi)),
        ("post_res_chain", lambda: tk.post_res_chain(x, [hr] * 3, [hq] * 3, [y] * 3)),
        ("proj_backward", lambda: tk.proj_backward(x, phi, p, sq)),
        ("proj_pre_backward", lambda: tk.proj_pre_backward(x, phi, p, sq, hp, y, dout)),
        # the boundary's one pass (on sm_90, the Gluon step backward's kernel; its dp, dsq, h_pre any such values)
        ("boundary_backward", lambda: tk.boundary_backward(x1, phi, p, sq, hp, y, dout, x, hr, hq, y, hp)),
        ("fused step", lambda: tf.step(x, hr, hq, y, phi, bias, alpha, *static)),
        ("fused step_backward", lambda: tf.step_backward(x, hr, hq, y, phi, bias, alpha, h_pre, p1, sq1, x1, x_in,
                                                          h_post, h_res, *static)),
        ("fused enter", lambda: tf.enter(x, phi, bias, alpha, *static)),
        ("fused enter_backward", lambda: tf.enter_backward(x, phi, bias, alpha, h_pre0, p0, sq0, x_in, h_post,
                                                            h_res, *static)),
    ]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check(dev: str, quick: bool = False) -> tuple[list[str], int]:
    rows, bad = [], 0
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        # C = 128: whole 128-column K blocks inside one stream, where proj's backward takes TMA descriptors (and
        # on sm_90 every Gluon kernel runs); quick: that C alone, at two token counts of one class and one of another
        bf16_shapes = [(37, 128), (41, 128), (1000, 128)] if quick else \
            [(t, c) for c in (96, 128) for t in (37, 41, 48, 1000)]
        for t, c in bf16_shapes if dtype == torch.bfloat16 else [(37, 96), (41, 96)]:
            n = 4
            for name, thunk in cases(t, n, c, dtype, dev):
                L.enable(False)
                want = _flat(thunk())
                L.enable(True)
                first, second = _flat(thunk()), _flat(thunk())
                ok = all(torch.equal(a, w) and torch.equal(b, w) for a, b, w in zip(first, second, want))
                bad += not ok
                if not ok or t in (37, 41):
                    rows.append(f"| {name} | {str(dtype)[6:]} | {t} x {c} | {'bit-equal' if ok else 'DIFFERENT'} |")
    return rows, bad


def host_us(thunk, iters: int) -> float:
    for _ in range(20):
        thunk()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        thunk()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="bf16 at C = 128 only (three token counts): fewer builds")
    ap.add_argument("--gluon", action="store_true", help="the Gluon kernels on the direct path too (launch."
                    "enable_gluon; without it, on Triton's path)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("launch_check: needs a CUDA device", file=sys.stderr)
        return 2
    dev = "cuda"
    lines = [f"# Direct launch path — {datetime.date.today()}", "",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}",
             f"- Gluon kernels on the direct path: {'yes' if args.gluon else 'no'}", ""]
    L.enable_gluon(args.gluon)
    torch.use_deterministic_algorithms(True, warn_only=True)  # a torch op without a deterministic kernel warns
    try:
        rows, bad = check(dev, args.quick)
    finally:
        torch.use_deterministic_algorithms(False)
    lines += ["## Bit-equality with Triton's path (n = 4, C = " + ("128" if args.quick else "96 and 128")
              + "; rows for T = 37, 41 and every mismatch)", "",
              "| op | dtype | T x C | result |", "|---|---|---|---|"] + rows
    lines += ["", f"mismatches: {bad}; call signatures cached by the direct path: {L.cached_launchers()}", ""]
    lines += ["## Host us a call (T = 64, n = 4, C = 128, bf16)", "",
              "| op | Triton's path | direct | saved |", "|---|---|---|---|"]
    total = [0.0, 0.0]
    for name, thunk in cases(64, 4, 128, torch.bfloat16, dev):
        L.enable(False)
        slow = host_us(thunk, args.iters)
        L.enable(True)
        fast = host_us(thunk, args.iters)
        total[0] += slow
        total[1] += fast
        lines.append(f"| {name} | {slow:.1f} | {fast:.1f} | {slow - fast:.1f} |")
    lines.append(f"| all | {total[0]:.1f} | {total[1]:.1f} | {total[0] - total[1]:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.environ.get("OUT") or "."
    with open(os.path.join(out, "launch_check.md"), "w") as f:
        f.write(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
