"""Triton kernels of the fused boundary ops ``enter`` / ``step`` and their backwards.

Same names, signatures, return tuples and dtypes as the functions at the end of ``reference.py``;
conventions as in ``triton_ops.py`` (token-major [T, n, C] streams, T not specialised, int64 offsets,
fp32 accumulation or fp64 for fp64 streams, direct ``kernel[grid]`` launches so ``TRITON_INTERPRET=1``
runs them, per-program partials summed with ``torch.sum`` instead of atomics).

Two designs of the projection kernels were measured on an H100 (2026-11-23,
benchmarks/results/kernels-2026-11-23-h100-run3.md, boundary-2026-11-23-h100.md); this module keeps the
better half of each: a token-major forward (39 % of copy bandwidth, against 9 % for a phi-stationary one)
and a phi-stationary backward (25 %, against 10-18 % for a token-major one). Both are still slower than the
separate ops, which is why ``fuse`` defaults to False. (This pairing itself has not run on a GPU yet.)

    K1 _fwd_kernel     grid (token blocks, C splits). Per [BT, NP, BC] chunk: X = H_res X_prev + H_post y in
                       fp32, rounded to the stream dtype and stored (MIX; ``enter`` reads X instead), sq and
                       p += vec(X) @ phi, phi chunks read from L2 per token block. bf16/fp16 streams multiply
                       in their own dtype on tensor cores with fp32 accumulation (phi rounded to the stream
                       dtype once per call), fp32/fp64 exactly. The C split exists only to fill the GPU at
                       small T; its partials are summed by torch.
    coeffs, pre        ``triton_ops`` (pre runs at ~93% of copy bandwidth).

    K2 _dh_pre_kernel  grid (token blocks), pre_backward's streaming tile (wide C, few tokens): dH_pre =
                       <X, dx_in> with X recomputed on the fly and rounded as the forward stored it (MIX).
    coeffs_backward    ``triton_ops``: dp, dsq, dbias, dalpha.
    K3 _bwd_kernel     grid (C slabs, token splits). phi^T slab [m, n*BC] and the dphi partial [n*BC, m]
                       stay on chip while the program walks its tokens: G = dX + H_pre dx_in + dp phi^T +
                       2 dsq X (fp32, never rounded), dphi += X^T dp (both dots fp32 inputs, tf32 for half
                       streams, exact otherwise); for ``step`` also dX_prev = H_res^T G, dy = H_post G and this
                       slab's partials of the per-token dH_res = G X_prev^T and dH_post = G y; for ``enter``
                       dX = G. Partials: dphi [splits, nC, m], dH_res [S, T, n, n], dH_post [S, T, n]
                       (the last two: 2*4*(n*n+n)*C/BC bytes a token, ~8% of its stream bytes at BC=64).

Bytes per token, elements of C (each tensor read or written once; cost.FUSED), stream of n rows:
    step fwd:  K1 2n+1 (X_prev, y, X)  + pre n+1                   = 3n+2   (14 at n = 4)
    step bwd:  K2 n+2 (X_prev, y, dx_in) + K3 3n+3 (X_prev, y, dx_in, dX, dX_prev, dy) = 4n+5 (21)
    enter:     K1 n, pre n+1;  enter bwd: K2 n+1, K3 2n+1
plus the fp32 partials named above. Tile sizes live in ``_CFG`` (``configure`` overrides them for a
benchmark sweep); ``_slab_tiles`` shrinks them with n so the on-chip phi slab stays within ``phi_budget``
elements. Known weak spot: K3 needs all m columns at once for G, so at n = 16 (m = 288) its slabs are only
2 channels wide (register-safe and correct, but short rows: expect poor bandwidth there). n <= 8 keeps
slabs of >= 16 channels.

Under the interpreter (tests), bf16 tl.dot is wrong and fp32 -> bf16 casts truncate; K1 then multiplies the
same bf16-rounded operands in fp32 (exact products, so the values equal the GPU's) and ``_round`` rounds
bf16 stores to nearest by hand, so the tests see what the GPU computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tops
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.triton_ops import _acc_tl, _acc_torch, _cdiv, _check_stream, _pow2


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedCfg:
    bt: int = 32  # tokens per block (>= 16: tl.dot)
    bc: int = 128  # channels of every stream per slab (K1, K3) or per chunk (K2)
    phi_budget: int = 16384  # elements of a phi tile [n*BC, m_pad]: K1's chunk, K3's on-chip slab
    budget: int = 4096  # K2: elements of one [BT, n, BC] tile
    num_warps: int = 8
    num_stages: int = 2
    waves: int = 2  # token splits so that programs >= waves x SMs


# fwd and bwd: the winners of the H100 tile sweep for these two structures (32 x 64; 4 and 8 warps,
# benchmarks/results/boundary-2026-11-23-h100.md); dh_pre takes pre_backward's streaming tile
# (4096 elements, up to 1024 channels, 4 warps).
_CFG = {
    "fwd": FusedCfg(bt=32, bc=64, num_warps=4),
    "dh_pre": FusedCfg(bc=1024, num_warps=4),
    "bwd": FusedCfg(bt=32, bc=64, num_warps=8),
}
_OVERRIDES: dict[str, FusedCfg] = {}


def configure(kernel: str, **fields) -> None:
    """Change one kernel's tiles ("fwd", "dh_pre", "bwd") for the rest of the process; no fields: reset."""
    if kernel not in _CFG:
        raise ValueError(f"mhc triton_fused.configure: unknown kernel {kernel!r}; expected one of {sorted(_CFG)}")
    if fields:
        _OVERRIDES[kernel] = replace(_CFG[kernel], **fields)
    else:
        _OVERRIDES.pop(kernel, None)


def _cfg(kernel: str) -> FusedCfg:
    return _OVERRIDES.get(kernel, _CFG[kernel])


def _slab_tiles(kernel: str, n: int, c: int, mp: int) -> tuple[int, FusedCfg]:
    """(BC, cfg): halve BC, not below one 16-deep dot, until an [n*BC, m_pad] phi tile fits ``phi_budget``."""
    cfg = _cfg(kernel)
    np_ = _pow2(n)
    min_bc = max(1, 16 // np_)  # tl.dot needs K = n*BC >= 16
    bc = max(min_bc, min(cfg.bc, _pow2(c)))
    while bc > min_bc and np_ * bc * mp > cfg.phi_budget:
        bc //= 2
    return bc, cfg


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32, torch.float64: tl.float64}


def _rne(x_dtype: torch.dtype) -> bool:
    """Round bf16 stores by hand (``_round``): only under the interpreter, whatever the stream dtype (y and
    dy may be bf16 under an fp32 stream)."""
    return _INTERPRETED


def _fwd_dot(x_dtype: torch.dtype) -> tuple[torch.dtype, object, str]:
    """(dtype phi is rounded to, dtype the dot runs in, input precision) of K1.

    Half streams: phi rounded to the stream dtype, products on tensor cores with fp32 accumulation (X is
    already in that dtype, so only phi is rounded, as in a bf16 linear layer). Under the interpreter a
    bf16 tl.dot returns garbage (fp16 is right), so there the same rounded operands are widened to fp32:
    bf16 x bf16 products are exact in fp32, so the values the test sees are those of the GPU path."""
    if x_dtype in (torch.bfloat16, torch.float16):
        dot = tl.float32 if (_INTERPRETED and x_dtype == torch.bfloat16) else _TL[x_dtype]
        return x_dtype, dot, "ieee"
    return x_dtype, _TL[x_dtype], "ieee"


def _token_split(programs: int, t: int, bt: int, device: torch.device, waves: int) -> tuple[int, int]:
    """(tokens per split, splits): enough splits that programs x splits fill ``waves`` per SM."""
    blocks = _cdiv(t, bt)
    want = _cdiv(waves * tops._num_sms(device), max(programs, 1))
    splits = max(1, min(blocks, want))
    t_split = _cdiv(blocks, splits) * bt
    return t_split, _cdiv(t, t_split)


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round(v, XT: tl.constexpr, RNE: tl.constexpr):
    """v (fp32) cast to a stream dtype XT. Triton's interpreter casts fp32 -> bf16 by truncation (the GPU
    rounds to nearest even), so under it (RNE: set only when interpreted) bf16 is rounded by hand first: the tests then compare the
    stored stream with the reference's bit for bit instead of within an ulp."""
    if RNE:
        if XT == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(XT)


@triton.jit
def _x_tile(xp_ptr, hres_ptr, hpost_ptr, y_ptr, r64, mi, m2, m3, cols, C, N: tl.constexpr, NP: tl.constexpr,
            MIX: tl.constexpr, ACC: tl.constexpr, XT: tl.constexpr, RNE: tl.constexpr):
    """X in the stream dtype: H_res X_prev + H_post y in ACC, rounded once (MIX), or loaded. Masked
    entries are 0 either way (every load's ``other`` is 0)."""
    ii = tl.arange(0, NP)
    if MIX:
        hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
        y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        acc = hp[:, :, None] * y[:, None, :]
        for j in tl.static_range(N):
            hcol = tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0).to(ACC)
            xj = tl.load(xp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
            acc += hcol[:, :, None] * xj[:, None, :]
        return _round(acc, XT, RNE)
    else:
        off = (r64[:, None] * N + ii[None, :])[:, :, None] * C + cols[None, None, :]
        return tl.load(xp_ptr + off, mask=m3, other=0.0).to(XT)


# ---------------------------------------------------------------------------------------------
# K1: mix + proj forward, token-major
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, phi_ptr, x_ptr, p_ptr, sq_ptr, T, C, M, C_SPLIT,
                N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                MIX: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, XT: tl.constexpr,
                RNE: tl.constexpr):
    """Program (token block, C split): walks its channels in [BT, NP, BC] chunks, stores X (MIX) and
    accumulates p = vec(X) @ phi and sq over them; phi chunks come from L2 for every token block."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ii = tl.arange(0, NP)
    ms = tl.arange(0, MP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    mmask = ms < M
    c_lo = split * C_SPLIT
    c_hi = tl.minimum(c_lo + C_SPLIT, C)
    acc = tl.zeros([BT, MP], dtype=ACC)
    sq = tl.zeros([BT], dtype=ACC)
    for c0 in range(c_lo, c_hi, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < c_hi
        m2 = rmask[:, None] & cmask[None, :]
        m3 = mi[:, :, None] & cmask[None, None, :]
        xt = _x_tile(xp_ptr, hres_ptr, hpost_ptr, y_ptr, r64, mi, m2, m3, cols, C, N, NP, MIX, ACC, XT, RNE)
        if MIX:
            off = (r64[:, None] * N + ii[None, :])[:, :, None] * C + cols[None, None, :]
            tl.store(x_ptr + off, xt, mask=m3)
        xa = xt.to(ACC)
        sq += tl.sum(tl.sum(xa * xa, axis=2), axis=1)
        krow = (ii[:, None] * C + cols[None, :]).to(tl.int64)  # phi row of stream i, channel c
        kmask = (ii[:, None] < N) & cmask[None, :]
        ph = tl.load(phi_ptr + krow[:, :, None] * M + ms[None, None, :],
                     mask=kmask[:, :, None] & mmask[None, None, :], other=0.0)
        acc = tl.dot(tl.reshape(xt.to(DOT), (BT, NP * BC)), tl.reshape(ph.to(DOT), (NP * BC, MP)), acc,
                     input_precision=PREC, out_dtype=ACC)
    base = split.to(tl.int64) * T
    tl.store(p_ptr + (base + r64)[:, None] * M + ms[None, :], acc, mask=rmask[:, None] & mmask[None, :])
    tl.store(sq_ptr + base + r64, sq, mask=rmask)


def _fwd(x_src: Tensor, h_res: Tensor | None, h_post: Tensor | None, y: Tensor | None, phi: Tensor, acc):
    """(X, p, sq): X = H_res x_src + H_post y rounded to the stream dtype when ``y`` is given, else x_src."""
    mix = y is not None
    t, n, c = x_src.shape
    m = phi.shape[1]
    x = torch.empty_like(x_src) if mix else x_src
    if t == 0 or c == 0:
        return x, torch.zeros((t, m), dtype=acc, device=x.device), torch.zeros((t,), dtype=acc, device=x.device)
    np_, mp = _pow2(n), max(16, _pow2(m))
    bc, cfg = _slab_tiles("fwd", n, c, mp)
    bt = max(16, min(cfg.bt, _pow2(t)))
    blocks = _cdiv(t, bt)
    # split C only to fill the GPU when there are few token blocks; partials are summed below
    splits = max(1, min(_cdiv(cfg.waves * tops._num_sms(x.device), blocks), _cdiv(c, bc)))
    c_split = _cdiv(_cdiv(c, splits), bc) * bc
    splits = _cdiv(c, c_split)
    p = torch.empty((splits, t, m), dtype=acc, device=x.device)
    sq = torch.empty((splits, t), dtype=acc, device=x.device)
    phi_dtype, dot, prec = _fwd_dot(x_src.dtype)
    phi_d = phi.to(phi_dtype).contiguous()  # once per call: a few MB against the stream's GBs
    d = x_src  # placeholder for pointers a constexpr branch never reads
    args = (x_src, h_res if mix else d, h_post if mix else d, y if mix else d, phi_d, x, p, sq, t, c, m, c_split)
    meta = dict(N=n, NP=np_, MP=mp, BT=bt, BC=bc, MIX=mix, ACC=_acc_tl(acc), DOT=dot, PREC=prec,
                XT=_TL[x_src.dtype], RNE=_rne(x_src.dtype))
    launch(_fwd_kernel, (blocks, splits), args, meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits == 1:
        return x, p[0], sq[0]
    return x, p.sum(0), sq.sum(0)


# ---------------------------------------------------------------------------------------------
# K2: dH_pre = <X, dx_in>
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _dh_pre_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dh_ptr, T, C, N: tl.constexpr, NP: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, MIX: tl.constexpr, ACC: tl.constexpr, XT: tl.constexpr,
                   RNE: tl.constexpr):
    """One program owns BT tokens and walks all of C (a wide, few-token tile as in pre_backward), so the
    reduction over C needs no cross-program sum."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ii = tl.arange(0, NP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    dh = tl.zeros([BT, NP], dtype=ACC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        m3 = mi[:, :, None] & cmask[None, None, :]
        g = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        xa = _x_tile(xp_ptr, hres_ptr, hpost_ptr, y_ptr, r64, mi, m2, m3, cols, C, N, NP, MIX, ACC, XT, RNE).to(ACC)
        dh += tl.sum(xa * g[:, None, :], axis=2)
    tl.store(dh_ptr + r64[:, None] * N + ii[None, :], dh, mask=mi)


def _dh_pre(x_src: Tensor, h_res, h_post, y, dx_in: Tensor, acc) -> Tensor:
    mix = y is not None
    t, n, c = x_src.shape
    dh = torch.zeros((t, n), dtype=acc, device=x_src.device)
    if t == 0 or c == 0:
        return dh
    np_ = _pow2(n)
    cfg = _cfg("dh_pre")
    bc = min(_pow2(c), cfg.bc, max(16, cfg.budget // np_))
    bt = max(1, min(_pow2(t), cfg.budget // (np_ * bc)))
    d = x_src
    launch(
        _dh_pre_kernel, (_cdiv(t, bt),), (x_src, h_res if mix else d, h_post if mix else d, y if mix else d, dx_in, dh, t, c),
        dict(N=n, NP=np_, BT=bt, BC=bc, MIX=mix, ACC=_acc_tl(acc), XT=_TL[x_src.dtype], RNE=_rne(x_src.dtype)),
        num_warps=cfg.num_warps,
    )
    return dh


# ---------------------------------------------------------------------------------------------
# K3: G, dphi and (step) post_res's backward in one pass
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _bwd_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, phi_ptr, hpre_ptr, dp_ptr, dsq_ptr, dxo_ptr, gin_ptr,
                dxp_ptr, dy_ptr, dphi_ptr, dhres_ptr, dhpost_ptr, T, C, M, T_SPLIT,
                N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                MIX: tl.constexpr, HAS_DX: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                XT: tl.constexpr, RNE: tl.constexpr):
    slab = tl.program_id(0)
    split = tl.program_id(1)
    ii = tl.arange(0, NP)
    ms = tl.arange(0, MP)
    cols = slab * BC + tl.arange(0, BC)
    cmask = cols < C
    mmask = ms < M
    kmask = (ii[:, None] < N) & cmask[None, :]  # [NP, BC]
    krow = (ii[:, None] * C + cols[None, :]).to(tl.int64)
    # phi^T of this slab, [MP, NP*BC], loaded transposed (no permute) and kept for every token
    phi_t = tl.load(phi_ptr + krow[None, :, :] * M + ms[:, None, None],
                    mask=mmask[:, None, None] & kmask[None, :, :], other=0.0)
    phi_t = tl.reshape(phi_t.to(ACC), (MP, NP * BC))
    dphi = tl.zeros([NP * BC, MP], dtype=ACC)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_hi
        r64 = rows.to(tl.int64)
        mi = rmask[:, None] & (ii[None, :] < N)
        m2 = rmask[:, None] & cmask[None, :]
        m3 = mi[:, :, None] & cmask[None, None, :]
        soff = (r64[:, None] * N + ii[None, :])[:, :, None] * C + cols[None, None, :]
        xa = _x_tile(xp_ptr, hres_ptr, hpost_ptr, y_ptr, r64, mi, m2, m3, cols, C, N, NP, MIX, ACC, XT, RNE).to(ACC)
        gin = tl.load(gin_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        hpre = tl.load(hpre_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
        dp = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        dp = dp.to(ACC)
        dsq = tl.load(dsq_ptr + r64, mask=rmask, other=0.0).to(ACC)
        # G in ACC, zero on masked entries: every term is (masked loads and phi rows are 0)
        g = hpre[:, :, None] * gin[:, None, :] + (2.0 * dsq)[:, None, None] * xa
        g += tl.reshape(tl.dot(dp, phi_t, input_precision=PREC, out_dtype=ACC), (BT, NP, BC))
        if HAS_DX:
            g += tl.load(dxo_ptr + soff, mask=m3, other=0.0).to(ACC)
        dphi = tl.dot(tl.trans(tl.reshape(xa, (BT, NP * BC))), dp, dphi, input_precision=PREC, out_dtype=ACC)
        if MIX:
            part = slab.to(tl.int64) * T + r64  # this slab's partial of the reductions over C
            hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
            tl.store(dy_ptr + r64[:, None] * C + cols[None, :],
                     _round(tl.sum(hp[:, :, None] * g, axis=1), dy_ptr.dtype.element_ty, RNE), mask=m2)
            y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
            tl.store(dhpost_ptr + part[:, None] * N + ii[None, :], tl.sum(g * y[:, None, :], axis=2), mask=mi)
            for j in tl.static_range(N):
                # X_prev[:, j] was read a moment ago by _x_tile: this re-read hits the cache
                xj = tl.load(xp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
                hcol = tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0)
                dxj = tl.sum(hcol.to(ACC)[:, :, None] * g, axis=1)
                tl.store(dxp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], _round(dxj, dxp_ptr.dtype.element_ty, RNE),
                         mask=m2)
                tl.store(dhres_ptr + part[:, None] * (N * N) + ii[None, :] * N + j,
                         tl.sum(g * xj[:, None, :], axis=2), mask=mi)
        else:
            tl.store(dxp_ptr + soff, _round(g, dxp_ptr.dtype.element_ty, RNE), mask=m3)
    out = split.to(tl.int64) * (N * C) + tl.reshape(krow, (NP * BC,))
    tl.store(dphi_ptr + out[:, None] * M + ms[None, :], dphi,
             mask=tl.reshape(kmask, (NP * BC,))[:, None] & mmask[None, :])


def _bwd(x_src, h_res, h_post, y, phi, h_pre, dp, dsq, dx, dx_in, acc):
    """(dX_src, dy, dphi, dH_res, dH_post); dy / dH_* are None without the mix (``enter``)."""
    mix = y is not None
    t, n, c = x_src.shape
    m = phi.shape[1]
    dxp = torch.empty_like(x_src)
    if t == 0 or c == 0:
        z = torch.zeros
        return (dxp, torch.empty_like(y) if mix else None, z(phi.shape, dtype=phi.dtype, device=phi.device),
                z((t, n, n), dtype=acc, device=x_src.device), z((t, n), dtype=acc, device=x_src.device))
    np_, mp = _pow2(n), max(16, _pow2(m))
    bc, cfg = _slab_tiles("bwd", n, c, mp)
    bt = max(16, min(cfg.bt, _pow2(t)))
    slabs = _cdiv(c, bc)
    t_split, splits = _token_split(slabs, t, bt, x_src.device, cfg.waves)
    dy = torch.empty_like(y) if mix else None
    dphi = torch.empty((splits, n * c, m), dtype=acc, device=x_src.device)
    parts = slabs if mix else 0
    dh_res = torch.empty((parts, t, n, n), dtype=acc, device=x_src.device)
    dh_post = torch.empty((parts, t, n), dtype=acc, device=x_src.device)
    d = x_src
    args = (x_src, h_res if mix else d, h_post if mix else d, y if mix else d, phi, h_pre, dp, dsq,
            dx if dx is not None else d, dx_in, dxp, dy if mix else d, dphi, dh_res if mix else d,
            dh_post if mix else d, t, c, m, t_split)
    half = x_src.dtype in (torch.bfloat16, torch.float16)
    meta = dict(N=n, NP=np_, MP=mp, BT=bt, BC=bc, MIX=mix, HAS_DX=dx is not None, ACC=_acc_tl(acc),
                PREC="tf32" if half else "ieee", XT=_TL[x_src.dtype], RNE=_rne(x_src.dtype))
    launch(_bwd_kernel, (slabs, splits), args, meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dphi = (dphi[0] if splits == 1 else dphi.sum(0)).to(phi.dtype)
    if not mix:
        return dxp, None, dphi, None, None
    return dxp, dy, dphi, dh_res.sum(0), dh_post.sum(0)


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
    _, p, sq = _fwd(x, None, None, None, phi, _acc_torch(x.dtype, phi.dtype))
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def step(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode):
    """(x, x_in, h_pre, h_post, h_res, p, sq): x = post_res(x_prev, ...) in the stream dtype, then enter(x)."""
    _check("step", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev)
    x, p, sq = _fwd(x_prev.contiguous(), h_res_prev.contiguous(), h_post_prev.contiguous(), y_prev.contiguous(),
                    phi, _acc_torch(x_prev.dtype, phi.dtype))
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return x, tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def enter_backward(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode):
    """(dx, dphi, dbias, dalpha) of ``enter``."""
    _check("enter_backward", n, x, phi, h_pre=h_pre, p=p, sq=sq, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    x, dx_in, phi = x.contiguous(), dx_in.contiguous(), phi.contiguous()
    acc = _acc_torch(x.dtype, phi.dtype)
    dh_pre = _dh_pre(x, None, None, None, dx_in, acc)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx, _, dphi, _, _ = _bwd(x, None, None, None, phi, h_pre.contiguous(), dp, dsq, None, dx_in, acc)
    return dx, dphi, dbias, dalpha


def step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post,
                  dh_res, n, nc, eps, iters, mode):
    """(dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha) of ``step``; X is recomputed."""
    _check("step_backward", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev,
           h_pre=h_pre, p=p, sq=sq, dx=dx, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    x_prev, h_res_prev, h_post_prev = x_prev.contiguous(), h_res_prev.contiguous(), h_post_prev.contiguous()
    y_prev, dx, dx_in, phi = y_prev.contiguous(), dx.contiguous(), dx_in.contiguous(), phi.contiguous()
    acc = _acc_torch(x_prev.dtype, phi.dtype)
    dh_pre = _dh_pre(x_prev, h_res_prev, h_post_prev, y_prev, dx_in, acc)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx_prev, dy_prev, dphi, dh_res_prev, dh_post_prev = _bwd(
        x_prev, h_res_prev, h_post_prev, y_prev, phi, h_pre.contiguous(), dp, dsq, dx, dx_in, acc)
    return dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha
