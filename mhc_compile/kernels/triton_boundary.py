"""Triton kernels of the fused boundary ops ``enter`` / ``step`` (oracle: the end of ``reference.py``).

Same signatures and dtypes as the reference functions; conventions as in ``triton_ops.py`` (token-major
[T, n, C] streams, T not specialised, int64 offsets, fp32 accumulation or fp64 for fp64 streams, direct
launches so the interpreter runs them, deterministic partial sums).

Forward of ``step`` (``enter`` is the same without the mix: MIX=False reads X instead of making it):

    _mix_proj_kernel   grid (token blocks, C splits). Per [BT, NP, BC] chunk: X = H_res X_prev + H_post y
                       in fp32, rounded to the stream dtype and stored, sq += X^2, and p += X @ phi on tensor
                       cores. Half-precision streams multiply in their own dtype (phi cast once per call),
                       fp32 / fp64 streams exactly. The C split only exists to fill the GPU at small T.
    coeffs, pre        the kernels of triton_ops (pre runs at the copy bandwidth already).

Backward of ``step``:

    _dh_pre_kernel     grid (token blocks), each walks all of C: dH_pre = <X, dx_in>, X recomputed (MIX).
    coeffs_backward    triton_ops: dp, dsq, dbias, dalpha.
    _boundary_bwd_kernel  grid (C slabs, token splits). A program keeps the phi rows of its slab (all n
                       streams, BC channels) and its dphi partial on chip while it walks its tokens:
                       G = dX + H_pre dx_in + dp phi^T + 2 dsq X  (fp32, never rounded), dphi += X^T dp,
                       and for step dX_prev = H_res^T G, dy = H_post G, plus this slab's partial of the
                       per-token dH_res = G X_prev^T and dH_post = G y (summed over slabs afterwards).

Bytes per token (elements of C, n streams): mix_proj 2n + 1, pre n + 1, dh_pre n + 2, boundary_bwd 3n + 3
(``enter``: n, n + 1, n + 1, 3n + 1), i.e. the ``cost.FUSED`` counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels import triton_ops as tops
from mhc_compile.kernels.triton_ops import _acc_tl, _acc_torch, _check_stream, _pow2


@dataclass(frozen=True)
class Tile:
    bt: int  # tokens per block
    bc: int  # channels per chunk (of every stream)
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 2  # C splits / token splits so that programs >= waves x SMs


_DEFAULTS = {
    "mix_proj": Tile(bt=32, bc=64, num_warps=4),
    "boundary_bwd": Tile(bt=32, bc=32, num_warps=8),
}
_OVERRIDES: dict[str, Tile] = {}


def configure(kernel: str, **fields) -> None:
    """Change a kernel's tiles for the rest of the process (a benchmark sweep's winner); no fields: reset."""
    if fields:
        _OVERRIDES[kernel] = replace(_DEFAULTS[kernel], **fields)
    else:
        _OVERRIDES.pop(kernel, None)


def _tile(kernel: str, n: int, mp: int = 16) -> Tile:
    """The configured tile, shrunk for wide n (registers: [BT, NP, BC] fp32 tiles and [NP*BC, MP] slabs)."""
    cfg = _OVERRIDES.get(kernel, _DEFAULTS[kernel])
    np_ = _pow2(n)
    bc = cfg.bc
    while bc > 16 and np_ * bc * max(cfg.bt, mp) > 32768:
        bc //= 2
    return replace(cfg, bc=bc)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _dot_dtype(x: Tensor) -> torch.dtype:
    """Half-precision streams multiply on tensor cores in their own dtype (phi rounded to it, as a bf16
    linear layer would), fp32 / fp64 streams exactly. Triton's interpreter computes bf16 dots wrongly
    (garbage, while fp16 is right), so under it a bf16 stream's dot runs in fp32; the fp16 tests cover the
    half-precision path of the same code."""
    if x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not _INTERPRETED):
        return x.dtype
    return _acc_torch(x.dtype)


def _prec(x: Tensor) -> str:
    return "ieee" if _dot_dtype(x) in (torch.float32, torch.float64) else "tf32"  # (ignored for half inputs)


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stream_tile(x_ptr, hres_ptr, hp, y, r64, mi, cols, m2, m3, C, N: tl.constexpr, NP: tl.constexpr,
                 MIX: tl.constexpr, ACC: tl.constexpr, OUT_T: tl.constexpr):
    """The [BT, NP, BC] tile of X in the stream dtype: mixed from X_prev and y (MIX) or loaded."""
    if MIX:
        ii = tl.arange(0, NP)
        acc = hp[:, :, None] * y[:, None, :]
        for j in tl.static_range(N):
            hcol = tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0).to(ACC)
            xj = tl.load(x_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
            acc += hcol[:, :, None] * xj[:, None, :]
        return tl.where(m3, acc, 0.0).to(OUT_T)
    else:
        ii = tl.arange(0, NP)
        off = (r64[:, None] * N + ii[None, :])[:, :, None] * C + cols[None, None, :]
        return tl.load(x_ptr + off, mask=m3, other=0.0).to(OUT_T)


# ---------------------------------------------------------------------------------------------
# forward: mix + proj
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _mix_proj_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, phi_ptr, x_ptr, p_ptr, sq_ptr, T, C, M, C_SPLIT,
                     N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     MIX: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ii = tl.arange(0, NP)
    ms = tl.arange(0, MP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    mmask = ms < M
    stream = (r64[:, None] * N + ii[None, :])[:, :, None] * C
    hp = tl.zeros([BT, NP], dtype=ACC)
    if MIX:
        hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    c_lo = split * C_SPLIT
    c_hi = tl.minimum(c_lo + C_SPLIT, C)
    acc = tl.zeros([BT, MP], dtype=ACC)
    sq = tl.zeros([BT], dtype=ACC)
    for c0 in range(c_lo, c_hi, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < c_hi
        m3 = mi[:, :, None] & cmask[None, None, :]
        y = tl.zeros([BT, BC], dtype=ACC)
        if MIX:
            y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(ACC)
        xt = _stream_tile(xp_ptr, hres_ptr, hp, y, r64, mi, cols, rmask[:, None] & cmask[None, :], m3, C, N, NP,
                          MIX, ACC, x_ptr.dtype.element_ty)
        if MIX:
            tl.store(x_ptr + stream + cols[None, None, :], xt, mask=m3)
        xa = xt.to(ACC)
        sq += tl.sum(tl.sum(xa * xa, axis=2), axis=1)
        krow = (ii[:, None] * C + cols[None, :]).to(tl.int64)  # [NP, BC] rows of phi
        kmask = (ii[:, None] < N) & cmask[None, :]
        ph = tl.load(phi_ptr + krow[:, :, None] * M + ms[None, None, :],
                     mask=kmask[:, :, None] & mmask[None, None, :], other=0.0)
        acc = tl.dot(tl.reshape(xt.to(ph.dtype), (BT, NP * BC)), tl.reshape(ph, (NP * BC, MP)), acc,
                     input_precision=PREC, out_dtype=ACC)
    base = split.to(tl.int64) * T
    tl.store(p_ptr + (base + r64)[:, None] * M + ms[None, :], acc, mask=rmask[:, None] & mmask[None, :])
    tl.store(sq_ptr + base + r64, sq, mask=rmask)


def _splits(programs: int, steps: int, device: torch.device, waves: int) -> int:
    want = triton.cdiv(waves * tops._num_sms(device), max(programs, 1))
    return max(1, min(want, steps))


def _mix_proj(x_src: Tensor, h_res: Tensor | None, h_post: Tensor | None, y: Tensor | None, phi: Tensor):
    """(X, p, sq): X made from (x_src, h_res, h_post, y) when they are given, else X = x_src."""
    mix = y is not None
    t, n, c = x_src.shape
    m = phi.shape[1]
    if phi.shape[0] != n * c:
        raise ValueError(f"mhc triton enter/step: phi has {phi.shape[0]} rows, expected n*C = {n * c}")
    acc = _acc_torch(x_src.dtype, phi.dtype)
    x = torch.empty_like(x_src) if mix else x_src
    if t == 0 or c == 0:
        return x, torch.zeros((t, m), dtype=acc, device=x.device), torch.zeros((t,), dtype=acc, device=x.device)
    np_, mp = _pow2(n), max(16, _pow2(m))
    cfg = _tile("mix_proj", n, mp)
    bt = min(cfg.bt, max(16, _pow2(t)))  # tl.dot needs >= 16 rows
    bc = max(16 // np_, min(_pow2(c), cfg.bc))
    blocks = triton.cdiv(t, bt)
    splits = _splits(blocks, triton.cdiv(c, bc), x.device, cfg.waves)
    c_split = triton.cdiv(triton.cdiv(c, splits), bc) * bc
    splits = triton.cdiv(c, c_split)
    p = torch.empty((splits, t, m), dtype=acc, device=x.device)
    sq = torch.empty((splits, t), dtype=acc, device=x.device)
    phi_d = phi.to(_dot_dtype(x_src)).contiguous()
    dummy = x_src
    args = (x_src, h_res if mix else dummy, h_post if mix else dummy, y if mix else dummy, phi_d, x, p, sq,
            t, c, m, c_split)
    meta = dict(N=n, NP=np_, MP=mp, BT=bt, BC=bc, MIX=mix, ACC=_acc_tl(acc), PREC=_prec(x_src))
    tops._launch_pipelined(_mix_proj_kernel, (blocks, splits), args, meta, cfg.num_warps, cfg.num_stages)
    if splits == 1:
        return x, p[0], sq[0]
    return x, p.sum(0), sq.sum(0)


# ---------------------------------------------------------------------------------------------
# backward pass 1: dH_pre = <X, dx_in>
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _dh_pre_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dh_ptr, T, C, N: tl.constexpr, NP: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, MIX: tl.constexpr, ACC: tl.constexpr, XT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ii = tl.arange(0, NP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    hp = tl.zeros([BT, NP], dtype=ACC)
    if MIX:
        hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    dh = tl.zeros([BT, NP], dtype=ACC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        m3 = mi[:, :, None] & cmask[None, None, :]
        g = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        y = tl.zeros([BT, BC], dtype=ACC)
        if MIX:
            y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        xa = _stream_tile(xp_ptr, hres_ptr, hp, y, r64, mi, cols, m2, m3, C, N, NP, MIX, ACC, XT).to(ACC)
        dh += tl.sum(xa * g[:, None, :], axis=2)
    tl.store(dh_ptr + r64[:, None] * N + ii[None, :], dh, mask=mi)


def _dh_pre(x_src, h_res, h_post, y, dx_in, acc):
    mix = y is not None
    t, n, c = x_src.shape
    dh = torch.zeros((t, n), dtype=acc, device=x_src.device)
    if t == 0 or c == 0:
        return dh
    np_ = _pow2(n)
    # Like pre_backward (at the copy bandwidth on an H100): few tokens and wide C chunks per program, so
    # the grid is large and every load is a long contiguous row; the first tile here (16 tokens x 128
    # channels) ran at 22 % (benchmarks/results/boundary-2026-11-23-h100.md).
    bt, bc, warps = tops._stream_tile("pre_backward", t, c, np_)
    _dh_pre_kernel[(triton.cdiv(t, bt),)](
        x_src, h_res if mix else x_src, h_post if mix else x_src, y if mix else x_src, dx_in, dh, t, c,
        N=n, NP=np_, BT=bt, BC=bc, MIX=mix, ACC=_acc_tl(acc), XT=_tl_dtype(x_src.dtype), num_warps=warps,
    )
    return dh


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32, torch.float64: tl.float64}


def _tl_dtype(dtype: torch.dtype):
    return _TL[dtype]


# ---------------------------------------------------------------------------------------------
# backward pass 2: G, dphi, and (step) post_res's backward, in one pass over the streams
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _boundary_bwd_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, phi_ptr, hpre_ptr, dp_ptr, dsq_ptr, dxo_ptr,
                         g_ptr, dxp_ptr, dy_ptr, dphi_ptr, dhres_ptr, dhpost_ptr, T, C, M, T_SPLIT,
                         N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, MIX: tl.constexpr, HAS_DX: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, XT: tl.constexpr):
    slab = tl.program_id(0)
    split = tl.program_id(1)
    ii = tl.arange(0, NP)
    jj = tl.arange(0, NP)
    ms = tl.arange(0, MP)
    cols = slab * BC + tl.arange(0, BC)
    cmask = cols < C
    mmask = ms < M
    kmask = (ii[:, None] < N) & cmask[None, :]  # [NP, BC]
    krow = (ii[:, None] * C + cols[None, :]).to(tl.int64)
    # phi^T of this slab: [MP, NP * BC], kept for the whole token range
    phi_t = tl.reshape(tl.permute(tl.load(phi_ptr + krow[:, :, None] * M + ms[None, None, :],
                                          mask=kmask[:, :, None] & mmask[None, None, :], other=0.0).to(ACC),
                                  (2, 0, 1)), (MP, NP * BC))
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
        stream = (r64[:, None] * N + ii[None, :])[:, :, None] * C + cols[None, None, :]
        hp = tl.zeros([BT, NP], dtype=ACC)
        y = tl.zeros([BT, BC], dtype=ACC)
        if MIX:
            hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
            y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        xa = _stream_tile(xp_ptr, hres_ptr, hp, y, r64, mi, cols, m2, m3, C, N, NP, MIX, ACC, XT).to(ACC)
        gin = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        hpre = tl.load(hpre_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
        dp = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        dp = dp.to(ACC)
        dsq = tl.load(dsq_ptr + r64, mask=rmask, other=0.0).to(ACC)
        g = hpre[:, :, None] * gin[:, None, :] + 2.0 * dsq[:, None, None] * xa
        g += tl.reshape(tl.dot(dp, phi_t, input_precision=PREC, out_dtype=ACC), (BT, NP, BC))
        if HAS_DX:
            g += tl.load(dxo_ptr + stream, mask=m3, other=0.0).to(ACC)
        g = tl.where(m3, g, 0.0)
        dphi = tl.dot(tl.trans(tl.reshape(xa, (BT, NP * BC))), dp, dphi, input_precision=PREC, out_dtype=ACC)
        if MIX:
            dy = tl.sum(hp[:, :, None] * g, axis=1)
            tl.store(dy_ptr + r64[:, None] * C + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=m2)
            dh_post = tl.sum(g * y[:, None, :], axis=2)
            dh_res = tl.zeros([BT, NP, NP], dtype=ACC)
            for j in tl.static_range(N):
                hcol = tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0)
                xj = tl.load(xp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
                dxj = tl.sum(hcol.to(ACC)[:, :, None] * g, axis=1)
                tl.store(dxp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], dxj.to(dxp_ptr.dtype.element_ty),
                         mask=m2)
                dh_res += tl.where(jj[None, None, :] == j, tl.sum(g * xj[:, None, :], axis=2)[:, :, None], 0.0)
            # this slab's partial of the per-token reductions over C
            part = slab.to(tl.int64) * T + r64
            m_res = mi[:, :, None] & (jj[None, None, :] < N)
            tl.store(dhres_ptr + part[:, None, None] * (N * N) + ii[None, :, None] * N + jj[None, None, :], dh_res,
                     mask=m_res)
            tl.store(dhpost_ptr + part[:, None] * N + ii[None, :], dh_post, mask=mi)
        else:
            tl.store(dxp_ptr + stream, g.to(dxp_ptr.dtype.element_ty), mask=m3)
    out = split.to(tl.int64) * (N * C) + tl.reshape(krow, (NP * BC,))
    tl.store(dphi_ptr + out[:, None] * M + ms[None, :], dphi,
             mask=tl.reshape(kmask, (NP * BC,))[:, None] & mmask[None, :])


def _boundary_bwd(x_src, h_res, h_post, y, phi, h_pre, dp, dsq, dx, dx_in, acc):
    mix = y is not None
    t, n, c = x_src.shape
    m = phi.shape[1]
    dxp = torch.empty_like(x_src)
    dy = torch.empty_like(y) if mix else None
    np_, mp = _pow2(n), max(16, _pow2(m))
    cfg = _tile("boundary_bwd", n, mp)
    bc = max(16 // np_, min(_pow2(c), cfg.bc))
    bt = max(16, min(cfg.bt, _pow2(t)))
    slabs = triton.cdiv(c, bc)
    splits = _splits(slabs, triton.cdiv(t, bt), x_src.device, cfg.waves)
    t_split = triton.cdiv(triton.cdiv(max(t, 1), splits), bt) * bt
    splits = triton.cdiv(max(t, 1), t_split)
    dphi = torch.zeros((splits, n * c, m), dtype=acc, device=x_src.device)
    dh_res = torch.zeros((slabs, t, n, n), dtype=acc, device=x_src.device)
    dh_post = torch.zeros((slabs, t, n), dtype=acc, device=x_src.device)
    if t > 0 and c > 0:
        d = x_src
        args = (x_src, h_res if mix else d, h_post if mix else d, y if mix else d, phi, h_pre, dp, dsq,
                dx if dx is not None else d, dx_in, dxp, dy if mix else d, dphi, dh_res, dh_post, t, c, m, t_split)
        meta = dict(N=n, NP=np_, MP=mp, BT=bt, BC=bc, MIX=mix, HAS_DX=dx is not None, ACC=_acc_tl(acc),
                    PREC="ieee" if x_src.dtype in (torch.float32, torch.float64) else "tf32",
                    XT=_tl_dtype(x_src.dtype))
        tops._launch_pipelined(_boundary_bwd_kernel, (slabs, splits), args, meta, cfg.num_warps, cfg.num_stages)
    return dxp, dy, dphi.sum(0).to(phi.dtype), dh_res.sum(0), dh_post.sum(0)


# ---------------------------------------------------------------------------------------------
# the four functions of reference.py
# ---------------------------------------------------------------------------------------------
def _check(op: str, x: Tensor, *streams: Tensor) -> None:
    _check_stream(op, x, *streams)


def enter(x, phi, bias, alpha, n, nc, eps, iters, mode):
    _check("enter", x)
    x = x.contiguous()
    _, p, sq = _mix_proj(x, None, None, None, phi.contiguous())
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def step(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode):
    _check("step", x_prev, y_prev)
    x, p, sq = _mix_proj(x_prev.contiguous(), h_res_prev.contiguous(), h_post_prev.contiguous(), y_prev.contiguous(),
                         phi.contiguous())
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return x, tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def enter_backward(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode):
    _check("enter_backward", x, dx_in)
    x, dx_in = x.contiguous(), dx_in.contiguous()
    acc = _acc_torch(x.dtype, phi.dtype)
    dh_pre = _dh_pre(x, None, None, None, dx_in, acc)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx, _, dphi, _, _ = _boundary_bwd(x, None, None, None, phi.contiguous(), h_pre.contiguous(), dp, dsq, None,
                                      dx_in, acc)
    return dx, dphi, dbias, dalpha


def step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post,
                  dh_res, n, nc, eps, iters, mode):
    _check("step_backward", x_prev, y_prev, dx, dx_in)
    x_prev, h_res_prev, h_post_prev = x_prev.contiguous(), h_res_prev.contiguous(), h_post_prev.contiguous()
    y_prev, dx, dx_in = y_prev.contiguous(), dx.contiguous(), dx_in.contiguous()
    acc = _acc_torch(x_prev.dtype, phi.dtype)
    dh_pre = _dh_pre(x_prev, h_res_prev, h_post_prev, y_prev, dx_in, acc)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx_prev, dy_prev, dphi, dh_res_prev, dh_post_prev = _boundary_bwd(
        x_prev, h_res_prev, h_post_prev, y_prev, phi.contiguous(), h_pre.contiguous(), dp, dsq, dx, dx_in, acc)
    return dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha

