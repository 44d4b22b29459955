"""Kernel lab: candidate designs of the two tensor-core kernels that miss their floors, timed beside the
shipped ones in one process on a GPU (issue 3).

The shipped kernels (``mhc_compile/kernels/triton_ops.py``) are ``_proj_fwd_kernel`` (33 % of copy bandwidth
at 8192 x 4096, n = 4, bf16) and ``_proj_pre_bwd_kernel`` (45 %). This script holds the candidates as plain
Triton kernels, checks each against the reference (``kernels/reference.py``) at the timed shape, times it
(median of ``triton.testing.do_bench``), and reports bytes / (time x copy bandwidth), registers and spills.
Winners move into ``triton_ops.py`` with their tests; the rest stay here as the record of what was tried.

    python benchmarks/kernel_lab.py --out DIR            # table -> DIR/lab.md, Triton IR of the kernels -> DIR/ir/
    ncu ... python benchmarks/kernel_lab.py --ncu        # one launch of each design, for Nsight Compute

Forward candidates (p = vec(X) @ phi, sq = |vec(X)|^2; X bf16 [T, K = n*C], phi fp32 [K, m]):
  cur        the shipped kernel: X tile widened to fp32, one tf32 dot (phi keeps 10 mantissa bits).
  hl         X tile stays bf16; phi pre-split on the host into bf16 hi + lo [K, BM] (~16 bits together),
             two bf16 dots into one fp32 accumulator; no fp32 copy of the tile for the dot.
  hl_sq2     hl, but sq reads the tile a second time (L1 / L2), so the dot operand and the elementwise
             square need not share one register layout.
  sq_only    the read of X and sq alone: the floor of any design that reads X once.
Backward candidates (proj_backward + pre_backward + acc folded, as passes/fold_stream_grads.py emits):
  cur        the shipped kernel: tf32 dots on the fp32-widened X tile; phi slab resident in registers.
  hl         dphi = X^T dp as two bf16 dots (X exact, dp split hi + lo in-kernel); dx's dot stays tf32.
  hl_reload  hl, with the phi slab re-read from L1 / L2 every step instead of held in registers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl
import triton.testing

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tk


# ---------------------------------------------------------------------------------------------
# forward candidates
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _lab_proj_hl(x_ptr, hi_ptr, lo_ptr, p_ptr, sq_ptr, T, K, M, K_SPLIT, BT: tl.constexpr, BK: tl.constexpr,
                 BM: tl.constexpr, SQ_TWICE: tl.constexpr, DOT: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BM)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros([BT, BM], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < k_hi
        xptrs = x_ptr + r64[:, None] * K + ks[None, :]
        xm = rmask[:, None] & kmask[None, :]
        xt = tl.load(xptrs, mask=xm, other=0.0)
        hptrs = ks[:, None].to(tl.int64) * BM + cols[None, :]  # hi / lo are padded to BM columns on the host
        hi = tl.load(hi_ptr + hptrs, mask=kmask[:, None], other=0.0)
        lo = tl.load(lo_ptr + hptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(xt.to(DOT), hi.to(DOT), acc, out_dtype=tl.float32, input_precision="ieee")
        acc = tl.dot(xt.to(DOT), lo.to(DOT), acc, out_dtype=tl.float32, input_precision="ieee")
        if SQ_TWICE:
            xs = tl.load(xptrs, mask=xm, other=0.0).to(tl.float32)
        else:
            xs = xt.to(tl.float32)
        sq += tl.sum(xs * xs, axis=1)
    base = split.to(tl.int64) * T
    tl.store(p_ptr + (base + r64)[:, None] * M + cols[None, :], acc, mask=rmask[:, None] & (cols[None, :] < M))
    tl.store(sq_ptr + base + r64, sq, mask=rmask)


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


def _fwd_grid(t, k, bt, bk, waves, device):
    blocks = triton.cdiv(t, bt)
    want = triton.cdiv(waves * tk._num_sms(device), blocks)
    splits = max(1, min(want, triton.cdiv(k, bk) // 4))
    k_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    return blocks, triton.cdiv(k, k_split), k_split


def split_hi_lo(phi: torch.Tensor, bm: int):
    """phi (fp32 [K, m]) -> bf16 hi, lo [K, bm] with hi + lo = phi to ~16 mantissa bits (zero padded)."""
    k, m = phi.shape
    hi = torch.zeros((k, bm), dtype=torch.bfloat16, device=phi.device)
    lo = torch.zeros_like(hi)
    hi[:, :m] = phi.to(torch.bfloat16)
    lo[:, :m] = (phi - hi[:, :m].float()).to(torch.bfloat16)
    return hi, lo


def proj_hl(x, hi, lo, m, bt=128, bk=128, waves=2, num_warps=4, num_stages=3, sq_twice=False, info=None):
    t, n, c = x.shape
    k = n * c
    bm = hi.shape[1]
    blocks, splits, k_split = _fwd_grid(t, k, bt, bk, waves, x.device)
    p = torch.empty((splits, t, m), dtype=torch.float32, device=x.device)
    sq = torch.empty((splits, t), dtype=torch.float32, device=x.device)
    dot = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16
    ck = _lab_proj_hl[(blocks, splits)](x, hi, lo, p, sq, t, k, m, k_split, BT=bt, BK=bk, BM=bm,
                                        SQ_TWICE=sq_twice, DOT=dot, num_warps=num_warps, num_stages=num_stages)
    if info is not None:
        info["kernel"] = ck
    return p.sum(0), sq.sum(0)


def sq_only(x, bt=128, bk=128, waves=2, num_warps=4, num_stages=3, info=None):
    t, n, c = x.shape
    k = n * c
    blocks, splits, k_split = _fwd_grid(t, k, bt, bk, waves, x.device)
    sq = torch.empty((splits, t), dtype=torch.float32, device=x.device)
    ck = _lab_sq_only[(blocks, splits)](x, sq, t, k, k_split, BT=bt, BK=bk, num_warps=num_warps,
                                        num_stages=num_stages)
    if info is not None:
        info["kernel"] = ck
    return sq.sum(0)


# ---------------------------------------------------------------------------------------------
# backward candidates
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _lab_ppb_hl(x_ptr, phi_ptr, dp_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dx_ptr, dphi_ptr, T, C, M, T_SPLIT,
                N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, MP: tl.constexpr,
                RESIDENT: tl.constexpr, DOT: tl.constexpr):
    KB: tl.constexpr = NP * BC
    split = tl.program_id(1)
    jj = tl.arange(0, KB)
    ii = jj // BC
    cc = tl.program_id(0) * BC + jj % BC
    kmask = (ii < N) & (cc < C)
    krow = ii.to(tl.int64) * C + cc
    ms = tl.arange(0, MP)
    mmask = ms < M
    phi_ptrs = phi_ptr + krow[None, :] * M + ms[:, None]
    pmask = mmask[:, None] & kmask[None, :]
    if RESIDENT:
        phi_t = tl.load(phi_ptrs, mask=pmask, other=0.0)
    dphi = tl.zeros([KB, MP], dtype=tl.float32)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_hi
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & kmask[None, :]
        off = r64[:, None] * (N * C) + krow[None, :]
        xt = tl.load(x_ptr + off, mask=m2, other=0.0)
        dp = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        dsq = tl.load(dsq_ptr + r64, mask=rmask, other=0.0)
        h = tl.load(h_ptr + r64[:, None] * N + ii[None, :], mask=m2, other=0.0)
        g = tl.load(g_ptr + r64[:, None] * C + cc[None, :], mask=m2, other=0.0).to(tl.float32)
        if not RESIDENT:
            phi_t = tl.load(phi_ptrs, mask=pmask, other=0.0)
        dx = tl.dot(dp, phi_t, input_precision="tf32", out_dtype=tl.float32)
        dx += 2.0 * dsq[:, None] * xt.to(tl.float32) + h * g
        dx += tl.load(acc_ptr + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m2)
        dp_hi = dp.to(tl.bfloat16)
        dp_lo = (dp - dp_hi.to(tl.float32)).to(tl.bfloat16)
        xT = tl.trans(xt.to(DOT))
        dphi = tl.dot(xT, dp_hi.to(DOT), dphi, out_dtype=tl.float32, input_precision="ieee")
        dphi = tl.dot(xT, dp_lo.to(DOT), dphi, out_dtype=tl.float32, input_precision="ieee")
    out = split.to(tl.int64) * (N * C) + krow
    tl.store(dphi_ptr + out[:, None] * M + ms[None, :], dphi, mask=kmask[:, None] & mmask[None, :])


def proj_pre_backward_hl(x, phi, dp, dsq, h_pre, dout, acc, bt=64, kb=128, waves=4, num_warps=4, num_stages=3,
                         resident=True, info=None):
    t, n, c = x.shape
    k, m = phi.shape
    np_ = tk._pow2(n)
    mp = max(16, tk._pow2(m))
    bc = max(16 // np_, min(tk._pow2(c), max(1, kb // np_)))
    cblocks = triton.cdiv(c, bc)
    want = triton.cdiv(waves * tk._num_sms(x.device), cblocks)
    splits = max(1, min(want, triton.cdiv(t, bt) // 2))
    t_split = triton.cdiv(triton.cdiv(t, splits), bt) * bt
    splits = triton.cdiv(t, t_split)
    dx = torch.empty_like(x)
    dphi = torch.empty((splits, k, m), dtype=torch.float32, device=x.device)
    dot = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16
    ck = _lab_ppb_hl[(cblocks, splits)](x, phi, dp, dsq, h_pre, dout, acc, dx, dphi, t, c, m, t_split, N=n,
                                        NP=np_, BT=bt, BC=bc, MP=mp, RESIDENT=resident, DOT=dot,
                                        num_warps=num_warps, num_stages=num_stages)
    if info is not None:
        info["kernel"] = ck
    return dx, dphi.sum(0)


# ---------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------
def rel_err(a, e) -> float:
    scale = e.double().abs().max().item() or 1.0
    return (a.double() - e.double()).abs().max().item() / scale


SMOKE = False


def bench_us(fn) -> float:
    if SMOKE:
        fn()
        return 1.0
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth(device) -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (us * 1e-6)


def make(t, n, c, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    m = n * n + 2 * n

    def rn(*s, dt=torch.float32, scale=1.0):
        return (scale * torch.randn(*s, generator=g, device=device)).to(dt)

    return dict(x=rn(t, n, c, dt=torch.bfloat16), phi=rn(n * c, m, scale=(n * c) ** -0.5), dp=rn(t, m),
                dsq=rn(t, scale=1e-3), h=torch.rand(t, n, generator=g, device=device),
                g=rn(t, c, dt=torch.bfloat16), acc=rn(t, n, c, dt=torch.bfloat16))


def folded_reference(d):
    """The folded backward in plain PyTorch (fp32): proj_backward's dx + pre_backward's dx + acc; dphi."""
    x, phi = d["x"].float(), d["phi"]
    dx, dphi = ref.proj_backward(x, phi, d["dp"], d["dsq"])
    dxp, _ = ref.pre_backward(x, d["h"], d["g"].float())
    return dx + dxp + d["acc"].float(), dphi


def fwd_rows(d, bw, ncu=False):
    x, phi = d["x"], d["phi"]
    t, n, c = x.shape
    k, m = phi.shape
    e_p, e_sq = ref.proj(x.float(), phi)
    nbytes = x.numel() * 2 + phi.numel() * 4 + t * (m + 1) * 4
    hi, lo = split_hi_lo(phi, max(16, tk._pow2(m)))
    designs = [("cur", {}, lambda cfg, info: tk_proj(x, phi, cfg, info))]
    tiles = [dict(bt=128, bk=128, waves=2, num_warps=4, num_stages=2), dict(bt=128, bk=128, waves=2, num_warps=4,
             num_stages=3), dict(bt=64, bk=128, waves=4, num_warps=4, num_stages=4),
             dict(bt=128, bk=64, waves=2, num_warps=4, num_stages=4), dict(bt=64, bk=256, waves=2, num_warps=8,
             num_stages=3), dict(bt=128, bk=128, waves=1, num_warps=8, num_stages=3),
             dict(bt=256, bk=64, waves=1, num_warps=8, num_stages=3), dict(bt=64, bk=64, waves=4, num_warps=4,
             num_stages=5)]
    if ncu:
        tiles = tiles[:1]
    for tile in tiles:
        designs.append(("hl", tile, lambda cfg, info: proj_hl(x, hi, lo, m, **cfg, info=info)))
        designs.append(("hl_sq2", tile, lambda cfg, info: proj_hl(x, hi, lo, m, **cfg, sq_twice=True, info=info)))
        designs.append(("sq_only", tile, lambda cfg, info: (e_p, sq_only(x, **cfg, info=info))))
    rows = []
    for name, cfg, fn in designs:
        info = {}
        try:
            p, sq = fn(cfg, info)
            err = max(rel_err(p, e_p), rel_err(sq, e_sq))
            us = float("nan") if ncu else bench_us(lambda: fn(cfg, None))
        except Exception as exc:  # a tile that does not fit (shared memory, registers) is a row, not a crash
            rows.append(f"| proj fwd | {name} | {cfg} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        ck = info.get("kernel")
        regs = f"{ck.n_regs}/{ck.n_spills}" if ck is not None and hasattr(ck, "n_regs") else "-"
        rows.append(f"| proj fwd | {name} | {cfg} | {us:.1f} | {nbytes / (us * 1e-6) / bw:.0%} | {err:.1e} | {regs} |")
        print(rows[-1], flush=True)
        dump_ir(f"fwd_{name}_{len(rows)}", ck)
    return rows


def tk_proj(x, phi, cfg, info):
    if not cfg:
        out = tk.proj(x, phi)
        if info is not None:
            info["kernel"] = _last_compiled(tk._proj_fwd_kernel)
        return out
    with tk.tuning("proj", **cfg):
        return tk.proj(x, phi)


def _last_compiled(jit_fn):
    try:  # triton 3.x: device -> {key: CompiledKernel}
        caches = jit_fn.device_caches
        for cache in caches.values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            if kernels:
                return list(kernels.values())[-1]
    except Exception:
        return None
    return None


def bwd_rows(d, bw, ncu=False):
    x, phi = d["x"], d["phi"]
    t, n, c = x.shape
    k, m = phi.shape
    e_dx, e_dphi = folded_reference(d)
    nbytes = 3 * x.numel() * 2 + d["g"].numel() * 2 + t * (m + 1 + n) * 4 + 2 * phi.numel() * 4
    args = (x, phi, d["dp"], d["dsq"], d["h"], d["g"], d["acc"])

    def cur(cfg, info):
        if cfg:
            with tk.tuning("proj_pre_backward", **cfg):
                return tk.proj_pre_backward(*args)
        out = tk.proj_pre_backward(*args)
        if info is not None:
            info["kernel"] = _last_compiled(tk._proj_pre_bwd_kernel)
        return out

    designs = [("cur", {}, cur)]
    tiles = [dict(bt=64, kb=128, waves=4, num_warps=4, num_stages=3), dict(bt=32, kb=128, waves=4, num_warps=4,
             num_stages=3), dict(bt=64, kb=64, waves=4, num_warps=4, num_stages=3),
             dict(bt=64, kb=128, waves=2, num_warps=8, num_stages=2), dict(bt=128, kb=64, waves=2, num_warps=8,
             num_stages=2), dict(bt=32, kb=64, waves=8, num_warps=4, num_stages=4)]
    if ncu:
        tiles = tiles[:1]
    for tile in tiles:
        designs.append(("hl", tile, lambda cfg, info: proj_pre_backward_hl(*args, **cfg, info=info)))
        designs.append(("hl_reload", tile,
                        lambda cfg, info: proj_pre_backward_hl(*args, **cfg, resident=False, info=info)))
    rows = []
    for name, cfg, fn in designs:
        info = {}
        try:
            dx, dphi = fn(cfg, info)
            err = max(rel_err(dx, e_dx), rel_err(dphi, e_dphi))
            us = float("nan") if ncu else bench_us(lambda: fn(cfg, None))
        except Exception as exc:
            rows.append(f"| proj_pre bwd | {name} | {cfg} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        ck = info.get("kernel")
        regs = f"{ck.n_regs}/{ck.n_spills}" if ck is not None and hasattr(ck, "n_regs") else "-"
        rows.append(f"| proj_pre bwd | {name} | {cfg} | {us:.1f} | {nbytes / (us * 1e-6) / bw:.0%} | {err:.1e} "
                    f"| {regs} |")
        print(rows[-1], flush=True)
        dump_ir(f"bwd_{name}_{len(rows)}", ck)
    return rows


IR_DIR = None


def dump_ir(tag, ck):
    if IR_DIR is None or ck is None or not hasattr(ck, "asm"):
        return
    os.makedirs(IR_DIR, exist_ok=True)
    for kind in ("ttgir",):
        if kind in ck.asm:
            with open(os.path.join(IR_DIR, f"{tag}.{kind}"), "w") as f:
                f.write(ck.asm[kind])


def main() -> int:
    global IR_DIR, SMOKE
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
        SMOKE = True
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
