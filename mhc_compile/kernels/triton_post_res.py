"""``post_res``: X'[i] = sum_j h_res[i, j] X[j] + h_post[i] y, and its backward (optionally also writing ``pre``'s
x_in from the same pass over x); ``post_res_collapse``: the mean (or sum) of X' over the n streams, X' unwritten;
``post_res_chain``: post_res applied k times, each X' the next step's X, from one read of the first X."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.triton_common import (INTERPRETED, acc_tl, acc_torch, cdiv, check_stream, grad_buffer, pow2,
                                               round_to, stream_arg, stream_dims)
from mhc_compile.kernels.triton_config import cfg_of, stream_tile


# ---------------------------------------------------------------------------------------------
# post_res: X'[i] = sum_j h_res[i, j] X[j] + h_post[i] y
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mix_tile(x_ptr, hres_ptr, hp, y, r64, mi, cols, m2, C, N: tl.constexpr, NP: tl.constexpr,
              ACC: tl.constexpr, X_BCAST: tl.constexpr = False):
    """[BT, NP, BC] tile of H_res X + H_post^T y, each x[t, j] chunk loaded once (fp32 accumulation).
    X_BCAST: x is [T, C], the one row every stream of a token holds: loaded once for all j.

    The mix is h_post y, then an explicit FMA a term, h_res[i, j] x_j in j order (every kernel that writes or
    rebuilds X' mixes so: ``_mix_regs``, ``triton_fused._mix``, ``triton_post_res_proj``, and with ``gl.fma`` the
    Gluon post_res_proj and step backward). Written as ``acc += h x``, the compiler chose per kernel which product
    to contract into which add: post_res folded h_post y into the first term's FMA and the chain's later steps did
    not, and on an H100 the chain's streams differed from k post_res calls by an ulp (session 49,
    benchmarks/chain_check.py). An explicit FMA leaves no such choice, and the interpreter rounds it once too, so
    the CPU tests see the GPU's bits."""
    ii = tl.arange(0, NP)
    acc = hp[:, :, None] * y[:, None, :]
    if X_BCAST:
        xrow = tl.load(x_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    for j in tl.static_range(N):
        hcol = tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0).to(ACC)
        if X_BCAST:
            xj = xrow
        else:
            xj = tl.load(x_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        acc = tl.fma(hcol[:, :, None], xj[:, None, :], acc)
    return acc


@triton.jit(do_not_specialize=["T"])
def _post_res_fwd_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, out_ptr, T, C, N: tl.constexpr,
                         NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
                         X_BCAST: tl.constexpr = False):
    """X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``); X' is stored dense."""
    out, r64, cols, mi, m2, off, m3 = _post_res_tile(x_ptr, hres_ptr, hpost_ptr, y_ptr, T, C, N, NP, BT, BC, ACC,
                                                     X_BCAST)
    tl.store(out_ptr + off, round_to(out, out_ptr.dtype.element_ty, RNE), mask=m3)


@triton.jit
def _post_res_tile(x_ptr, hres_ptr, hpost_ptr, y_ptr, T, C, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
                   BC: tl.constexpr, ACC: tl.constexpr, X_BCAST: tl.constexpr):
    """This program's [BT, NP, BC] tile of X' (ACC, unrounded), with its token offsets, channels, masks ([BT, NP]
    streams, [BT, BC] rows, [BT, NP, BC] tile) and element offsets in a dense [T, N, C] stream."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    ii = tl.arange(0, NP)
    rmask = rows < T
    cmask = cols < C
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    m2 = rmask[:, None] & cmask[None, :]
    hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    out = _mix_tile(x_ptr, hres_ptr, hp, y, r64, mi, cols, m2, C, N, NP, ACC, X_BCAST)
    off = (r64[:, None] * N + ii[None, :])[:, :, None] * C + cols[None, None, :]
    return out, r64, cols, mi, m2, off, mi[:, :, None] & cmask[None, None, :]


@triton.jit
def _mix_regs(xt, hres_ptr, hp, y, r64, mi, N: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr):
    """``_mix_tile`` for an X tile held in registers ([BT, NP, BC], ACC): X[j] is picked out of it by a sum over the
    stream axis of its bits and zeros (an integer sum: exact, signed zeros too, where a float sum's +0.0 start
    would turn -0.0 into +0.0), and mixed as ``_mix_tile`` mixes, so a step gives post_res's bits."""
    ii = tl.arange(0, NP)
    bits = xt.to(tl.int64 if ACC == tl.float64 else tl.int32, bitcast=True)
    acc = hp[:, :, None] * y[:, None, :]
    for j in tl.static_range(N):
        hcol = tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0).to(ACC)
        xj = tl.sum(tl.where((ii == j)[None, :, None], bits, 0), axis=1).to(ACC, bitcast=True)
        acc = tl.fma(hcol[:, :, None], xj[:, None, :], acc)
    return acc


@triton.jit
def _chain_store(out_ptr, v, off, m3, ACC: tl.constexpr, RNE: tl.constexpr):
    """Store one step's X' (rounded to the stream dtype, as post_res stores it) and return it as the next step's X:
    the rounded values, so the next step mixes what a separate post_res would read back."""
    q = round_to(v, out_ptr.dtype.element_ty, RNE)
    tl.store(out_ptr + off, q, mask=m3)
    return q.to(ACC)


@triton.jit
def _chain_step(xt, hres_ptr, hpost_ptr, y_ptr, out_ptr, r64, mi, cols, m2, off, m3, C, N: tl.constexpr,
                NP: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr):
    ii = tl.arange(0, NP)
    hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    return _chain_store(out_ptr, _mix_regs(xt, hres_ptr, hp, y, r64, mi, N, NP, ACC), off, m3, ACC, RNE)


@triton.jit(do_not_specialize=["T"])
def _post_res_chain_kernel(x_ptr, hres0, hpost0, y0, out0, hres1, hpost1, y1, out1, hres2, hpost2, y2, out2,
                           hres3, hpost3, y3, out3, T, C, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
                           BC: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr, K: tl.constexpr,
                           X_BCAST: tl.constexpr = False):
    """K (1 to CHAIN_STEPS) post_res steps on one [BT, NP, BC] tile: X read once (X_BCAST: one row a token, as
    ``_post_res_fwd_kernel``'s), each step's y and coefficients read and its X' written; the unused steps' pointers
    are never touched."""
    out, r64, cols, mi, m2, off, m3 = _post_res_tile(x_ptr, hres0, hpost0, y0, T, C, N, NP, BT, BC, ACC, X_BCAST)
    xt = _chain_store(out0, out, off, m3, ACC, RNE)
    if K > 1:
        xt = _chain_step(xt, hres1, hpost1, y1, out1, r64, mi, cols, m2, off, m3, C, N, NP, ACC, RNE)
    if K > 2:
        xt = _chain_step(xt, hres2, hpost2, y2, out2, r64, mi, cols, m2, off, m3, C, N, NP, ACC, RNE)
    if K > 3:
        xt = _chain_step(xt, hres3, hpost3, y3, out3, r64, mi, cols, m2, off, m3, C, N, NP, ACC, RNE)


