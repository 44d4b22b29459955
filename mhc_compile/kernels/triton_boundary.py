"""boundary_backward: a site's proj_pre_backward and the post_res backward of the site before it, as one op.

In the default path's backward, the boundary between sublayers l and l+1 runs two stream passes back to back:

    dX_l, dphi                = proj_pre_backward(X_l, phi, dp, dsq, h_pre, dx_in, acc)          3n + 1
    dX_prev, dh_res, dh_post,
      dy (, x_in)             = post_res_backward(_pre)(X_prev, h_res, h_post, y, dX_l (, h_pre_prev))   3n + 2 (+1)

(elements of C a token, ``cost.DEFAULT``): dX_l is written only for the second to read it back, and the second
pass reads X_prev apart from the first's read of X_l. On an sm_90 GPU (bf16 streams, n <= 4, C a multiple of 32)
``boundary_backward`` runs both in one pass, the Gluon step backward's second pass with X_l read instead of rebuilt
(``gluon_step_bwd.boundary_grads``): 4n + 3 (+1), 8 elements a token fewer at n = 4, with G = dX_l kept in fp32 in
registers (rounded once, into dX_prev, instead of into dX_l first). Elsewhere (or with ``BoundaryBwdCfg.ws`` off:
``triton_ops.configure("boundary_backward", ws=False)``), and where that kernel does not build (with a warning), the
two Triton ops run one after the other: the same values as the graph had before passes/fold_boundary_grads.py put the
op there.

Measured on an H100 (session 40, benchmarks/results/session40-2026-12-06-h100.md): correct at six shapes, dh_res /
dh_post about 1000x closer to float64 than the two ops; 62-71 % of its floor, DRAM-bound with 20 % more bytes than
its count (the dH partials torch summed after it, and per-token data every channel block reads, missed in L2).
Session 41 (session41-2026-12-06-h100.md): the dH partials added in L2 (``BoundaryBwdCfg.dh_atomic``, the default;
not deterministic, so off under ``torch.use_deterministic_algorithms``) and the per-token data cut to 256 bytes a
token: 18-25 % faster than the two ops at every measured shape (2224-2254 against 2667-2671 us at 32768 x 4096,
958-961 against 1201-1206 at 8192 x 7168), its DRAM bytes equal to its count. passes/fold_boundary_grads.py puts it
in the default path since then.
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.errors import TritonError

from mhc_compile.kernels import triton_post_res as tpost
from mhc_compile.kernels import triton_proj as tproj
from mhc_compile.kernels.triton_common import check_stream, gluon_build_failed, grad_buffer
from mhc_compile.kernels.triton_config import cfg_of

_NO_GLUON: set = set()  # devices where the Gluon kernel failed to build: the two ops run there instead


def _gluon():
    """kernels/gluon_step_bwd.py, imported on first use (Gluon is only needed on sm_90)."""
    from mhc_compile.kernels import gluon_step_bwd

    return gluon_step_bwd


def boundary_backward(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None,
    x_prev: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, h_pre_prev: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_prev, dh_res, dh_post, dy, x_in, dphi), as ``reference.boundary_backward``: x_in is pre(x_prev,
    h_pre_prev), or [.., 0] without h_pre_prev. ``out``: where dx_prev goes, e.g. acc itself
    (passes/inplace_stream_grads.py): both paths read a tile of acc before they write that tile there."""
    check_stream("boundary_backward", x, x_prev, y, dout)
    if x.shape != x_prev.shape:
        raise ValueError(f"mhc triton boundary_backward: x has shape {tuple(x.shape)}, x_prev "
                         f"{tuple(x_prev.shape)}; the boundary's two streams have one shape")
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    xin = h_pre_prev is not None
    if out is not None:
        out = grad_buffer(out, x_prev, "boundary_backward")
    cfg = cfg_of("boundary_backward")
    if cfg.ws and _gluon_runs(x, x_prev, y, dout, acc, out, n, c, xin):
        t = x.numel() // (n * c)

        def tokens(v):  # leading dims as one token dim, [T, ...]
            return v.reshape(t, *v.shape[len(lead):])

        try:
            dx_prev, dh_res, dh_post, dy, dphi, x_in = _gluon().boundary_grads(
                tokens(x), tokens(x_prev), tokens(h_res), tokens(h_post), tokens(y), phi.contiguous(), tokens(h_pre),
                tokens(dp), tokens(dsq), tokens(acc), tokens(dout), tokens(h_pre_prev) if xin else None,
                out=tokens(out) if out is not None else None, stages=cfg.stages, mixers=cfg.mixers,
                mix_regs=cfg.mix_regs, dphi_regs=cfg.dphi_regs, dh_atomic=cfg.dh_atomic, walk_tiles=cfg.walk_tiles,
                long_walk=cfg.long_walk, pace=cfg.pace, pace_waves=cfg.pace_waves, pace_walk=cfg.pace_walk,
                store_lag=cfg.store_lag)
            if x_in is None:
                x_in = x.new_empty(lead + (0,))
            return (dx_prev.view(x_prev.shape) if out is None else out, dh_res.view(lead + (n, n)),
                    dh_post.view(lead + (n,)), dy.view(y.shape), x_in.view(lead + x_in.shape[-1:]), dphi)
        except TritonError as e:  # raised before the launch: nothing was written, the two ops start over
            gluon_build_failed("boundary backward", e, x.device, _NO_GLUON, "proj_pre_backward and post_res_backward")
    g, dphi = tproj.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc, out=out)
    res = tpost._post_res_backward(x_prev, h_res, h_post, y, g, h_pre_prev.contiguous() if xin else None, out=out)
    x_in = res[4] if xin else x.new_empty(lead + (0,))
    return res[0], res[1], res[2], res[3], x_in, dphi


def _gluon_runs(x, x_prev, y, dout, acc, out, n, c, xin) -> bool:
    """Whether the one-pass kernel takes the call: contiguous bf16 streams on an sm_90 GPU it supports, acc given
    (the kernel always reads it), x not broadcast (a chain head's stream is never a boundary's X_l)."""
    if acc is None or x.device in _NO_GLUON or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    dense = (x, x_prev, y, dout, acc) + (() if out is None else (out,))
    if any(v.dtype != torch.bfloat16 or not v.is_contiguous() for v in dense) or acc.shape != x.shape:
        return False
    return _gluon().boundary_supported(x, n, c, xin, *dense[1:])
