"""Kernel lab: designs of the tensor-core kernels of proj and its backward, timed side by side in one process
on a GPU (issue 3), with the previous designs kept here as the baseline and the record of what was tried.

Round 1 (2026-11-24, benchmarks/results/lab-2026-11-24-h100.md): proj forward with X entering the tensor cores
as bf16 and phi split into bf16 hi + lo halves on the host ran at 91 % of copy bandwidth against 34 % for the
tf32 design (X widened to fp32 in registers); it ships in ``triton_ops.proj``. The folded backward
(``_prev_proj_pre_bwd_kernel`` below, 45 %) was register-bound (255 registers, 94 spills, occupancy 12.5 %,
no software pipelining, five layout conversions of [BT, K] tiles per step, by Nsight Compute and its IR).
Rounds 2-3 timed its replacement, now in ``triton_ops``: a dx kernel and a dphi kernel over flat K tiles, dphi
as dp^T @ X so the X tile enters the tensor cores as loaded (also tried then and removed as slower: dphi fused
into the dx pass, and dx's dp @ phi^T as FMAs).

    python benchmarks/kernel_lab.py --out DIR            # table -> DIR/lab.md, Triton IR -> DIR/ir/
    ncu ... python benchmarks/kernel_lab.py --ncu        # one launch of each design, for Nsight Compute
    TRITON_INTERPRET=1 python benchmarks/kernel_lab.py --smoke   # CPU, tiny shapes, values only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_kernels as bk  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_common as tcom  # noqa: E402
from mhc_compile.kernels import triton_proj as tproj  # noqa: E402


# ---------------------------------------------------------------------------------------------
# previous designs (round 1 baseline)
# ---------------------------------------------------------------------------------------------
def prev_proj(x, phi):
    """proj before round 1: the X tile widened to fp32, one tf32 dot (the kernel's HI_LO=False path)."""
    t, n, c = x.shape
    k, m = phi.shape
    bt, bk, bm = 128, 128, max(16, tcom.pow2(m))
    blocks = triton.cdiv(t, bt)
    splits = max(1, min(triton.cdiv(2 * tcom.num_sms(x.device), blocks), triton.cdiv(k, bk) // 4))
    k_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_split)
    p = torch.empty((splits, t, m), dtype=torch.float32, device=x.device)
    sq = torch.empty((splits, t), dtype=torch.float32, device=x.device)
    tproj._proj_fwd_kernel[(blocks, 1, splits)](x, phi, p, sq, t, k, m, bm, k_split, 1.0, BT=bt, BK=bk, BM=bm,
                                                   ACC=tl.float32, PREC="tf32", HI_LO=False, DOT=tl.float32,
                                                   num_warps=4, num_stages=2)
    return p.sum(0), sq.sum(0)


@triton.jit(do_not_specialize=["T"])
def _prev_proj_pre_bwd_kernel(x_ptr, phi_ptr, dp_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dx_ptr, dphi_ptr, T, C, M,
                         T_SPLIT, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         MP: tl.constexpr, HAS_ACC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Program (channel block, token split): the whole stream gradient of its [tokens, n x BC] slab and a
    [n*BC, M] partial of dphi, so dX is written once instead of as three stream-sized partials.

    _proj_bwd_kernel's one-pass idea (the x tile serves both dx and dphi, the phi slab stays in registers)
    with the tile's K lanes j = i * BC + c laid out stream-major over one channel chunk rather than over a
    flat run of n*C: every stream of the chunk lives in this program, so it alone reads dout[t, chunk] and
    DRAM sees each dout element once. The NP lanes that share a channel repeat its load, which L1 serves;
    that gather avoids reshaping a [BT, NP, BC] tile to [BT, NP*BC] each step, a layout change through
    shared memory. dp, dsq and h_pre are re-read by every channel block (from L2: all blocks walk the
    same tokens), as proj_backward re-reads dp per K block.
    """
    KB: tl.constexpr = NP * BC
    split = tl.program_id(1)
    jj = tl.arange(0, KB)
    ii = jj // BC
    cc = tl.program_id(0) * BC + jj % BC  # BC is a power of two: contiguous runs of BC, so loads vectorise
    kmask = (ii < N) & (cc < C)
    krow = ii.to(tl.int64) * C + cc  # row of phi = offset of x[t, i, c] inside token t
    ms = tl.arange(0, MP)
    mmask = ms < M
    phi_t = tl.load(phi_ptr + krow[None, :] * M + ms[:, None], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(ACC)  # [MP, KB]
    dphi = tl.zeros([KB, MP], dtype=ACC)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_hi
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & kmask[None, :]
        off = r64[:, None] * (N * C) + krow[None, :]
        xt = tl.load(x_ptr + off, mask=m2, other=0.0).to(ACC)
        dp = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & mmask[None, :],
                     other=0.0).to(ACC)
        dsq = tl.load(dsq_ptr + r64, mask=rmask, other=0.0).to(ACC)
        h = tl.load(h_ptr + r64[:, None] * N + ii[None, :], mask=m2, other=0.0).to(ACC)
        g = tl.load(g_ptr + r64[:, None] * C + cc[None, :], mask=m2, other=0.0).to(ACC)
        # all partial gradients meet in ACC: the stream dtype rounds once, at the store
        dx = tl.dot(dp, phi_t, input_precision=PREC, out_dtype=ACC) + 2.0 * dsq[:, None] * xt + h * g
        if HAS_ACC:
            dx += tl.load(acc_ptr + off, mask=m2, other=0.0).to(ACC)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m2)
        dphi = tl.dot(tl.trans(xt), dp, dphi, input_precision=PREC)
    out = split.to(tl.int64) * (N * C) + krow
    tl.store(dphi_ptr + out[:, None] * M + ms[None, :], dphi, mask=kmask[:, None] & mmask[None, :])


def prev_proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc):
    t, n, c = x.shape
    k, m = phi.shape
    np_, mp = tcom.pow2(n), max(16, tcom.pow2(m))
    bc = max(16 // np_, min(tcom.pow2(c), max(1, 128 // np_)))
    bt = max(16, min(64, tcom.pow2(t)))
    cblocks = triton.cdiv(c, bc)
    splits = max(1, min(triton.cdiv(4 * tcom.num_sms(x.device), cblocks), triton.cdiv(t, bt) // 2))
    t_split = triton.cdiv(triton.cdiv(t, splits), bt) * bt
    splits = triton.cdiv(t, t_split)
    dx = torch.empty_like(x)
    dphi = torch.empty((splits, k, m), dtype=torch.float32, device=x.device)
    prec = "tf32" if x.dtype in (torch.bfloat16, torch.float16) else "ieee"
    _prev_proj_pre_bwd_kernel[(cblocks, splits)](x, phi, dp, dsq, h_pre, dout, acc, dx, dphi, t, c, m, t_split,
                                                 N=n, NP=np_, BT=bt, BC=bc, MP=mp, HAS_ACC=True, ACC=tl.float32,
                                                 PREC=prec, num_warps=4, num_stages=3)
    return dx, dphi.sum(0)


# ---------------------------------------------------------------------------------------------
# the floor of a design that reads X once: its read and sum of squares alone
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _lab_sq_only(x_ptr, sq_ptr, T, K, K_SPLIT, BT: tl.constexpr, BK: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    sq = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        xs = tl.load(x_ptr + r64[:, None] * K + ks[None, :], mask=rmask[:, None] & (ks < k_hi)[None, :],
                     other=0.0).to(tl.float32)
        sq += tl.sum(xs * xs, axis=1)
    tl.store(sq_ptr + split.to(tl.int64) * T + r64, sq, mask=rmask)


def sq_only(x, bt=64, bk=128, waves=4):
    t, n, c = x.shape
    k = n * c
    blocks = triton.cdiv(t, bt)
    splits = max(1, min(triton.cdiv(waves * tcom.num_sms(x.device), blocks), triton.cdiv(k, bk) // 4))
    k_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_split)
    sq = torch.empty((splits, t), dtype=torch.float32, device=x.device)
    _lab_sq_only[(blocks, splits)](x, sq, t, k, k_split, BT=bt, BK=bk, num_warps=4, num_stages=4)
    return sq.sum(0)


# ---------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------
IR_DIR = None
# timing (GPU time from CUDA graphs), copy bandwidth and error as in the kernel benchmark, so the two agree
rel_err, bench_us, copy_bandwidth = bk._rel_err, bk.bench_us, bk.copy_bandwidth


def make(t, n, c, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    m = n * n + 2 * n

    def rn(*s, dt=torch.float32, scale=1.0):
        return (scale * torch.randn(*s, generator=g, device=device)).to(dt)

    return dict(x=rn(t, n, c, dt=torch.bfloat16), phi=rn(n * c, m, scale=(n * c) ** -0.5), dp=rn(t, m),
                dsq=rn(t, scale=1e-3), h=torch.rand(t, n, generator=g, device=device),
                g=rn(t, c, dt=torch.bfloat16), acc=rn(t, n, c, dt=torch.bfloat16))


def _compiled(jit_fn):
    """The most recently compiled variant of a jitted kernel (registers, spills, IR), if Triton exposes it."""
    try:
        for cache in jit_fn.device_caches.values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            if kernels:
                return list(kernels.values())[-1]
    except Exception:
        return None
    return None


def _regs(jit_fns) -> str:
    out = []
    for f in jit_fns:
        ck = _compiled(f)
        if ck is not None and hasattr(ck, "n_regs"):
            out.append(f"{ck.n_regs}/{ck.n_spills}")
    return " + ".join(out) or "-"


def run_rows(label, designs, expected, nbytes, bw, ncu):
    rows = []
    for name, cfg, fn, kernels in designs:
        try:
            out = fn()
            err = max((rel_err(a, e) for a, e in zip(out, expected) if a is not None and e is not None), default=0.0)
            us = float("nan") if ncu else bench_us(fn)
        except Exception as exc:  # a tile that does not fit is a row, not a crash
            rows.append(f"| {label} | {name} | {cfg} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            print(rows[-1], flush=True)
            continue
        rows.append(f"| {label} | {name} | {cfg} | {us:.1f} | {nbytes / (us * 1e-6) / bw:.0%} | {err:.1e} | "
                    f"{_regs(kernels)} |")
        print(rows[-1], flush=True)
        if IR_DIR and kernels:
            os.makedirs(IR_DIR, exist_ok=True)
            ck = _compiled(kernels[0])
            if ck is not None and "ttgir" in getattr(ck, "asm", {}):
                with open(os.path.join(IR_DIR, f"{''.join(ch if ch.isalnum() else '_' for ch in label + '_' + name)}_{len(rows)}.ttgir"), "w") as f:
                    f.write(ck.asm["ttgir"])
    return rows


def _tuned(kernel_cfgs, fn):
    """fn under several kernels' tiles at once (triton_ops.tuning for each)."""
    def call():
        with contextlib.ExitStack() as stack:
            for kernel, cfg in kernel_cfgs.items():
                stack.enter_context(tk.tuning(kernel, **cfg))
            return fn()
    return call


def fwd_rows(d, bw, ncu):
    x, phi = d["x"], d["phi"]
    t = x.shape[0]
    m = phi.shape[1]
    e_p, e_sq = ref.proj(x.float(), phi)
    nbytes = x.numel() * 2 + phi.numel() * 4 + t * (m + 1) * 4
    kern = [tproj._proj_fwd_kernel]
    designs = [("prev (tf32)", {}, lambda: prev_proj(x, phi), kern),
               ("cur (hi/lo)", "default", lambda: tk.proj(x, phi), kern),
               ("sq_only (floor)", {}, lambda: (None, sq_only(x)), [_lab_sq_only])]
    if not ncu:
        for bt, bk, w, st, wv in [(128, 128, 4, 2, 2), (128, 128, 8, 4, 1), (64, 128, 4, 4, 4), (128, 256, 8, 3, 1)]:
            cfg = dict(bt=bt, bk=bk, num_warps=w, num_stages=st, waves=wv)
            designs.append(("cur (hi/lo)", cfg, _tuned({"proj": cfg}, lambda: tk.proj(x, phi)), kern))
    return run_rows("proj fwd", designs, (e_p, e_sq), nbytes, bw, ncu)


def folded_reference(d):
    x, phi = d["x"].float(), d["phi"]
    dx, dphi = ref.proj_backward(x, phi, d["dp"], d["dsq"])
    dxp, _ = ref.pre_backward(x, d["h"], d["g"].float())
    return (dx + dxp + d["acc"].float()).to(d["x"].dtype), dphi


def bwd_rows(d, bw, ncu):
    x, phi = d["x"], d["phi"]
    t, n, c = x.shape
    m = phi.shape[1]
    expected = folded_reference(d)
    nbytes = 3 * x.numel() * 2 + d["g"].numel() * 2 + t * (m + 1 + n) * 4 + 2 * phi.numel() * 4
    args = (x, phi, d["dp"], d["dsq"], d["h"], d["g"], d["acc"])
    both = [tproj._proj_dx_kernel, tproj._proj_dphi_kernel]
    designs = [("prev (stream-major, tf32)", {}, lambda: prev_proj_pre_backward(*args), [_prev_proj_pre_bwd_kernel]),
               ("cur: dx + dphi kernels", "default", lambda: tk.proj_pre_backward(*args), both)]
    if not ncu:
        # (bt, bk, warps, stages, waves); waves=64 gives one tile per program (no token loop). Rounds 2-3 also
        # timed dphi fused into dx's pass and dx's dot as FMAs (fuse_dphi / dx_fma, since removed: slower).
        for bt, bk, w, st, wv in [(16, 128, 4, 3, 64), (64, 128, 4, 3, 64), (32, 256, 4, 3, 64), (32, 128, 8, 3, 64),
                                  (16, 256, 4, 3, 64), (32, 64, 4, 3, 64), (32, 128, 4, 3, 4)]:
            cfg = dict(bt=bt, bk=bk, num_warps=w, num_stages=st, waves=wv)
            designs.append(("cur, proj_dx tile", cfg, _tuned({"proj_dx": cfg},
                                                              lambda: tk.proj_pre_backward(*args)), both))
        for bt, bk, w, st, wv in [(64, 128, 8, 4, 2), (64, 256, 8, 3, 1), (128, 128, 8, 3, 1), (64, 128, 4, 4, 4)]:
            cfg = dict(bt=bt, bk=bk, num_warps=w, num_stages=st, waves=wv)
            designs.append(("cur, proj_dphi tile", cfg, _tuned({"proj_dphi": cfg},
                                                                lambda: tk.proj_pre_backward(*args)), both))
    rows = run_rows("proj_pre bwd", designs, expected, nbytes, bw, ncu)
    # dphi alone as one cuBLAS matmul (X read once, dp^T hi/lo): the bar for the dphi kernel
    if not ncu:
        x2 = x.reshape(t, -1)
        a = tcom.split_hi_lo(d["dp"], max(16, tcom.pow2(m)), transpose=True)
        xbytes = x.numel() * 2 + a.numel() * 2
        rows += run_rows("dphi part", [("dp^T @ X by torch.mm (cuBLAS), bf16 hi/lo", {},
                                        lambda: (torch.mm(a, x2, out_dtype=torch.float32),), [])],
                         (None,), xbytes, bw, ncu)
    return rows


def main() -> int:
    global IR_DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--channels", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ncu", action="store_true", help="one launch per design, no timing (for Nsight Compute)")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.out and not args.ncu:
        IR_DIR = os.path.join(args.out, "ir")
    if args.smoke:
        bk.SMOKE = True
        args.tokens, args.channels = [37], 40
    bw = 1.0 if args.smoke or args.ncu else copy_bandwidth(device)
    lines = [f"- device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}",
             f"- torch {torch.__version__}, triton {triton.__version__}", f"- copy bandwidth: {bw / 1e9:.0f} GB/s",
             "", "| kernel | design | tile | us | eff | rel err | regs/spills |", "|---|---|---|---|---|---|---|"]
    for t in args.tokens:
        lines.append(f"| **T={t}, C={args.channels}, n={args.n}** | | | | | | |")
        d = make(t, args.n, args.channels, device)
        lines += fwd_rows(d, bw, args.ncu)
        lines += bwd_rows(d, bw, args.ncu)
        if args.ncu:
            break
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lab.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
