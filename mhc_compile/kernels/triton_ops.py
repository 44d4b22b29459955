"""Triton kernels of the mHC ops, one function per op of ``kernels/reference.py`` with the same signature.

All streams are contiguous and token-major: x [T, n, C], y [T, C], coefficients [T, n] / [T, n, n] fp32. The
one exception is a stream input x broadcast over n (a chain's head; ``_stream_arg``): the kernels that read x take
it as its [T, C] rows under the X_BCAST constexpr, and write their outputs dense.
Conventions shared by every kernel:

* ``T`` (tokens) is a runtime argument and is excluded from Triton's value specialisation
  (``do_not_specialize``), so a new batch or sequence length reuses the compiled kernel. ``n`` is a
  constexpr (loops over streams unroll), ``C`` a runtime argument (Triton still specialises it on
  divisibility by 16, which is what lets loads along C vectorise).
* The stream stays in its dtype (bf16 / fp16 / fp32, fp64 for tests); everything is accumulated in fp32
  (fp64 when the stream is fp64), matching ``reference.acc_dtype``.
* Stream offsets are computed in int64: T * n * C exceeds 2^31 at long contexts.
* Reductions over T (dphi, dbias, dalpha) and split-K reductions write per-program partials that are then
  summed with ``torch.sum``: deterministic, no atomics.
* The projections use ``tl.dot``. A bf16 stream enters the tensor cores as loaded (post_res_proj: X' as
  rounded to bf16 in registers), and the fp32 operand (phi in proj and post_res_proj; dp in dphi = X^T dp) is
  split into bf16 hi + lo halves, two dots: X is exact and the fp32 operand keeps ~16 mantissa bits, a
  relative error of about 2^-17 per product. Where the stream is not the other operand (dx's dp @ phi^T)
  and for fp16 streams, the operands are fp32 multiplied in tf32 (10 mantissa bits, about 2^-11 per
  product). fp32 / fp64 streams use exact ("ieee") products.

Kernels are launched directly rather than through ``torch.library.triton_op``, so the same code runs under
``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests exercise it. Every launch goes through
kernels/launch.py: ``kernel[grid](...)`` the first time a call signature is seen, its compiled kernel's launcher
after that (Triton's per-call binding and cache lookup cost more host time than these kernels' GPU time at small
widths).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.errors import TritonError
from triton.runtime.errors import OutOfResources

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.tma import descriptor, tma_ok

_STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_MODES = {"mhc": 0, "hc": 1}


# ---------------------------------------------------------------------------------------------
# launch helpers and configuration
# ---------------------------------------------------------------------------------------------
# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in
# recent Triton, ~2 us a call through their wrapper, and every launch of a training step computes several.
def _pow2(v: int) -> int:
    """The least power of two >= v (1 for v <= 1)."""
    return 1 << (max(int(v), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lead_of(x: Tensor, trailing: int) -> tuple[torch.Size, int]:
    """(x's leading dims before its ``trailing`` ones, their product: the token count T).

    The wrappers take tensors with whatever leading dims the graph has ([B, S, n, C], [T, n, C] ...) and allocate
    their outputs with the same ones: the kernels only need T and contiguous memory, and a view a tensor costs
    a dispatcher call of host time (~2-4 us on the GPU machine's CPU, several a call)."""
    if x.dim() < trailing:
        raise ValueError(f"mhc triton: expected a tensor with {trailing} trailing dims after its token dims, got "
                         f"shape {tuple(x.shape)}")
    lead = x.shape[: x.dim() - trailing]
    return lead, math.prod(lead)


def _stream_dims(x: Tensor) -> tuple[torch.Size, int, int, int]:
    """(leading dims, T, n, C) of a stream tensor [..., n, C]."""
    lead, t = _lead_of(x, 2)
    n, c = x.shape[-2:]
    return lead, t, n, c


def _stream_arg(x: Tensor) -> tuple[Tensor, bool]:
    """(the stream x as a kernel reads it, whether it is broadcast). A chain's head stream is its embedding expanded
    over the n streams (passes/rewrite.py): stride 0 along n over dense [..., C] rows. The kernels given X_BCAST read
    that one row a token (offset token * C + c for every stream) instead of n copies that a ``.contiguous()`` would
    write first. Any other x is made contiguous."""
    if x.shape[-2] > 1 and x.stride(-2) == 0 and x.select(-2, 0).is_contiguous():
        return x, True
    return x.contiguous(), False


def _check_stream(op: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype not in _STREAM_DTYPES:
            raise TypeError(
                f"mhc triton {op}: unsupported dtype {t.dtype}; expected one of "
                f"{', '.join(str(d) for d in _STREAM_DTYPES)}"
            )


@functools.lru_cache(maxsize=None)  # a few dtype combinations, asked for at every launch
def _acc_torch(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, ref.acc_dtype(d))
    return out


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(stream_dtype: torch.dtype) -> str:
    """tf32 tensor cores for half-precision streams (exact on their values), exact products otherwise."""
    return "tf32" if stream_dtype in (torch.bfloat16, torch.float16) else "ieee"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: keep grids tiny


@dataclass(frozen=True)
class StreamCfg:
    """Tile of the elementwise / per-token-reduction kernels: BT tokens x NP streams x BC channels."""

    budget: int = 4096  # elements of one [BT, NP, BC] tile; bounds registers per program
    max_bc: int = 1024
    num_warps: int = 4


@dataclass(frozen=True)
class PostResBwdCfg(StreamCfg):
    """post_res_backward's tile, and which of its two kernels runs.

    ``two_d`` (the default; used for n <= 4 and tiles of >= 8 channels): _post_res_bwd_2d_kernel. It loads dout as
    n [BT, BC] tiles in the layout of x and y, so no tile changes layout. dy and dx are sums over that tuple, with
    no reduction. dh_post and dh_res accumulate as per-thread partials of 8 adjacent channels, reduced across
    threads once after the loop. ``two_d=False`` (and n > 4) takes _post_res_bwd_kernel, which loads dout as one
    [BT, NP, BC] tile: its loop takes 10 layout conversions a chunk and reduces dh_post and dh_res across threads
    in every chunk (session 8's note).

    What the sm_90a builds show (Triton 3.9 on a CPU, n = 4, C = 7168, one token x 1024 channels, 4 warps):

    | kernel | layout conversions in the loop | cross-thread reductions in the loop | registers |
    |---|---|---|---|
    | 2-D | 0 (its 20 reductions stay within a thread) | none | 137 |
    | _post_res_bwd_kernel | 10 | yes | 128 |

    Neither build spills. Timed on an H200 (Triton 3.6, session 10,
    benchmarks/results/sweep-2026-12-02-h200-s10-call1.md): 881 against 904 us at 32768 x 4096 (100 against 98 %
    of copy bandwidth); in the d = 7168 training step +8.1 against +8.4 % over the residual model (medians of 3
    rounds, training-2026-12-02-h200-s10-call1.md)."""

    two_d: bool = True


@dataclass(frozen=True)
class CoeffsBwdCfg(StreamCfg):
    """coeffs_backward's tile (BT = budget / NP^2 tokens a program), and how its Sinkhorn backward walks back:
    ``segments`` = 4 from three register checkpoints (the default), 1 from m0 alone (``_sinkhorn_backward``)."""

    segments: int = 4


@dataclass(frozen=True)
class DotCfg:
    """Tile of the tensor-core kernels (proj, its backward, the fused post_res + proj)."""

    bt: int = 64
    bk: int = 128  # proj and its backward: K (= n*C) per step; post_res_proj: channels per chunk (BC)
    bm: int = 64  # max columns of p per program (proj; post_res_proj has no column blocks)
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 4  # aim for this many programs per SM by splitting the long reduction
    per_thread: int = 32  # post_res_proj only: elements a thread of its n input tiles, accumulator or phi tile
    tma: bool = True  # post_res_proj only: X, y, X' and phi's halves as TMA descriptor blocks where allowed
    tma_store: bool = False  # post_res_proj only, with tma: X' leaves by TMA stores (else by pointer stores)
    # proj and post_res_proj (with tma), bf16 hi/lo: one dot against phi's interleaved [hi | lo] tile instead of a
    # hi and a lo dot, so the X tile is read from shared memory once per chunk, not twice
    join_hi_lo: bool = False
    occupancy: int = 1  # post_res_proj only: programs an SM that its channel-split planner assumes
    # post_res_proj only, with tma and join_hi_lo, n in {1, 2, 4} and n*BC <= 256 (a TMA box side): the n streams'
    # X' chunks enter one dot of K = n*BC against phi's rows reordered (row c*n + i holds phi[i*C + c], written so
    # by the hi / lo split), transposed so that both operands come from shared memory. In the sm_90a build
    # (benchmarks/post_res_proj_build.py) a chunk's eight wgmmas take one wait instead of eight, its phi tile one
    # TMA load instead of four and the loop 10 barriers instead of 22, for 104 KB of shared memory against 92. On an
    # H200 (session 20, four runs at 32768 x 4096) it ran 0.2-0.5 % faster than the default, within run-to-run
    # spread: the kernel waits on its TMA loads, not on its dots (session20 results), so it stays opt-in
    one_dot: bool = False
    maxnreg: int | None = None  # post_res_proj only, GPU: caps registers a thread (ptxas spills past it)
    # post_res_proj only, bf16 on sm_90: the warp-specialized Gluon kernel (kernels/gluon_post_res_proj.py). A loader
    # warp fills a ring of ws_stages slots of ws_subs adjacent chunks, read as TMA boxes of ws_box channels a row
    # (0: BC), and a ring of ws_wstages phi slots (0: as many as fit), while ws_consumers compute warpgroups take
    # each slot's chunks in turn (one where C's chunks do not split evenly), mix and project. H200, session 22,
    # interleaved in two runs at 32768 x 4096: 720.9-722.7 us with two warpgroups, 735.0-744.2 with one, 753.2-754.3
    # for the Triton kernel (79, 77, 75 % of copy bandwidth); 32768 x 7168: 1258.7-1262.5, 1315.7-1323.2,
    # 1318.1-1321.2. At 8192 tokens one and two ran within 2 % of each other. ws_regs: registers a thread of the
    # second warpgroup. The default since session 27: faster than the Triton kernel in every run since session 21 and
    # at every shape of the kernel tables of sessions 24 and 27 (C = 2048 to 7168, 8192 and 32768 tokens), alone
    # (79-80 vs 75-77 % at 32768 x 4096, 73-75 vs 68-71 % at 8192 x 4096) and inside step's forward (84-86 vs 82-84 %
    # at 32768 x 4096; session27-2026-12-04-h200.md). It runs only where post_res_proj runs: the fused
    # boundary (fuse=True, fold_post_res_proj), both opt-in
    ws: bool = True
    ws_subs: int = 2
    ws_box: int = 64
    ws_stages: int = 0
    ws_wstages: int = 0
    ws_consumers: int = 2
    ws_regs: int = 232

    def __post_init__(self):  # configure / tuning build configs through replace(), so a bad field fails there
        if self.ws_consumers not in (1, 2):
            raise ValueError(f"mhc DotCfg: ws_consumers={self.ws_consumers}; the Gluon post_res_proj runs 1 or 2 "
                             "compute warpgroups")


@dataclass(frozen=True)
class FusedBwdCfg:
    """Tile and launch of proj's one-pass backward (kernels/triton_proj_bwd.py) for bf16 streams; ``enabled``
    False falls back to the dx + dphi kernel pair below (the side-by-side baseline)."""

    enabled: bool = True
    bt: int = 64
    bk: int = 128
    num_warps: int = 8
    num_stages: int = 2
    maxnreg: int | None = 128  # GPU only: caps registers so two programs fit an SM (ptxas spills past it)
    occupancy: int = 2  # programs an SM that the token-split planner assumes
    waves: float = 16.0  # most programs an SM the token-split planner considers
    # the kernel's PIPELINE_ALL: dout and acc staged through shared memory like the dots' operands. H200: 478 vs
    # 592 us at 8192 x 7168 (76 vs 61 % of copy bandwidth), 1819 vs 2197 at 32768 x 7168 (session8 results)
    pipeline_all: bool = True
    # X, dout, acc and dX as [BT, BK] blocks through TMA descriptors (kernels/triton_proj_bwd.py): each lands in
    # a swizzled shared-memory tile and dX leaves from one, instead of cp.async copies into unswizzled tiles and a
    # register layout change before the store. H200 (session11 results): 971 vs 996 us at 32768 x 4096 (85 vs
    # 83 % of copy bandwidth), 468 vs 495 at 8192 x 7168; in the d = 7168 step 524 vs 556 us a call
    tma: bool = True
    # bf16 on sm_90: the warp-specialized Gluon kernel (kernels/gluon_proj_bwd.py): a TMA loader warp with a ring of
    # three or four slots, dx warpgroups (each a half of every tile, or one both) and a dphi warpgroup. H200, session
    # 26 (benchmarks/results/session26-2026-12-04-h200.md), beside this Triton kernel in the same run, the op as called:
    # - without acc (enter's backward, proj_backward) it is faster or equal in every run: 678-730 vs 795-837 us at
    #   32768 x 4096 (77-84 vs 68-72 % of copy bandwidth), 177-180 vs 205-211 at 8192 x 4096, 0-6 % at C = 7168; in
    #   the kernel table proj bwd 85 vs 73 %, enter bwd 85 vs 77 %;
    # - with acc (the default path's folded boundary) the two traded places in session 26 (958-966 vs 949-953 us at
    #   32768 x 4096 in one run, 955-979 vs 1001-1010 in another, 978 vs 988 in the kernel table; 238-244 vs 246-260
    #   at 8192 x 4096 in all three). Session 27 (session27-2026-12-04-h200.md), dphi's hi + lo paired in registers:
    #   923-963 vs 996-1000 us at 32768 x 4096, 234-237 vs 256 at 8192 x 4096, 447-452 vs 481-482 at 8192 x 7168,
    #   1828-1844 vs 1817-1818 at 32768 x 7168; the d = 2048 step (host-bound) +24.5 % vs +25.4 %, d = 4096 equal.
    # ws: the Gluon kernel for every call it supports (the default since session 27); ws False with ws_no_acc: only
    # for the calls without acc; both False: the Triton kernel everywhere
    ws: bool = True
    ws_no_acc: bool = True
    # dx warpgroups: None = two with acc, one without. Which is faster changed between runs (without acc at 32768 x
    # 4096: one 678 vs two 714 us in session 26's call 2, 730 vs 690 in its call 4, 716 vs 681-688 in session 27's
    # call 1; with acc the other way round in those three), so this is no tuned choice
    ws_mixers: int | None = None

    def __post_init__(self):
        if self.ws_mixers not in (None, 1, 2):
            raise ValueError(f"mhc FusedBwdCfg: ws_mixers={self.ws_mixers}; the Gluon proj backward runs 1 or 2 dx "
                             "warpgroups (None: two with acc, one without)")

    def gluon_for(self, has_acc: bool) -> int:
        """The Gluon kernel's dx warpgroups for a call with or without acc, 0 where this config keeps the Triton
        kernel (whether the call can run on the Gluon kernel is gluon_proj_bwd.supported's to say)."""
        if not (self.ws or (self.ws_no_acc and not has_acc)):
            return 0
        return self.ws_mixers or (2 if has_acc else 1)


# Defaults = the fastest tiles of the sweep in benchmarks/bench_kernels.py on an H100 (T=8192, C=4096, n=4,
# bf16; benchmarks/results/kernels-2026-11-23-h100.md). Full-width C (1024) won for the backward kernels too.
_DEFAULTS = {
    "pre": StreamCfg(budget=2048),
    "pre_backward": StreamCfg(),
    "pre_backward_dh": StreamCfg(),  # untuned: pre_backward's tile (one stream-sized write fewer)
    "post_res": StreamCfg(),
    "post_res_backward": PostResBwdCfg(),
    # hi/lo bf16 dots: the fastest tile at 8192 and 32768 tokens (benchmarks/results/lab-2026-11-24-h100.md);
    # one program an SM (three stages of its tiles take 144 KB of shared memory); K splits: _filling_splits
    # Session 15: join_hi_lo (one dot a step against phi's [hi | lo] columns, the X tile read from shared memory
    # once): 132.1 against 143.9 us at 8192 x 7168 (84 against 78 %), 258.2 us (98 %) at 32768 x 4096 against
    # 269.8 in session 11 (kernels-2026-12-03-h200-s15-call2.md)
    "proj": DotCfg(bt=128, bk=128, num_warps=8, num_stages=3, waves=4, join_hi_lo=True),
    # one tile per program (waves = 64 leaves no token loop: its loads are not pipelined); the lab's fastest
    # tiles at 8192 and 32768 tokens
    "proj_dx": DotCfg(bt=16, bk=128, num_warps=4, num_stages=3, waves=64),
    "proj_dphi": DotCfg(bt=64, bk=128, num_warps=4, num_stages=3, waves=2),
    # the fastest tile of benchmarks/lab_dx_dphi.py on an H200 (lab-dx-dphi-2026-12-02-h200.md)
    "proj_dx_dphi": FusedBwdCfg(),
    # BT = 128 tokens (phi's L2 reads per stream byte halve against 64), BC = 16 channels per chunk so the n = 4
    # input tiles stay within 8 elements per thread (128 registers, no spills in the sm_90 compile); bk and bt
    # are upper bounds that _post_res_proj_tile shrinks as n grows. H100: 56-63 % of copy bandwidth, slower
    # than post_res + proj apart (benchmarks/results/session5-2026-11-24-h100.md). H200 sweep at 32768 x 4096
    # (session12 results): 64 x 32 / 4 warps with the budget raised to 128 elements a thread (245 registers, no
    # spills in the sm_90a build) took 981.8 against 1097.1 us for 128 x 16 / 8 warps (58 against 53 %)
    # Session 14: TMA (192 registers, 96 KB of shared memory: two programs an SM); channel splits that fill whole
    # waves of those two slots (at 8192 tokens, 128 token blocks: 2 splits, where waves alone gave 3 = 1.45
    # waves). H200, 8192 x 7168: 357 us (70 %) against 465 with 3 splits; the same splits in the pointer build
    # 450 against 495 (post-res-proj-tma-...-s14-call4/5.md). A 168-register cap lost at 32768 x 4096 and
    # 8192 x 7168 (808 vs 776, 377 vs 357 us); call 5's 291 us at 8192 x 4096 did not repeat (216 in call 8).
    # Session 15: join_hi_lo (one m64n64k32 dot a stream against phi's [hi | lo] tile, 4 dots and 4 waits a chunk
    # instead of 8): 743.8 against 767.7 us at 32768 x 4096 in one sweep (boundary-...-s15-call1.md).
    "post_res_proj": DotCfg(bt=64, bk=32, num_warps=4, num_stages=3, waves=2, per_thread=128, occupancy=2,
                            join_hi_lo=True),
    # the sweep winner at 8192 x 4096 (kernels-2026-11-24-h100.md: 43.8 us against 92 us for budget 1024)
    "coeffs": StreamCfg(budget=256, num_warps=1),
    "coeffs_backward": CoeffsBwdCfg(budget=256, num_warps=1),
}
_OVERRIDES: dict[str, object] = {}


def _cfg(kernel: str):
    return _OVERRIDES.get(kernel, _DEFAULTS[kernel])


def configure(kernel: str, **fields) -> None:
    """Change one kernel's tile configuration for the rest of the process (e.g. to a benchmark's winner)."""
    _OVERRIDES[kernel] = replace(_DEFAULTS[kernel], **fields)


@contextlib.contextmanager
def overriding(overrides: dict, defaults: dict, kernel: str, fields: dict):
    """``overrides[kernel]`` = ``defaults[kernel]`` with ``fields`` replaced, for the duration of a with block, then
    whatever was there before; the ``tuning`` of this module and of triton_fused. Not thread-safe."""
    old = overrides.get(kernel)
    overrides[kernel] = replace(defaults[kernel], **fields)
    try:
        yield
    finally:
        if old is None:
            overrides.pop(kernel, None)
        else:
            overrides[kernel] = old


def tuning(kernel: str, **fields):
    """Temporarily change one kernel's tile configuration (benchmark sweeps): a context manager."""
    return overriding(_OVERRIDES, _DEFAULTS, kernel, fields)


def _stream_tile(kernel: str, t: int, c: int, np_: int) -> tuple[int, int, int]:
    """(BT, BC, num_warps): wide along C for vector loads, extra tokens only when C is small."""
    return _stream_tile_of(_cfg(kernel), t, c, np_)


@functools.lru_cache(maxsize=4096)  # every launch asks again with the same few shapes
def _stream_tile_of(cfg: StreamCfg, t: int, c: int, np_: int) -> tuple[int, int, int]:
    bc = min(_pow2(c), cfg.max_bc, max(16, cfg.budget // np_))
    bt = max(1, min(_pow2(t), cfg.budget // (np_ * bc)))
    return bt, bc, cfg.num_warps


def _splits(cfg: DotCfg, device: torch.device, programs: int, steps: int, min_steps: int = 4) -> int:
    """How many ways to split a reduction of ``steps`` tiles so the grid fills ``cfg.waves`` per SM."""
    want = _cdiv(cfg.waves * _num_sms(device), max(programs, 1))
    return max(1, min(want, steps // min_steps))


def _wave_efficiency(programs: int, slots: int) -> float:
    """Fraction of the SM slots busy over the grid's waves (equal programs, ``slots`` resident at a time)."""
    return programs / (_cdiv(programs, slots) * slots)


def _filling_splits(cfg: DotCfg, device: torch.device, programs: int, steps: int, occupancy: int = 1,
                    min_steps: int = 4) -> int:
    """The split count of a reduction of ``steps`` tiles, among those that leave each program >= ``min_steps``
    tiles and the grid <= ``cfg.waves`` programs an SM, whose grid keeps the most SM slots busy over its waves
    (``occupancy`` programs resident an SM); ties go to fewer splits (longer loops, fewer partials).

    A grid sized by waves alone can end in a nearly empty wave: proj at 8192 tokens has 64 token blocks, and
    "one program an SM" gave 3 splits = 192 programs = 1.45 waves on 132 SMs, 73 % of the slots busy
    (profile_step, session 7: 55 % of copy bandwidth in the step); 2 splits fill 97 %.
    """
    slots = max(1, occupancy) * _num_sms(device)
    most = max(1, min(steps // min_steps, _cdiv(cfg.waves * slots, max(programs, 1))))
    return _least_idle_splits(programs, most, slots)


@functools.lru_cache(maxsize=4096)  # called every launch with the same few arguments; ~30 candidates each
def _least_idle_splits(programs: int, most: int, slots: int, split_cost: float = 0.0) -> int:
    """Among 1 .. ``most`` splits of a grid of ``programs``, the one with the least predicted time:
    (1 + split_cost x splits, for more than one split) / the fraction of the ``slots`` busy over its waves;
    ties go to fewer splits. ``split_cost``: what one split's partial costs against the kernel's other bytes."""

    def cost(s):
        return (1.0 + (split_cost * s if s > 1 else 0.0)) / _wave_efficiency(programs * s, slots)

    return min(range(1, max(1, most) + 1), key=lambda s: (round(cost(s), 6), s))


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
# pre: x_in = sum_i h_pre[i] x[i]
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _pre_fwd_kernel(x_ptr, h_ptr, out_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    ACC: tl.constexpr, X_BCAST: tl.constexpr = False):
    """X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``)."""
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
    X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``); dx is stored dense.
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
    _check_stream("pre", x)
    lead, t, n, c = _stream_dims(x)
    (x, bcast), h_pre = _stream_arg(x), h_pre.contiguous()
    out = torch.empty(lead + (c,), dtype=x.dtype, device=x.device)
    if t == 0 or c == 0:
        return out
    bt, bc, warps = _stream_tile("pre", t, c, 1)
    grid = (_cdiv(t, bt), _cdiv(c, bc))
    launch(_pre_fwd_kernel, grid, (x, h_pre, out, t, c),
           dict(N=n, BT=bt, BC=bc, ACC=_acc_tl(x.dtype), X_BCAST=bcast), num_warps=warps)
    return out


def pre_backward(x: Tensor, h_pre: Tensor, dout: Tensor) -> tuple[Tensor, Tensor]:
    _check_stream("pre_backward", x, dout)
    lead, t, n, c = _stream_dims(x)
    (x, bcast), h_pre, dout = _stream_arg(x), h_pre.contiguous(), dout.contiguous()
    acc = _acc_torch(x.dtype, dout.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # dense, also where x is broadcast
    if t == 0 or c == 0:
        return dx.zero_(), torch.zeros(lead + (n,), dtype=acc, device=x.device)
    dh = torch.empty(lead + (n,), dtype=acc, device=x.device)  # every element written: no fill launch
    np_ = _pow2(n)
    bt, bc, warps = _stream_tile("pre_backward", t, c, np_)
    launch(
        _pre_bwd_kernel, (_cdiv(t, bt),), (x, h_pre, dout, dx, dh, t, c),
        dict(N=n, NP=np_, BT=bt, BC=bc, ACC=_acc_tl(acc), STORE_DX=True, X_BCAST=bcast), num_warps=warps,
    )
    return dx, dh


def pre_backward_dh(x: Tensor, h_pre: Tensor, dout: Tensor) -> Tensor:
    """dh of pre_backward alone: reads x and dout once, writes [T, n]; h_pre is not read."""
    _check_stream("pre_backward_dh", x, dout)
    lead, t, n, c = _stream_dims(x)
    (x, bcast), dout = _stream_arg(x), dout.contiguous()
    acc = _acc_torch(x.dtype, dout.dtype)
    if t == 0 or c == 0:
        return torch.zeros(lead + (n,), dtype=acc, device=x.device)
    dh = torch.empty(lead + (n,), dtype=acc, device=x.device)  # every element written: no fill launch
    np_ = _pow2(n)
    bt, bc, warps = _stream_tile("pre_backward_dh", t, c, np_)
    # h_ptr / dx_ptr are placeholders: STORE_DX=False compiles their loads and stores away
    launch(
        _pre_bwd_kernel, (_cdiv(t, bt),), (x, h_pre, dout, dh, dh, t, c),
        dict(N=n, NP=np_, BT=bt, BC=bc, ACC=_acc_tl(acc), STORE_DX=False, X_BCAST=bcast), num_warps=warps,
    )
    return dh


# ---------------------------------------------------------------------------------------------
# post_res: X'[i] = sum_j h_res[i, j] X[j] + h_post[i] y
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mix_tile(x_ptr, hres_ptr, hp, y, r64, mi, cols, m2, C, N: tl.constexpr, NP: tl.constexpr,
              ACC: tl.constexpr, X_BCAST: tl.constexpr = False):
    """[BT, NP, BC] tile of H_res X + H_post^T y, each x[t, j] chunk loaded once (fp32 accumulation).
    X_BCAST: x is [T, C], the one row every stream of a token holds: loaded once for all j."""
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
        acc += hcol[:, :, None] * xj[:, None, :]
    return acc


@triton.jit(do_not_specialize=["T"])
def _post_res_fwd_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, out_ptr, T, C, N: tl.constexpr,
                         NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
                         X_BCAST: tl.constexpr = False):
    """X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``); X' is stored dense."""
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
    tl.store(out_ptr + off, _round(out, out_ptr.dtype.element_ty, RNE), mask=mi[:, :, None] & cmask[None, None, :])


@triton.jit(do_not_specialize=["T"])
def _post_res_bwd_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dx_ptr, dhres_ptr, dhpost_ptr, dy_ptr,
                         hpre_ptr, xin_ptr, T, C, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, ACC: tl.constexpr, PRE: tl.constexpr, X_BCAST: tl.constexpr = False,
                         G_BCAST: tl.constexpr = False):
    """One program owns BT tokens and walks all of C: reads x, dout, y once, writes dx, dy once.

    Every load of a chunk is issued before its first reduction, and the H_res columns before the loop. A
    reduction across warps is a barrier, which no load moves across: with each x row loaded between two
    reductions and H_res re-read every chunk (the compiler cannot hoist it past the stores), the kernel waited a
    memory latency per row, 467.1 us against 401.8 at 8192 x 7168 on an H200 (83 % against 97 % of copy
    bandwidth, benchmarks/results/session7-2026-12-02-h200.md).

    PRE: also writes x_in = sum_i h_pre[i] x[i] (``pre``'s value, summed in its order and rounded once) from the
    x rows it loads anyway.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``): loaded once a chunk and
    used as each x[j]; dx keeps the dense layout. G_BCAST: likewise dout (a mean collapse's gradient,
    passes/broadcast_collapse_grad.py).
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
        for j in tl.static_range(N):
            xj = xs[j]
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
def _channel_partials(v, BT: tl.constexpr, BC: tl.constexpr):
    """[BT, BC] -> [BT, BC / 8]: sums over the 8 adjacent channels a thread loads (no cross-thread reduction)."""
    return tl.sum(tl.reshape(v, (BT, BC // 8, 8)), axis=2)


@triton.jit(do_not_specialize=["T"])
def _post_res_bwd_2d_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dx_ptr, dhres_ptr, dhpost_ptr, dy_ptr,
                            hpre_ptr, xin_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                            ACC: tl.constexpr, PRE: tl.constexpr, X_BCAST: tl.constexpr = False,
                            G_BCAST: tl.constexpr = False):
    """_post_res_bwd_kernel's outputs with every tile 2-D [BT, BC] (PostResBwdCfg.two_d): dout row i, x row j and y
    share one layout; the per-token coefficients are [BT] vectors; dh_post and dh_res are carried through the
    channel loop as [BT, BC / 8] partials and reduced across threads once at the end.
    X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``): loaded once a chunk and
    used as each x[i]; dx keeps the dense layout. G_BCAST: likewise dout (a mean collapse's gradient,
    passes/broadcast_collapse_grad.py)."""
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
        for j in tl.static_range(N):
            dxj = hr[j][:, None] * gs[0]
            for i in tl.static_range(1, N):
                dxj += hr[i * N + j][:, None] * gs[i]
            tl.store(dx_ptr + (r64 * N + j)[:, None] * C + cols[None, :], dxj.to(dx_ptr.dtype.element_ty),
                     mask=m2)
        new_post = ()
        new_res = ()
        for i in tl.static_range(N):
            new_post = new_post + (acc_post[i] + _channel_partials(gs[i] * y, BT, BC),)
            for j in tl.static_range(N):
                new_res = new_res + (acc_res[i * N + j] + _channel_partials(gs[i] * xs[j], BT, BC),)
        acc_post = new_post
        acc_res = new_res
    for i in tl.static_range(N):
        tl.store(dhpost_ptr + r64 * N + i, tl.sum(acc_post[i], axis=1).to(dhpost_ptr.dtype.element_ty), mask=rmask)
        for j in tl.static_range(N):
            tl.store(dhres_ptr + r64 * (N * N) + i * N + j,
                     tl.sum(acc_res[i * N + j], axis=1).to(dhres_ptr.dtype.element_ty), mask=rmask)


def post_res(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor) -> Tensor:
    _check_stream("post_res", x, y)
    lead, t, n, c = _stream_dims(x)
    (x, bcast), h_res, h_post, y = _stream_arg(x), h_res.contiguous(), h_post.contiguous(), y.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # dense, also where x is broadcast
    if t == 0 or c == 0:
        return out
    np_ = _pow2(n)
    bt, bc, warps = _stream_tile("post_res", t, c, np_)
    grid = (_cdiv(t, bt), _cdiv(c, bc))
    launch(_post_res_fwd_kernel, grid, (x, h_res, h_post, y, out, t, c),
           dict(N=n, NP=np_, BT=bt, BC=bc, ACC=_acc_tl(x.dtype), RNE=_INTERPRETED, X_BCAST=bcast), num_warps=warps)
    return out


def post_res_backward(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh_res, dh_post, dy). ``out``: where dx goes, e.g. dout itself (passes/inplace_stream_grads.py)."""
    return _post_res_backward(x, h_res, h_post, y, dout, None, out)


def post_res_backward_pre(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, h_pre: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """post_res_backward plus pre(x, h_pre), from the one pass over x (passes/fold_pre_recompute.py)."""
    return _post_res_backward(x, h_res, h_post, y, dout, h_pre.contiguous(), out)


def _grad_buffer(out: Tensor | None, like: Tensor, what: str, copied: Tensor | None = None) -> Tensor:
    """Where a kernel writes a stream gradient shaped ``like``; it reads the gradient it is computed from tile by tile
    before it writes the same tile, so that gradient's buffer may be the one. ``out`` if given (it must be dense: a
    copy would drop the write), else ``copied``, the dense copy ``.contiguous()`` had to make of the gradient read
    (ours alone: the caller's tensor is untouched; the last site of a backward may get its gradient as a broadcast
    view), else a new tensor."""
    if out is not None:
        if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous():
            raise ValueError(f"mhc triton {what}: out must be a contiguous {like.dtype} tensor of shape "
                             f"{tuple(like.shape)}, got {out.dtype} {tuple(out.shape)} (contiguous: "
                             f"{out.is_contiguous()})")
        return out
    if copied is not None and copied.dtype == like.dtype and copied.shape == like.shape:
        return copied
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)  # dense, also where like is broadcast


def _post_res_backward(x, h_res, h_post, y, dout, h_pre, out=None):
    _check_stream("post_res_backward", x, y, dout)
    lead, t, n, c = _stream_dims(x)
    (x, bcast), h_res, h_post = _stream_arg(x), h_res.contiguous(), h_post.contiguous()
    # dout broadcast over the streams (a mean collapse's gradient) is read as its one row a token, not copied
    y, (dense, g_bcast) = y.contiguous(), _stream_arg(dout)
    acc = _acc_torch(x.dtype, dout.dtype)
    dx = _grad_buffer(out, x, "post_res_backward", copied=dense if dense is not dout else None)
    dy, dout = torch.empty_like(y), dense
    x_in = torch.empty(lead + (c,), dtype=x.dtype, device=x.device) if h_pre is not None else None
    extra = () if h_pre is None else (x_in,)
    if t == 0 or c == 0:
        return ((dx.zero_(), torch.zeros(lead + (n, n), dtype=acc, device=x.device),
                 torch.zeros(lead + (n,), dtype=acc, device=x.device), dy.zero_()) + tuple(e.zero_() for e in extra))
    # the kernel writes every element of dh_res and dh_post: no fill launches
    dh_res = torch.empty(lead + (n, n), dtype=acc, device=x.device)
    dh_post = torch.empty(lead + (n,), dtype=acc, device=x.device)
    np_ = _pow2(n)
    bt, bc, warps = _stream_tile("post_res_backward", t, c, np_)
    args = (x, h_res, h_post, y, dout, dx, dh_res, dh_post, dy,
            h_pre if h_pre is not None else h_post, x_in if x_in is not None else dy, t, c)
    if _cfg("post_res_backward").two_d and n <= _TWO_D_MAX_N and bc >= 8:  # 8: one thread's channel vector
        launch(_post_res_bwd_2d_kernel, (_cdiv(t, bt),), args,
               dict(N=n, BT=bt, BC=bc, ACC=_acc_tl(acc), PRE=h_pre is not None, X_BCAST=bcast, G_BCAST=g_bcast),
               num_warps=warps)
    else:
        launch(_post_res_bwd_kernel, (_cdiv(t, bt),), args,
               dict(N=n, NP=np_, BT=bt, BC=bc, ACC=_acc_tl(acc), PRE=h_pre is not None, X_BCAST=bcast,
                    G_BCAST=g_bcast),
               num_warps=warps)
    return (dx, dh_res, dh_post, dy) + extra


# ---------------------------------------------------------------------------------------------
# proj: p = vec(x) @ phi, sq = |vec(x)|^2, one pass over x on tensor cores
# ---------------------------------------------------------------------------------------------
def _hi_lo(stream_dtype: torch.dtype) -> bool:
    """bf16 streams multiply in bf16 with the fp32 operand split into hi + lo bf16 halves.

    X is exact in bf16 and hi + lo keeps ~16 mantissa bits of the fp32 operand (tf32 keeps 10). The tile of X
    then feeds the tensor cores as it was loaded instead of being widened to fp32 in registers: on an H100 this
    took proj from 34 % to 96 % of copy bandwidth at 32768 x 4096 (kernels-2026-11-24b-h100.md). fp16 keeps tf32:
    its 5-bit exponent would flush the lo half of small values.
    """
    return stream_dtype == torch.bfloat16


def _half_dot_dtype():
    """The dtype hi/lo dots run in: bf16, or fp32 under Triton's interpreter, whose bf16 tl.dot is wrong
    (bf16 operands are exact in fp32, so the interpreter computes the GPU's products)."""
    return tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16


@triton.jit
def _round(v, XT: tl.constexpr, RNE: tl.constexpr):
    """v (fp32) cast to a stream dtype XT. Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to
    nearest even), so under it (RNE: set only when interpreted, ``_INTERPRETED``) bf16 is rounded by hand first:
    the tests then compare a stored stream with the reference's bit for bit instead of within an ulp."""
    if RNE:
        if XT == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(XT)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _hi_lo_kernel(src_ptr, dst_ptr, R, M, s_half, s_r, s_m, BR: tl.constexpr, MP: tl.constexpr,
                  STREAMS: tl.constexpr = 1):
    """dst[0] = bf16(src), dst[1] = bf16(src - dst[0]) for an fp32 [R, M] src, zero-padded to MP columns;
    dst element (half, r, m) at half * s_half + r * s_r + m * s_m (so it can write either orientation).
    STREAMS > 1: src's rows are STREAMS blocks of R / STREAMS (phi's rows i*C + c), and source row i*C + c goes to
    dst row c*STREAMS + i (post_res_proj's one_dot)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ms = tl.arange(0, MP)
    rmask = rows < R
    r64 = rows.to(tl.int64)
    v = tl.load(src_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & (ms < M)[None, :], other=0.0)
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    if STREAMS > 1:
        per_stream = R // STREAMS
        r64 = (r64 % per_stream) * STREAMS + r64 // per_stream
    off = r64[:, None] * s_r + ms[None, :] * s_m
    tl.store(dst_ptr + off, hi, mask=rmask[:, None])
    tl.store(dst_ptr + s_half + off, lo, mask=rmask[:, None])


def _split_hi_lo(src: Tensor, mp: int, transpose: bool, interleave: bool = False, streams: int = 1) -> Tensor:
    """fp32 [..., M] (R rows) -> bf16 [2, R, mp] (hi, lo), or [2 * mp, R] with ``transpose`` (the A operand of
    X^T dp), or [R, 2, mp] with ``interleave`` (a row's hi then lo: one [rows, 2 mp] B tile of a dot).
    ``streams``: R is that many blocks of rows (phi's i*C + c), written in the order c*streams + i."""
    m = src.shape[-1]
    r = src.numel() // m
    if r % streams:
        raise ValueError(f"mhc triton _split_hi_lo: {r} rows are not {streams} equal blocks")
    if transpose:
        dst = torch.empty((2 * mp, r), dtype=torch.bfloat16, device=src.device)
        strides = (mp * r, 1, r)
    elif interleave:
        dst = torch.empty((r, 2, mp), dtype=torch.bfloat16, device=src.device)
        strides = (mp, 2 * mp, 1)
    else:
        dst = torch.empty((2, r, mp), dtype=torch.bfloat16, device=src.device)
        strides = (r * mp, mp, 1)
    br = max(1, min(_pow2(r), 4096 // mp))
    meta = dict(BR=br, MP=mp, STREAMS=streams) if streams > 1 else dict(BR=br, MP=mp)
    launch(_hi_lo_kernel, (_cdiv(r, br),), (src.float().contiguous(), dst, r, m, *strides), meta)
    return dst


@triton.jit(do_not_specialize=["T"])
def _proj_fwd_kernel(x_ptr, phi_ptr, p_ptr, sq_ptr, T, K, M, MPAD, K_SPLIT, BT: tl.constexpr, BK: tl.constexpr,
                     BM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, HI_LO: tl.constexpr,
                     DOT: tl.constexpr, JOIN: tl.constexpr = False):
    """Program (token block, column block, K split): [BT, BM] partial of p and [BT] partial of sq.

    Partials go to p_ptr[split] / sq_ptr[split]; the column-block-0 programs own sq.
    HI_LO: phi_ptr is _split_hi_lo's [2, K, MPAD] and the X tile enters both dots in its own dtype;
    otherwise phi is [K, M] in ACC and the tile is widened (tf32 for fp16, exact for fp32 / fp64).
    JOIN (with HI_LO): phi_ptr is _split_hi_lo's interleaved [K, 2, MPAD]; the block's hi and lo columns form one
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
            acc = tl.dot(xf, ph, acc, input_precision=PREC)
        sq8 += tl.sum(tl.reshape(xf * xf, (BT, BK // 8, 8)), axis=2)
    sq = tl.sum(sq8, axis=1)
    if JOIN:
        acc = tl.sum(tl.reshape(acc, (BT, 2, BM)), axis=1)
    base = split.to(tl.int64) * T
    tl.store(p_ptr + (base + r64)[:, None] * M + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    # (a tensor-valued test: the interpreter rejects a scalar bool in a mask)
    tl.store(sq_ptr + base + r64, sq, mask=rmask & ((rows * 0 + pid_m) == 0))


def _dot_block_m(m: int, cfg: DotCfg) -> int:
    return min(max(16, _pow2(m)), max(16, cfg.bm))


def proj(x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    _check_stream("proj", x, phi)
    lead, t, n, c = _stream_dims(x)
    k, m = phi.shape
    if k != n * c:
        raise ValueError(f"mhc triton proj: phi has {k} rows, expected n*C = {n * c}")
    (x, bcast), phi = _stream_arg(x), phi.contiguous()
    if bcast and t > 0:
        # a stream broadcast over its n streams (a chain's head): vec(x) @ phi = row @ sum_i phi_i and
        # |vec(x)|^2 = n |row|^2, so one pass over the [T, C] rows with one dot a chunk. Reading the row once for
        # each stream's phi rows instead (H200, session 17) was slower than the dense copy: 255 against 226 us at
        # 8192 x 7168, since a program's n reads of its [BT, C] rows fell out of L2. The sum over streams is rounded
        # to fp32 before phi's hi / lo split: p agrees with the dense path to the dots' precision (~1e-4 of its
        # scale for bf16 streams, tests/test_broadcast_stream.py), not bit for bit.
        p, sq = proj(x.select(-2, 0).unsqueeze(-2), phi.view(n, c, m).sum(0))
        return p, sq * n
    acc = _acc_torch(x.dtype, phi.dtype)
    if t == 0 or k == 0:
        return torch.zeros(lead + (m,), dtype=acc, device=x.device), torch.zeros(lead, dtype=acc, device=x.device)
    cfg = _cfg("proj")
    bm = _dot_block_m(m, cfg)
    mblocks = _cdiv(m, bm)
    hi_lo = _hi_lo(x.dtype) and acc == torch.float32
    join = hi_lo and cfg.join_hi_lo
    w = _split_hi_lo(phi, mblocks * bm, transpose=False, interleave=join) if hi_lo else phi
    bt = min(cfg.bt, max(16, _pow2(t)))  # tl.dot needs >= 16 rows
    splits = _filling_splits(cfg, x.device, _cdiv(t, bt) * mblocks, _cdiv(k, cfg.bk))
    k_split = _cdiv(_cdiv(k, splits), cfg.bk) * cfg.bk
    splits = _cdiv(k, k_split)
    p = torch.empty((splits,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((splits,) + lead, dtype=acc, device=x.device)
    grid = (_cdiv(t, bt), mblocks, splits)
    meta = dict(BT=bt, BK=cfg.bk, BM=bm, ACC=_acc_tl(acc), PREC=_dot_precision(x.dtype), HI_LO=hi_lo,
                DOT=_half_dot_dtype(), JOIN=join)
    launch(_proj_fwd_kernel, grid, (x, w, p, sq, t, k, m, mblocks * bm, k_split), meta,
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
def _k_block(C, M, N: tl.constexpr, BK: tl.constexpr, MP: tl.constexpr, ONE_STREAM: tl.constexpr):
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
    X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``), read at channels cc as
    dout is; acc and dx keep the dense layout."""
    K = N * C
    split = tl.program_id(1)
    ks, kmask, ks64, ms, mmask, ii, cc = _k_block(C, M, N, BK, MP, ONE_STREAM)
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
    X_BCAST: x is [T, C], the one row every stream of a token holds (``_stream_arg``): column k of vec(x) is
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
    splits = _splits(cfg, device, kblocks, _cdiv(t, bt), min_steps=2)
    t_split = _cdiv(_cdiv(t, splits), bt) * bt
    return _cdiv(t, t_split), t_split


_NO_ONE_PASS: set = set()  # devices whose shared memory the one-pass backward's tile does not fit
_NO_PIPELINE_ALL: set = set()  # devices that fit it only without PIPELINE_ALL's extra shared-memory stages


def _proj_grads(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor | None, dout: Tensor | None,
                acc: Tensor | None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx, dphi); dx written into ``out`` when given (it may be acc: each dx tile is stored after its acc tile
    is read, by the same program). x as the op got it: the kernels read it through ``_stream_arg``; the other
    tensors contiguous."""
    _, t, n, c = _stream_dims(x)
    k, m = phi.shape
    acc_t = _acc_torch(x.dtype, phi.dtype, *(() if dout is None else (dout.dtype,)))
    if t == 0 or k == 0:  # x has no elements: neither has dx
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out), torch.zeros_like(phi)
    hi_lo = _hi_lo(x.dtype) and acc_t == torch.float32
    if hi_lo and _cfg("proj_dx_dphi").enabled and x.device not in _NO_ONE_PASS:  # one pass over X
        from mhc_compile.kernels import triton_proj_bwd

        cfg = _cfg("proj_dx_dphi")
        if cfg.pipeline_all and x.device in _NO_PIPELINE_ALL:
            cfg = replace(cfg, pipeline_all=False)
        try:
            return triton_proj_bwd.proj_grads(x, phi, dp, dsq, h_pre, dout, acc, cfg, out=out)
        except OutOfResources as e:  # a GPU with less shared memory than the tile needs (228 KB an SM on H100)
            if cfg.pipeline_all:  # dout and acc staged too take a third more: try without, then the pair
                _NO_PIPELINE_ALL.add(x.device)
                warnings.warn(f"mhc triton proj backward: the one-pass kernel with PIPELINE_ALL does not fit this "
                              f"GPU ({e}); using it without", stacklevel=2)
                return _proj_grads(x, phi, dp, dsq, h_pre, dout, acc, out)
            _NO_ONE_PASS.add(x.device)
            warnings.warn(f"mhc triton proj backward: the one-pass kernel does not fit this GPU ({e}); using the "
                          "dx + dphi kernel pair", stacklevel=2)
    x, bcast = _stream_arg(x)
    cfg, cfg_phi = _cfg("proj_dx"), _cfg("proj_dphi")
    mp = max(16, _pow2(m))
    if hi_lo:  # dp^T as bf16 hi rows then lo rows: [2 * MP, T]
        a, s_am, s_at, ma = _split_hi_lo(dp, mp, transpose=True), t, 1, 2 * mp
    else:  # dp^T read in place
        a, s_am, s_at, ma = dp, 1, m, mp
    # the phi slab [MP, BK] lives in registers: BK shrinks as m grows
    bk = max(16, min(cfg.bk, 4096 // mp))
    bt = max(16, min(cfg.bt, _pow2(t)))
    kblocks = _cdiv(k, bk)
    splits, t_split = _token_splits(cfg, x.device, kblocks, t, bt)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out  # dense, x broadcast or not
    prec = _dot_precision(x.dtype)
    meta = dict(N=n, BT=bt, BK=bk, MP=mp, HAS_PRE=h_pre is not None, ONE_STREAM=c % bk == 0,
                HAS_ACC=acc is not None, ACC=_acc_tl(acc_t), PREC=prec, X_BCAST=bcast)
    # absent operands are placeholders that their constexpr flag never lets the kernel read
    args = (x, phi, dp, dsq, h_pre if h_pre is not None else dp, dout if dout is not None else x,
            acc if acc is not None else x, dx, t, c, m, t_split)
    launch(_proj_dx_kernel, (kblocks, splits), args, meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bk2 = max(16, min(cfg_phi.bk, 8192 // ma))  # the [MA, BK] accumulator lives in registers
    bt2 = max(16, min(cfg_phi.bt, _pow2(t)))
    kblocks2 = _cdiv(k, bk2)
    splits2, t_split2 = _token_splits(cfg_phi, x.device, kblocks2, t, bt2)
    dphi = torch.empty((splits2, k, m), dtype=acc_t, device=x.device)
    meta2 = dict(BT=bt2, BK=bk2, MP=mp, MA=ma, HI_LO=hi_lo, DOT=_half_dot_dtype(), ACC=_acc_tl(acc_t), PREC=prec,
                 X_BCAST=bcast)
    launch(_proj_dphi_kernel, (kblocks2, splits2), (x, a, dphi, t, k, c, m, t_split2, s_am, s_at), meta2,
           num_warps=cfg_phi.num_warps, num_stages=cfg_phi.num_stages)
    return dx, dphi.sum(0).to(phi.dtype)


def proj_backward(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor) -> tuple[Tensor, Tensor]:
    _check_stream("proj_backward", x, phi)
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
    _check_stream("proj_pre_backward", x, phi, dout)
    n, c = x.shape[-2:]
    k, m = phi.shape
    if k != n * c:
        raise ValueError(f"mhc triton proj_pre_backward: phi has {k} rows, expected n*C = {n * c}")
    if acc is not None:
        _check_stream("proj_pre_backward", acc)
        if acc.shape != x.shape:
            raise ValueError(f"mhc triton proj_pre_backward: acc has shape {tuple(acc.shape)}, "
                             f"expected x's {tuple(x.shape)}")
        dense = acc.contiguous()
        out, acc = _grad_buffer(out, x, "proj_pre_backward", copied=dense if dense is not acc else None), dense
    else:
        out = _grad_buffer(out, x, "proj_pre_backward")
    return _proj_grads(x, phi.contiguous(), dp.contiguous(), dsq.contiguous(), h_pre.contiguous(), dout.contiguous(),
                       acc, out)


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
    _check_stream("coeffs", p)
    lead, t = _lead_of(p, 1)
    m = p.shape[-1]
    if m != ref.num_coeffs(n):
        raise ValueError(f"mhc triton coeffs: p has {m} columns, expected n*n + 2n = {ref.num_coeffs(n)}")
    np_ = _pow2(n)
    bt = max(1, min(_pow2(t), cfg.budget // (np_ * np_)))
    return lead, t, m, np_, bt


def coeffs(
    p: Tensor, sq: Tensor, bias: Tensor, alpha: Tensor, n: int, nc: int, eps: float, iters: int, mode: str
) -> tuple[Tensor, Tensor, Tensor]:
    cfg = _cfg("coeffs")
    lead, t, m, np_, bt = _coeffs_launch_args(p, n, mode, cfg)
    acc = _acc_torch(p.dtype, sq.dtype, bias.dtype, alpha.dtype)
    p, sq, bias, alpha = p.contiguous(), sq.contiguous(), bias.contiguous(), alpha.contiguous()
    h_pre = torch.empty(lead + (n,), dtype=acc, device=p.device)
    h_post = torch.empty(lead + (n,), dtype=acc, device=p.device)
    h_res = torch.empty(lead + (n, n), dtype=acc, device=p.device)
    if t == 0:
        return h_pre, h_post, h_res
    launch(
        _coeffs_fwd_kernel, (_cdiv(t, bt),), (p, sq, bias, alpha, h_pre, h_post, h_res, t, nc, eps, iters),
        dict(N=n, NP=np_, BT=bt, MODE=_MODES[mode], ACC=_acc_tl(acc)), num_warps=cfg.num_warps,
    )
    return h_pre, h_post, h_res


def coeffs_backward(
    p: Tensor, sq: Tensor, bias: Tensor, alpha: Tensor, dh_pre: Tensor, dh_post: Tensor, dh_res: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _cfg("coeffs_backward")
    lead, t, m, np_, bt = _coeffs_launch_args(p, n, mode, cfg)
    acc = _acc_torch(p.dtype, sq.dtype, bias.dtype, alpha.dtype)
    tensors = [v.contiguous() for v in (p, sq, bias, alpha, dh_pre, dh_post, dh_res)]
    dp = torch.empty(lead + (m,), dtype=acc, device=p.device)
    dsq = torch.empty(lead, dtype=acc, device=p.device)
    if t == 0:
        return dp, dsq, torch.zeros_like(bias), torch.zeros_like(alpha)
    blocks = _cdiv(t, bt)
    # each block writes its row of the dbias / dalpha partials whole: no fill launch. (One sum over [blocks, m + 3]
    # would return two views of one tensor, and a custom op's outputs must not alias.)
    parts = torch.empty((blocks, m + 3), dtype=acc, device=p.device)
    launch(
        _coeffs_bwd_kernel, (blocks,), (*tensors, dp, dsq, parts, parts[:, m:], t, nc, eps, iters, m + 3),
        dict(N=n, NP=np_, BT=bt, MODE=_MODES[mode], ACC=_acc_tl(acc), SEGMENTS=cfg.segments),
        num_warps=cfg.num_warps,
    )
    return dp, dsq, parts[:, :m].sum(0).to(bias.dtype), parts[:, m:].sum(0).to(alpha.dtype)


# ---------------------------------------------------------------------------------------------
# post_res (layer l) fused with proj (layer l+1): one pass writes X' and accumulates the next p, sq
#
# A program owns BT tokens and a range of channels (the channel split) and all m <= 288 columns of p at once
# (MP = next power of 2, no column blocks), walking its channels in chunks of BC. Per chunk, y and the n input
# rows x[:, j, chunk] are loaded once; each output row X'_i is mixed in fp32 in _mix_tile's order (so X' is
# post_res's bit for bit under the interpreter; on an H100 the compiler contracts differently and ~5 in 10^6
# elements differ, all near-cancellations), rounded to the stream dtype, stored, squared into sq and
# multiplied on tensor cores with phi rows i*C + chunk. bf16 streams use proj's hi/lo dots (the rounded X'_i enters both as bf16);
# other dtypes widen X'_i and phi to ACC (tf32 for fp16, exact for fp32 / fp64).
#
# Tile sizes come from compiling for sm_90 without a GPU (triton.compile to a GPUTarget, then ptxas -v):
# registers grow by about 16 per element a thread holds of one [BT, BC] tile at n = 4 (128 registers at 8
# elements, spills past 16), so the n input tiles are bounded per thread; the [BT, MP] accumulator and a
# [BC, MP] phi tile likewise. Pipeline stages are limited to what fits in shared memory: at n = 16 one stage
# of the 2n phi tiles alone is 512 KiB, and asking the pipeliner for 2 stages took minutes to compile.
#
# TMA (DotCfg.tma, bf16 with C a multiple of BC): X, y, X' and phi's halves move as descriptor blocks. The pointer
# build was issue-bound, not bandwidth-bound (Nsight on an H200: 8 warps an SM, 0.58 eligible warps a scheduler,
# 51 % of DRAM bandwidth; without its X' stores it still read at only 51 %): every element paid 64-bit address
# and mask arithmetic. With descriptors the loads land in shared memory by TMA (first built with TMA stores of X'
# too: 192 registers instead of 255; H200, 32768 x 4096: 776 against 961 us, 73 against 59 % of copy bandwidth;
# results/post-res-proj-tma-2026-12-03-h200-s14-call4.md). X' now leaves by pointer stores (DotCfg.tma_store
# False): the TMA-store build reuses one shared buffer for the n stores of a chunk and waits for each store's
# read before the next; with pointer stores (218 registers) it ran 0.1-1.4 % faster at three shapes in one run
# (766 against 777 us at 32768 x 4096; s14-call8 results).
# ---------------------------------------------------------------------------------------------
_PRP_SMEM = 192 * 1024  # bytes of pipeline buffers (H100: 227 KiB of shared memory per block)
_PRP_HOIST = 20  # up to this many coefficient vectors (n*n + n; n <= 4) are loaded once per program


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def _post_res_proj_tile(cfg: DotCfg, t: int, n: int, c: int, m: int) -> tuple[int, int, int]:
    """(BT, BC, MP) within the per-thread budget; tl.dot needs BT >= 16 rows and BC >= 16 channels (K).

    At the defaults: n = 4 (MP = 32): BT = 64, BC = 32; n = 16 (MP = 512): BT = BC = 32.
    """
    mp = max(16, _pow2(m))
    budget = cfg.per_thread * 32 * cfg.num_warps
    bt = max(16, min(cfg.bt, _pow2(t), _pow2_floor(budget // mp)))
    bc = max(16, min(cfg.bk, _pow2(c), _pow2_floor(budget // (n * bt)), _pow2_floor(budget // mp)))
    bt = max(16, min(bt, _pow2_floor(budget // (n * bc))))  # BC at its floor of 16: fewer tokens instead
    return bt, bc, mp


def _post_res_proj_stages(cfg: DotCfg, n: int, bt: int, bc: int, mp: int, stream_bytes: int, phi_bytes: int,
                          hi_lo: bool) -> int:
    """Pipeline stages whose buffers fit _PRP_SMEM: a stage holds n + 1 input tiles and the chunk's phi tiles."""
    per_stage = (n + 1) * bt * bc * stream_bytes + (2 if hi_lo else 1) * n * bc * mp * phi_bytes
    return max(1, min(cfg.num_stages, _PRP_SMEM // per_stage))


@triton.jit
def _post_res_proj_coeffs(hres_ptr, hpost_ptr, r64, rmask, N: tl.constexpr, ACC: tl.constexpr):
    """The per-token coefficient vectors ([BT] each): h_post[:, i] for i < N, then h_res[:, i, j] at N + i*N + j."""
    coef = ()
    for i in tl.static_range(N):
        coef = coef + (tl.load(hpost_ptr + r64 * N + i, mask=rmask, other=0.0).to(ACC),)
    for i in tl.static_range(N):
        for j in tl.static_range(N):
            coef = coef + (tl.load(hres_ptr + r64 * (N * N) + (i * N + j), mask=rmask, other=0.0).to(ACC),)
    return coef


@triton.jit
def _streams_along_k(xs, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The N [BT, BC] tiles of a chunk as one [BT, N*BC] tile whose column c*N + i is tile i's column c (N in
    {1, 2, 4}): tl.join stacks on a new last axis, so nested joins of (0, 2) and (1, 3) put stream i = 2a + b at
    [.., c, a, b], and the reshape flattens (c, a, b) in that order."""
    if N == 1:
        v = xs[0]
    elif N == 2:
        v = tl.reshape(tl.join(xs[0], xs[1]), (BT, 2 * BC))
    else:
        v = tl.reshape(tl.join(tl.join(xs[0], xs[2]), tl.join(xs[1], xs[3])), (BT, 4 * BC))
    return v


@triton.jit(do_not_specialize=["T"])
def _post_res_proj_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, hi_ptr, lo_ptr, out_ptr, p_ptr, sq_ptr, T, C, M,
                          MPAD, C_SPLIT, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, MP: tl.constexpr,
                          ACC: tl.constexpr, PREC: tl.constexpr, HI_LO: tl.constexpr, DOT: tl.constexpr,
                          HOIST: tl.constexpr, RNE: tl.constexpr, TMA: tl.constexpr, TMA_STORE: tl.constexpr,
                          JOIN: tl.constexpr, ONE_DOT: tl.constexpr = False):
    """Program (token block, channel split): stores its X' chunk, writes [BT, M] / [BT] partials of p / sq.

    Partials go to p_ptr[split] / sq_ptr[split]. HI_LO: hi_ptr / lo_ptr are the halves of _split_hi_lo's
    [2, K, MPAD] and X'_i enters both dots as bf16 (DOT); otherwise hi_ptr is phi [K, M] (lo_ptr unused) and
    X'_i is widened to ACC. HOIST: the coefficient vectors are loaded once, before the channel loop.
    TMA (bf16, HI_LO, C and C_SPLIT multiples of BC): x_ptr is a tensor descriptor of X as [T, N*C], y_ptr of
    y [T, C], both in [BT, BC] blocks, and hi_ptr of the halves as [2K, MPAD] in [BC, MP] blocks (lo_ptr unused);
    with TMA_STORE out_ptr is a descriptor like x_ptr's, else X' is stored through pointers. Rows past T read as
    zeros and are not written; no chunk crosses a stream or a split. JOIN (with TMA): hi_ptr is a descriptor of
    the halves interleaved ([K, 2 MPAD], _split_hi_lo's interleave) in [BC, 2 MP] blocks, so each stream's chunk
    takes one dot of twice the width; the hi and lo column halves of the accumulator are added at the end.
    ONE_DOT (with JOIN, N in {1, 2, 4}, N*BC <= 256): hi_ptr's rows are phi's reordered so that row c*N + i holds
    phi[i*C + c], in [N*BC, 2 MP] blocks; the chunk's N X' tiles enter one transposed dot as [N*BC, BT]
    (_streams_along_k).
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    ms = tl.arange(0, MP)
    mmask = ms < M
    if HOIST:
        coef = _post_res_proj_coeffs(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
    c_lo = split * C_SPLIT
    c_hi = tl.minimum(c_lo + C_SPLIT, C)
    if ONE_DOT:
        acc = tl.zeros([2 * MP, BT], dtype=ACC)  # p^T: transposed back after the loop
    elif JOIN:
        acc = tl.zeros([BT, 2 * MP], dtype=ACC)
    else:
        acc = tl.zeros([BT, MP], dtype=ACC)
    sq = tl.zeros([BT], dtype=ACC)
    t0 = tl.program_id(0) * BT
    for c0 in range(c_lo, c_hi, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < c_hi
        m2 = rmask[:, None] & cmask[None, :]
        xs = ()  # the n input rows of this chunk, each loaded once, kept in the stream dtype
        if TMA:
            y = y_ptr.load([t0, c0]).to(ACC)
            for j in tl.static_range(N):
                xs = xs + (x_ptr.load([t0, j * C + c0]),)
        else:
            y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
            for j in tl.static_range(N):
                xs = xs + (tl.load(x_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0),)
        if not HOIST:
            coef = _post_res_proj_coeffs(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
        xws = ()  # ONE_DOT: the chunk's X' tiles, for one dot after the loop
        for i in tl.static_range(N):
            # _mix_tile's order: h_post y, then + h_res[i, j] x_j for j = 0 .. N-1
            xi = coef[i][:, None] * y
            for j in tl.static_range(N):
                xi += coef[N + i * N + j][:, None] * xs[j].to(ACC)
            if TMA and TMA_STORE:
                xo = _round(xi, tl.bfloat16, RNE)
                out_ptr.store([t0, i * C + c0], xo)
            else:
                xo = _round(xi, out_ptr.dtype.element_ty, RNE)  # what the unfused proj would read; masked lanes 0
                tl.store(out_ptr + (r64 * N + i)[:, None] * C + cols[None, :], xo, mask=m2)
            xf = xo.to(ACC)
            sq += tl.sum(xf * xf, axis=1)
            # The select (an identity: masked lanes are already 0) keeps the compiler from hoisting the dot
            # operand's layout conversion up through this chain to the loads, which computes X'_i twice, once
            # per layout (twice the FMAs and spilled registers in the sm_90 compile); selects are not hoisted.
            xw = tl.where(m2, xo, 0.0).to(xo.dtype)
            krow = (i * C + cols).to(tl.int64)  # rows of phi_next: k = i*C + c (the pointer builds)
            if ONE_DOT:
                xws = xws + (xw.to(DOT),)
            elif TMA and JOIN:
                hl = hi_ptr.load([i * C + c0, 0])
                acc = tl.dot(xw.to(DOT), hl.to(DOT), acc, out_dtype=ACC)
            elif TMA:
                hi = hi_ptr.load([i * C + c0, 0])
                lo = hi_ptr.load([N * C + i * C + c0, 0])
                acc = tl.dot(xw.to(DOT), hi.to(DOT), acc, out_dtype=ACC)
                acc = tl.dot(xw.to(DOT), lo.to(DOT), acc, out_dtype=ACC)
            elif HI_LO:
                off = krow[:, None] * MPAD + ms[None, :]
                hi = tl.load(hi_ptr + off, mask=cmask[:, None], other=0.0)
                lo = tl.load(lo_ptr + off, mask=cmask[:, None], other=0.0)
                acc = tl.dot(xw.to(DOT), hi.to(DOT), acc, out_dtype=ACC)
                acc = tl.dot(xw.to(DOT), lo.to(DOT), acc, out_dtype=ACC)
            else:
                ph = tl.load(hi_ptr + krow[:, None] * M + ms[None, :], mask=cmask[:, None] & mmask[None, :],
                             other=0.0).to(ACC)
                acc = tl.dot(xw.to(ACC), ph, acc, input_precision=PREC)
        if ONE_DOT:
            # p^T += phi_chunk^T X'_chunk^T: both operands in shared memory (phi's TMA tile, X' staged by the
            # compiler), so the chunk's wgmmas chain with one wait. With X' as the A operand from registers the
            # sm_90a build waits after every wgmma (benchmarks/post_res_proj_build.py)
            hl = hi_ptr.load([c0 * N, 0])
            acc = tl.dot(tl.trans(hl.to(DOT)), tl.trans(_streams_along_k(xws, N, BT, BC)), acc, out_dtype=ACC)
    if ONE_DOT:
        acc = tl.trans(acc)
    if JOIN:
        acc = tl.sum(tl.reshape(acc, (BT, 2, MP)), axis=1)
    base = split.to(tl.int64) * T
    tl.store(p_ptr + (base + r64)[:, None] * M + ms[None, :], acc, mask=rmask[:, None] & mmask[None, :])
    tl.store(sq_ptr + base + r64, sq, mask=rmask)


def _gluon_prp():
    """kernels/gluon_post_res_proj.py, imported on first use: Gluon is only needed for DotCfg.ws."""
    from mhc_compile.kernels import gluon_post_res_proj

    return gluon_post_res_proj


_NO_GLUON_PRP: set = set()  # devices where the Gluon post_res_proj failed to build: the Triton kernel runs there


def _post_res_proj_ws(cfg: DotCfg, x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi_next: Tensor,
                      out: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """post_res_proj on the warp-specialized Gluon kernel (one program an SM: its ring takes the shared memory),
    or None where it does not run: off sm_90, a shape it does not take, or a build error (another Triton's
    Gluon, shared memory, ptxas), after which the device keeps the Triton kernel, with a warning. A build error
    comes before the launch, so nothing has been written."""
    lead, t, n, c = _stream_dims(x)
    m = phi_next.shape[1]
    bt, bc, mp = _post_res_proj_tile(cfg, t, n, c, m)
    gp = _gluon_prp()
    if not gp.supported(x, n, c, bc, mp):
        return None
    chosen = gp.choose(n, c, bc, mp, cfg.num_warps, cfg.ws_subs, cfg.ws_stages, cfg.ws_wstages, cfg.ws_consumers)
    if chosen is None:
        return None
    bt, slots, consumers = chosen
    chunk = bc * slots[0]  # the Gluon kernel's splits are whole stream slots
    splits = _filling_splits(cfg, x.device, _cdiv(t, bt), _cdiv(c, chunk), occupancy=1)
    c_split = _cdiv(_cdiv(c, splits), chunk) * chunk
    parts = _cdiv(c, c_split) * consumers  # a partial a compute warpgroup
    p = torch.empty((parts,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((parts,) + lead, dtype=acc, device=x.device)
    try:
        gp.launch(x.view(t, n, c), h_res.view(t, n, n), h_post.view(t, n), y.view(t, c),
                  _split_hi_lo(phi_next, mp, transpose=False), out.view(t, n, c), p.view(parts, t, m),
                  sq.view(parts, t), c_split, bc, mp, cfg.num_warps, consumers, *slots, cfg.ws_regs, cfg.ws_box)
    except TritonError as e:
        _NO_GLUON_PRP.add(x.device)
        warnings.warn(f"mhc post_res_proj: the Gluon kernel does not build here ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the Triton kernel on {x.device}", stacklevel=3)
        return None
    return (out, p[0], sq[0]) if parts == 1 else (out, p.sum(0), sq.sum(0))


def post_res_proj(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi_next: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(post_res(x, h_res, h_post, y), *proj(that, phi_next)) with one read of x and y and one write of X'."""
    _check_stream("post_res_proj", x, y, phi_next)
    lead, t, n, c = _stream_dims(x)
    k, m = phi_next.shape
    if k != n * c:
        raise ValueError(f"mhc triton post_res_proj: phi_next has {k} rows, expected n*C = {n * c}")
    x, h_res, h_post = x.contiguous(), h_res.contiguous(), h_post.contiguous()
    y, phi_next = y.contiguous(), phi_next.contiguous()
    acc = _acc_torch(x.dtype, phi_next.dtype)
    out = torch.empty_like(x)
    if t == 0 or c == 0:
        zeros = torch.zeros(lead + (m,), dtype=acc, device=x.device)
        return out, zeros, torch.zeros(lead, dtype=acc, device=x.device)
    cfg = _cfg("post_res_proj")
    hi_lo = _hi_lo(x.dtype) and acc == torch.float32
    if cfg.ws and hi_lo and x.device not in _NO_GLUON_PRP:  # DotCfg.ws: the Gluon kernel where it runs
        done = _post_res_proj_ws(cfg, x, h_res, h_post, y, phi_next, out, acc)
        if done is not None:
            return done
    bt, bc, mp = _post_res_proj_tile(cfg, t, n, c, m)
    # TMA boxes are at most 256 elements a side: n = 16 (m = 288, MP = 512) keeps the pointer build
    tma = cfg.tma and hi_lo and c % bc == 0 and max(bt, bc, mp) <= 256 and tma_ok(x, y, out)
    join = tma and cfg.join_hi_lo and 2 * mp <= 256
    one_dot = join and cfg.one_dot and n in (1, 2, 4) and n * bc <= 256
    tblocks = _cdiv(t, bt)
    splits = _filling_splits(cfg, x.device, tblocks, _cdiv(c, bc), occupancy=cfg.occupancy)
    c_split = _cdiv(_cdiv(c, splits), bc) * bc
    splits = _cdiv(c, c_split)
    p = torch.empty((splits,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((splits,) + lead, dtype=acc, device=x.device)
    if hi_lo:  # one_dot: row c*n + i holds phi[i*C + c], so a chunk's rows for all n streams are one block
        w = _split_hi_lo(phi_next, mp, transpose=False, interleave=join, streams=n if one_dot else 1)
        hi, lo = (w, w) if join else (w[0], w[1])
    else:
        w = hi = lo = phi_next
    if tma:  # c_split is a multiple of bc: with c % bc == 0 no chunk crosses a stream or a split
        x_arg, y_arg = descriptor(x, t, n * c, (bt, bc)), descriptor(y, t, c, (bt, bc))
        out_arg = descriptor(out, t, n * c, (bt, bc)) if cfg.tma_store else out
        rows = n * bc if one_dot else bc
        hi = lo = descriptor(w, k, 2 * mp, (rows, 2 * mp)) if join else descriptor(w, 2 * k, mp, (bc, mp))
    else:
        x_arg, y_arg, out_arg = x, y, out
    meta = dict(N=n, BT=bt, BC=bc, MP=mp, ACC=_acc_tl(acc), PREC=_dot_precision(x.dtype), HI_LO=hi_lo,
                DOT=_half_dot_dtype(), HOIST=n * n + n <= _PRP_HOIST, RNE=_INTERPRETED, TMA=tma,
                TMA_STORE=tma and cfg.tma_store, JOIN=join, ONE_DOT=one_dot)
    stages = _post_res_proj_stages(cfg, n, bt, bc, mp, x.element_size(), w.element_size(), hi_lo)
    launch(_post_res_proj_kernel, (tblocks, splits),
           (x_arg, h_res, h_post, y_arg, hi, lo, out_arg, p, sq, t, c, m, mp, c_split),
           meta, num_warps=cfg.num_warps, num_stages=stages,
           **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and x.is_cuda else {}))
    if splits == 1:
        return out, p[0], sq[0]
    return out, p.sum(0), sq.sum(0)
