"""``pre``: x_in = sum_i h_pre[i] x[i], and its backward (dx and dh, or dh alone for the folded site backward)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.triton_common import acc_tl, acc_torch, cdiv, check_stream, pow2, stream_arg, stream_dims
from mhc_compile.kernels.triton_config import stream_tile


# ---------------------------------------------------------------------------------------------
# pre: x_in = sum_i h_pre[i] x[i]
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _pre_fwd_kernel(x_ptr, h_ptr, out_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    ACC: tl.constexpr, X_BCAST: tl.constexpr = False):
    """X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < T
    mask = rmask[:, None] & (cols[None, :] < C)
    r64 = rows.to(tl.int64)
    acc = tl.zeros([BT, BC], dtype=ACC)
    if X_BCAST:  # loaded once, summed over i as the n rows are
        xrow = tl.load(x_ptr + r64[:, None] * C + cols[None, :], mask=mask, other=0.0)
    for i in tl.static_range(N):
        h = tl.load(h_ptr + r64 * N + i, mask=rmask, other=0.0).to(ACC)
        if X_BCAST:
            xi = xrow
        else:
            xi = tl.load(x_ptr + (r64 * N + i)[:, None] * C + cols[None, :], mask=mask, other=0.0)
        acc += h[:, None] * xi.to(ACC)
    tl.store(out_ptr + r64[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _pre_bwd_kernel(x_ptr, h_ptr, g_ptr, dx_ptr, dh_ptr, T, C, N: tl.constexpr, NP: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, STORE_DX: tl.constexpr,
                    X_BCAST: tl.constexpr = False):
    """One program owns BT tokens and walks all of C, so dh = <x[i], dout> needs no cross-program sum.

    STORE_DX=False (pre_backward_dh): dx is left to proj_pre_backward, which folds it into the single
    write of the stream gradient, so h_pre and dx_ptr are never touched.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``stream_arg``); dx is stored dense.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ii = tl.arange(0, NP)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    mi = rmask[:, None] & (ii[None, :] < N)
    if STORE_DX:
        h = tl.load(h_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    stream = (r64[:, None] * N + ii[None, :])[:, :, None] * C  # [BT, NP, 1] row starts of x[t, i]
    dh = tl.zeros([BT, NP], dtype=ACC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < C
        g = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        g = g.to(ACC)
        m3 = mi[:, :, None] & cmask[None, None, :]
        off = stream + cols[None, None, :]
        if X_BCAST:  # the [BT, NP, BC] tile of the dense path, every stream reading the token's row
            x = tl.load(x_ptr + r64[:, None, None] * C + cols[None, None, :], mask=m3, other=0.0).to(ACC)
        else:
            x = tl.load(x_ptr + off, mask=m3, other=0.0).to(ACC)
        if STORE_DX:
            tl.store(dx_ptr + off, (h[:, :, None] * g[:, None, :]).to(dx_ptr.dtype.element_ty), mask=m3)
        dh += tl.sum(x * g[:, None, :], axis=2)
    tl.store(dh_ptr + r64[:, None] * N + ii[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mi)


def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    check_stream("pre", x)
    lead, t, n, c = stream_dims(x)
    (x, bcast), h_pre = stream_arg(x), h_pre.contiguous()
    out = torch.empty(lead + (c,), dtype=x.dtype, device=x.device)
    if t == 0 or c == 0:
        return out
    bt, bc, warps = stream_tile("pre", t, c, 1)
    grid = (cdiv(t, bt), cdiv(c, bc))
    launch(_pre_fwd_kernel, grid, (x, h_pre, out, t, c),
           dict(N=n, BT=bt, BC=bc, ACC=acc_tl(x.dtype), X_BCAST=bcast), num_warps=warps)
    return out


def pre_backward(x: Tensor, h_pre: Tensor, dout: Tensor) -> tuple[Tensor, Tensor]:
    check_stream("pre_backward", x, dout)
    lead, t, n, c = stream_dims(x)
    (x, bcast), h_pre, dout = stream_arg(x), h_pre.contiguous(), dout.contiguous()
    acc = acc_torch(x.dtype, dout.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # dense, also where x is broadcast
    if t == 0 or c == 0:
        return dx.zero_(), torch.zeros(lead + (n,), dtype=acc, device=x.device)
    dh = torch.empty(lead + (n,), dtype=acc, device=x.device)  # every element written: no fill launch
    np_ = pow2(n)
    bt, bc, warps = stream_tile("pre_backward", t, c, np_)
    launch(
        _pre_bwd_kernel, (cdiv(t, bt),), (x, h_pre, dout, dx, dh, t, c),
        dict(N=n, NP=np_, BT=bt, BC=bc, ACC=acc_tl(acc), STORE_DX=True, X_BCAST=bcast), num_warps=warps,
    )
    return dx, dh


def pre_backward_dh(x: Tensor, h_pre: Tensor, dout: Tensor) -> Tensor:
    """dh of pre_backward alone: reads x and dout once, writes [T, n]; h_pre is not read."""
    check_stream("pre_backward_dh", x, dout)
    lead, t, n, c = stream_dims(x)
    (x, bcast), dout = stream_arg(x), dout.contiguous()
    acc = acc_torch(x.dtype, dout.dtype)
    if t == 0 or c == 0:
        return torch.zeros(lead + (n,), dtype=acc, device=x.device)
    dh = torch.empty(lead + (n,), dtype=acc, device=x.device)  # every element written: no fill launch
    np_ = pow2(n)
    bt, bc, warps = stream_tile("pre_backward_dh", t, c, np_)
    # h_ptr / dx_ptr are placeholders: STORE_DX=False compiles their loads and stores away
    launch(
        _pre_bwd_kernel, (cdiv(t, bt),), (x, h_pre, dout, dh, dh, t, c),
        dict(N=n, NP=np_, BT=bt, BC=bc, ACC=acc_tl(acc), STORE_DX=False, X_BCAST=bcast), num_warps=warps,
    )
    return dh
