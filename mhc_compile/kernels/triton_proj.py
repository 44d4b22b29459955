"""``proj``: p = vec(x) @ phi and sq = |vec(x)|^2 in one pass over x on tensor cores, and its backward (dx, dphi),
optionally folded with ``pre``'s backward and a stream-gradient accumulator."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.errors import TritonError
from triton.runtime.errors import OutOfResources

from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.tma import tma_ok
from mhc_compile.kernels.triton_common import (acc_tl, acc_torch, cdiv, check_stream, dot_precision, filling_splits,
                                               gluon_build_failed, grad_buffer, half_dot_dtype, is_broadcast, pow2,
                                               split_hi_lo, stream_arg, stream_dims, uses_hi_lo, wave_splits)
from mhc_compile.kernels.triton_config import DotCfg, cfg_of


# ---------------------------------------------------------------------------------------------
# the forward: p = vec(x) @ phi, sq = |vec(x)|^2, one pass over x on tensor cores
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _proj_fwd_kernel(x_ptr, phi_ptr, p_ptr, sq_ptr, T, K, M, MPAD, K_SPLIT, ONE, BT: tl.constexpr, BK: tl.constexpr,
                     BM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, HI_LO: tl.constexpr,
                     DOT: tl.constexpr, JOIN: tl.constexpr = False):
    """Program (token block, column block, K split): [BT, BM] partial of p and [BT] partial of sq.

    Partials go to p_ptr[split] / sq_ptr[split]; the column-block-0 programs own sq.
    HI_LO: phi_ptr is split_hi_lo's [2, K, MPAD] and the X tile enters both dots in its own dtype;
    otherwise phi is [K, M] in ACC and the tile is widened (tf32 for fp16, exact for fp32 / fp64).
    JOIN (with HI_LO): phi_ptr is split_hi_lo's interleaved [K, 2, MPAD]; the block's hi and lo columns form one
    [BK, 2 BM] tile, so each step takes one dot of twice the width (the X tile read from shared memory once) and
    the accumulator's hi and lo halves are added after the loop.
    The sum of squares accumulates as [BT, BK / 8] partials, each over 8 adjacent columns (the 8-element vector a
    thread loads, so no step reduces across threads), and is reduced across columns once after the loop. Reduced
    every step instead (4 rounds of warp shuffles among the 16 threads sharing a row, in the sm_90a IR), the
    kernel was 8-10 % slower on an H200: 154.6 against 142.6 us at 8192 x 7168, 301.7 against 273.7 at
    32768 x 4096 (84 against 93 % of copy bandwidth; benchmarks/results/session8-2026-12-02-h200.md).
    X and phi's halves as TMA descriptor blocks (as proj's backward reads them) were timed and removed: 269.5
    against 269.8 us alone at 32768 x 4096, 185.3 against 169.6 us a call in the d = 7168 step
    (benchmarks/results/session11-2026-12-02-h200.md).
    A broadcast x (a chain's head) does not come here as such: ``proj`` projects its rows on phi summed over the
    streams.
    """
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    cmask = cols < M
    r64 = rows.to(tl.int64)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if JOIN:
        acc = tl.zeros([BT, 2 * BM], dtype=ACC)
        j2 = tl.arange(0, 2 * BM)
        jcols = (j2 // BM) * MPAD + pid_m * BM + j2 % BM  # hi columns of the block, then its lo columns
    else:
        acc = tl.zeros([BT, BM], dtype=ACC)
    sq8 = tl.zeros([BT, BK // 8], dtype=ACC)  # BK >= 16: tl.dot
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < k_hi
        xt = tl.load(x_ptr + r64[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if JOIN:
            hl = tl.load(phi_ptr + ks[:, None].to(tl.int64) * (2 * MPAD) + jcols[None, :], mask=kmask[:, None],
                         other=0.0)
            acc = tl.dot(xt.to(DOT), hl.to(DOT), acc, out_dtype=ACC)
            xf = xt.to(ACC)
        elif HI_LO:
            hp = phi_ptr + ks[:, None].to(tl.int64) * MPAD + cols[None, :]
            hi = tl.load(hp, mask=kmask[:, None], other=0.0)
            lo = tl.load(hp + K * MPAD, mask=kmask[:, None], other=0.0)
            acc = tl.dot(xt.to(DOT), hi.to(DOT), acc, out_dtype=ACC)
            acc = tl.dot(xt.to(DOT), lo.to(DOT), acc, out_dtype=ACC)
            xf = xt.to(ACC)
        else:
            xf = xt.to(ACC)
            ph = tl.load(phi_ptr + ks[:, None].to(tl.int64) * M + cols[None, :],
                         mask=kmask[:, None] & cmask[None, :], other=0.0).to(ACC)
            acc = tl.dot(xf, ph, acc, input_precision=PREC, out_dtype=ACC)
        sq8 += tl.sum(tl.reshape(xf * xf, (BT, BK // 8, 8)), axis=2)
        # The X tile feeds the asynchronous dots and, through registers, sq. Triton 3.6's pipeliner gives such a load
        # one shared-memory slot fewer than its prefetch needs (triton-lang/triton #6691 / #7110): the cp.async of
        # the tile two steps on lands in the slot the last step's wgmma may still be reading. On an H200 that gave p
        # wrong by 30-50 % at n = 8, 11 and 16 (session 30; at n = 4 the shorter dots finished first). Reading acc
        # here makes each step wait for its dots before the next load is issued. ONE is 1.0 at run time (a
        # constant would fold away, and the wait with it).
        acc = acc * ONE
    sq = tl.sum(sq8, axis=1)
    if JOIN:
        acc = tl.sum(tl.reshape(acc, (BT, 2, BM)), axis=1)
    base = split.to(tl.int64) * T
    tl.store(p_ptr + (base + r64)[:, None] * M + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    # (a tensor-valued test: the interpreter rejects a scalar bool in a mask)
    tl.store(sq_ptr + base + r64, sq, mask=rmask & ((rows * 0 + pid_m) == 0))


def _dot_block_m(m: int, cfg: DotCfg) -> int:
    return min(max(16, pow2(m)), max(16, cfg.bm))


def _gluon_proj():
    """kernels/gluon_proj.py, imported on first use: Gluon is only needed for DotCfg.ws."""
    from mhc_compile.kernels import gluon_proj

    return gluon_proj


_NO_GLUON_PROJ: set = set()  # devices where the Gluon proj failed to build: the Triton kernel runs there


def _proj_ws(cfg: DotCfg, x: Tensor, phi: Tensor, lead: tuple, t: int, k: int, m: int, acc: torch.dtype):
    """proj on the warp-specialized Gluon kernel, or None where it does not run: off sm_90, a shape it does not take,
    or a build error (another Triton's Gluon, shared memory, ptxas), after which the device keeps the Triton kernel,
    with a warning. A build error comes before the launch, so nothing has been written."""
    gp = _gluon_proj()
    mp = max(16, pow2(m))
    warps = gp.warps_for(mp, cfg.num_warps)
    bt = 16 * warps
    chosen = gp.plan(k, bt, mp, cfg.ws_subs, cfg.ws_stages) if gp.supported(x, k, mp) and tma_ok(x) else None
    if chosen is None:
        return None
    chunk = chosen[0] * gp.BK  # the Gluon kernel's splits are whole slots
    splits = filling_splits(cfg, x.device, cdiv(t, bt), k // chunk, occupancy=1)
    k_split = cdiv(cdiv(k, splits), chunk) * chunk
    splits = cdiv(k, k_split)
    p = torch.empty((splits,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((splits,) + lead, dtype=acc, device=x.device)
    try:
        gp.launch(x.reshape(t, k), split_hi_lo(phi, mp, transpose=False, interleave=cfg.join_hi_lo),
                  p.view(splits, t, m), sq.view(splits, t), k_split, warps, *chosen, join=cfg.join_hi_lo)
    except TritonError as e:
        gluon_build_failed("proj", e, x.device, _NO_GLUON_PROJ, "the Triton kernel", stacklevel=3)
        return None
    return (p[0], sq[0]) if splits == 1 else (p.sum(0), sq.sum(0))


def proj(x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    check_stream("proj", x, phi)
    lead, t, n, c = stream_dims(x)
    k, m = phi.shape
    if k != n * c:
        raise ValueError(f"mhc triton proj: phi has {k} rows, expected n*C = {n * c}")
    (x, bcast), phi = stream_arg(x), phi.contiguous()
    if bcast and t > 0:
        # a stream broadcast over its n streams (a chain's head): vec(x) @ phi = row @ sum_i phi_i and
        # |vec(x)|^2 = n |row|^2, so one pass over the [T, C] rows with one dot a chunk. Reading the row once for
        # each stream's phi rows instead (H200, session 17) was slower than the dense copy: 255 against 226 us at
        # 8192 x 7168, since a program's n reads of its [BT, C] rows fell out of L2. The sum over streams is rounded
        # to fp32 before phi's hi / lo split: p agrees with the dense path to the dots' precision (~1e-4 of its
        # scale for bf16 streams, tests/test_broadcast_stream.py), not bit for bit.
        p, sq = proj(x.select(-2, 0).unsqueeze(-2), phi.view(n, c, m).sum(0))
        return p, sq * n
    acc = acc_torch(x.dtype, phi.dtype)
    if t == 0 or k == 0:
        return torch.zeros(lead + (m,), dtype=acc, device=x.device), torch.zeros(lead, dtype=acc, device=x.device)
    cfg = cfg_of("proj")
    if cfg.ws and uses_hi_lo(x.dtype) and acc == torch.float32 and x.device not in _NO_GLUON_PROJ:
        done = _proj_ws(cfg, x, phi, lead, t, k, m, acc)
        if done is not None:
            return done
    bm = _dot_block_m(m, cfg)
    mblocks = cdiv(m, bm)
    hi_lo = uses_hi_lo(x.dtype) and acc == torch.float32
    join = hi_lo and cfg.join_hi_lo
    w = split_hi_lo(phi, mblocks * bm, transpose=False, interleave=join) if hi_lo else phi
    bt = min(cfg.bt, max(16, pow2(t)))  # tl.dot needs >= 16 rows
    splits = filling_splits(cfg, x.device, cdiv(t, bt) * mblocks, cdiv(k, cfg.bk))
    k_split = cdiv(cdiv(k, splits), cfg.bk) * cfg.bk
    splits = cdiv(k, k_split)
    p = torch.empty((splits,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((splits,) + lead, dtype=acc, device=x.device)
    grid = (cdiv(t, bt), mblocks, splits)
    meta = dict(BT=bt, BK=cfg.bk, BM=bm, ACC=acc_tl(acc), PREC=dot_precision(x.dtype), HI_LO=hi_lo,
                DOT=half_dot_dtype(), JOIN=join)
    launch(_proj_fwd_kernel, grid, (x, w, p, sq, t, k, m, mblocks * bm, k_split, 1.0), meta,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits == 1:
        return p[0], sq[0]
    return p.sum(0), sq.sum(0)



# ---------------------------------------------------------------------------------------------
# the backward of proj, optionally folded with pre_backward and a stream-gradient accumulator:
#   dx   = dp @ phi^T + 2 dsq x  (+ h_pre[t, i] * dout[t, c])  (+ acc)       k = i * C + c
#   dphi = x^T @ dp
# Both walk X tiles [BT, BK] along the flat K = n*C axis. dphi is dp^T @ X: dp^T ([MA, BT], tiny) is the A
# operand and the X tile the B operand as loaded, so no tile is transposed in registers. bf16 streams take one
# kernel for both (kernels/triton_proj_bwd.py, X read once); the other dtypes, and bf16 with
# configure("proj_dx_dphi", enabled=False), take the pair below, where dphi reads X a second time (the first try
# at folding dphi into this dx pass spilled registers at every tile: benchmarks/kernel_lab.py,
# lab-2026-11-24-h100.md; dx's dp @ phi^T as m rank-1 FMA updates was slower than the dot).
# ---------------------------------------------------------------------------------------------
@triton.jit
def k_block(C, M, N: tl.constexpr, BK: tl.constexpr, MP: tl.constexpr, ONE_STREAM: tl.constexpr):
    """Indices of a (K block, token split) program of proj's backward: its flat columns k = i * C + c (ks, the
    in-range mask, ks as int64), the coefficient columns padded to MP (ms, mask), and the stream ii and channel cc
    of its lanes for the folded pre_backward term: with ONE_STREAM (C % BK == 0) the block lies in one stream,
    so ii is one value and cc a contiguous run; otherwise both are per lane."""
    ks = tl.program_id(0) * BK + tl.arange(0, BK)
    kmask = ks < N * C
    ms = tl.arange(0, MP)
    if ONE_STREAM:
        ii = (tl.program_id(0) * BK) // C
        cc = tl.program_id(0) * BK - ii * C + tl.arange(0, BK)
    else:
        ii = ks // C
        cc = ks - ii * C
    return ks, kmask, ks.to(tl.int64), ms, ms < M, ii, cc


@triton.jit(do_not_specialize=["T"])
def _proj_dx_kernel(x_ptr, phi_ptr, dp_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dx_ptr, T, C, M, T_SPLIT,
                    N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, MP: tl.constexpr, HAS_PRE: tl.constexpr,
                    ONE_STREAM: tl.constexpr, HAS_ACC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    X_BCAST: tl.constexpr = False):
    """Program (K block, token split): dx of its [tokens, BK] slab, all terms meeting in ACC and rounded once
    at the store; the phi slab [MP, BK] is loaded once for the program's token range.
    ONE_STREAM (C % BK == 0, every real width): the block lies in one stream i0, so h_pre is one value a
    token and dout's channels a contiguous run, loaded as vectors; otherwise both are gathered per lane.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``), read at channels cc as
    dout is; acc and dx keep the dense layout."""
    K = N * C
    split = tl.program_id(1)
    ks, kmask, ks64, ms, mmask, ii, cc = k_block(C, M, N, BK, MP, ONE_STREAM)
    phi_t = tl.load(phi_ptr + ks64[None, :] * M + ms[:, None], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(ACC)  # [MP, BK]
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_hi
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & kmask[None, :]
        off = r64[:, None] * K + ks64[None, :]
        if X_BCAST:
            xt = tl.load(x_ptr + r64[:, None] * C + cc[None, :], mask=m2, other=0.0).to(ACC)
        else:
            xt = tl.load(x_ptr + off, mask=m2, other=0.0).to(ACC)
        dp = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & mmask[None, :],
                     other=0.0).to(ACC)
        dsq = tl.load(dsq_ptr + r64, mask=rmask, other=0.0).to(ACC)
        dx = tl.dot(dp, phi_t, input_precision=PREC, out_dtype=ACC) + 2.0 * dsq[:, None] * xt
        if HAS_PRE:
            g = tl.load(g_ptr + r64[:, None] * C + cc[None, :], mask=m2, other=0.0).to(ACC)
            if ONE_STREAM:
                h = tl.load(h_ptr + r64 * N + ii, mask=rmask, other=0.0).to(ACC)
                dx += h[:, None] * g
            else:
                h = tl.load(h_ptr + r64[:, None] * N + ii[None, :], mask=m2, other=0.0).to(ACC)
                dx += h * g
        if HAS_ACC:
            dx += tl.load(acc_ptr + off, mask=m2, other=0.0).to(ACC)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["T"])
def _proj_dphi_kernel(x_ptr, a_ptr, dphi_ptr, T, K, C, M, T_SPLIT, s_am, s_at, BT: tl.constexpr, BK: tl.constexpr,
                      MP: tl.constexpr, MA: tl.constexpr, HI_LO: tl.constexpr, DOT: tl.constexpr,
                      ACC: tl.constexpr, PREC: tl.constexpr, X_BCAST: tl.constexpr = False):
    """Program (K block, token split): the [MA, BK] partial of dphi^T = dp^T @ X over its tokens, written
    transposed into dphi_ptr[split] ([K, M]). The X tile goes to the tensor cores as loaded (proj's forward,
    transposed). HI_LO: the A rows are dp's bf16 hi halves then lo halves ([2 * MP, T]), summed at the end;
    otherwise A is dp^T read in place (strides s_am, s_at) and the tile is widened to ACC.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``): column k of vec(x) is
    x[t, k % C] (C: the stream's width, read only here)."""
    split = tl.program_id(1)
    ks = tl.program_id(0) * BK + tl.arange(0, BK)
    kmask = ks < K
    ks64 = ks.to(tl.int64)
    mas = tl.arange(0, MA)
    dphi = tl.zeros([MA, BK], dtype=ACC)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_hi
        if X_BCAST:
            xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + (ks % C)[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
        else:
            xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks64[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
        if HI_LO:
            amask = rmask[None, :]
        else:
            amask = (mas < M)[:, None] & rmask[None, :]
        a = tl.load(a_ptr + mas[:, None] * s_am + rows.to(tl.int64)[None, :] * s_at, mask=amask, other=0.0)
        if HI_LO:
            dphi = tl.dot(a.to(DOT), xt.to(DOT), dphi, out_dtype=ACC)
        else:
            dphi = tl.dot(a.to(ACC), xt.to(ACC), dphi, input_precision=PREC, out_dtype=ACC)
    if HI_LO:
        dphi = tl.sum(tl.reshape(dphi, (2, MP, BK)), axis=0)
    ms = tl.arange(0, MP)
    out = split.to(tl.int64) * K + ks64
    tl.store(dphi_ptr + out[None, :] * M + ms[:, None], dphi, mask=(ms < M)[:, None] & kmask[None, :])


def _token_splits(cfg: DotCfg, device: torch.device, kblocks: int, t: int, bt: int) -> tuple[int, int]:
    """(splits, tokens per split) of a (K block, token split) grid."""
    splits = wave_splits(cfg, device, kblocks, cdiv(t, bt), min_steps=2)
    t_split = cdiv(cdiv(t, splits), bt) * bt
    return cdiv(t, t_split), t_split


# Tiles of the one-pass backward (``_tile_key``) that a device's shared memory does not fit, and those it fits only
# without PIPELINE_ALL's extra stages. Kept by tile, not by device: at n >= 11 (m >= 143 coefficients, dp's hi / lo
# rows padded to 512) the tile takes 276-278 KB in Triton 3.6's sm_90a build, past the 227 KB of an H100 or H200,
# where n = 8 to 10 take 156 KB; one call at a large n must not take the one-pass kernel from every later call.
_NO_ONE_PASS: set = set()
_NO_PIPELINE_ALL: set = set()


def _tile_key(x: Tensor, m: int, dout: Tensor | None, acc: Tensor | None) -> tuple:
    """What sets the one-pass tile's shared memory on a device: the coefficient count (dp's and phi's tiles) and
    whether dout and acc are staged too."""
    return (x.device, m, dout is not None, acc is not None)


def _proj_grads(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor | None, dout: Tensor | None,
                acc: Tensor | None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx, dphi); dx written into ``out`` when given (it may be acc: each dx tile is stored after its acc tile
    is read, by the same program). x as the op got it: the kernels read it through ``stream_arg``; the other
    tensors contiguous."""
    _, t, n, c = stream_dims(x)
    k, m = phi.shape
    acc_t = acc_torch(x.dtype, phi.dtype, *(() if dout is None else (dout.dtype,)))
    if t == 0 or k == 0:  # x has no elements: neither has dx
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out), torch.zeros_like(phi)
    hi_lo = uses_hi_lo(x.dtype) and acc_t == torch.float32
    tile = _tile_key(x, m, dout, acc)
    if hi_lo and cfg_of("proj_dx_dphi").enabled and tile not in _NO_ONE_PASS:  # one pass over X
        from mhc_compile.kernels import triton_proj_bwd

        cfg = cfg_of("proj_dx_dphi")
        if cfg.pipeline_all and tile in _NO_PIPELINE_ALL:
            cfg = replace(cfg, pipeline_all=False)
        try:
            return triton_proj_bwd.proj_grads(x, phi, dp, dsq, h_pre, dout, acc, cfg, out=out)
        except OutOfResources as e:  # more shared memory than the GPU has (227 KB a block on an H100 / H200)
            if cfg.pipeline_all:  # dout and acc staged too take a third more: try without, then the pair
                _NO_PIPELINE_ALL.add(tile)
                warnings.warn(f"mhc triton proj backward: the one-pass kernel with PIPELINE_ALL does not fit this "
                              f"GPU at m = {m} coefficients ({e}); using it without", stacklevel=2)
                return _proj_grads(x, phi, dp, dsq, h_pre, dout, acc, out)
            _NO_ONE_PASS.add(tile)
            warnings.warn(f"mhc triton proj backward: the one-pass kernel does not fit this GPU at m = {m} "
                          f"coefficients ({e}); using the dx + dphi kernel pair", stacklevel=2)
    x, bcast = stream_arg(x)
    cfg, cfg_phi = cfg_of("proj_dx"), cfg_of("proj_dphi")
    mp = max(16, pow2(m))
    if hi_lo:  # dp^T as bf16 hi rows then lo rows: [2 * MP, T]
        a, s_am, s_at, ma = split_hi_lo(dp, mp, transpose=True), t, 1, 2 * mp
    else:  # dp^T read in place
        a, s_am, s_at, ma = dp, 1, m, mp
    # the phi slab [MP, BK] lives in registers: BK shrinks as m grows
    bk = max(16, min(cfg.bk, 4096 // mp))
    bt = max(16, min(cfg.bt, pow2(t)))
    kblocks = cdiv(k, bk)
    splits, t_split = _token_splits(cfg, x.device, kblocks, t, bt)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out  # dense, x broadcast or not
    prec = dot_precision(x.dtype)
    meta = dict(N=n, BT=bt, BK=bk, MP=mp, HAS_PRE=h_pre is not None, ONE_STREAM=c % bk == 0,
                HAS_ACC=acc is not None, ACC=acc_tl(acc_t), PREC=prec, X_BCAST=bcast)
    # absent operands are placeholders that their constexpr flag never lets the kernel read
    args = (x, phi, dp, dsq, h_pre if h_pre is not None else dp, dout if dout is not None else x,
            acc if acc is not None else x, dx, t, c, m, t_split)
    launch(_proj_dx_kernel, (kblocks, splits), args, meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bk2 = max(16, min(cfg_phi.bk, 8192 // ma))  # the [MA, BK] accumulator lives in registers
    bt2 = max(16, min(cfg_phi.bt, pow2(t)))
    kblocks2 = cdiv(k, bk2)
    splits2, t_split2 = _token_splits(cfg_phi, x.device, kblocks2, t, bt2)
    dphi = torch.empty((splits2, k, m), dtype=acc_t, device=x.device)
    meta2 = dict(BT=bt2, BK=bk2, MP=mp, MA=ma, HI_LO=hi_lo, DOT=half_dot_dtype(), ACC=acc_tl(acc_t), PREC=prec,
                 X_BCAST=bcast)
    launch(_proj_dphi_kernel, (kblocks2, splits2), (x, a, dphi, t, k, c, m, t_split2, s_am, s_at), meta2,
           num_warps=cfg_phi.num_warps, num_stages=cfg_phi.num_stages)
    return dx, dphi.sum(0).to(phi.dtype)


def proj_backward(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor) -> tuple[Tensor, Tensor]:
    check_stream("proj_backward", x, phi)
    n, c = x.shape[-2:]
    if phi.shape[0] != n * c:
        raise ValueError(f"mhc triton proj_backward: phi has {phi.shape[0]} rows, expected n*C = {n * c}")
    return _proj_grads(x, phi.contiguous(), dp.contiguous(), dsq.contiguous(), None, None, None)


def proj_pre_backward(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(proj_backward dx + pre_backward dx (+ acc), rounded once to x.dtype ; proj_backward's dphi).

    One pass writes the whole stream gradient instead of three stream-sized partials and their sum
    (passes/fold_stream_grads.py). ``out``: where dx goes, e.g. acc itself (passes/inplace_stream_grads.py).
    """
    check_stream("proj_pre_backward", x, phi, dout)
    n, c = x.shape[-2:]
    k, m = phi.shape
    if k != n * c:
        raise ValueError(f"mhc triton proj_pre_backward: phi has {k} rows, expected n*C = {n * c}")
    if acc is not None:
        check_stream("proj_pre_backward", acc)
        if acc.shape != x.shape:
            raise ValueError(f"mhc triton proj_pre_backward: acc has shape {tuple(acc.shape)}, "
                             f"expected x's {tuple(x.shape)}")
        dense = acc.contiguous()
        out, acc = grad_buffer(out, x, "proj_pre_backward", copied=dense if dense is not acc else None), dense
    else:
        out = grad_buffer(out, x, "proj_pre_backward")
    return _proj_grads(x, phi.contiguous(), dp.contiguous(), dsq.contiguous(), h_pre.contiguous(), dout.contiguous(),
                       acc, out)


def proj_pre_backward_collapsed(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(proj_pre_backward's dx summed over the n streams, [.., 1, C] ; its dphi): a chain head's stream gradient
    (passes/collapse_head_grad.py).

    On a stream broadcast over its n streams every stream reads the same row x, so the sum is proj_pre_backward on
    that row with the streams' parts summed first: phi's n row blocks (dp @ sum_i phi_i^T), h_pre's n columns, acc's
    n rows, and dsq counted n times (sum_i 2 dsq x = 2 n dsq x); dx is rounded once, and dphi's n row blocks are the
    row's one, repeated. The kernel reads the row, dout and acc's sum and writes one row, where proj_pre_backward
    writes n that the sum then reads back. Any other x: proj_pre_backward, then the sum of its rounded rows."""
    check_stream("proj_pre_backward_collapsed", x, phi, dout)
    n, c = x.shape[-2:]
    k, m = phi.shape
    if k != n * c:
        raise ValueError(f"mhc triton proj_pre_backward_collapsed: phi has {k} rows, expected n*C = {n * c}")
    summed = x.shape[:-2] + (1, c)  # acc as one row a token: already summed (post_res_backward's collapse_dx)
    if acc is not None and acc.shape not in (x.shape, summed):
        raise ValueError(f"mhc triton proj_pre_backward_collapsed: acc has shape {tuple(acc.shape)}, expected x's "
                         f"{tuple(x.shape)} or {summed}")
    sums = acc_torch(x.dtype, phi.dtype, dout.dtype)
    if not is_broadcast(x):
        rows = acc if acc is None or acc.shape == x.shape else None
        dx, dphi = proj_pre_backward(x, phi, dp, dsq, h_pre, dout, rows)
        if acc is not None and rows is None:
            return (dx.sum(-2, keepdim=True, dtype=sums) + acc).to(x.dtype), dphi
        return dx.sum(-2, keepdim=True), dphi  # one reduction, rounded once (as acc's below)
    row = x.select(-2, 0).unsqueeze(-2)  # dense: is_broadcast holds its rows contiguous
    phi_sum = phi.reshape(n, c, m).sum(0, dtype=sums).to(phi.dtype)
    # one reduction kernel, accumulating in fp32 (torch's for bf16 / fp16 too) and rounding once to x's dtype: a
    # dtype=fp32 sum and a cast would write and read the row twice more in fp32 (session 39: the head row 46 %)
    acc_sum = acc if acc is None or acc.shape == summed else acc.sum(-2, keepdim=True).to(x.dtype)
    ds, dphi_row = proj_pre_backward(row, phi_sum, dp, dsq * n, h_pre.sum(-1, keepdim=True), dout, acc_sum)
    return ds, dphi_row.repeat(n, 1)
