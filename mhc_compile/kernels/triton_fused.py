"""Triton kernels of the fused boundary ops ``enter`` / ``step`` and their backwards.

Same names, signatures, return tuples and dtypes as the functions at the end of ``reference.py``;
conventions as in ``triton_ops.py`` (token-major [T, n, C] streams, T not specialised, int64 offsets,
fp32 accumulation or fp64 for fp64 streams, direct launches so ``TRITON_INTERPRET=1`` runs them).

Each op is a short pipeline of the default path's tuned kernels (``triton_ops``, measured there) plus one kernel
of this module, K2, which exists because ``step`` does not save the stream X it computes (a saved X would stay alive
through the sublayer's backward beside X_prev; see runtime/ops.py's ``_step_setup``):

    enter        proj -> coeffs -> pre
    step         post_res_proj -> coeffs -> pre                  (X_l written once; proj reads it from registers)
    enter bwd    pre_backward_dh -> coeffs_backward -> proj_pre_backward     (one pass: G, dphi)
    step bwd     K2 _dh_pre_kernel -> coeffs_backward -> proj_pre_backward (acc = dX) -> post_res_backward
                 (StepBwdCfg.ws, the default on sm_90: K2 without its X store -> coeffs_backward -> gluon_step_bwd's
                 one pass)

    K2  grid (token blocks): X_i = H_res[i, :] X_prev + H_post[i] y recomputed per [BT, BC] chunk and rounded as
        the forward stored it, dH_pre = <X_i, dx_in>, and X written for the two passes after it; a program walks
        all of C, so no cross-program sum.
    G (X's whole gradient) goes from proj_pre_backward to post_res_backward in the stream dtype, rounded once, as
    the default path's stream gradient does.

Bytes a token, in elements of C, n streams (``cost.FUSED`` counts the floor of one pass each way, 3n+2 and 4n+5):
    step fwd:  post_res_proj 2n+1 (X_prev, y, X) + pre n+1 = 3n+2 (14 at n = 4)
    step bwd:  K2 2n+2 (X_prev, y, dx_in, X) + proj_pre_backward 3n+1 (X, dx_in, dX, G) + post_res_backward 3n+2
               (X_prev, y, G, dX_prev, dy) = 8n+5 (37)
    enter:     proj n + pre n+1;  enter bwd: pre_backward_dh n+1 + proj_pre_backward 2n+1

Why the step backward is three passes and not one: its outputs need two reductions in crossing directions (dphi
sums over tokens, dH_res / dH_post over channels) and G = dp phi^T + ... needs a tensor-core dot. Two one-pass
designs ran on an H200 and were slower than these three passes (benchmarks/results/session13-2026-12-03-h200.md):
programs owning a channel slab of all n streams (session 12: 5.0 ms at 32768 x 4096, 19 % of copy bandwidth;
per-token coefficients and dp re-read for every 16-channel slab, 255 registers) and token-major programs with the
dot in the chunk loop plus a slab kernel for dphi (5.7 + 1.0 ms: the dot's output layout meets the loaded tiles'
in 59 layout conversions a chunk, and the build spills).

Under the interpreter (tests) bf16 tl.dot is wrong and fp32 -> bf16 casts truncate: ``triton_common.round_to``
rounds bf16 stores to nearest by hand, so the tests see what the GPU computes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.errors import TritonError

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tops
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.triton_common import (INTERPRETED, acc_tl, acc_torch, cdiv, check_stream, gluon_build_failed,
                                               grad_buffer, gluon_stream, is_broadcast, pow2, round_to, stream_arg)
from mhc_compile.kernels.triton_config import GluonStepCfg, overriding
from mhc_compile.kernels.triton_post_res import channel_partials
from mhc_compile.kernels.triton_post_res_proj import PRP_HOIST, coeff_vectors


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedCfg:
    bt: int = 64  # tokens a program
    bc: int = 64  # channels a chunk
    num_warps: int = 8


@dataclass(frozen=True)
class StepBwdCfg(GluonStepCfg):
    """How ``step_backward`` runs. ``ws``: its second and last stream pass as the warp-specialized Gluon kernel of
    kernels/gluon_step_bwd.py (two passes, 4n+5 elements of C a token, instead of three, 8n+5), where
    ``gluon_step_bwd.supported`` says it runs (sm_90, bf16, n <= 4, C a multiple of 32); elsewhere, and where its
    build fails (with a warning), the three passes. On by default since session 37: faster than the three passes at
    every shape measured since session 28, on both GPUs. H200 (session 30): by 12-21 %, and than the default path's
    folded backward on a saved X by 0-8 % (a tie at 8192 x 4096). H100 (session 37's kernel table, benchmarks/
    results/session37-2026-12-05-h100.md): 657.8 against 896.3 us at 8192 x 4096, 1127.3 against 1613.7 at 8192 x
    7168, 2690.9 against 3567.7 at 32768 x 4096 (69.3 against 52.3 % of copy bandwidth over the 4n+5 floor), 4741.9
    against 6462.0 at 32768 x 7168. ``fuse=True`` itself stays opt-in: in session 30's training step it was 1.4
    points slower than the default path at d = 4096 (+11.4 against +10.0 %), its activation memory +23.7 % against
    +17.7 %.
    The fields are ``GluonStepCfg``'s: ``stages`` at most 3; one mixer is faster since the mixers' loops over j run
    at run time (session 30); with two mixers, 176 / 96 registers spill least in the Triton 3.6 sm_90a build: 16
    bytes, reloaded once a tile outside the inner loops (benchmarks/gluon_step_bwd_check.py --build). ``dh_atomic``
    (the default since session 41): 2174-2178 against 2305-2317 us with the partials at 32768 x 4096 on an H100, 85 %
    of the 4n+5 floor (benchmarks/results/session41-2026-12-06-h100.md).
    ``x_dphi``: the dphi warpgroup mixes X, not the mixer (``gluon_step_bwd``'s X_DPHI; X's ring takes a slot's worth
    of shared memory: three slots on a broadcast X_prev, two on a dense one), with ``X_DPHI_REGS`` registers. Off:
    H100, session 55, bit-equal, 1 % slower on the chain head's dense pass (1915-1920 against 1897-1900 us at
    32768 x 4096) and 4 % on its row (1394-1398 against 1340-1342)."""

    x_dphi: bool = False


_CFG = {
    "dh_pre": FusedCfg(bt=2, bc=512, num_warps=4),
    "step_bwd": StepBwdCfg(),
}
_OVERRIDES: dict[str, object] = {}


def configure(kernel: str, **fields) -> None:
    """Change one kernel's configuration ("dh_pre": tiles, "step_bwd": ``StepBwdCfg``) for the rest of the
    process; no fields: reset. The stages the ops share with the unfused design take ``triton_ops.configure``."""
    if kernel not in _CFG:
        raise ValueError(f"mhc triton_fused.configure: unknown kernel {kernel!r}; expected one of {sorted(_CFG)}")
    if fields:
        _OVERRIDES[kernel] = replace(_CFG[kernel], **fields)
    else:
        _OVERRIDES.pop(kernel, None)


def tuning(kernel: str, **fields):
    """``configure`` for the duration of a with block (benchmarks, checks): a context manager."""
    if kernel not in _CFG:
        raise ValueError(f"mhc triton_fused.tuning: unknown kernel {kernel!r}; expected one of {sorted(_CFG)}")
    return overriding(_OVERRIDES, _CFG, kernel, fields)


def _cfg(kernel: str):
    return _OVERRIDES.get(kernel, _CFG[kernel])


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32, torch.float64: tl.float64}


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mix(xs, y, coef, i: tl.constexpr, N: tl.constexpr, XT: tl.constexpr, RNE: tl.constexpr):
    """X_i rounded to the stream dtype, in post_res's order: h_post y, then an FMA a term, h_res[i, j] x_j.
    ``coef``: the per-token coefficient vectors of ``triton_post_res_proj.coeff_vectors`` (h_post[:, i] at i,
    h_res[:, i, j] at N + i * N + j)."""
    xi = coef[i][:, None] * y
    for j in tl.static_range(N):
        xi = tl.fma(coef[N + i * N + j][:, None], xs[j], xi)
    return round_to(xi, XT, RNE)


@triton.jit
def _stream_loads(xp_ptr, y_ptr, r64, cols, m2, C, N: tl.constexpr, ACC: tl.constexpr, X_BCAST: tl.constexpr):
    """(X_prev rows as a tuple of n [BT, BC] tiles, y tile), widened to ACC. X_BCAST: X_prev is [T, C], the one
    row every stream of a token holds (``stream_arg``), loaded once and used as each of the n tiles."""
    y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    xs = ()
    if X_BCAST:
        row = tl.load(xp_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        for j in tl.static_range(N):
            xs = xs + (row,)
    else:
        for j in tl.static_range(N):
            xs = xs + (tl.load(xp_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC),)
    return xs, y


# ---------------------------------------------------------------------------------------------
# K2: X recomputed (and written, for the three-pass backward), dH_pre = <X, dx_in>
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _dh_pre_kernel(xp_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, x_ptr, dh_ptr, T, C, N: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, XT: tl.constexpr, RNE: tl.constexpr,
                   HOIST: tl.constexpr, STORE_X: tl.constexpr = True, X_BCAST: tl.constexpr = False):
    """One program owns BT tokens and walks all of C. X_i is rounded as the forward stored it (same order of
    sums, same rounding), stored where STORE_X (x_ptr unused otherwise), and dH_pre sums the rounded value.
    X_BCAST: X_prev is one row a token (a chain head's broadcast embedding; ``_stream_loads``).
    dH_pre is carried as n [BT, BC / 8] partials (each thread sums the 8 adjacent channels it loads) and reduced
    across threads once, after the loop. HOIST: the coefficient vectors are loaded once, before the loop (n <= 4),
    else again for every chunk."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    if HOIST:
        coef = coeff_vectors(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
    dh = ()
    for i in tl.static_range(N):
        dh = dh + (tl.zeros([BT, BC // 8], dtype=ACC),)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = rmask[:, None] & (cols < C)[None, :]
        xs, y = _stream_loads(xp_ptr, y_ptr, r64, cols, m2, C, N, ACC, X_BCAST)
        g = tl.load(g_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
        if not HOIST:
            coef = coeff_vectors(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
        new = ()
        for i in tl.static_range(N):
            xi = _mix(xs, y, coef, i, N, XT, RNE)
            if STORE_X:
                tl.store(x_ptr + (r64 * N + i)[:, None] * C + cols[None, :], xi, mask=m2)
            new = new + (dh[i] + channel_partials(xi.to(ACC) * g, BT, BC),)
        dh = new
    for i in tl.static_range(N):
        tl.store(dh_ptr + r64 * N + i, tl.sum(dh[i], axis=1), mask=rmask)


def _recompute_dh_pre(x_prev: Tensor, h_res, h_post, y, dx_in: Tensor, acc,
                      store_x: bool = True) -> tuple[Tensor | None, Tensor]:
    """(X, dH_pre): ``step``'s stream rebuilt from its inputs, and pre's gradient of H_pre; X is None without
    ``store_x`` (the kernel then only reads). x_prev as ``stream_arg`` gives it: dense, or broadcast over n."""
    t, n, c = x_prev.shape
    x = torch.empty(x_prev.shape, dtype=x_prev.dtype, device=x_prev.device) if store_x else None
    dh = torch.empty((t, n), dtype=acc, device=x_prev.device)
    cfg = _cfg("dh_pre")
    bc = max(8, min(cfg.bc, pow2(c)))
    bt = max(1, min(cfg.bt, pow2(t)))
    launch(_dh_pre_kernel, (cdiv(t, bt),), (x_prev, h_res, h_post, y, dx_in, x_prev if x is None else x, dh, t, c),
           dict(N=n, BT=bt, BC=bc, ACC=acc_tl(acc), XT=_TL[x_prev.dtype], RNE=INTERPRETED,
                HOIST=n * n + n <= PRP_HOIST, STORE_X=store_x, X_BCAST=is_broadcast(x_prev)),
           num_warps=cfg.num_warps)
    return x, dh


_NO_GLUON: set = set()  # devices where the Gluon step backward failed to build: the three passes run there instead


def _gluon_step_bwd():
    """kernels/gluon_step_bwd.py, imported on first use: Gluon is only needed for StepBwdCfg.ws."""
    from mhc_compile.kernels import gluon_step_bwd

    return gluon_step_bwd


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check(op: str, n: int, x: Tensor, phi: Tensor, **named: Tensor) -> None:
    """Dtypes and shapes, so a wrong call fails here with names instead of reading out of bounds. y and the
    gradients may have another stream dtype than x (autocast: an fp32 stream, a bf16 sublayer output);
    every load widens to the accumulation dtype."""
    check_stream(op, x, *(v for k, v in named.items() if k in ("y_prev", "dx", "dx_in")))
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
    """(x_in, h_pre, h_post, h_res, p, sq) of the stream ``x`` [T, n, C]. x is passed on as it came: proj and pre
    read a stream broadcast over n (a chain's head) as its one row a token and copy any other x dense."""
    _check("enter", n, x, phi)
    p, sq = tops.proj(x, phi)
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def step(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode):
    """(x, x_in, h_pre, h_post, h_res, p, sq): x = post_res(x_prev, ...) in the stream dtype, then enter(x). x_prev
    as it came: post_res_proj reads a stream broadcast over n (the step after a chain head, under fuse=True, gets
    the embedding so) as its one row a token; x is dense."""
    _check("step", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev)
    x, p, sq = tops.post_res_proj(x_prev, h_res_prev, h_post_prev, y_prev, phi)
    h_pre, h_post, h_res = tops.coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    return x, tops.pre(x, h_pre), h_pre, h_post, h_res, p, sq


def enter_backward(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode):
    """(dx, dphi, dbias, dalpha) of ``enter``; x as in ``enter``."""
    return _enter_backward(tops.proj_pre_backward, x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc,
                           eps, iters, mode)


def enter_backward_collapsed(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode,
                             acc=None):
    """``enter_backward`` with dx (+ acc, the stream's other gradient) summed over the n streams, [T, 1, C] (a chain
    head's embedding gradient, passes/collapse_head_grad.py): on a broadcast x its last pass reads one row (and acc)
    and writes one (``triton_proj.proj_pre_backward_collapsed``)."""
    return _enter_backward(tops.proj_pre_backward_collapsed, x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res,
                           n, nc, eps, iters, mode, acc)


def _enter_backward(proj_pre_backward, x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters,
                    mode, acc=None):
    _check("enter_backward", n, x, phi, h_pre=h_pre, p=p, sq=sq, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    dh_pre = tops.pre_backward_dh(x, h_pre, dx_in)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    dx, dphi = proj_pre_backward(x, phi, dp, dsq, h_pre, dx_in, acc)
    return dx, dphi, dbias, dalpha


def step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post,
                  dh_res, n, nc, eps, iters, mode, out=None, collapse_dx=False):
    """(dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha) of ``step``; X is recomputed.

    ``out``: where dx_prev goes, e.g. dx itself (passes/inplace_stream_grads.py). G is then written there too, so
    the op holds one stream-sized gradient instead of three (dx, G, dx_prev); both kernels are safe in place (a
    program stores a tile only after it has read that tile of the buffer, and no other program reads it).
    ``collapse_dx``: dx_prev summed over the n streams, [T, 1, C], rounded once (under fuse=True a chain head's
    part of its embedding gradient, passes/collapse_head_grad.py): 1 row a token written instead of n.
    x_prev as in ``step``: broadcast over n it is read as its one row a token by every pass (``stream_arg``)."""
    _check("step_backward", n, x_prev, phi, h_res_prev=h_res_prev, h_post_prev=h_post_prev, y_prev=y_prev,
           h_pre=h_pre, p=p, sq=sq, dx=dx, dx_in=dx_in, dh_post=dh_post, dh_res=dh_res)
    if collapse_dx and out is not None:
        raise ValueError("mhc triton step_backward: collapse_dx writes one row a token, not over a stream-sized out")
    if out is not None:  # checked before any work, by the check the kernels that write it apply
        out = grad_buffer(out, x_prev, "step_backward")
    (x_prev, bcast), h_res_prev, h_post_prev = stream_arg(x_prev), h_res_prev.contiguous(), h_post_prev.contiguous()
    y_prev, dx, dx_in, phi = y_prev.contiguous(), dx.contiguous(), dx_in.contiguous(), phi.contiguous()
    acc = acc_torch(x_prev.dtype, phi.dtype)
    t, _, c = x_prev.shape
    if t == 0 or c == 0:  # no stream elements; the coefficients' gradients still flow from dh_post, dh_res
        dh_pre = torch.zeros((t, n), dtype=acc, device=x_prev.device)
        dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps,
                                                      iters, mode)
        z = dict(dtype=acc, device=x_prev.device)
        dx_prev = x_prev.new_empty((t, 1, c) if collapse_dx else (t, n, c)) if out is None else out
        return (dx_prev, torch.zeros((t, n, n), **z),
                torch.zeros((t, n), **z), torch.empty_like(y_prev), torch.zeros_like(phi), dbias, dalpha)
    cfg = _cfg("step_bwd")
    if (cfg.ws and x_prev.device not in _NO_GLUON
            and _gluon_step_bwd().supported(x_prev, n, c, y_prev, dx, dx_in, *(() if out is None else (out,)))):
        # two passes: dH_pre from X_prev, y and dx_in; then everything else from one more read of them and dX
        _, dh_pre = _recompute_dh_pre(x_prev, h_res_prev, h_post_prev, y_prev, dx_in, acc, store_x=False)
        dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters,
                                                      mode)
        x_gluon = gluon_stream(x_prev, bcast)[0]  # dense where its broadcast reads are off
        try:
            dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi = _gluon_step_bwd().step_grads(
                x_gluon, h_res_prev, h_post_prev, y_prev, phi, h_pre, dp, dsq, dx, dx_in, out=out, stages=cfg.stages,
                mixers=cfg.mixers, mix_regs=cfg.mix_regs, dphi_regs=cfg.dphi_regs, dh_atomic=cfg.dh_atomic,
                collapse_dx=collapse_dx, walk_tiles=cfg.walk_tiles, long_walk=cfg.long_walk,
                pace=cfg.pace, pace_waves=cfg.pace_waves, pace_walk=cfg.pace_walk, store_lag=cfg.store_lag,
                x_dphi=cfg.x_dphi)
            return dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha
        except TritonError as e:  # a build error (another Triton's Gluon, shared memory, ptxas) comes before the
            # launch, so nothing was written: the three passes below start over, here and for the rest of the run
            gluon_build_failed("step backward", e, x_prev.device, _NO_GLUON, "the three Triton passes")
    x, dh_pre = _recompute_dh_pre(x_prev, h_res_prev, h_post_prev, y_prev, dx_in, acc)
    dp, dsq, dbias, dalpha = tops.coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)
    # G = X's whole gradient, dX included
    g, dphi = tops.proj_pre_backward(x, phi, dp, dsq, h_pre, dx_in, dx, out=out)
    del x
    dx_prev, dh_res_prev, dh_post_prev, dy_prev = tops.post_res_backward(x_prev, h_res_prev, h_post_prev, y_prev, g,
                                                                         out=out, collapse_dx=collapse_dx)
    return dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha
