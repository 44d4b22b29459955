"""Plain-PyTorch reference of every mHC op: the oracle, the CPU path and the MLIR-export path.

Shapes (T = tokens, flattened leading dims; m = n*n + 2n):
    x      [T, n, C]   the widened residual stream, model dtype, C contiguous
    phi    [n*C, m]    projection, columns [pre n | post n | res n*n row-major]
    bias   [m]
    alpha  [3]         (alpha_pre, alpha_post, alpha_res)
    p      [T, m]      fp32, vec(x) @ phi (not yet normalised)
    sq     [T]         fp32, sum(vec(x)^2)
    h_pre  [T, n], h_post [T, n], h_res [T, n, n]   fp32

The op boundary is split so that the fused kernels can slot in one at a time: ``proj`` (one pass over
x on tensor cores that also yields the sum of squares), ``coeffs`` (tiny per-token math: scales,
sigmoids, Sinkhorn), ``pre`` (x_in = H_pre . X) and ``post_res`` (X' = H_res X + H_post^T y). The
fused boundary ops at the end (``enter``, ``step`` = post_res of site l-1 with proj, coeffs and pre of
site l) are what the graph runs by default (``passes/fuse.py``); they are defined by composing the above.

Every function here is differentiable with autograd; the backward formulas written out below are the
ones the Triton backward kernels are checked against.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_coeffs(n: int) -> int:
    return n * n + 2 * n


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The coefficient path runs in fp32, or in fp64 when the inputs are fp64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _acc(t: Tensor) -> Tensor:
    return t.to(acc_dtype(t.dtype))


# ---------------------------------------------------------------------------------------------
# proj: p = vec(x) @ phi (fp32 accumulate), sq = sum(vec(x)^2)
# ---------------------------------------------------------------------------------------------
def proj(x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    t, n, c = x.shape
    xf = _acc(x.reshape(t, n * c))
    return xf @ _acc(phi), (xf * xf).sum(-1)


def proj_backward(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor) -> tuple[Tensor, Tensor]:
    """dx = dp @ phi^T + 2 dsq x ;  dphi = vec(x)^T dp."""
    t, n, c = x.shape
    xf = _acc(x.reshape(t, n * c))
    dx = _acc(dp) @ _acc(phi).t() + 2.0 * _acc(dsq)[:, None] * xf
    dphi = xf.t() @ _acc(dp)
    return dx.reshape(t, n, c).to(x.dtype), dphi.to(phi.dtype)


# ---------------------------------------------------------------------------------------------
# coeffs: Ht = alpha (.) (p * r) + b ; H_pre, H_post, H_res per mode
# ---------------------------------------------------------------------------------------------
def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on exp(L - max L): alternately normalise columns then rows, ``iters`` times.

    Ends on a row normalisation, so every row sums to 1 to rounding: with all streams equal, H_res X
    returns the stream unchanged (what makes the rewrite function-preserving at init).
    """
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def sinkhorn_backward(logits: Tensor, iters: int, dout: Tensor) -> Tensor:
    """Exact backward of the unrolled ``sinkhorn``: recompute the iterates, then walk them back.

    For a normalisation M' = M / s (s the column or row sums of M), dM = (dM' - <dM', M'>_s) / s, where
    <., .>_s sums over the same axis as s. The max shift drops out: Sinkhorn is invariant to scaling M.
    """
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    m0 = m
    steps = []
    for _ in range(iters):
        for axis in (-2, -1):
            s = m.sum(dim=axis, keepdim=True)
            m = m / s
            steps.append((axis, m, s))
    g = dout
    for axis, m_out, s in reversed(steps):
        g = (g - (g * m_out).sum(dim=axis, keepdim=True)) / s
    return g * m0


def coeffs(
    p: Tensor,
    sq: Tensor,
    bias: Tensor,
    alpha: Tensor,
    n: int,
    nc: int,
    eps: float,
    iters: int,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixing coefficients from the projection. ``nc`` = n*C, the length mean(x^2) divides by."""
    p = _acc(p)
    r = torch.rsqrt(_acc(sq) / nc + eps)
    z = p * r[:, None]
    if mode == "hc":
        z = torch.tanh(z)
    a = _acc(alpha)
    b = _acc(bias)
    t = p.shape[0]
    ht_pre = a[0] * z[:, :n] + b[:n]
    ht_post = a[1] * z[:, n : 2 * n] + b[n : 2 * n]
    ht_res = (a[2] * z[:, 2 * n :] + b[2 * n :]).reshape(t, n, n)
    if mode == "mhc":
        return torch.sigmoid(ht_pre), 2.0 * torch.sigmoid(ht_post), sinkhorn(ht_res, iters)
    if mode == "hc":
        return ht_pre, ht_post, ht_res
    raise ValueError(f"mhc coeffs: unknown mode {mode!r}")


def coeffs_backward(
    p: Tensor,
    sq: Tensor,
    bias: Tensor,
    alpha: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    n: int,
    nc: int,
    eps: float,
    iters: int,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dp, dsq, dbias, dalpha) of ``coeffs``, recomputing its forward."""
    p = _acc(p)
    t = p.shape[0]
    r = torch.rsqrt(_acc(sq) / nc + eps)
    u = p * r[:, None]
    if mode == "hc":
        u = torch.tanh(u)
    a = _acc(alpha)
    b = _acc(bias)
    group = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    ht = group * u + b
    if mode == "mhc":
        s_pre = torch.sigmoid(ht[:, :n])
        s_post = torch.sigmoid(ht[:, n : 2 * n])
        d_pre = _acc(dh_pre) * s_pre * (1 - s_pre)
        d_post = 2.0 * _acc(dh_post) * s_post * (1 - s_post)
        d_res = sinkhorn_backward(ht[:, 2 * n :].reshape(t, n, n), iters, _acc(dh_res)).reshape(t, n * n)
    elif mode == "hc":
        d_pre, d_post, d_res = _acc(dh_pre), _acc(dh_post), _acc(dh_res).reshape(t, n * n)
    else:
        raise ValueError(f"mhc coeffs: unknown mode {mode!r}")
    dht = torch.cat([d_pre, d_post, d_res], dim=1)
    dbias = dht.sum(0)
    gu = dht * u
    dalpha = torch.stack([gu[:, :n].sum(), gu[:, n : 2 * n].sum(), gu[:, 2 * n :].sum()])
    dz = dht * group
    if mode == "hc":
        dz = dz * (1 - u * u)
    dp = dz * r[:, None]
    dr = (dz * p).sum(1)
    dsq = dr * (-0.5 / nc) * r * r * r
    return dp, dsq, dbias.to(bias.dtype), dalpha.to(alpha.dtype)


# ---------------------------------------------------------------------------------------------
# pre: x_in = sum_i h_pre[i] x[i]
# ---------------------------------------------------------------------------------------------
def pre(x: Tensor, h_pre: Tensor) -> Tensor:
    return torch.einsum("tn,tnc->tc", _acc(h_pre), _acc(x)).to(x.dtype)


def pre_backward(x: Tensor, h_pre: Tensor, dout: Tensor) -> tuple[Tensor, Tensor]:
    """dx[i] = h_pre[i] dout ;  dh_pre[i] = <x[i], dout>."""
    g = _acc(dout)
    dx = _acc(h_pre)[:, :, None] * g[:, None, :]
    dh = torch.einsum("tnc,tc->tn", _acc(x), g)
    return dx.to(x.dtype), dh


# ---------------------------------------------------------------------------------------------
# pre + proj backward of one site, split so the stream gradient is written once:
#   pre_backward_dh gives dh_pre (which coeffs_backward needs before dp, dsq exist), then
#   proj_pre_backward sums the proj and pre contributions to dX (and the residual path's, ``acc``)
#   in the accumulation dtype and rounds them once.
# ---------------------------------------------------------------------------------------------
def pre_backward_dh(x: Tensor, h_pre: Tensor, dout: Tensor) -> Tensor:
    """dh_pre[i] = <x[i], dout>: ``pre_backward``'s dh without its dx (h_pre only keeps the signature)."""
    return torch.einsum("tnc,tc->tn", _acc(x), _acc(dout))


def proj_pre_backward(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """dx = dp @ phi^T + 2 dsq x + h_pre[i] dout (+ acc), rounded once ;  dphi = vec(x)^T dp.

    Equals proj_backward's dx + pre_backward's dx + acc without the two intermediate roundings.
    """
    dx, dphi = _proj_pre_grads(x, phi, dp, dsq, h_pre, dout, acc)
    return dx.to(x.dtype), dphi.to(phi.dtype)


def proj_pre_backward_collapsed(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum over the n streams of proj_pre_backward's dx before its rounding, [T, 1, C], rounded once ; its dphi).

    The gradient of a stream broadcast over its n streams (a chain's head, its embedding expanded) is that sum,
    which the expand's backward would otherwise take of the n-wide dx (passes/collapse_head_grad.py). ``acc``: the
    stream's other gradient, its n rows or their sum ([T, 1, C]: post_res_backward's collapsed dx)."""
    dx, dphi = _proj_pre_grads(x, phi, dp, dsq, h_pre, dout, None)
    dx = dx.sum(1, keepdim=True)
    if acc is not None:
        dx = dx + _acc(acc).sum(1, keepdim=True)
    return dx.to(x.dtype), dphi.to(phi.dtype)


def _proj_pre_grads(x, phi, dp, dsq, h_pre, dout, acc) -> tuple[Tensor, Tensor]:
    """proj_pre_backward's (dx [T, n, C], dphi) in the accumulation dtype, unrounded."""
    t, n, c = x.shape
    xf = _acc(x.reshape(t, n * c))
    dx = (_acc(dp) @ _acc(phi).t() + 2.0 * _acc(dsq)[:, None] * xf).reshape(t, n, c)
    dx = dx + _acc(h_pre)[:, :, None] * _acc(dout)[:, None, :]
    if acc is not None:
        dx = dx + _acc(acc)
    return dx, xf.t() @ _acc(dp)


# ---------------------------------------------------------------------------------------------
# post_res: X'[i] = sum_j h_res[i, j] X[j] + h_post[i] y
# ---------------------------------------------------------------------------------------------
def post_res(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor) -> Tensor:
    out = torch.einsum("tij,tjc->tic", _acc(h_res), _acc(x)) + _acc(h_post)[:, :, None] * _acc(y)[:, None, :]
    return out.to(x.dtype)


def post_res_chain(x: Tensor, h_res: list[Tensor], h_post: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    """post_res applied len(y) times, each output the next one's stream: [X_1, ..., X_k], each rounded to x's dtype
    as post_res rounds it (a recompute block's streams rebuilt in one pass, passes/fold_recompute_chain.py)."""
    outs = []
    for hr, hp, yk in zip(h_res, h_post, y, strict=True):
        x = post_res(x, hr, hp, yk)
        outs.append(x)
    return outs


def post_res_collapse(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, mean: bool = True) -> Tensor:
    """post_res's n streams collapsed by their mean (or sum), [T, C], rounded once (a chain's tail,
    passes/collapse_tail.py)."""
    out = torch.einsum("tij,tjc->tic", _acc(h_res), _acc(x)) + _acc(h_post)[:, :, None] * _acc(y)[:, None, :]
    return (out.mean(-2) if mean else out.sum(-2)).to(x.dtype)


def post_res_backward(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, collapse_dx: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dX[j] = sum_i h_res[i, j] dout[i] ; dy = sum_i h_post[i] dout[i] ;
    dh_res[i, j] = <dout[i], X[j]> ; dh_post[i] = <dout[i], y>.
    ``collapse_dx``: dX summed over its n rows before rounding, [T, 1, C] (a chain head's,
    passes/collapse_head_grad.py)."""
    g = _acc(dout)
    dx = torch.einsum("tij,tic->tjc", _acc(h_res), g)
    if collapse_dx:
        dx = dx.sum(-2, keepdim=True)
    dy = torch.einsum("ti,tic->tc", _acc(h_post), g)
    dh_res = torch.einsum("tic,tjc->tij", g, _acc(x))
    dh_post = torch.einsum("tic,tc->ti", g, _acc(y))
    return dx.to(x.dtype), dh_res, dh_post, dy.to(y.dtype)


def post_res_backward_pre(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, h_pre: Tensor, collapse_dx: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """post_res_backward and pre(x, h_pre) of the same stream: the backward's recomputed sublayer input made
    from the stream the post_res backward reads anyway (passes/fold_pre_recompute.py)."""
    return post_res_backward(x, h_res, h_post, y, dout, collapse_dx) + (pre(x, h_pre),)


def boundary_backward(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None,
    x_prev: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, h_pre_prev: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A site's proj_pre_backward (its stream x = X_l, ...) and the post_res backward of the site before it (X_l =
    post_res(x_prev, h_res, h_post, y)) as one op, the boundary between two sublayers in backward
    (passes/fold_boundary_grads.py): (dx_prev, dh_res, dh_post, dy, x_in, dphi). G, X_l's whole gradient, stays in
    the accumulation dtype instead of being rounded to the stream's between the two. x_in = pre(x_prev, h_pre_prev)
    (post_res_backward_pre's), or [T, 0] without h_pre_prev."""
    g, dphi = _proj_pre_grads(x, phi, dp, dsq, h_pre, dout, acc)
    dx_prev, dh_res, dh_post, dy = post_res_backward(x_prev, h_res, h_post, y, g)
    x_in = pre(x_prev, h_pre_prev) if h_pre_prev is not None else x_prev.new_empty(x_prev.shape[0], 0)
    return dx_prev, dh_res, dh_post, dy, x_in, dphi.to(phi.dtype)


# ---------------------------------------------------------------------------------------------
# post_res (layer l) then proj (layer l+1): the pair the cross-layer fused kernel replaces
# ---------------------------------------------------------------------------------------------
def post_res_proj(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(X', p_next, sq_next): X' = post_res(...) in the stream dtype, and proj of that rounded X'."""
    out = post_res(x, h_res, h_post, y)
    p, sq = proj(out, phi_next)
    return out, p, sq


# ---------------------------------------------------------------------------------------------
# Fused boundary ops: what one kernel pipeline does between two sublayers.
#
#   enter(X)                                = proj -> coeffs -> pre          (a chain's first site)
#   step(X_prev, H_res_prev, H_post_prev, y) = post_res(l-1) -> enter(l)     (every later site)
#
# One op per boundary means the stream X_l has exactly one consumer whose backward produces its
# gradient, so the three partial gradients of X_l (through proj, pre and the next post_res) are summed
# inside the kernel in fp32 instead of by autograd as three stream-sized tensors. The backward of
# ``step`` never needs X_l itself: it is recomputed on the fly from X_prev and y, which the post_res
# backward reads anyway.
# ---------------------------------------------------------------------------------------------
def enter(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, n: int, nc: int, eps: float, iters: int, mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_in, h_pre, h_post, h_res, p, sq) of the stream ``x`` [T, n, C]."""
    p, sq = proj(x, phi)
    h_pre, h_post, h_res = coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return pre(x, h_pre), h_pre, h_post, h_res, p, sq


def _boundary_grad(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, p: Tensor, sq: Tensor,
    dx_in: Tensor, dh_post: Tensor, dh_res: Tensor, n: int, nc: int, eps: float, iters: int, mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(G, dphi, dbias, dalpha): G = the gradient of X through proj, coeffs and pre, unrounded."""
    t, _, c = x.shape
    xa, g_in = _acc(x), _acc(dx_in)
    dh_pre = torch.einsum("tnc,tc->tn", xa, g_in)
    dp, dsq, dbias, dalpha = coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    g = _acc(h_pre)[:, :, None] * g_in[:, None, :]
    g = g + (dp @ _acc(phi).t()).reshape(t, n, c) + 2.0 * dsq[:, None, None] * xa
    dphi = xa.reshape(t, n * c).t() @ dp
    return g, dphi.to(phi.dtype), dbias, dalpha


def enter_backward(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, p: Tensor, sq: Tensor,
    dx_in: Tensor, dh_post: Tensor, dh_res: Tensor, n: int, nc: int, eps: float, iters: int, mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dphi, dbias, dalpha) of ``enter`` given the gradients of x_in, h_post and h_res."""
    g, dphi, dbias, dalpha = _boundary_grad(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res,
                                            n, nc, eps, iters, mode)
    return g.to(x.dtype), dphi, dbias, dalpha


def enter_backward_collapsed(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, p: Tensor, sq: Tensor,
    dx_in: Tensor, dh_post: Tensor, dh_res: Tensor, n: int, nc: int, eps: float, iters: int, mode: str,
    acc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``enter_backward`` with dx (+ acc, the stream's other gradient) summed over the n streams before its
    rounding, [T, 1, C]: the gradient of a chain head's embedding under ``fuse=True`` (passes/collapse_head_grad.py).
    ``acc``: its n rows or their sum ([T, 1, C]: the next step_backward's collapsed dx_prev)."""
    g, dphi, dbias, dalpha = _boundary_grad(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res,
                                            n, nc, eps, iters, mode)
    g = g.sum(1, keepdim=True)
    if acc is not None:
        g = g + _acc(acc).sum(1, keepdim=True)
    return g.to(x.dtype), dphi, dbias, dalpha


def step(
    x_prev: Tensor, h_res_prev: Tensor, h_post_prev: Tensor, y_prev: Tensor,
    phi: Tensor, bias: Tensor, alpha: Tensor, n: int, nc: int, eps: float, iters: int, mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x, x_in, h_pre, h_post, h_res, p, sq): x = post_res(x_prev, ...) in the stream dtype, then enter(x)."""
    x = post_res(x_prev, h_res_prev, h_post_prev, y_prev)
    return (x, *enter(x, phi, bias, alpha, n, nc, eps, iters, mode))


def step_backward(
    x_prev: Tensor, h_res_prev: Tensor, h_post_prev: Tensor, y_prev: Tensor,
    phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, p: Tensor, sq: Tensor,
    dx: Tensor, dx_in: Tensor, dh_post: Tensor, dh_res: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str, collapse_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha) of ``step``.

    ``dx`` is the gradient of the step's output stream x (from the next boundary); the gradient of x in
    total, G = dx + (through pre, coeffs, proj), stays in the accumulation dtype into post_res's backward.
    ``collapse_dx``: dx_prev summed over its n rows before rounding, [T, 1, C] (a chain head's part under
    fuse=True, passes/collapse_head_grad.py), as ``post_res_backward``'s.
    """
    x = post_res(x_prev, h_res_prev, h_post_prev, y_prev)
    g, dphi, dbias, dalpha = _boundary_grad(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res,
                                            n, nc, eps, iters, mode)
    g = g + _acc(dx)
    xa, ya = _acc(x_prev), _acc(y_prev)
    dx_prev = torch.einsum("tij,tic->tjc", _acc(h_res_prev), g)
    if collapse_dx:
        dx_prev = dx_prev.sum(-2, keepdim=True)
    dy_prev = torch.einsum("ti,tic->tc", _acc(h_post_prev), g)
    dh_res_prev = torch.einsum("tic,tjc->tij", g, xa)
    dh_post_prev = torch.einsum("tic,tc->ti", g, ya)
    return dx_prev.to(x_prev.dtype), dh_res_prev, dh_post_prev, dy_prev.to(y_prev.dtype), dphi, dbias, dalpha


def step_grads(
    x_prev: Tensor, h_res_prev: Tensor, h_post_prev: Tensor, y_prev: Tensor, phi: Tensor,
    h_pre: Tensor, dp: Tensor, dsq: Tensor, dx: Tensor, dx_in: Tensor, collapse_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi): ``step_backward``'s second stream pass in a two-pass
    design (kernels/gluon_step_bwd.py), given what its first pass and coeffs_backward produce (dp, dsq) and the
    forward's h_pre. X is rebuilt as the forward stored it; G = dp phi^T + 2 dsq X + h_pre dx_in + dX stays in the
    accumulation dtype. ``collapse_dx`` as in ``step_backward``."""
    t, n, c = x_prev.shape
    x = _acc(post_res(x_prev, h_res_prev, h_post_prev, y_prev))
    g = (_acc(dp) @ _acc(phi).t()).reshape(t, n, c) + 2.0 * _acc(dsq)[:, None, None] * x
    g = g + _acc(h_pre)[:, :, None] * _acc(dx_in)[:, None, :] + _acc(dx)
    xa = _acc(x_prev)
    dx_prev = torch.einsum("tij,tic->tjc", _acc(h_res_prev), g)
    if collapse_dx:
        dx_prev = dx_prev.sum(-2, keepdim=True)
    dy_prev = torch.einsum("ti,tic->tc", _acc(h_post_prev), g)
    dh_res_prev = torch.einsum("tic,tjc->tij", g, xa)
    dh_post_prev = torch.einsum("tic,tc->ti", g, _acc(y_prev))
    dphi = x.reshape(t, n * c).t() @ _acc(dp)
    return dx_prev.to(x_prev.dtype), dh_res_prev, dh_post_prev, dy_prev.to(y_prev.dtype), dphi.to(phi.dtype)
