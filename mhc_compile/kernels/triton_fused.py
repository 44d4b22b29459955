"""Triton kernels of the fused boundary ops ``enter`` / ``step`` and their backwards.

Same names, signatures, return tuples and dtypes as the functions at the end of ``reference.py``;
conventions as in ``triton_ops.py`` (token-major [T, n, C] streams, T not specialised, int64 offsets,
fp32 accumulation or fp64 for fp64 streams, direct launches so ``TRITON_INTERPRET=1`` runs them, per-program
partials summed with ``torch.sum`` instead of atomics).

Each op is a short pipeline. Where a stage is a pass of the unfused design over the same bytes, it is that
pass's kernel (``triton_ops``, tuned and measured there); this module adds the one kernel pair that exists only
because of the fusion, the backward of ``step``.

    enter        proj -> coeffs -> pre                              (triton_ops)
    step         post_res_proj -> coeffs -> pre                      (triton_ops: X_l written once, and proj
                                                                      reads the rounded X_l from registers)
    enter bwd    pre_backward_dh -> coeffs_backward -> proj_pre_backward (one pass: dX = G, dphi)
    step bwd     K2 _dh_pre_kernel  -> coeffs_backward -> K3 _step_bwd_kernel

    K2  grid (token blocks): dH_pre = <X_i, dx_in>, X_i = H_res X_prev + H_post y recomputed per [BT, BC] chunk
        and rounded as the forward stored it; a program walks all of C, so no cross-program sum.
    K3  grid (C slabs of BC channels, token splits). Every tile is 2-D [BT, BC], one per stream, all in one
        layout (per-token coefficients are [BT] vectors). The program keeps, for each stream i, phi_i^T [MP, BC]
        and its dphi_i^T accumulator [MA, BC] on chip while it walks its tokens; per tile and stream i:
            X_i  = H_res[i, :] X_prev + H_post[i] y                   (recomputed, rounded to the stream dtype)
            G_i  = dX_i + H_pre[i] dx_in + dp phi_i^T + 2 dsq X_i     (fp32, never rounded)
            dphi_i^T += A X_i           A = dp^T as bf16 hi rows then lo rows (bf16 streams: X_i enters the
                                        tensor cores as stored, as in proj's one-pass backward)
            dX_prev_j += H_res[i, j] G_i,  dy += H_post[i] G_i        (stored once, after the last i)
            dH_res[i, j] = <G_i, X_prev_j>, dH_post[i] = <G_i, y>     (this slab's partial, summed by torch)

Bytes a token, in elements of C (each tensor read or written once; ``cost.FUSED``), n streams:
    step fwd:  post_res_proj 2n+1 (X_prev, y, X) + pre n+1 = 3n+2 (14 at n = 4)
    step bwd:  K2 n+2 (X_prev, y, dx_in) + K3 3n+3 (X_prev, y, dx_in, dX, dX_prev, dy) = 4n+5 (21)
    enter:     proj n + pre n+1;  enter bwd: pre_backward_dh n+1 + proj_pre_backward 2n+1
plus K3's fp32 partials of dH_res / dH_post: 4 (n^2 + n) bytes a token a slab, written, then read by the sum.

Measured on an H200 at 32768 x 4096 (benchmarks/results/session12-2026-12-02-h200.md): enter forward 99 % of copy
bandwidth, backward 78 %; step forward 70 %, backward 24 % (K2 95 %, K3 19 %). K3 is the slow stage: with its
dots and sums removed its loop still reads at only 2.7 TB/s (10 stream tiles and ~30 per-token vectors a 64-token
tile, 255 registers, one program an SM). TMA descriptors for its tiles were tried and were slower.

Under the interpreter (tests) bf16 tl.dot is wrong and fp32 -> bf16 casts truncate: the hi/lo dots run on the
same bf16 values widened to fp32 (exact products), and ``_round`` rounds bf16 stores to nearest by hand, so the
tests see what the GPU computes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tops
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.triton_ops import _acc_tl, _acc_torch, _cdiv, _check_stream, _pow2, _pow2_floor


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedCfg:
    bt: int = 64  # tokens per tile (K3: >= 16 for tl.dot)
    bc: int = 64  # channels per tile: K2's chunk, K3's slab (shrunk so that n [MA, BC] accumulators fit budget)
    budget: int = 16384  # K3: elements of the n dphi accumulators together
    num_warps: int = 8
    num_stages: int = 2
    waves: int = 2  # K3: token splits so that programs >= waves x SMs


_CFG = {
    "dh_pre": FusedCfg(bt=2, bc=512, num_warps=4),
    "bwd": FusedCfg(bt=64, bc=16, num_warps=4),
}
_OVERRIDES: dict[str, FusedCfg] = {}


def configure(kernel: str, **fields) -> None:
    """Change one kernel's tiles ("dh_pre", "bwd") for the rest of the process; no fields: reset. The stages the
    ops share with the unfused design take ``triton_ops.configure``."""
    if kernel not in _CFG:
        raise ValueError(f"mhc triton_fused.configure: unknown kernel {kernel!r}; expected one of {sorted(_CFG)}")
    if fields:
        _OVERRIDES[kernel] = replace(_CFG[kernel], **fields)
    else:
        _OVERRIDES.pop(kernel, None)


def _cfg(kernel: str) -> FusedCfg:
    return _OVERRIDES.get(kernel, _CFG[kernel])


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32, torch.float64: tl.float64}


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mix(xs, y, coef, i: tl.constexpr, N: tl.constexpr, XT: tl.constexpr, RNE: tl.constexpr):
    """X_i rounded to the stream dtype, in post_res's order: h_post y, then + h_res[i, j] x_j. ``coef``: the
    per-token coefficient vectors of ``triton_ops._post_res_proj_coeffs`` (h_post[:, i] at i, h_res[:, i, j] at
    N + i * N + j)."""
    xi = coef[i][:, None] * y
    for j in tl.static_range(N):
        xi += coef[N + i * N + j][:, None] * xs[j]
    return tops._round(xi, XT, RNE)


@triton.jit
def _stream_loads(xp_ptr, y_ptr, r64, cols, m2, C, N: tl.constexpr, ACC: tl.constexpr):
    """(X_prev rows as a tuple of n [BT, BC] tiles, y tile), widened to ACC."""
    y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    xs = ()
    for j in tl.static_range(N):
        xs = xs + (tl.load(xp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC),)
    return xs, y


# ---------------------------------------------------------------------------------------------
# K2: dH_pre = <X, dx_in>, X recomputed
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _dh_pre_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dh_ptr, T, C, N: tl.constexpr, BT: tl.constexpr,
                   BC: tl.constexpr, ACC: tl.constexpr, XT: tl.constexpr, RNE: tl.constexpr, HOIST: tl.constexpr):
    """One program owns BT tokens and walks all of C. dH_pre is carried as n [BT, BC / 8] partials (each thread
    sums the 8 adjacent channels it loads) and reduced across threads once, after the loop. HOIST: the
    coefficient vectors are loaded once, before the loop (n <= 4), else again for every chunk."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    if HOIST:
        coef = tops._post_res_proj_coeffs(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
    dh = ()
    for i in tl.static_range(N):
        dh = dh + (tl.zeros([BT, BC // 8], dtype=ACC),)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = rmask[:, None] & (cols < C)[None, :]
        xs, y = _stream_loads(xp_ptr, y_ptr, r64, cols, m2, C, N, ACC)
        g = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        if not HOIST:
            coef = tops._post_res_proj_coeffs(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
        new = ()
        for i in tl.static_range(N):
            xi = _mix(xs, y, coef, i, N, XT, RNE)
            new = new + (dh[i] + tops._channel_partials(xi.to(ACC) * g, BT, BC),)
        dh = new
    for i in tl.static_range(N):
        tl.store(dh_ptr + r64 * N + i, tl.sum(dh[i], axis=1), mask=rmask)


def _dh_pre(x_prev: Tensor, h_res, h_post, y, dx_in: Tensor, acc) -> Tensor:
    t, n, c = x_prev.shape
    dh = torch.empty((t, n), dtype=acc, device=x_prev.device)
    cfg = _cfg("dh_pre")
    bc = max(8, min(cfg.bc, _pow2(c)))
    bt = max(1, min(cfg.bt, _pow2(t)))
    launch(_dh_pre_kernel, (_cdiv(t, bt),), (x_prev, h_res, h_post, y, dx_in, dh, t, c),
           dict(N=n, BT=bt, BC=bc, ACC=_acc_tl(acc), XT=_TL[x_prev.dtype], RNE=tops._INTERPRETED,
                HOIST=n * n + n <= tops._PRP_HOIST),
           num_warps=cfg.num_warps)
    return dh


# ---------------------------------------------------------------------------------------------
# K3: G, dphi and post_res's backward in one pass
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _step_bwd_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, phi_ptr, a_ptr, hpre_ptr, dp_ptr, dsq_ptr, dxo_ptr,
                     gin_ptr, dxp_ptr, dy_ptr, dphi_ptr, dh_ptr, T, C, M, T_SPLIT, s_am, s_at,
                     N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, MP: tl.constexpr, MA: tl.constexpr,
                     EVEN_C: tl.constexpr, HI_LO: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, XT: tl.constexpr, RNE: tl.constexpr, DHW: tl.constexpr):
    """Program (C slab, token split). a_ptr: the A operand of dphi_i^T = A @ X_i: with HI_LO dp^T as bf16 hi rows
    then lo rows ([2 MP, s_am], s_at = 1, MA = 2 MP) and X_i as stored, else dp^T read in place (MA = MP) and X_i
    in ACC. dphi_ptr[split] gets rows i * C + c of this slab. dh_ptr [slab, T, N*N + N]: this slab's partials of
    dH_res (flat i * N + j) then dH_post (N*N + i).

    The n^2 + n sums over the slab's channels stay in the layout of the dot that made G, each as a [BT, 1] column
    selected into one [BT, DHW] tile that is stored once. Reduced to [BT] vectors and stored one by one, each
    was first moved to the store's layout through shared memory (a barrier a sum): on an H200 that doubled the
    kernel's time (7.8 against 4.2 ms at 32768 x 4096 with the sums left out).
    """
    slab = tl.program_id(0)
    split = tl.program_id(1)
    cols = slab * BC + tl.arange(0, BC)
    cmask = cols < C
    ms = tl.arange(0, MP)
    mmask = ms < M
    mas = tl.arange(0, MA)
    dcol = tl.arange(0, DHW)
    if HI_LO:
        arow = (mas % MP) < M
    else:
        arow = mas < M
    # per stream: phi_i^T [MP, BC] (loaded once, for every token) and the dphi_i^T accumulator [MA, BC]
    phis = ()
    dphis = ()
    for i in tl.static_range(N):
        krow = (i * C + cols).to(tl.int64)
        phis = phis + (tl.load(phi_ptr + krow[None, :] * M + ms[:, None], mask=mmask[:, None] & cmask[None, :],
                               other=0.0).to(ACC),)
        dphis = dphis + (tl.zeros([MA, BC], dtype=ACC),)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_hi
        r64 = rows.to(tl.int64)
        if EVEN_C:
            m2 = rmask[:, None]
        else:
            m2 = rmask[:, None] & cmask[None, :]
        dp = tl.load(dp_ptr + (r64 * M)[:, None] + ms[None, :], mask=rmask[:, None] & mmask[None, :],
                     other=0.0).to(ACC)
        at = tl.load(a_ptr + mas[:, None] * s_am + (r64 * s_at)[None, :], mask=arow[:, None] & rmask[None, :],
                     other=0.0)
        dsq2 = 2.0 * tl.load(dsq_ptr + r64, mask=rmask, other=0.0).to(ACC)
        xs, y = _stream_loads(xp_ptr, y_ptr, r64, cols, m2, C, N, ACC)
        gin = tl.load(gin_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        dh = tl.zeros([BT, DHW], dtype=ACC)
        coef = tops._post_res_proj_coeffs(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
        dxs = ()
        dy = tl.zeros([BT, BC], dtype=ACC)
        new_dphis = ()
        for i in tl.static_range(N):
            xi = _mix(xs, y, coef, i, N, XT, RNE)
            if HI_LO:
                new_dphis = new_dphis + (tl.dot(at.to(DOT), xi.to(DOT), dphis[i], out_dtype=ACC),)
            else:
                new_dphis = new_dphis + (tl.dot(at.to(ACC), xi.to(ACC), dphis[i], input_precision=PREC,
                                                out_dtype=ACC),)
            hpre = tl.load(hpre_ptr + r64 * N + i, mask=rmask, other=0.0).to(ACC)
            # G_i in ACC; masked rows and columns are 0 in every term
            g = tl.dot(dp, phis[i], input_precision=PREC, out_dtype=ACC)
            g += dsq2[:, None] * xi.to(ACC)
            g += hpre[:, None] * gin
            g += tl.load(dxo_ptr + (r64 * N + i)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
            dy += coef[i][:, None] * g
            dh = tl.where((dcol == N * N + i)[None, :], tl.sum(g * y, axis=1, keep_dims=True), dh)
            nd = ()
            for j in tl.static_range(N):
                h = coef[N + i * N + j]
                if i == 0:
                    nd = nd + (h[:, None] * g,)
                else:
                    nd = nd + (dxs[j] + h[:, None] * g,)
                dh = tl.where((dcol == i * N + j)[None, :], tl.sum(g * xs[j], axis=1, keep_dims=True), dh)
            dxs = nd
        dphis = new_dphis
        for j in tl.static_range(N):
            tl.store(dxp_ptr + (r64 * N + j)[:, None] * C + cols[None, :],
                     tops._round(dxs[j], dxp_ptr.dtype.element_ty, RNE), mask=m2)
        tl.store(dy_ptr + r64[:, None] * C + cols[None, :], tops._round(dy, dy_ptr.dtype.element_ty, RNE), mask=m2)
        drow = (slab.to(tl.int64) * T + r64) * (N * N + N)
        tl.store(dh_ptr + drow[:, None] + dcol[None, :], dh, mask=rmask[:, None] & (dcol < N * N + N)[None, :])
    for i in tl.static_range(N):
        d = dphis[i]
        if HI_LO:
            d = tl.sum(tl.reshape(d, (2, MP, BC)), axis=0)
        out = split.to(tl.int64) * (N * C) + i * C + cols
        tl.store(dphi_ptr + out[None, :] * M + ms[:, None], d, mask=mmask[:, None] & cmask[None, :])


def _step_bwd_tiles(n: int, c: int, t: int, ma: int) -> tuple[int, int, FusedCfg]:
    """(BT, BC, cfg): BC halved, not below one 16-wide dot operand, until the n [MA, BC] accumulators fit."""
    cfg = _cfg("bwd")
    bc = max(16, min(cfg.bc, _pow2(c), _pow2_floor(cfg.budget // (n * ma))))
    bt = max(16, min(cfg.bt, _pow2(t)))
    return bt, bc, cfg


def _step_bwd(x_prev, h_res, h_post, y, phi, h_pre, dp, dsq, dx, dx_in, acc):
    """(dX_prev, dy, dphi, dH_res, dH_post) of ``step``."""
    from mhc_compile.kernels.triton_proj_bwd import split_dp_t

    t, n, c = x_prev.shape
    m = phi.shape[1]
    mp = max(16, _pow2(m))
    hi_lo = tops._hi_lo(x_prev.dtype) and acc == torch.float32
    ma = 2 * mp if hi_lo else mp
    bt, bc, cfg = _step_bwd_tiles(n, c, t, ma)
    slabs = _cdiv(c, bc)
    blocks = _cdiv(t, bt)
    want = _cdiv(cfg.waves * tops._num_sms(x_prev.device), slabs)
    splits = max(1, min(blocks, want))
    t_split = _cdiv(blocks, splits) * bt
    splits = _cdiv(t, t_split)
    if hi_lo:
        a = split_dp_t(dp, mp)
        s_am, s_at = a.stride(0), 1
    else:
        a, s_am, s_at = dp, 1, m
    dxp = torch.empty_like(x_prev)
    dy = torch.empty_like(y)
    dphi = torch.empty((splits, n * c, m), dtype=acc, device=x_prev.device)
    dh = torch.empty((slabs, t, n * n + n), dtype=acc, device=x_prev.device)
    args = (x_prev, h_res, h_post, y, phi, a, h_pre, dp, dsq, dx, dx_in, dxp, dy, dphi, dh, t, c, m, t_split, s_am,
            s_at)
    meta = dict(N=n, BT=bt, BC=bc, MP=mp, MA=ma, EVEN_C=c % bc == 0, HI_LO=hi_lo, DOT=tops._half_dot_dtype(),
                ACC=_acc_tl(acc), PREC=tops._dot_precision(x_prev.dtype), XT=_TL[x_prev.dtype], RNE=tops._INTERPRETED,
                DHW=_pow2(n * n + n))
    launch(_step_bwd_kernel, (slabs, splits), args, meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dphi = (dphi[0] if splits == 1 else dphi.sum(0)).to(phi.dtype)
    dh = dh[0] if slabs == 1 else dh.sum(0)
    # two tensors of their own (the op's outputs must not alias): T x (n^2 + n) fp32, small
    return dxp, dy, dphi, dh[:, : n * n].contiguous().view(t, n, n), dh[:, n * n:].contiguous()


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check(op: str, n: int, x: Tensor, phi: Tensor, **named: Tensor) -> None:
    """Dtypes and shapes, so a wrong call fails here with names instead of reading out of bounds. y and the
    gradients may have another stream dtype than x (autocast: an fp32 stream, a bf16 sublayer output);
    every load widens to the accumulation dtype."""
    _check_stream(op, x, *(v for k, v in named.items() if k in ("y_prev", "dx", "dx_in")))
    if x.dim() != 3 or x.shape[1] != n:
        raise ValueError(f"mhc triton {op}: stream has shape {tuple(x.shape)}, expected [T, n={n}, C]")
    t, _, c = x.shape
    want = {
        "h_res_prev": (t, n, n), "h_post_prev": (t, n), "y_prev": (t, c), "dx": (t, n, c), "dx_in": (t, c),
        "h_pre": (t, n), "p": (t, ref.num_coeffs(n)), "sq": (t,), "dh_post": (t, n), "dh_res": (t, n, n),
    }
    for k, v in named.items():
        if tuple(v.shape) != want[k]:
            raise ValueError(f"mhc triton {op}: {k} has shape {tuple(v.shape)}, expected {want[k]}")
    if tuple(phi.shape) != (n * c, ref.num_coeffs(n)):
        raise ValueError(f"mhc triton {op}: phi has shape {tuple(phi.shape)}, expected (n*C, n*n + 2n) = "
                         f"{(n * c, ref.num_coeffs(n))}")


# ---------------------------------------------------------------------------------------------
# the four functions of reference.py
# ---------------------------------------------------------------------------------------------
def enter(x, phi, bias, alpha, n, nc, eps, iters, mode):
    """(x_in, h_pre, h_post, h_res, p, sq) of the stream ``x`` [T, n, C]."""
    _check("enter", n, x, phi)
    x = x.contiguous()
    p, sq = tops.proj(x, phi)
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def step(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode):
    """(x, x_in, h_pre, h_post, h_res, p, sq): x = post_res(x_prev, ...) in the stream dtype, then enter(x)."""
    _check("step", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev)
    x, p, sq = tops.post_res_proj(x_prev, h_res_prev, h_post_prev, y_prev, phi)
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return x, tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def enter_backward(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode):
    """(dx, dphi, dbias, dalpha) of ``enter``."""
    _check("enter_backward", n, x, phi, h_pre=h_pre, p=p, sq=sq, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    dh_pre = tops.pre_backward_dh(x, h_pre, dx_in)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx, dphi = tops.proj_pre_backward(x, phi, dp, dsq, h_pre, dx_in)
    return dx, dphi, dbias, dalpha


def step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post,
                  dh_res, n, nc, eps, iters, mode):
    """(dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha) of ``step``; X is recomputed."""
    _check("step_backward", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev,
           h_pre=h_pre, p=p, sq=sq, dx=dx, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    x_prev, h_res_prev, h_post_prev = x_prev.contiguous(), h_res_prev.contiguous(), h_post_prev.contiguous()
    y_prev, dx, dx_in, phi = y_prev.contiguous(), dx.contiguous(), dx_in.contiguous(), phi.contiguous()
    acc = _acc_torch(x_prev.dtype, phi.dtype)
    t, _, c = x_prev.shape
    if t == 0 or c == 0:  # no stream elements; the coefficients' gradients still flow from dh_post, dh_res
        dh_pre = torch.zeros((t, n), dtype=acc, device=x_prev.device)
    else:
        dh_pre = _dh_pre(x_prev, h_res_prev, h_post_prev, y_prev, dx_in, acc)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    if t == 0 or c == 0:
        z = dict(dtype=acc, device=x_prev.device)
        return (torch.empty_like(x_prev), torch.zeros((t, n, n), **z), torch.zeros((t, n), **z),
                torch.empty_like(y_prev), torch.zeros_like(phi), dbias, dalpha)
    dx_prev, dy_prev, dphi, dh_res_prev, dh_post_prev = _step_bwd(
        x_prev, h_res_prev, h_post_prev, y_prev, phi, h_pre.contiguous(), dp.contiguous(), dsq.contiguous(), dx,
        dx_in, acc)
    return dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha
