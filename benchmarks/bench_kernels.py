"""Kernel benchmark: each mHC Triton kernel against the copy-bandwidth floor, the eager reference and the
reference under torch.compile, measured side by side in one process on one GPU.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--tokens 8192 32768] [--channels 2048 4096 7168]
                                                    [--compiled-shapes 8192x4096] [--sweep]

Stages, each written to $OUT (else ./bench_out) as soon as it is done, so a time limit loses only the tail:
(1) correctness of every Triton op against ``kernels/reference.py`` at the benchmark's configuration (ops
that fail are not timed) -> correctness.md; (2) device-to-device copy bandwidth (read + write bytes over
time) -> env.md; (3) with --sweep, a round-robin tile sweep whose winners are used for the rest of the run
-> sweep.md; (4) the table: time (median of ``triton.testing.do_bench_cudagraph``: GPU time), bytes (every tensor the kernel
reads or writes, counted once), GB/s, efficiency = bytes / (time x copy bw), and the eager reference
-> kernels.md; (5) correctness on odd shapes (n = 1, 3, 16; C = 5, 33; fp16 / fp32) -> correctness.md;
(6) the reference under torch.compile at --compiled-shapes -> compiled.md. --budget-s bounds (5) and (6).
The fused boundary ops (``step`` / ``enter`` and their backwards, ``kernels/triton_fused.py``) get rows
next to "unfused step", the four
separate kernels the fused ``step`` replaces (post_res + proj + coeffs + pre, and their backwards plus the
sum of the stream gradient's three parts). Their bytes are ``mhc_compile/cost.py``'s stream counts
(FUSED / UNFUSED; the [T, m]-sized coefficient tensors, < 1 %, left out), so the rows compare like for like.
The ``step`` backward runs in two passes on sm_90 (``StepBwdCfg.ws``, a warp-specialized Gluon kernel, the default
since session 37); "step (three-pass)" backward runs the three Triton passes beside it (off sm_90 both rows run
those). proj's forward and one-pass backward (``DotCfg.ws``, ``FusedBwdCfg.ws``) and post_res_proj (``DotCfg.ws``)
are Gluon kernels by default on sm_90: the rows that run them ("proj" forward and backward, "proj_pre_backward",
"folded step" and "enter" backward; "post_res_proj" and "step" forward) have "(Triton)" rows beside them that run
the Triton kernel instead. enter's backward keeps the Triton kernel on an H100 (``triton_config.PROJ_BWD_BY_DEVICE``):
"enter (Gluon)" backward runs the Gluon one there.
--sweep also sweeps triton_fused's tiles (``triton_fused.configure``).
``--smoke`` runs the script on CPU under TRITON_INTERPRET=1 with tiny shapes (timings meaningless).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_clocks import ClockLog  # noqa: E402
from benchmarks.gpu_clocks import describe as describe_clocks  # noqa: E402
from mhc_compile import cost  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_fused as tf  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402

N_ITERS = 20
EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# inputs and byte counts
# ---------------------------------------------------------------------------------------------
def make_inputs(t: int, n: int, c: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    m = n * n + 2 * n
    acc = ref.acc_dtype(dtype)

    def randn(*shape, dt=acc, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device, dtype=torch.float32)).to(dt)

    def rand(*shape, scale=1.0):
        return (scale * torch.rand(*shape, generator=g, device=device, dtype=torch.float32)).to(acc)

    inp = dict(
        x=randn(t, n, c, dt=dtype), y=randn(t, c, dt=dtype), dx_in=randn(t, n, c, dt=dtype),
        dy_in=randn(t, c, dt=dtype), h_pre=rand(t, n), h_post=rand(t, n, scale=2.0), h_res=rand(t, n, n),
        phi=randn(n * c, m, scale=(n * c) ** -0.5), bias=randn(m), alpha=randn(3, scale=0.01),
        dp=randn(t, m), dsq=randn(t, scale=1e-3), dh_pre=randn(t, n), dh_post=randn(t, n),
        dh_res=randn(t, n, n), n=n, c=c, t=t,
    )
    p, sq = ref.proj(inp["x"], inp["phi"])
    inp.update(p=p, sq=sq)
    # the fused ops' saved tensors, consistent with their forward: enter(x) has proj(x) = (p, sq); step's
    # stream is post_res(x, ...), whose proj and coefficients its backward takes
    ca = coeff_args(inp)
    xs = ref.post_res(inp["x"], inp["h_res"], inp["h_post"], inp["y"])
    ps, sqs = ref.proj(xs, inp["phi"])
    inp.update(xs=xs, ps=ps, sqs=sqs, hpre_s=ref.coeffs(ps, sqs, inp["bias"], inp["alpha"], *ca)[0],
               hpre_e=ref.coeffs(p, sq, inp["bias"], inp["alpha"], *ca)[0])
    return inp


def coeff_args(inp: dict, mode: str = "mhc") -> tuple:
    return (inp["n"], inp["n"] * inp["c"], EPS, N_ITERS, mode)


@dataclass
class Case:
    kernel: str
    direction: str
    call: Callable[[object], object]  # takes the kernels module (tk or ref or a compiled wrapper)
    nbytes: int
    impl: str = ""  # "fused": call() takes triton_fused where it is given tk


def _module(case: Case, k):
    """The module a case runs on: the fused rows swap triton_ops for their own Triton module."""
    if k is tk and case.impl:
        return tf
    return k


def _call(case: Case, k):
    return case.call(_module(case, k))


def _nb(*tensors) -> int:
    return sum(v.numel() * v.element_size() for v in tensors)


def cases(inp: dict) -> list[Case]:
    """Every kernel with the tensors it must touch once: its inputs and outputs."""
    x, y, phi, p, sq = inp["x"], inp["y"], inp["phi"], inp["p"], inp["sq"]
    hp, hq, hr = inp["h_pre"], inp["h_post"], inp["h_res"]
    gx, gy, dp, dsq = inp["dx_in"], inp["dy_in"], inp["dp"], inp["dsq"]
    gpre, gpost, gres = inp["dh_pre"], inp["dh_post"], inp["dh_res"]
    b, a = inp["bias"], inp["alpha"]
    ca = coeff_args(inp)
    return [
        Case("proj", "fwd", lambda k: k.proj(x, phi), _nb(x, phi, p, sq)),
        Case("proj (Triton)", "fwd", _triton_proj_fwd(lambda k: k.proj(x, phi)), _nb(x, phi, p, sq)),
        Case("proj", "bwd", lambda k: k.proj_backward(x, phi, dp, dsq), _nb(x, phi, dp, dsq, x, phi)),
        Case("proj (Triton)", "bwd", _triton_proj(lambda k: k.proj_backward(x, phi, dp, dsq)),
             _nb(x, phi, dp, dsq, x, phi)),
        Case("coeffs", "fwd", lambda k: k.coeffs(p, sq, b, a, *ca), _nb(p, sq, b, a, hp, hq, hr)),
        Case("coeffs", "bwd", lambda k: k.coeffs_backward(p, sq, b, a, gpre, gpost, gres, *ca),
             _nb(p, sq, b, a, gpre, gpost, gres, p, sq, b, a)),
        Case("pre", "fwd", lambda k: k.pre(x, hp), _nb(x, hp, y)),
        Case("pre", "bwd", lambda k: k.pre_backward(x, hp, gy), _nb(x, hp, gy, x, hp)),
        Case("post_res", "fwd", lambda k: k.post_res(x, hr, hq, y), _nb(x, hr, hq, y, x)),
        Case("post_res", "bwd", lambda k: k.post_res_backward(x, hr, hq, y, gx), _nb(x, hr, hq, y, gx, x, hr, hq, y)),
        Case("post_res_proj", "fwd", lambda k: k.post_res_proj(x, hr, hq, y, phi), _nb(x, hr, hq, y, phi, x, p, sq)),
        # the backward-only ops of passes/fold_stream_grads.py (gx, shaped like X, stands for the residual part)
        Case("pre_backward_dh", "bwd", lambda k: k.pre_backward_dh(x, hp, gy), _nb(x, gy, hp)),
        # the Gluon kernel by default (FusedBwdCfg.ws: kernels/gluon_proj_bwd.py on sm_90, bf16, n <= 4, C a
        # multiple of 128), the Triton kernel in the row after it (and everywhere else)
        Case("proj_pre_backward", "bwd", lambda k: k.proj_pre_backward(x, phi, dp, dsq, hp, gy, gx),
             _nb(x, phi, dp, dsq, hp, gy, gx, x, phi)),
        Case("proj_pre_backward (Triton)", "bwd",
             _triton_proj(lambda k: k.proj_pre_backward(x, phi, dp, dsq, hp, gy, gx)),
             _nb(x, phi, dp, dsq, hp, gy, gx, x, phi)),
        Case("proj_pre_backward (dx_hl)", "bwd",
             _dx_hl(lambda k: k.proj_pre_backward(x, phi, dp, dsq, hp, gy, gx)),
             _nb(x, phi, dp, dsq, hp, gy, gx, x, phi)),
    ] + fused_cases(inp)


def _stream_bytes(inp: dict, traffic) -> int:
    """cost.py's elements of C per token (one sublayer boundary) as bytes for this T, C, n and dtype."""
    elems = int(traffic.subs(cost.n, inp["n"]))
    return elems * inp["t"] * inp["c"] * inp["x"].element_size()


def fused_cases(inp: dict) -> list[Case]:
    """step / enter (fused) and the four unfused ops step replaces."""
    x, y, phi, p, sq, xs = inp["x"], inp["y"], inp["phi"], inp["p"], inp["sq"], inp["xs"]
    hq, hr, b, a = inp["h_post"], inp["h_res"], inp["bias"], inp["alpha"]
    ps, sqs, hpre_s, hpre_e = inp["ps"], inp["sqs"], inp["hpre_s"], inp["hpre_e"]
    dx, g_in, gpost, gres = inp["dx_in"], inp["dy_in"], inp["dh_post"], inp["dh_res"]  # dX [T,n,C], dx_in [T,C]
    ca = coeff_args(inp)
    n = inp["n"]
    step_fwd = _stream_bytes(inp, cost.FUSED.forward)
    step_bwd = _stream_bytes(inp, cost.FUSED.backward)
    # enter: K1 reads X only (n) + pre (n + 1); backward: dh_pre (n + 1) + one pass (X, dx_in -> dX: 2n + 1)
    elem = inp["t"] * inp["c"] * x.element_size()
    enter_fwd, enter_bwd = (2 * n + 1) * elem, (3 * n + 2) * elem
    # enter on a chain head's stream, its embedding broadcast over the n streams: X is one row a token (read as 1,
    # not n); dX leaves dense. Forward: proj (1) + pre (1 + 1); backward: dh_pre (1 + 1) + one pass (1 + 1 + n)
    xb = x[:, 0].contiguous().unsqueeze(1).expand(x.shape)
    pb, sqb = ref.proj(xb, phi)
    hpre_b = ref.coeffs(pb, sqb, b, a, *ca)[0]
    enter_b_fwd, enter_b_bwd = 3 * elem, (n + 4) * elem
    # the default path's chain head: proj_pre_backward on that broadcast X with acc, its dx summed over the streams
    # (passes/collapse_head_grad.py): X row, dout and acc read, one row written; acc is the head's post_res backward's
    # dx, which that pass has it write summed too (collapse_dx): 4 ("head"; acc's n rows summed here: n + 3); the n
    # rows written and summed after, as before that pass: 3n + 3. The head's post_res backward with collapse_dx: X
    # row, dout (n), y read, dx row and dy written: n + 4
    head_bwd, head_acc_rows_bwd, head_rows_bwd = 4 * elem, (n + 3) * elem, (3 * n + 3) * elem
    head_post_res_bwd = (n + 4) * elem
    acc_row = dx.sum(-2, keepdim=True)
    # fuse=True's chain head after that pass: enter's backward on the row, the next step's dx_prev summed in as acc:
    # dh_pre (1 + 1) + the one-row pass (X row, dout, acc, one row written); acc one row since that step_backward
    # writes it summed (collapse_dx): 6 ("enter (collapsed)"); acc's n rows summed here: n + 5. That step_backward
    # ("step (head)"): its 4n + 5 with dX_prev written as one row, 3n + 6
    enter_c_bwd, enter_c_rows_bwd = 6 * elem, (n + 5) * elem
    step_head_bwd = step_bwd - (n - 1) * elem
    # that step as the model calls it since session 50: its X_prev is the embedding broadcast over the streams, read
    # as one row ("step (head, row)"): the forward's 3n + 2 with one row of X_prev read, 2n + 3; the backward's two
    # passes each read one row of X_prev instead of n, n + 8
    step_row_fwd, step_row_bwd = step_fwd - (n - 1) * elem, step_head_bwd - 2 * (n - 1) * elem
    # a chain's tail (passes/collapse_tail.py): the last post_res and the mean after it as one kernel, X and y read,
    # one row written (n + 2); post_res writing the n streams and the mean reading them back: 3n + 2
    tail_fwd, tail_rows_fwd = (n + 2) * elem, (3 * n + 2) * elem
    dp, dsq = inp["dp"], inp["dsq"]

    def unfused_fwd(k):
        xx = k.post_res(x, hr, hq, y)
        pp, ss = k.proj(xx, phi)
        h_pre, _, _ = k.coeffs(pp, ss, b, a, *ca)
        return xx, k.pre(xx, h_pre)

    def unfused_bwd(k):
        """autograd's order: the three gradients of X, their sum, then post_res's backward."""
        dxa, dh_pre = k.pre_backward(xs, hpre_s, g_in)
        dp, dsq, _, _ = k.coeffs_backward(ps, sqs, b, a, dh_pre, gpost, gres, *ca)
        dxb, _ = k.proj_backward(xs, phi, dp, dsq)
        return k.post_res_backward(x, hr, hq, y, dx + dxa + dxb)

    def folded_bwd(k):
        """The same boundary after passes/fold_stream_grads.py: X's gradient written once."""
        dh_pre = k.pre_backward_dh(xs, hpre_s, g_in)
        dp, dsq, _, _ = k.coeffs_backward(ps, sqs, b, a, dh_pre, gpost, gres, *ca)
        dxs, _ = k.proj_pre_backward(xs, phi, dp, dsq, hpre_s, g_in, dx)
        return k.post_res_backward(x, hr, hq, y, dxs)

    # bytes: dh pass (X, dx_in) + folded pass (X, dx_in, acc, dX) + post_res backward (X, dX, y -> dX, dy)
    folded_bytes = (n + 1) * elem + (3 * n + 1) * elem + (3 * n + 2) * elem
    # passes/fold_boundary_grads.py's op: proj_pre_backward (site l + 1) and the post_res backward it feeds, with x_in
    # (fold_pre_recompute's): X, dx_in, acc, X_prev, y read; dX_prev, dy, x_in written (4n + 4; the two ops 6n + 4)

    def boundary(k):
        return k.boundary_backward(xs, phi, dp, dsq, hpre_s, g_in, dx, x, hr, hq, y, hpre_e)

    out = [
        Case("folded step", "bwd", folded_bwd, folded_bytes),
        Case("folded step (Triton)", "bwd", _triton_proj(folded_bwd), folded_bytes),
        Case("folded step (dx_hl)", "bwd", _dx_hl(folded_bwd), folded_bytes),
        Case("boundary", "bwd", boundary, (4 * n + 4) * elem),
        Case("boundary (two-op)", "bwd", _two_ops(boundary), (6 * n + 4) * elem),
        Case("step", "fwd", lambda k: k.step(x, hr, hq, y, phi, b, a, *ca), step_fwd, "fused"),
        Case("step", "bwd", lambda k: k.step_backward(x, hr, hq, y, phi, b, a, hpre_s, ps, sqs, dx, g_in, gpost,
                                                      gres, *ca), step_bwd, "fused"),
        Case("enter", "fwd", lambda k: k.enter(x, phi, b, a, *ca), enter_fwd, "fused"),
        Case("enter", "bwd", lambda k: k.enter_backward(x, phi, b, a, hpre_e, p, sq, g_in, gpost, gres, *ca),
             enter_bwd, "fused"),
        Case("enter (broadcast)", "fwd", lambda k: k.enter(xb, phi, b, a, *ca), enter_b_fwd, "fused"),
        Case("enter (broadcast)", "bwd", lambda k: k.enter_backward(xb, phi, b, a, hpre_b, pb, sqb, g_in, gpost, gres,
                                                                    *ca), enter_b_bwd, "fused"),
        Case("enter (collapsed)", "bwd", lambda k: k.enter_backward_collapsed(xb, phi, b, a, hpre_b, pb, sqb, g_in,
                                                                              gpost, gres, *ca, acc=acc_row),
             enter_c_bwd, "fused"),
        Case("enter (collapsed, acc rows)", "bwd",
             lambda k: k.enter_backward_collapsed(xb, phi, b, a, hpre_b, pb, sqb, g_in, gpost, gres, *ca, acc=dx),
             enter_c_rows_bwd, "fused"),
        Case("step (head)", "bwd", lambda k: k.step_backward(x, hr, hq, y, phi, b, a, hpre_s, ps, sqs, dx, g_in, gpost,
                                                             gres, *ca, collapse_dx=True), step_head_bwd, "fused"),
        Case("step (head, row)", "fwd", lambda k: k.step(xb, hr, hq, y, phi, b, a, *ca), step_row_fwd, "fused"),
        Case("step (head, row)", "bwd", lambda k: k.step_backward(xb, hr, hq, y, phi, b, a, hpre_s, ps, sqs, dx, g_in,
                                                                  gpost, gres, *ca, collapse_dx=True), step_row_bwd,
             "fused"),
        Case("head", "bwd", lambda k: k.proj_pre_backward_collapsed(xb, phi, dp, dsq, hpre_b, g_in, acc_row), head_bwd),
        Case("head (acc-rows)", "bwd", lambda k: k.proj_pre_backward_collapsed(xb, phi, dp, dsq, hpre_b, g_in, dx),
             head_acc_rows_bwd),
        Case("post_res (head)", "bwd", lambda k: k.post_res_backward(xb, hr, hq, y, dx, collapse_dx=True),
             head_post_res_bwd),
        Case("head (uncollapsed)", "bwd",
             lambda k: k.proj_pre_backward(xb, phi, dp, dsq, hpre_b, g_in, dx)[0].sum(-2, keepdim=True), head_rows_bwd),
        Case("tail", "fwd", lambda k: k.post_res_collapse(x, hr, hq, y, True), tail_fwd),
        Case("tail (uncollapsed)", "fwd", lambda k: k.post_res(x, hr, hq, y).mean(-2), tail_rows_fwd),
        Case("unfused step", "fwd", unfused_fwd, _stream_bytes(inp, cost.UNFUSED.forward)),
        Case("unfused step", "bwd", unfused_bwd, _stream_bytes(inp, cost.UNFUSED.backward)),
        # post_res_proj's Triton kernel, where the rows above run the Gluon one (DotCfg.ws: sm_90, bf16), alone and
        # inside step's forward
        Case("post_res_proj (Triton)", "fwd", _triton_prp(lambda k: k.post_res_proj(x, hr, hq, y, phi)),
             _nb(x, hr, hq, y, phi, x, p, sq)),
        Case("step (Triton)", "fwd", _triton_prp(lambda k: k.step(x, hr, hq, y, phi, b, a, *ca)), step_fwd, "fused"),
        # the three Triton passes, where the "step bwd" row runs two on sm_90 (StepBwdCfg.ws: kernels/gluon_step_bwd.py,
        # bf16, n <= 4)
        Case("step (three-pass)", "bwd", _three_pass(lambda k: k.step_backward(x, hr, hq, y, phi, b, a, hpre_s, ps,
                                                                             sqs, dx, g_in, gpost, gres, *ca)),
             step_bwd, "fused"),
        # enter's proj backward (dout, no acc): by device ("enter" bwd: the Gluon kernel on sm_90 but the Triton one on
        # an H100, triton_config.PROJ_BWD_BY_DEVICE), here each of the two
        Case("enter (Triton)", "bwd", _triton_proj(lambda k: k.enter_backward(x, phi, b, a, hpre_e, p, sq, g_in, gpost,
                                                                             gres, *ca)), enter_bwd, "fused"),
        Case("enter (Gluon)", "bwd", _gluon_enter(lambda k: k.enter_backward(x, phi, b, a, hpre_e, p, sq, g_in,
                                                                            gpost, gres, *ca)), enter_bwd, "fused"),
    ]
    return out


