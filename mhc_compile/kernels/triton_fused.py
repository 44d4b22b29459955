"""Triton pipelines of the fused boundary ops ``enter`` / ``step`` and their backwards.

Same names, signatures, return tuples and dtypes as the functions at the end of ``reference.py``;
conventions as in ``triton_ops.py`` (token-major [T, n, C] streams, T not specialised, int64 offsets,
fp32 accumulation or fp64 for fp64 streams, direct launches so ``TRITON_INTERPRET=1`` runs them).

Each op is a short pipeline of the default path's tuned kernels (``triton_ops``, measured there):

    enter        proj -> coeffs -> pre
    step         post_res_proj -> coeffs -> pre                  (X_l written once; proj reads it from registers)
    enter bwd    pre_backward_dh -> coeffs_backward -> proj_pre_backward     (one pass: G, dphi)
    step bwd     pre_backward_dh -> coeffs_backward -> proj_pre_backward (acc = dX) -> post_res_backward

    G (X's whole gradient) goes from proj_pre_backward to post_res_backward in the stream dtype, rounded once, as
    the default path's stream gradient does. ``step``'s backward takes X_l as the forward returned it (the next
    boundary's X_prev, which the backward holds anyway). Until session 18 it rebuilt X_l from X_prev and y in a
    kernel of its own (K2: X_prev, y, dx_in read, X written, 2n+2 elements a token) where pre_backward_dh now reads
    X and dx_in (n+1).

Bytes a token, in elements of C, n streams (``cost.FUSED`` counts the floor of one pass each way, 3n+2 and 4n+5):
    step fwd:  post_res_proj 2n+1 (X_prev, y, X) + pre n+1 = 3n+2 (14 at n = 4)
    step bwd:  pre_backward_dh n+1 (X, dx_in) + proj_pre_backward 3n+1 (X, dx_in, dX, G) + post_res_backward 3n+2
               (X_prev, y, G, dX_prev, dy) = 7n+4 (32)
    enter:     proj n + pre n+1;  enter bwd: pre_backward_dh n+1 + proj_pre_backward 2n+1

Why the step backward is three passes and not one: its outputs need two reductions in crossing directions (dphi
sums over tokens, dH_res / dH_post over channels) and G = dp phi^T + ... needs a tensor-core dot, while dp needs
dH_pre, a sum over all of C. Two one-pass designs ran on an H200 and were slower than these passes
(benchmarks/results/session13-2026-12-03-h200.md): programs owning a channel slab of all n streams (session 12:
5.0 ms at 32768 x 4096, 19 % of copy bandwidth; per-token coefficients and dp re-read for every 16-channel slab, 255
registers) and token-major programs with the dot in the chunk loop plus a slab kernel for dphi (5.7 + 1.0 ms: the
dot's output layout meets the loaded tiles' in 59 layout conversions a chunk, and the build spills).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tops
from mhc_compile.kernels.triton_ops import _acc_torch, _check_stream


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check(op: str, n: int, stream: Tensor, phi: Tensor, **named: Tensor) -> None:
    """Dtypes and shapes, so a wrong call fails here with names instead of reading out of bounds. y and the
    gradients may have another stream dtype than x (autocast: an fp32 stream, a bf16 sublayer output);
    every load widens to the accumulation dtype."""
    _check_stream(op, stream, *(v for k, v in named.items() if k in ("y_prev", "x", "dx", "dx_in")))
    if stream.dim() != 3 or stream.shape[1] != n:
        raise ValueError(f"mhc triton {op}: stream has shape {tuple(stream.shape)}, expected [T, n={n}, C]")
    t, _, c = stream.shape
    want = {
        "h_res_prev": (t, n, n), "h_post_prev": (t, n), "y_prev": (t, c), "x": (t, n, c), "dx": (t, n, c),
        "dx_in": (t, c), "h_pre": (t, n), "p": (t, ref.num_coeffs(n)), "sq": (t,), "dh_post": (t, n),
        "dh_res": (t, n, n),
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
    """(x_in, h_pre, h_post, h_res, p, sq) of the stream ``x`` [T, n, C]. x is passed on as it came: proj and pre
    read a stream broadcast over n (a chain's head) as its one row a token and copy any other x dense."""
    _check("enter", n, x, phi)
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
    """(dx, dphi, dbias, dalpha) of ``enter``; x as in ``enter``."""
    _check("enter_backward", n, x, phi, h_pre=h_pre, p=p, sq=sq, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    dh_pre = tops.pre_backward_dh(x, h_pre, dx_in)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx, dphi = tops.proj_pre_backward(x, phi, dp, dsq, h_pre, dx_in)
    return dx, dphi, dbias, dalpha


def step_backward(x_prev, h_res_prev, h_post_prev, y_prev, x, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post,
                  dh_res, n, nc, eps, iters, mode, out=None):
    """(dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha) of ``step``; x: its output stream.

    ``out``: where dx_prev goes, e.g. dx itself (passes/inplace_stream_grads.py). G is then written there too, so
    the op holds one stream-sized gradient instead of three (dx, G, dx_prev); both kernels are safe in place (a
    program stores a tile only after it has read that tile of the buffer, and no other program reads it)."""
    _check("step_backward", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev,
           x=x, h_pre=h_pre, p=p, sq=sq, dx=dx, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    if out is not None and (out.shape != x_prev.shape or out.dtype != x_prev.dtype or not out.is_contiguous()):
        raise ValueError(f"mhc triton step_backward: out must be a contiguous {x_prev.dtype} tensor of the stream's "
                         f"shape {tuple(x_prev.shape)}, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    x_prev, h_res_prev, h_post_prev = x_prev.contiguous(), h_res_prev.contiguous(), h_post_prev.contiguous()
    y_prev, x, dx, dx_in = y_prev.contiguous(), x.contiguous(), dx.contiguous(), dx_in.contiguous()
    phi = phi.contiguous()
    acc = _acc_torch(x_prev.dtype, phi.dtype)
    t, _, c = x_prev.shape
    if t == 0 or c == 0:  # no stream elements; the coefficients' gradients still flow from dh_post, dh_res
        dh_pre = torch.zeros((t, n), dtype=acc, device=x_prev.device)
        dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps,
                                                      iters, mode)
        z = dict(dtype=acc, device=x_prev.device)
        return (torch.empty_like(x_prev) if out is None else out, torch.zeros((t, n, n), **z),
                torch.zeros((t, n), **z), torch.empty_like(y_prev), torch.zeros_like(phi), dbias, dalpha)
    dh_pre = tops.pre_backward_dh(x, h_pre, dx_in)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    # G = X's whole gradient, dX included
    g, dphi = tops.proj_pre_backward(x, phi, dp, dsq, h_pre, dx_in, dx, out=out)
    dx_prev, dh_res_prev, dh_post_prev, dy_prev = tops.post_res_backward(x_prev, h_res_prev, h_post_prev, y_prev, g,
                                                                         out=out)
    return dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha
