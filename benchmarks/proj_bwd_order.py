"""proj's one-pass backward: dphi's dot before dx's (session 24) against after it (before), on a GPU.

In the order before session 24, Triton 3.6's pipeliner issued the next tile's TMA load into the single X buffer while
the dphi wgmma that reads X could still be in flight (the sm_90a PTX has no ``wgmma.wait_group`` between that dot's
commit and the ``cp.async.bulk.tensor`` load). Issuing dphi's dot first puts both dots under the one wait that dx
needs, ahead of the loads. This script:

1. stresses both orders for the race: the kernel is deterministic (fixed token splits, partials summed on the
   host), so every repetition must give bit-equal dX and dphi; it counts repetitions that differ from the first,
   on shapes whose stream fits in L2 (the loads land soonest) and on the benchmark's 32768 x 4096; it also checks
   the first repetition against a float64 reference;
2. times both orders side by side, interleaved rounds, CUDA-graph replays, with and without acc.

    PYTHONPATH=. OUT=DIR python benchmarks/proj_bwd_order.py
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_kernels import bench_us, copy_bandwidth  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_proj_bwd as tpb  # noqa: E402

N = 4
# (T, C, repetitions): streams that fit in L2 with two programs an SM (K / 128 >= 256 blocks), where the loads land
# soonest and the SM's tensor cores are shared, then the benchmark's shape
STRESS = [(512, 8192, 8000), (1024, 4096, 8000), (32768, 4096, 200)]
TIMES = [(32768, 4096, True), (8192, 7168, True)]
ORDERS = {0: "dphi after dx (before)", 1: "dphi first", 2: "dphi after dx, waited before the loads"}


def inputs(t, c, acc=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    m = ref.num_coeffs(N)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    f = dict(device="cuda", dtype=torch.float32)
    return dict(x=torch.randn(t, N, c, generator=g, **bf), phi=torch.randn(N * c, m, generator=g, **f) * 0.02,
                dp=torch.randn(t, m, generator=g, **f), dsq=torch.randn(t, generator=g, **f) * 1e-3,
                h_pre=torch.rand(t, N, generator=g, **f), dout=torch.randn(t, c, generator=g, **bf),
                acc=torch.randn(t, N, c, generator=g, **bf) if acc else None)


def run(v):
    return tk.proj_pre_backward(v["x"], v["phi"], v["dp"], v["dsq"], v["h_pre"], v["dout"], v["acc"])


def stress(lines):
    lines += ["## 1. Determinism over repetitions (a race shows as a repetition that differs from the first)", "",
              "| T x C | order | repetitions | differing dX | differing dphi | dphi vs float64 (max err / max) |",
              "|---|---|---|---|---|---|"]
    for t, c, reps in STRESS:
        v = inputs(t, c)
        # float64 reference of dphi from the same rounded operands the kernel multiplies: X as stored, dp as its
        # bf16 hi + lo halves
        hi = v["dp"].to(torch.bfloat16)
        dp_hl = hi.double() + (v["dp"] - hi.float()).to(torch.bfloat16).double()
        want = v["x"].reshape(t, -1).double().T @ dp_hl
        for first in (0, 2):
            tpb.DPHI_FIRST = first
            dx0, dphi0 = run(v)
            torch.cuda.synchronize()
            err = ((dphi0.double() - want).abs().max() / want.abs().max()).item()
            bad_dx = bad_dphi = 0
            for _ in range(reps if first == 0 else reps // 8):
                dx, dphi = run(v)
                bad_dx += int(not torch.equal(dx, dx0))
                bad_dphi += int(not torch.equal(dphi, dphi0))
            lines.append(f"| {t} x {c} | {ORDERS[first]} | {reps if first == 0 else reps // 8} | "
                         f"{bad_dx} | {bad_dphi} | {err:.2e} |")
            print(lines[-1], flush=True)
        del v, want
        torch.cuda.empty_cache()


def times(lines, bw, rounds=3):
    lines += ["", f"## 2. Times (us, CUDA-graph replays, median; {rounds} interleaved rounds), copy bandwidth "
              f"{bw / 1e9:.0f} GB/s", "",
              "| T x C | acc | " + " | ".join(ORDERS.values()) + " |", "|---|---|---|---|---|"]
    for t, c, acc in TIMES:
        v = inputs(t, c, acc)
        nbytes = (2 + (1 if acc else 0)) * v["x"].numel() * 2 + v["dout"].numel() * 2  # X, dout, (acc), dX
        res = {k: [] for k in ORDERS}
        for _ in range(rounds):
            for first in ORDERS:
                tpb.DPHI_FIRST = first
                res[first].append(bench_us(lambda: run(v)))
        med = {k: sorted(r)[rounds // 2] for k, r in res.items()}
        eff = lambda us: 100 * nbytes / (us * 1e-6) / bw  # noqa: E731
        cells = [f"{med[k]:.1f} ({eff(med[k]):.0f} %; {min(r):.1f}-{max(r):.1f}"
                 + (f"; {100 * (med[k] / med[0] - 1):+.1f} %)" if k else ")") for k, r in res.items()]
        lines.append(f"| {t} x {c} | {'yes' if acc else 'no'} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        del v
        torch.cuda.empty_cache()


def main():
    lines = [f"# proj's one-pass backward, the two dot orders — {datetime.date.today()}", "",
             f"- {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, n = {N}, "
             "bf16 streams, the shipped tile (triton_ops FusedBwdCfg)", ""]
    stress(lines)
    times(lines, copy_bandwidth("cuda"))
    out = os.environ.get("OUT", "bench_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "proj_bwd_order.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