def _triton_proj(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with proj's one-pass backward as the Triton kernel everywhere (FusedBwdCfg.ws, ws_no_acc off)."""
    def run(k):
        with tk.tuning("proj_dx_dphi", ws=False, ws_no_acc=False):
            return call(k)
    return run


def _gluon_enter(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with proj's one-pass backward on the Gluon kernel for enter's call too (FusedBwdCfg.ws_enter, which an
    H100 turns off by default); elsewhere (the CPU, no sm_90) the same call."""
    def run(k):
        with tk.tuning("proj_dx_dphi", ws_enter=True):
            return call(k)
    return run


def _dx_hl(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with the Gluon proj backward's dx dot in bf16 on dp's hi / lo tile (FusedBwdCfg.ws_dx_hl, opt-in);
    elsewhere (the CPU, the Triton kernel) the same call."""
    def run(k):
        with tk.tuning("proj_dx_dphi", ws_dx_hl=True):
            return call(k)
    return run


def _triton_proj_fwd(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with proj's forward as the Triton kernel (DotCfg.ws off for "proj")."""
    def run(k):
        with tk.tuning("proj", ws=False):
            return call(k)
    return run


def _triton_prp(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with post_res_proj as the Triton kernel (DotCfg.ws off): triton_ops and triton_fused take it, the
    references ignore it."""
    def run(k):
        with tk.tuning("post_res_proj", ws=False):
            return call(k)
    return run


def _two_ops(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with BoundaryBwdCfg.ws off: boundary_backward as proj_pre_backward, then the post_res backward (the
    reference ignores it)."""
    def run(k):
        with tk.tuning("boundary_backward", ws=False):
            return call(k)
    return run


def _three_pass(call: Callable[[object], object]) -> Callable[[object], object]:
    """``call`` with triton_fused's StepBwdCfg.ws off: the step backward's three Triton passes (the reference
    ignores it)."""
    def run(k):
        with tf.tuning("step_bwd", ws=False):
            return call(k)
    return run


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
SMOKE = False  # --smoke: CPU + interpreter, tiny shapes, wall-clock timing; exercises this script only


def bench_us(fn: Callable[[], object], rep: int = 100) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    # GPU time, replayed from a CUDA graph: at 8192 tokens the Python wrappers (several launches each) can
    # take longer than their kernels, and do_bench would then time the host. Host cost is measured by the
    # whole training step (bench_training.py). Anything that cannot be captured falls back to do_bench.
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
    except Exception:
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    nbytes = min(nbytes, 1 << 20) if SMOKE else nbytes
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    if SMOKE:
        us = bench_us(lambda: dst.copy_(src))
    else:
        us = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median") * 1e3
    del src, dst
    return 2 * nbytes / (us * 1e-6)


class Compiled:
    """The reference module with every op under torch.compile (one compiled function per op)."""

    def __init__(self):
        names = ["proj", "proj_backward", "coeffs", "coeffs_backward", "pre", "pre_backward", "post_res",
                 "post_res_backward", "post_res_proj"]
        for name in names:
            setattr(self, name, torch.compile(getattr(ref, name), dynamic=False))


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------
def _rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    scale = e.double().abs().max().item() or 1.0
    return (a.double() - e.double()).abs().max().item() / scale


CHECK_SHAPES = [(4099, 4, 2048, torch.bfloat16), (37, 3, 33, torch.float32), (100, 16, 64, torch.float32),
                (1, 1, 5, torch.float16)]
SMOKE_SHAPES = [(37, 3, 33, torch.float32), (20, 4, 16, torch.bfloat16)]


def check_correctness(device: str, shapes=CHECK_SHAPES) -> tuple[set, list[str]]:
    """Every op against the reference; error = max |diff| / max |ref| per output (tf32 / bf16 budgets).

    Returns the (kernel, direction) pairs that failed anywhere, and the markdown rows.
    """
    lines, failed = [], set()
    for t, n, c, dtype in shapes:
        inp = make_inputs(t, n, c, dtype, device, seed=1)
        budget = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        ca = coeff_args(inp, "hc")
        hc = Case("coeffs", "fwd hc", lambda k: k.coeffs(inp["p"], inp["sq"], inp["bias"], inp["alpha"], *ca), 0)
        for case in cases(inp) + [hc]:
            label = f"| {case.kernel} {case.direction} | {t}x{n}x{c} {str(dtype)[6:]} |"
            try:
                got, want = _tuple(_call(case, tk)), _tuple(_call(case, ref))
            except Exception as exc:  # report and go on: the other kernels are still worth timing
                failed.add((case.kernel, case.direction))
                lines.append(f"{label} {type(exc).__name__}: {str(exc)[:160]} | FAIL |")
                print(lines[-1], flush=True)
                continue
            errs = [_rel_err(a, e) for a, e in zip(got, want)]
            shape_ok = all(a.shape == e.shape and a.dtype == e.dtype for a, e in zip(got, want))
            good = shape_ok and max(errs) <= budget
            if not good:
                failed.add((case.kernel, case.direction))
            lines.append(f"{label} {max(errs):.2e} | {'ok' if good else 'FAIL'} |")
            print(lines[-1], flush=True)
        del inp
    return failed, lines


# ---------------------------------------------------------------------------------------------
# tile sweep
# ---------------------------------------------------------------------------------------------
def _dots(*rows):
    """(bt, bk, warps, stages, waves) rows as DotCfg fields."""
    return [dict(bt=bt, bk=bk, num_warps=w, num_stages=st, waves=wv) for bt, bk, w, st, wv in rows]


def _streams(*rows):
    return [dict(budget=b, max_bc=bc, num_warps=w) for b, bc, w in rows]


# Alternatives to the shipped defaults, the most promising first (the sweep stops at its time budget).
SWEEP = {
    # proj: join_hi_lo=False first (a hi and a lo dot a step, the X tile read from shared memory twice: the default
    # before session 15, 143.9 against 132.1 us at 8192 x 7168)
    "proj": [dict(join_hi_lo=False)] + _dots((128, 128, 8, 3, 4), (64, 128, 4, 4, 8), (128, 64, 4, 4, 4),
                                             (32, 128, 4, 3, 4), (64, 64, 4, 4, 4), (128, 128, 4, 2, 2)),
    "proj_dx": _dots((16, 128, 4, 3, 16), (16, 256, 4, 3, 64), (16, 64, 4, 3, 64), (32, 128, 4, 3, 64),
                     (16, 128, 8, 3, 64)),
    "proj_dphi": _dots((64, 128, 8, 4, 2), (128, 128, 8, 3, 1), (64, 128, 4, 4, 4)),
    # bk = channels per chunk (BC). First the pointer build (tma=False, the kernel before session 14) side by side;
    # then TMA tiles whose sm_90a builds (Triton 3.6, no GPU) do not spill: 64 x 32 / 8 warps 120 registers,
    # 64 x 32 / 4 warps 2 stages 193 (60 KB of shared memory), 128 x 32 / 8 warps 194, against the default's 192
    # (session 14 call 4: 776 us against 961 for the pointer build, the others 891-1298). Then register caps for
    # more programs an SM: 2 stages at 168 registers (24 bytes spilled, 60 KB: three programs), 3 stages at 168
    # (call 5: 60-70 %). tma_store=True: X' by TMA stores too (the default until call 8, 0.1-1.4 % slower: it
    # waits for each store's shared-memory read before the next stream's X' takes the one store buffer)
    # join_hi_lo=False: a hi and a lo dot a stream, 8 dots and 8 waits a chunk (the default before session 15,
    # whose one m64n64k32 dot against phi's [hi | lo] tile ran 743.8 against 767.7 us at 32768 x 4096)
    # bt=32 (session 15; timed in session 20: 784-816 us, 70-73 %): below wgmma's 64 rows Triton takes mma v2,
    # whose A operand comes from registers (no shared-memory hand-off, no dot waits); sm_90a build 128 registers,
    # no spills, 54 KB of shared memory: four 4-warp programs an SM, twice the warps of the default; phi is read
    # from L2 twice as often
    # one_dot (session 19): the chunk's four X' tiles in one transposed dot, both operands in shared memory; 10
    # barriers a chunk against 22 in the sm_90a build. Session 20 (H200, 32768 x 4096): one_dot 739-749 us against
    # the default's 742-751 in four runs, with tma_store 743-749; bk=64 at 8 warps (128-byte TMA rows, one program
    # an SM) 1046-1064; warp_specialize (tl.range's automatic warp specialization, Triton 3.6) 1221-1267 us and
    # NaN outputs in two of its three builds, removed; sq_tile (sq reduced once after the loop) 737-742 us and sq
    # 2.3e-3 away from the default's on the GPU (the interpreter agreed to 1e-6), removed (session20 results)
    # The Triton kernel's tiles (ws=False), beside the default, which is the Gluon kernel on sm_90 since session 27
    "post_res_proj": [dict(ws=False, **tile) for tile in (
        dict(), dict(one_dot=True), dict(one_dot=True, tma_store=True),
        dict(bk=64, num_warps=8, per_thread=64, one_dot=True),
        dict(bt=32, bk=32, occupancy=4), dict(tma=False), dict(join_hi_lo=False),
        dict(tma_store=True, join_hi_lo=False),
        dict(num_stages=2, maxnreg=168, occupancy=3),
        dict(maxnreg=168),
        dict(num_warps=8), dict(bt=128, bk=32, num_warps=8, num_stages=3, per_thread=64))],
    # the default is the 2-D kernel (PostResBwdCfg.two_d), one token a program, 1024 channels x 4 warps; then
    # 512 x 4 and 1024 x 8 (sm_90a builds: 137 / 95 / 99 registers), then the [BT, NP, BC] kernel at its old
    # default and with 1- and 2-warp programs, which reduce with fewer barriers (none faster on an H200, session 7)
    "post_res_backward": [dict(budget=2048, max_bc=512), dict(num_warps=8), dict(two_d=False)]
    + [dict(cfg, two_d=False) for cfg in _streams((1024, 256, 1), (2048, 512, 2), (8192, 1024, 8))],
    "pre_backward": _streams((4096, 1024, 4), (2048, 256, 4), (8192, 256, 8)),
    "post_res": _streams((2048, 512, 4), (8192, 1024, 8), (4096, 2048, 8)),
    "pre": _streams((2048, 512, 4), (8192, 2048, 8), (2048, 1024, 4)),
    "coeffs": [dict(budget=b, num_warps=w) for b, w in [(512, 2), (2048, 4), (256, 1)]],
    # segments=1: the Sinkhorn backward walked back from m0 alone (the kernel before the checkpoints); smaller
    # budgets: fewer tokens a warp, more warps an SM to hide the latency of its chain of dependent steps
    "coeffs_backward": [dict(segments=1), dict(budget=64), dict(budget=128), dict(budget=512, num_warps=2)],
}
_SWEEP_CASE = {"proj_dx": ("proj_pre_backward", "bwd"), "proj": ("proj", "fwd"), "proj_dphi": ("proj", "bwd"),
               "coeffs": ("coeffs", "fwd"), "coeffs_backward": ("coeffs", "bwd"),
               "pre": ("pre", "fwd"), "pre_backward": ("pre", "bwd"), "post_res": ("post_res", "fwd"),
               "post_res_backward": ("post_res", "bwd"), "post_res_proj": ("post_res_proj", "fwd")}


def sweep(inp: dict, copy_bw: float, deadline: float, skip: set, only=None) -> tuple[list[str], dict]:
    """Time each kernel's default tile and the SWEEP alternatives; returns rows and the fastest correct config.

    Round-robin over kernels (every default, then every kernel's first alternative, ...), so a time budget
    that runs out still leaves each kernel compared with something.
    """
    lines, fastest = [], {}
    by_name = {(c.kernel, c.direction): c for c in cases(inp)}
    kernels = [k for k in SWEEP if _SWEEP_CASE[k] not in skip and (only is None or k in only)]
    want = {k: _tuple(by_name[_SWEEP_CASE[k]].call(tk)) for k in kernels}
    for rank in range(1 + max(len(v) for v in SWEEP.values())):
        for kernel in kernels:
            if rank > len(SWEEP[kernel]):
                continue
            cfg = {} if rank == 0 else SWEEP[kernel][rank - 1]  # {} = the shipped default
            if time.time() > deadline:
                lines.append("| (sweep stopped: time budget) | | | | |")
                print(lines[-1], flush=True)
                return lines, {k: v[1] for k, v in fastest.items() if v[1]}
            case = by_name[_SWEEP_CASE[kernel]]
            try:
                with tk.tuning(kernel, **cfg):
                    err = max(_rel_err(a, e) for a, e in zip(_tuple(case.call(tk)), want[kernel]))
                    us = bench_us(lambda: case.call(tk), rep=50)
            except Exception as exc:  # a config that does not compile or fit
                lines.append(f"| {kernel} | {cfg or 'default'} | {type(exc).__name__}: {str(exc)[:80]} | | |")
                print(lines[-1], flush=True)
                continue
            eff = case.nbytes / (us * 1e-6) / copy_bw
            lines.append(f"| {kernel} | {cfg or 'default'} | {us:.1f} | {100 * eff:.0f}% | {err:.1e} |")
            print(lines[-1], flush=True)
            if err < 1e-2 and (kernel not in fastest or us < fastest[kernel][0]):
                fastest[kernel] = (us, cfg)
    return lines, {k: v[1] for k, v in fastest.items() if v[1]}


# triton_fused's tiles (its own config dict): each kernel timed through the op that runs it (step's backward).
FUSED_SWEEP = {
    "dh_pre": [dict(bt=4, bc=256), dict(bt=1, bc=1024), dict(bt=4, bc=512, num_warps=8)],
}
_FUSED_SWEEP_CASE = {"dh_pre": ("step", "bwd")}


def sweep_fused(inp: dict, copy_bw: float, deadline: float) -> tuple[list[str], dict]:
    """Each triton_fused kernel's default, then its alternatives (each winner kept while the next kernel is
    swept, since fwd and bwd are timed through whole ops). Returns rows and the winners."""
    lines, best = [], {}
    by_name = {(c.kernel, c.direction): c for c in cases(inp)}
    for kernel, alternatives in FUSED_SWEEP.items():
        case = by_name[_FUSED_SWEEP_CASE[kernel]]
        want = _tuple(_call(case, ref))
        fastest = None
        for cfg in [{}] + alternatives:
            if time.time() > deadline:
                lines.append("| (fused sweep stopped: time budget) | | | | |")
                break
            tf.configure(kernel, **cfg)
            try:
                err = max(_rel_err(a, e) for a, e in zip(_tuple(_call(case, tk)), want))
                us = bench_us(lambda: _call(case, tk), rep=50)
            except Exception as exc:  # a tile that does not compile or fit
                lines.append(f"| fused {kernel} | {cfg or 'default'} | {type(exc).__name__}: {str(exc)[:80]} | | |")
                print(lines[-1], flush=True)
                continue
            finally:
                tf.configure(kernel)
            lines.append(f"| fused {kernel} | {cfg or 'default'} | {us:.1f} | "
                         f"{100 * case.nbytes / (us * 1e-6) / copy_bw:.0f}% | {err:.1e} |")
            print(lines[-1], flush=True)
            if err < 2e-2 and (fastest is None or us < fastest[0]):
                fastest = (us, cfg)
        if fastest and fastest[1]:
            best[kernel] = fastest[1]
            tf.configure(kernel, **fastest[1])
    return lines, best


def _tuple(v):
    return v if isinstance(v, tuple) else (v,)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--channels", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--compiled-shapes", nargs="*", default=None,
                    help="TxC shapes at which to time torch.compile(reference) (default: all)")
    ap.add_argument("--sweep", action="store_true", help="tile sweep at T=8192, C=4096 before the table")
    ap.add_argument("--sweep-shape", default="8192x4096", help="TxC of the sweep")
    ap.add_argument("--sweep-kernels", nargs="*", default=None,
                    help="sweep only these SWEEP entries ('fused' for triton_fused's tiles; default: all)")
    ap.add_argument("--cases", nargs="*", default=None,
                    help="time only the table rows whose kernel name is one of these (default: all)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=330, help="stop optional stages past this wall time")
    ap.add_argument("--sweep-budget-s", type=float, default=70, help="seconds the sweep may take")
    return ap.parse_args()


def write(out_dir: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    args = parse_args()
    start = time.time()
    deadline = start + args.budget_s
    global SMOKE
    SMOKE = args.smoke
    if not SMOKE and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (or --smoke under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    device = "cpu" if SMOKE else "cuda"
    env_name = "cpu (smoke run: interpreter, timings meaningless)" if SMOKE else torch.cuda.get_device_name()
    out_dir = os.environ.get("OUT") or "./bench_out"
    os.makedirs(out_dir, exist_ok=True)
    env = [f"- device: {env_name}", f"- torch {torch.__version__}, triton {triton.__version__}",
           f"- n = {args.n}, bf16 stream, fp32 coefficients, Sinkhorn iters = {N_ITERS}"]

    # correctness first on the benchmark's own configuration (its compiled kernels are the ones timed);
    # the other shapes (n = 1, 3, 16, fp16 / fp32) after the table, to spend the compile time last
    shapes = SMOKE_SHAPES if SMOKE else CHECK_SHAPES
    failed, lines = check_correctness(device, shapes[:1])
    check = ["| op | shape | max err / max ref | |", "|---|---|---|---|"] + lines
    write(out_dir, "correctness.md", check)
    if failed:
        print(f"correctness FAILED for {sorted(failed)}: those are not timed", file=sys.stderr, flush=True)

    copy_bw = copy_bandwidth(device)
    env.append(f"- copy bandwidth (2 GiB bf16 device-to-device, read + write): {copy_bw / 1e9:.0f} GB/s")
    print("\n".join(env), flush=True)
    write(out_dir, "env.md", env)

    if args.sweep:
        st, sc = (int(v) for v in args.sweep_shape.split("x"))
        inp = make_inputs(st, args.n, sc, torch.bfloat16, device)
        sw = ["| kernel | config | time us | eff | err vs default |", "|---|---|---|---|---|"]
        rows, best = sweep(inp, copy_bw, time.time() + args.sweep_budget_s, failed, args.sweep_kernels)
        write(out_dir, "sweep.md", sw + rows)
        for kernel, cfg in best.items():  # time the table with the sweep winners, and say so
            tk.configure(kernel, **cfg)
        frows, fbest = [], {}
        if args.sweep_kernels is None or "fused" in args.sweep_kernels:  # keeps its winners set
            frows, fbest = sweep_fused(inp, copy_bw, time.time() + args.sweep_budget_s)
        write(out_dir, "sweep.md", sw + rows + frows)
        env.append(f"- tiles: defaults, except sweep winners at {args.sweep_shape}: {best or 'none'}; "
                   f"triton_fused: {fbest or 'none'}")
        write(out_dir, "env.md", env)
        del inp

    # the SM clock while each Triton row is timed: kernels bound by latency or tensor-core work slow when the GPU
    # reaches its power cap mid-table (session19 results, section 2); empty without nvidia-smi
    table = ["| kernel | dir | T | C | triton us | bytes MB | GB/s | eff | eager us | SM clock (triton) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in args.tokens:
        for c in args.channels:
            inp = make_inputs(t, args.n, c, torch.bfloat16, device)
            for case in cases(inp):
                if (case.kernel, case.direction) in failed or (args.cases is not None and case.kernel not in args.cases):
                    continue
                try:
                    with ClockLog() as clocks:
                        us = bench_us(lambda: _call(case, tk))
                    eager = bench_us(lambda: _call(case, ref))
                except Exception as exc:
                    print(f"{case.kernel} {case.direction} {t}x{c}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                gbs = case.nbytes / (us * 1e-6) / 1e9
                eff = case.nbytes / (us * 1e-6) / copy_bw
                table.append(f"| {case.kernel} | {case.direction} | {t} | {c} | {us:.1f} | {case.nbytes / 1e6:.1f} | "
                             f"{gbs:.0f} | {100 * eff:.1f}% | {eager:.1f} | {describe_clocks(clocks.summary())} |")
                print(table[-1], flush=True)
                write(out_dir, "kernels.md", env + [""] + table)
            del inp
            torch.cuda.empty_cache()

    for shape in shapes[1:]:
        if time.time() > deadline:
            check.append(f"| (stopped: time budget before {shape[:3]}) | | | |")
            break
        more_failed, more = check_correctness(device, [shape])
        failed |= more_failed
        check += more
        write(out_dir, "correctness.md", check)

    shapes = args.compiled_shapes if args.compiled_shapes is not None else [
        f"{t}x{c}" for t in args.tokens for c in args.channels]
    comp = ["| kernel | dir | T | C | triton us | compiled ref us | eager ref us |", "|---|---|---|---|---|---|---|"]
    compiled = Compiled()
    order = ["pre", "post_res", "proj", "post_res_proj", "coeffs"]  # cheapest compiles first
    for shape in shapes:
        t, c = (int(v) for v in shape.split("x"))
        inp = make_inputs(t, args.n, c, torch.bfloat16, device)
        for case in sorted((cs for cs in cases(inp) if cs.kernel in order), key=lambda cs: order.index(cs.kernel)):
            if time.time() > deadline:
                comp.append(f"| (stopped: time budget) | | {t} | {c} | | | |")
                write(out_dir, "compiled.md", comp)
                break
            if (case.kernel, case.direction) in failed:
                continue
            try:
                us, eager = bench_us(lambda: case.call(tk)), bench_us(lambda: case.call(ref))
                compiled_us = bench_us(lambda: case.call(compiled))
            except Exception as exc:
                print(f"compiled {case.kernel} {case.direction}: {type(exc).__name__}: {exc}", flush=True)
                continue
            comp.append(f"| {case.kernel} | {case.direction} | {t} | {c} | {us:.1f} | {compiled_us:.1f} | {eager:.1f} |")
            print(comp[-1], flush=True)
            write(out_dir, "compiled.md", comp)
        del inp
    print(f"done in {time.time() - start:.0f} s; results in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
