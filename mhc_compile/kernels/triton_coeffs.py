"""``coeffs``: the mHC coefficients from proj's p and sq (alpha, bias, sigmoid, 2 sigmoid, Sinkhorn in registers; or
Hyper-Connections' unconstrained form), and their backward with the exact unrolled Sinkhorn backward recomputed on
chip."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.triton_common import acc_tl, acc_torch, cdiv, check_stream, lead_of, pow2
from mhc_compile.kernels.triton_config import StreamCfg, cfg_of

_MODES = {"mhc": 0, "hc": 1}


# ---------------------------------------------------------------------------------------------
# small device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    """tanh without libdevice (not available in the interpreter).

    exp form for |v| >= 1/4 (cancellation costs at most ~2 ulp there), odd Taylor series through v^15 below
    (truncation < 2e-13 relative: exact in fp32, close enough in the fp64 tests).
    """
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    v2 = v * v
    small = 21844.0 / 6081075 + v2 * (-929569.0 / 638512875)
    small = 62.0 / 2835 + v2 * (-1382.0 / 155925 + v2 * small)
    small = 1.0 + v2 * (-1.0 / 3 + v2 * (2.0 / 15 + v2 * (-17.0 / 315 + v2 * small)))
    return tl.where(a >= 0.25, tl.where(v < 0, -big, big), v * small)


@triton.jit
def _normalise(m, valid, AXIS: tl.constexpr):
    """One Sinkhorn half-step: divide by the sums along AXIS (1 = columns, 2 = rows of [BT, i, j])."""
    s = tl.sum(m, axis=AXIS, keep_dims=True)
    s = tl.where(valid, s, 1.0)  # padded rows / columns sum to 0
    return m / s, s



# ---------------------------------------------------------------------------------------------
# coeffs: Ht = alpha (.) (p * r) + b ; sigmoid, 2 sigmoid, Sinkhorn (mode "mhc") or identity ("hc")
# A program owns BT tokens; the n x n matrices live in [BT, NP, NP] register tiles (padding masked).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _group(p_ptr, offs, mask, r, MODE: tl.constexpr, ACC: tl.constexpr):
    """(raw projection, u) for one coefficient group: u = p * r, tanh'd in "hc" mode."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = p * r
    if MODE == 1:
        u = _tanh(u)
    return p, u


@triton.jit
def _sinkhorn_m0(ht, valid):
    """exp(L - max L) per token over the valid n x n entries, 0 on the padding."""
    mx = tl.max(tl.max(tl.where(valid, ht, float("-inf")), axis=2), axis=1)
    return tl.where(valid, tl.exp(ht - mx[:, None, None]), 0.0)


@triton.jit
def _sinkhorn_iterate(m, valid, iters):
    for _ in range(iters):
        m, s = _normalise(m, valid, 1)
        m, s = _normalise(m, valid, 2)
    return m


@triton.jit
def _sinkhorn_span_backward(c, valid, lo, hi, g):
    """Walk g back through Sinkhorn iterations hi - 1 .. lo, given c = the iterate entering iteration lo.

    Each step re-runs the forward from c to the iteration it undoes: (hi - lo)^2 / 2 half-step pairs on a few
    registers per token, which is cheaper than spilling the iterates to memory.
    """
    for k in range(hi - lo):
        m = _sinkhorn_iterate(c, valid, hi - 1 - lo - k)
        mb, sc = _normalise(m, valid, 1)
        mc, sr = _normalise(mb, valid, 2)
        g = tl.where(valid, (g - tl.sum(g * mc, axis=2, keep_dims=True)) / sr, 0.0)
        g = tl.where(valid, (g - tl.sum(g * mb, axis=1, keep_dims=True)) / sc, 0.0)
    return g


@triton.jit
def _sinkhorn_backward(m0, valid, iters, g, SEGMENTS: tl.constexpr):
    """Exact backward of the unrolled iteration (see reference.sinkhorn_backward), from m0 = exp(logits - max).

    SEGMENTS = 4 keeps the iterates entering iterations L, 2L, 3L (L = ceil(iters / 4)) as checkpoints in
    registers and walks each quarter back from its own checkpoint: 3L + 4 L (L + 1) / 2 iterations in the
    chain of dependent steps (75 at iters = 20) instead of iters (iters + 1) / 2 (210) from m0 alone
    (SEGMENTS = 1). The kernel is latency-bound (a few warps an SM, every step waits on the one before), so its
    time follows that chain. Every iterate is computed by the same operations in the same order either way,
    so both give the same bits.
    """
    if SEGMENTS == 4:
        span = (iters + 3) // 4
        e1 = tl.minimum(span, iters)
        e2 = tl.minimum(2 * span, iters)
        e3 = tl.minimum(3 * span, iters)
        c1 = _sinkhorn_iterate(m0, valid, e1)
        c2 = _sinkhorn_iterate(c1, valid, e2 - e1)
        c3 = _sinkhorn_iterate(c2, valid, e3 - e2)
        g = _sinkhorn_span_backward(c3, valid, e3, iters, g)
        g = _sinkhorn_span_backward(c2, valid, e2, e3, g)
        g = _sinkhorn_span_backward(c1, valid, e1, e2, g)
        g = _sinkhorn_span_backward(m0, valid, 0, e1, g)
    else:
        tl.static_assert(SEGMENTS == 1, "SEGMENTS: 1 or 4")
        g = _sinkhorn_span_backward(m0, valid, 0, iters, g)
    return g * m0


@triton.jit
def _coeff_layout(pid, T, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    """Token rows and the offsets / masks of the pre/post [BT, NP] and res [BT, NP, NP] groups in [T, m]."""
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    ii = tl.arange(0, NP)
    imask = ii < N
    mi = rmask[:, None] & imask[None, :]
    valid = (imask[:, None] & imask[None, :])[None, :, :]
    m3 = rmask[:, None, None] & valid
    sq_off = ii[:, None] * N + ii[None, :]  # row-major (i, j) inside the res group
    return rows, rmask, r64, ii, imask, mi, valid, m3, sq_off


@triton.jit(do_not_specialize=["T"])
def _coeffs_fwd_kernel(p_ptr, sq_ptr, b_ptr, a_ptr, hpre_ptr, hpost_ptr, hres_ptr, T, nc, eps, iters,
                       N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr,
                       ACC: tl.constexpr):
    M: tl.constexpr = N * N + 2 * N
    rows, rmask, r64, ii, imask, mi, valid, m3, sq_off = _coeff_layout(tl.program_id(0), T, N, NP, BT)
    sq = tl.load(sq_ptr + r64, mask=rmask, other=0.0).to(ACC)
    r = 1.0 / tl.sqrt(sq / nc + eps)
    prow = p_ptr + r64 * M
    _, u_pre = _group(prow[:, None], ii[None, :], mi, r[:, None], MODE, ACC)
    _, u_post = _group(prow[:, None], N + ii[None, :], mi, r[:, None], MODE, ACC)
    _, u_res = _group(prow[:, None, None], 2 * N + sq_off[None, :, :], m3, r[:, None, None], MODE, ACC)
    ht_pre = tl.load(a_ptr).to(ACC) * u_pre + tl.load(b_ptr + ii, mask=imask, other=0.0).to(ACC)[None, :]
    ht_post = tl.load(a_ptr + 1).to(ACC) * u_post + tl.load(b_ptr + N + ii, mask=imask, other=0.0).to(ACC)[None, :]
    b_res = tl.load(b_ptr + 2 * N + sq_off[None, :, :], mask=valid, other=0.0).to(ACC)
    ht_res = tl.load(a_ptr + 2).to(ACC) * u_res + b_res
    if MODE == 0:
        h_pre = _sigmoid(ht_pre)
        h_post = 2.0 * _sigmoid(ht_post)
        h_res = _sinkhorn_iterate(_sinkhorn_m0(ht_res, valid), valid, iters)
    else:
        h_pre = ht_pre
        h_post = ht_post
        h_res = ht_res
    tl.store(hpre_ptr + r64[:, None] * N + ii[None, :], h_pre, mask=mi)
    tl.store(hpost_ptr + r64[:, None] * N + ii[None, :], h_post, mask=mi)
    tl.store(hres_ptr + r64[:, None, None] * (N * N) + sq_off[None, :, :], h_res, mask=m3)


@triton.jit(do_not_specialize=["T"])
def _coeffs_bwd_kernel(p_ptr, sq_ptr, b_ptr, a_ptr, gpre_ptr, gpost_ptr, gres_ptr, dp_ptr, dsq_ptr,
                       dbias_ptr, dalpha_ptr, T, nc, eps, iters, PART_STRIDE, N: tl.constexpr, NP: tl.constexpr,
                       BT: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, SEGMENTS: tl.constexpr):
    """Recomputes the forward, then dp, dsq per token and this block's partial sums of dbias, dalpha.

    Rows past T load zero gradients, so they add nothing to the partial sums.
    """
    M: tl.constexpr = N * N + 2 * N
    pid = tl.program_id(0)
    rows, rmask, r64, ii, imask, mi, valid, m3, sq_off = _coeff_layout(pid, T, N, NP, BT)
    sq = tl.load(sq_ptr + r64, mask=rmask, other=0.0).to(ACC)
    r = 1.0 / tl.sqrt(sq / nc + eps)
    prow = p_ptr + r64 * M
    p_pre, u_pre = _group(prow[:, None], ii[None, :], mi, r[:, None], MODE, ACC)
    p_post, u_post = _group(prow[:, None], N + ii[None, :], mi, r[:, None], MODE, ACC)
    p_res, u_res = _group(prow[:, None, None], 2 * N + sq_off[None, :, :], m3, r[:, None, None], MODE, ACC)
    a_pre = tl.load(a_ptr).to(ACC)
    a_post = tl.load(a_ptr + 1).to(ACC)
    a_res = tl.load(a_ptr + 2).to(ACC)
    g_pre = tl.load(gpre_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    g_post = tl.load(gpost_ptr + r64[:, None] * N + ii[None, :], mask=mi, other=0.0).to(ACC)
    g_res = tl.load(gres_ptr + r64[:, None, None] * (N * N) + sq_off[None, :, :], mask=m3, other=0.0).to(ACC)
    if MODE == 0:
        s_pre = _sigmoid(a_pre * u_pre + tl.load(b_ptr + ii, mask=imask, other=0.0).to(ACC)[None, :])
        s_post = _sigmoid(a_post * u_post + tl.load(b_ptr + N + ii, mask=imask, other=0.0).to(ACC)[None, :])
        b_res = tl.load(b_ptr + 2 * N + sq_off[None, :, :], mask=valid, other=0.0).to(ACC)
        m0 = _sinkhorn_m0(a_res * u_res + b_res, valid)
        d_pre = g_pre * s_pre * (1.0 - s_pre)
        d_post = 2.0 * g_post * s_post * (1.0 - s_post)
        d_res = _sinkhorn_backward(m0, valid, iters, g_res, SEGMENTS)
    else:
        d_pre = g_pre
        d_post = g_post
        d_res = g_res
    # per-block partials of the reductions over tokens; summed on the host side in a fixed order
    part = dbias_ptr + pid.to(tl.int64) * PART_STRIDE
    tl.store(part + ii, tl.sum(d_pre, axis=0), mask=imask)
    tl.store(part + N + ii, tl.sum(d_post, axis=0), mask=imask)
    tl.store(part + 2 * N + sq_off, tl.sum(d_res, axis=0), mask=valid.reshape(NP, NP))
    apart = dalpha_ptr + pid.to(tl.int64) * PART_STRIDE
    tl.store(apart, tl.sum(tl.sum(d_pre * u_pre, axis=1), axis=0))
    tl.store(apart + 1, tl.sum(tl.sum(d_post * u_post, axis=1), axis=0))
    tl.store(apart + 2, tl.sum(tl.sum(tl.sum(d_res * u_res, axis=2), axis=1), axis=0))
    dz_pre = d_pre * a_pre
    dz_post = d_post * a_post
    dz_res = d_res * a_res
    if MODE == 1:
        dz_pre = dz_pre * (1.0 - u_pre * u_pre)
        dz_post = dz_post * (1.0 - u_post * u_post)
        dz_res = dz_res * (1.0 - u_res * u_res)
    tl.store(dp_ptr + r64[:, None] * M + ii[None, :], dz_pre * r[:, None], mask=mi)
    tl.store(dp_ptr + r64[:, None] * M + N + ii[None, :], dz_post * r[:, None], mask=mi)
    tl.store(dp_ptr + r64[:, None, None] * M + 2 * N + sq_off[None, :, :], dz_res * r[:, None, None], mask=m3)
    dr = tl.sum(dz_pre * p_pre, axis=1) + tl.sum(dz_post * p_post, axis=1)
    dr += tl.sum(tl.sum(dz_res * p_res, axis=2), axis=1)
    tl.store(dsq_ptr + r64, dr * (-0.5) / nc * r * r * r, mask=rmask)


def _coeffs_launch_args(p: Tensor, n: int, mode: str, cfg: StreamCfg):
    if mode not in _MODES:
        raise ValueError(f"mhc coeffs: unknown mode {mode!r}")
    check_stream("coeffs", p)
    lead, t = lead_of(p, 1)
    m = p.shape[-1]
    if m != ref.num_coeffs(n):
        raise ValueError(f"mhc triton coeffs: p has {m} columns, expected n*n + 2n = {ref.num_coeffs(n)}")
    np_ = pow2(n)
    bt = max(1, min(pow2(t), cfg.budget // (np_ * np_)))
    return lead, t, m, np_, bt


def coeffs(
    p: Tensor, sq: Tensor, bias: Tensor, alpha: Tensor, n: int, nc: int, eps: float, iters: int, mode: str
) -> tuple[Tensor, Tensor, Tensor]:
    cfg = cfg_of("coeffs")
    lead, t, m, np_, bt = _coeffs_launch_args(p, n, mode, cfg)
    acc = acc_torch(p.dtype, sq.dtype, bias.dtype, alpha.dtype)
    p, sq, bias, alpha = p.contiguous(), sq.contiguous(), bias.contiguous(), alpha.contiguous()
    h_pre = torch.empty(lead + (n,), dtype=acc, device=p.device)
    h_post = torch.empty(lead + (n,), dtype=acc, device=p.device)
    h_res = torch.empty(lead + (n, n), dtype=acc, device=p.device)
    if t == 0:
        return h_pre, h_post, h_res
    launch(
        _coeffs_fwd_kernel, (cdiv(t, bt),), (p, sq, bias, alpha, h_pre, h_post, h_res, t, nc, eps, iters),
        dict(N=n, NP=np_, BT=bt, MODE=_MODES[mode], ACC=acc_tl(acc)), num_warps=cfg.num_warps,
    )
    return h_pre, h_post, h_res


def coeffs_backward(
    p: Tensor, sq: Tensor, bias: Tensor, alpha: Tensor, dh_pre: Tensor, dh_post: Tensor, dh_res: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = cfg_of("coeffs_backward")
    lead, t, m, np_, bt = _coeffs_launch_args(p, n, mode, cfg)
    acc = acc_torch(p.dtype, sq.dtype, bias.dtype, alpha.dtype)
    tensors = [v.contiguous() for v in (p, sq, bias, alpha, dh_pre, dh_post, dh_res)]
    dp = torch.empty(lead + (m,), dtype=acc, device=p.device)
    dsq = torch.empty(lead, dtype=acc, device=p.device)
    if t == 0:
        return dp, dsq, torch.zeros_like(bias), torch.zeros_like(alpha)
    blocks = cdiv(t, bt)
    # each block writes its row of the dbias / dalpha partials whole: no fill launch. (One sum over [blocks, m + 3]
    # would return two views of one tensor, and a custom op's outputs must not alias.)
    parts = torch.empty((blocks, m + 3), dtype=acc, device=p.device)
    launch(
        _coeffs_bwd_kernel, (blocks,), (*tensors, dp, dsq, parts, parts[:, m:], t, nc, eps, iters, m + 3),
        dict(N=n, NP=np_, BT=bt, MODE=_MODES[mode], ACC=acc_tl(acc), SEGMENTS=cfg.segments),
        num_warps=cfg.num_warps,
    )
    return dp, dsq, parts[:, :m].sum(0).to(bias.dtype), parts[:, m:].sum(0).to(alpha.dtype)