@triton.jit(do_not_specialize=["T"])
def _post_res_collapse_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, out_ptr, T, C, N: tl.constexpr, NP: tl.constexpr,
                              BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
                              MEAN: tl.constexpr, X_BCAST: tl.constexpr = False):
    """sum_i X'[i] (MEAN: / n) without X': sum_j (sum_i h_res[i, j]) X[j] + (sum_i h_post[i]) y, one [BT, BC] tile.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    ii = tl.arange(0, NP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    m2 = rmask[:, None] & (cols[None, :] < C)
    hp = tl.sum(tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC), axis=1)
    acc = hp[:, None] * tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    if X_BCAST:
        xrow = tl.load(x_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    for j in tl.static_range(N):
        w = tl.sum(tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi, other=0.0).to(ACC),
                   axis=1)  # column j of H_res summed: what X[j] adds to the n streams together
        if X_BCAST:
            xj = xrow
        else:
            xj = tl.load(x_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        acc += w[:, None] * xj
    if MEAN:
        acc = acc / N
    tl.store(out_ptr + r64[:, None] * C + cols[None, :], round_to(acc, out_ptr.dtype.element_ty, RNE), mask=m2)


@triton.jit(do_not_specialize=["T"])
def _post_res_bwd_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dx_ptr, dhres_ptr, dhpost_ptr, dy_ptr,
                         hpre_ptr, xin_ptr, T, C, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, ACC: tl.constexpr, PRE: tl.constexpr, X_BCAST: tl.constexpr = False,
                         G_BCAST: tl.constexpr = False, DX_SUM: tl.constexpr = False):
    """One program owns BT tokens and walks all of C: reads x, dout, y once, writes dx, dy once.

    Every load of a chunk is issued before its first reduction, and the H_res columns before the loop. A
    reduction across warps is a barrier, which no load moves across: with each x row loaded between two
    reductions and H_res re-read every chunk (the compiler cannot hoist it past the stores), the kernel waited a
    memory latency per row, 467.1 us against 401.8 at 8192 x 7168 on an H200 (83 % against 97 % of copy
    bandwidth, benchmarks/results/session7-2026-12-02-h200.md).

    PRE: also writes x_in = sum_i h_pre[i] x[i] (``pre``'s value, summed in its order and rounded once) from the
    x rows it loads anyway.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``): loaded once a chunk and
    used as each x[j]; dx keeps the dense layout. G_BCAST: likewise dout (a mean collapse's gradient,
    passes/broadcast_collapse_grad.py).
    DX_SUM: dx is [T, 1, C], its n rows summed (sum_j dx[j] = sum_i (sum_j h_res[i, j]) dout[i]): a chain head's
    stream gradient, passes/collapse_head_grad.py.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ii = tl.arange(0, NP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    hp = tl.load(hpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    hcols = ()  # column j of H_res, [BT, NP]
    for j in tl.static_range(N):
        hcols = hcols + (tl.load(hres_ptr + r64[:, None] * (N * N) + ii[None, :] * N + j, mask=mi,
                                 other=0.0).to(ACC),)
    if DX_SUM:  # H_res's row sums, [BT, NP]: what dout[i] adds to the summed dx
        hrows = hcols[0]
        for j in tl.static_range(1, N):
            hrows += hcols[j]
    hpres = ()  # h_pre[:, j], [BT]
    if PRE:
        for j in tl.static_range(N):
            hpres = hpres + (tl.load(hpre_ptr + r64 * N + j, mask=rmask, other=0.0).to(ACC),)
    stream = (r64[:, None] * N + ii[None, :])[:, :, None] * C
    jsel = tl.arange(0, NP)[None, None, :]
    dh_res = tl.zeros([BT, NP, NP], dtype=ACC)
    dh_post = tl.zeros([BT, NP], dtype=ACC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        m3 = mi[:, :, None] & cmask[None, None, :]
        if G_BCAST:  # dout [T, C]: every stream's gradient is the token's one row
            g = tl.load(g_ptr + r64[:, None, None] * C + cols[None, None, :], mask=m3, other=0.0).to(ACC)
        else:
            g = tl.load(g_ptr + stream + cols[None, None, :], mask=m3, other=0.0).to(ACC)  # dout[t, i, c]
        y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        xs = ()
        if X_BCAST:
            xrow = tl.load(x_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        for j in tl.static_range(N):
            if X_BCAST:
                xs = xs + (xrow,)
            else:
                xs = xs + (tl.load(x_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC),)
        if PRE:
            xin = tl.zeros([BT, BC], dtype=ACC)
            for j in tl.static_range(N):
                xin += hpres[j][:, None] * xs[j]
            tl.store(xin_ptr + r64[:, None] * C + cols[None, :], xin.to(xin_ptr.dtype.element_ty), mask=m2)
        dy = tl.sum(hp[:, :, None] * g, axis=1)
        tl.store(dy_ptr + r64[:, None] * C + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=m2)
        dh_post += tl.sum(g * y[:, None, :], axis=2)
        if DX_SUM:
            dsum = tl.sum(hrows[:, :, None] * g, axis=1)
            tl.store(dx_ptr + r64[:, None] * C + cols[None, :], dsum.to(dx_ptr.dtype.element_ty), mask=m2)
        for j in tl.static_range(N):
            xj = xs[j]
            if not DX_SUM:
                dxj = tl.sum(hcols[j][:, :, None] * g, axis=1)
                tl.store(dx_ptr + (r64 * N + j)[:, None] * C + cols[None, :], dxj.to(dx_ptr.dtype.element_ty),
                         mask=m2)
            # column j of dh_res; the select keeps the accumulator one register tile
            dh_res += tl.where(jsel == j, tl.sum(g * xj[:, None, :], axis=2)[:, :, None], 0.0)
    jj = tl.arange(0, NP)
    m_res = mi[:, :, None] & (jj[None, None, :] < N)
    off_res = r64[:, None, None] * (N * N) + ii[None, :, None] * N + jj[None, None, :]
    tl.store(dhres_ptr + off_res, dh_res.to(dhres_ptr.dtype.element_ty), mask=m_res)
    tl.store(dhpost_ptr + r64[:, None] * N + ii[None, :], dh_post.to(dhpost_ptr.dtype.element_ty), mask=mi)


_TWO_D_MAX_N = 4  # the 2-D kernel carries n + n^2 accumulators and n^2 coefficient vectors as tuples


@triton.jit
def channel_partials(v, BT: tl.constexpr, BC: tl.constexpr):
    """[BT, BC] -> [BT, BC / 8]: sums over the 8 adjacent channels a thread loads (no cross-thread reduction)."""
    return tl.sum(tl.reshape(v, (BT, BC // 8, 8)), axis=2)


@triton.jit(do_not_specialize=["T"])
def _post_res_bwd_2d_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dx_ptr, dhres_ptr, dhpost_ptr, dy_ptr,
                            hpre_ptr, xin_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                            ACC: tl.constexpr, PRE: tl.constexpr, X_BCAST: tl.constexpr = False,
                            G_BCAST: tl.constexpr = False, DX_SUM: tl.constexpr = False):
    """_post_res_bwd_kernel's outputs with every tile 2-D [BT, BC] (PostResBwdCfg.two_d): dout row i, x row j and y
    share one layout; the per-token coefficients are [BT] vectors; dh_post and dh_res are carried through the
    channel loop as [BT, BC / 8] partials and reduced across threads once at the end.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``): loaded once a chunk and
    used as each x[i]; dx keeps the dense layout. G_BCAST: likewise dout (a mean collapse's gradient,
    passes/broadcast_collapse_grad.py). DX_SUM: dx is [T, 1, C], its n rows summed (as _post_res_bwd_kernel's)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    hp = ()  # h_post[:, i]
    hr = ()  # h_res[:, i, j] at i * N + j
    hpre = ()  # h_pre[:, j]
    for i in tl.static_range(N):
        hp = hp + (tl.load(hpost_ptr + r64 * N + i, mask=rmask, other=0.0).to(ACC),)
        if PRE:
            hpre = hpre + (tl.load(hpre_ptr + r64 * N + i, mask=rmask, other=0.0).to(ACC),)
        for j in tl.static_range(N):
            hr = hr + (tl.load(hres_ptr + r64 * (N * N) + i * N + j, mask=rmask, other=0.0).to(ACC),)
    if DX_SUM:  # H_res's row sums: what dout[i] adds to the summed dx
        hrows = ()
        for i in tl.static_range(N):
            rsum = hr[i * N]
            for j in tl.static_range(1, N):
                rsum += hr[i * N + j]
            hrows = hrows + (rsum,)
    acc_post = ()
    acc_res = ()
    for i in tl.static_range(N):
        acc_post = acc_post + (tl.zeros([BT, BC // 8], dtype=ACC),)
        for j in tl.static_range(N):
            acc_res = acc_res + (tl.zeros([BT, BC // 8], dtype=ACC),)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = rmask[:, None] & (cols < C)[None, :]
        y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        xs = ()
        gs = ()
        if X_BCAST:
            xrow = tl.load(x_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        if G_BCAST:
            grow = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        for i in tl.static_range(N):
            off = (r64 * N + i)[:, None] * C + cols[None, :]
            if X_BCAST:
                xs = xs + (xrow,)
            else:
                xs = xs + (tl.load(x_ptr + off, mask=m2, other=0.0).to(ACC),)
            if G_BCAST:
                gs = gs + (grow,)
            else:
                gs = gs + (tl.load(g_ptr + off, mask=m2, other=0.0).to(ACC),)
        if PRE:
            xin = hpre[0][:, None] * xs[0]
            for j in tl.static_range(1, N):
                xin += hpre[j][:, None] * xs[j]
            tl.store(xin_ptr + r64[:, None] * C + cols[None, :], xin.to(xin_ptr.dtype.element_ty), mask=m2)
        dy = hp[0][:, None] * gs[0]
        for i in tl.static_range(1, N):
            dy += hp[i][:, None] * gs[i]
        tl.store(dy_ptr + r64[:, None] * C + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=m2)
        if DX_SUM:
            dsum = hrows[0][:, None] * gs[0]
            for i in tl.static_range(1, N):
                dsum += hrows[i][:, None] * gs[i]
            tl.store(dx_ptr + r64[:, None] * C + cols[None, :], dsum.to(dx_ptr.dtype.element_ty), mask=m2)
        else:
            for j in tl.static_range(N):
                dxj = hr[j][:, None] * gs[0]
                for i in tl.static_range(1, N):
                    dxj += hr[i * N + j][:, None] * gs[i]
                tl.store(dx_ptr + (r64 * N + j)[:, None] * C + cols[None, :], dxj.to(dx_ptr.dtype.element_ty),
                         mask=m2)
        new_post = ()
        new_res = ()
        for i in tl.static_range(N):
            new_post = new_post + (acc_post[i] + channel_partials(gs[i] * y, BT, BC),)
            for j in tl.static_range(N):
                new_res = new_res + (acc_res[i * N + j] + channel_partials(gs[i] * xs[j], BT, BC),)
        acc_post = new_post
        acc_res = new_res
    for i in tl.static_range(N):
        tl.store(dhpost_ptr + r64 * N + i, tl.sum(acc_post[i], axis=1).to(dhpost_ptr.dtype.element_ty), mask=rmask)
        for j in tl.static_range(N):
            tl.store(dhres_ptr + r64 * (N * N) + i * N + j,
                     tl.sum(acc_res[i * N + j], axis=1).to(dhres_ptr.dtype.element_ty), mask=rmask)


def post_res(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor) -> Tensor:
    check_stream("post_res", x, y)
    lead, t, n, c = stream_dims(x)
    (x, bcast), h_res, h_post, y = stream_arg(x), h_res.contiguous(), h_post.contiguous(), y.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # dense, also where x is broadcast
    if t == 0 or c == 0:
        return out
    np_ = pow2(n)
    bt, bc, warps = stream_tile("post_res", t, c, np_)
    grid = (cdiv(t, bt), cdiv(c, bc))
    launch(_post_res_fwd_kernel, grid, (x, h_res, h_post, y, out, t, c),
           dict(N=n, NP=np_, BT=bt, BC=bc, ACC=acc_tl(x.dtype), RNE=INTERPRETED, X_BCAST=bcast), num_warps=warps)
    return out


CHAIN_STEPS = 4  # post_res steps one launch of _post_res_chain_kernel takes (its pointer arguments); more: launches


def post_res_chain(x: Tensor, h_res: list[Tensor], h_post: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    """[X_1, ..., X_k]: post_res applied k = len(y) times, each X' the next step's X (a recompute block's streams,
    passes/fold_recompute_chain.py), bit-equal to k post_res calls. Reads X once: (n + 1) k + n elements of C a
    token (1 for a broadcast X), against (2n + 1) k for the k calls. Launches of up to CHAIN_STEPS steps, each
    after the first reading the last X' the one before wrote."""
    k = len(y)
    if not k or len(h_res) != k or len(h_post) != k:
        raise ValueError(f"mhc post_res_chain: {len(h_res)} h_res, {len(h_post)} h_post and {k} y: one of each a "
                         "step, at least one step")
    check_stream("post_res_chain", x, *y)
    outs: list[Tensor] = []
    for s in range(0, k, CHAIN_STEPS):
        outs += _post_res_chain(outs[-1] if outs else x, h_res[s:s + CHAIN_STEPS], h_post[s:s + CHAIN_STEPS],
                                y[s:s + CHAIN_STEPS])
    return outs


def _post_res_chain(x: Tensor, h_res: list[Tensor], h_post: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    _, t, n, c = stream_dims(x)
    x, bcast = stream_arg(x)
    outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in y]  # dense, also where x is broadcast
    if t == 0 or c == 0:
        return outs
    steps = [(hr.contiguous(), hp.contiguous(), yk.contiguous(), o) for hr, hp, yk, o in zip(h_res, h_post, y, outs)]
    pad = steps + [steps[0]] * (CHAIN_STEPS - len(steps))  # unused pointers (K says how many are read)
    np_ = pow2(n)
    bt, bc, warps = stream_tile("post_res", t, c, np_)
    grid = (cdiv(t, bt), cdiv(c, bc))
    launch(_post_res_chain_kernel, grid, (x, *(p for step in pad for p in step), t, c),
           dict(N=n, NP=np_, BT=bt, BC=bc, ACC=acc_tl(x.dtype), RNE=INTERPRETED, K=len(steps), X_BCAST=bcast),
           num_warps=warps)
    return outs


def post_res_collapse(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, mean: bool = True) -> Tensor:
    """post_res's streams collapsed, [.., C]: their mean (or sum), without writing them (passes/collapse_tail.py).
    Reads the n rows of x and y, writes one row: n + 2 elements of C a token, against post_res's 2n + 1 and the
    collapse's n + 1. Rounded once, where post_res rounds each stream before the collapse sums them."""
    check_stream("post_res_collapse", x, y)
    lead, t, n, c = stream_dims(x)
    (x, bcast), h_res, h_post, y = stream_arg(x), h_res.contiguous(), h_post.contiguous(), y.contiguous()
    out = torch.empty(lead + (c,), dtype=x.dtype, device=x.device)
    if t == 0 or c == 0:
        return out
    bt, bc, warps = stream_tile("pre", t, c, 1)  # pre's shape: n rows a token in, one out (and y)
    grid = (cdiv(t, bt), cdiv(c, bc))
    launch(_post_res_collapse_kernel, grid, (x, h_res, h_post, y, out, t, c),
           dict(N=n, NP=pow2(n), BT=bt, BC=bc, ACC=acc_tl(x.dtype), RNE=INTERPRETED, MEAN=bool(mean), X_BCAST=bcast),
           num_warps=warps)
    return out


def post_res_backward(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, out: Tensor | None = None,
    collapse_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh_res, dh_post, dy). ``out``: where dx goes, e.g. dout itself (passes/inplace_stream_grads.py).
    ``collapse_dx``: dx summed over the n streams, [.., 1, C] (a chain head's, passes/collapse_head_grad.py)."""
    return _post_res_backward(x, h_res, h_post, y, dout, None, out, collapse_dx)


def post_res_backward_pre(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, h_pre: Tensor, out: Tensor | None = None,
    collapse_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """post_res_backward plus pre(x, h_pre), from the one pass over x (passes/fold_pre_recompute.py)."""
    return _post_res_backward(x, h_res, h_post, y, dout, h_pre.contiguous(), out, collapse_dx)



def _post_res_backward(x, h_res, h_post, y, dout, h_pre, out=None, collapse_dx=False):
    check_stream("post_res_backward", x, y, dout)
    if collapse_dx and out is not None:
        raise ValueError("mhc triton post_res_backward: collapse_dx writes one row a token, not over a stream-sized "
                         "out")
    lead, t, n, c = stream_dims(x)
    (x, bcast), h_res, h_post = stream_arg(x), h_res.contiguous(), h_post.contiguous()
    # dout broadcast over the streams (a mean collapse's gradient) is read as its one row a token, not copied
    y, (dense, g_bcast) = y.contiguous(), stream_arg(dout)
    acc = acc_torch(x.dtype, dout.dtype)
    if collapse_dx:
        dx = torch.empty(lead + (1, c), dtype=x.dtype, device=x.device)
    else:
        dx = grad_buffer(out, x, "post_res_backward", copied=dense if dense is not dout else None)
    dy, dout = torch.empty_like(y), dense
    x_in = torch.empty(lead + (c,), dtype=x.dtype, device=x.device) if h_pre is not None else None
    extra = () if h_pre is None else (x_in,)
    if t == 0 or c == 0:
        return ((dx.zero_(), torch.zeros(lead + (n, n), dtype=acc, device=x.device),
                 torch.zeros(lead + (n,), dtype=acc, device=x.device), dy.zero_()) + tuple(e.zero_() for e in extra))
    # the kernel writes every element of dh_res and dh_post: no fill launches
    dh_res = torch.empty(lead + (n, n), dtype=acc, device=x.device)
    dh_post = torch.empty(lead + (n,), dtype=acc, device=x.device)
    np_ = pow2(n)
    bt, bc, warps = stream_tile("post_res_backward", t, c, np_)
    args = (x, h_res, h_post, y, dout, dx, dh_res, dh_post, dy,
            h_pre if h_pre is not None else h_post, x_in if x_in is not None else dy, t, c)
    if cfg_of("post_res_backward").two_d and n <= _TWO_D_MAX_N and bc >= 8:  # 8: one thread's channel vector
        launch(_post_res_bwd_2d_kernel, (cdiv(t, bt),), args,
               dict(N=n, BT=bt, BC=bc, ACC=acc_tl(acc), PRE=h_pre is not None, X_BCAST=bcast, G_BCAST=g_bcast,
                    DX_SUM=collapse_dx),
               num_warps=warps)
    else:
        launch(_post_res_bwd_kernel, (cdiv(t, bt),), args,
               dict(N=n, NP=np_, BT=bt, BC=bc, ACC=acc_tl(acc), PRE=h_pre is not None, X_BCAST=bcast,
                    G_BCAST=g_bcast, DX_SUM=collapse_dx),
               num_warps=warps)
    return (dx, dh_res, dh_post, dy) + extra
