"""What the Triton kernels' wrappers share: stream shapes and dtypes, the accumulator dtype, grid planners that fill
the SMs' waves, the bf16 hi / lo split of an fp32 dot operand, rounding to the stream dtype, and where a stream
gradient is written. The conventions these serve are in ``triton_ops``' docstring."""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels.launch import launch

if TYPE_CHECKING:
    from mhc_compile.kernels.triton_config import DotCfg

STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, the device
# ---------------------------------------------------------------------------------------------
# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in
# recent Triton, ~2 us a call through their wrapper, and every launch of a training step computes several.
def pow2(v: int) -> int:
    """The least power of two >= v (1 for v <= 1)."""
    return 1 << (max(int(v), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lead_of(x: Tensor, trailing: int) -> tuple[torch.Size, int]:
    """(x's leading dims before its ``trailing`` ones, their product: the token count T).

    The wrappers take tensors with whatever leading dims the graph has ([B, S, n, C], [T, n, C] ...) and allocate
    their outputs with the same ones: the kernels only need T and contiguous memory, and a view a tensor costs
    a dispatcher call of host time (~2-4 us on the GPU machine's CPU, several a call)."""
    if x.dim() < trailing:
        raise ValueError(f"mhc triton: expected a tensor with {trailing} trailing dims after its token dims, got "
                         f"shape {tuple(x.shape)}")
    lead = x.shape[: x.dim() - trailing]
    return lead, math.prod(lead)


def stream_dims(x: Tensor) -> tuple[torch.Size, int, int, int]:
    """(leading dims, T, n, C) of a stream tensor [..., n, C]."""
    lead, t = lead_of(x, 2)
    n, c = x.shape[-2:]
    return lead, t, n, c


def stream_arg(x: Tensor) -> tuple[Tensor, bool]:
    """(the stream x as a kernel reads it, whether it is broadcast). A chain's head stream is its embedding expanded
    over the n streams (passes/rewrite.py): stride 0 along n over dense [..., C] rows. The kernels given X_BCAST read
    that one row a token (offset token * C + c for every stream) instead of n copies that a ``.contiguous()`` would
    write first. Any other x is made contiguous."""
    if is_broadcast(x):
        return x, True
    return x.contiguous(), False


# The Gluon kernels' reads of a broadcast stream (post_res_proj, the step backward; under fuse=True the step after a
# chain head gets the embedding so). On by default since their GPU checks passed on an H100 in session 50
# (benchmarks/gluon_check.py's "bcast" rows, gluon_step_bwd_check.py's "X_prev broadcast" rows: bit-equal to the
# dense copy; results/session50-2026-12-07-h100.md). MHC_COMPILE_GLUON_BCAST=0 at import turns them off:
# ``gluon_stream`` then makes such a stream dense before those kernels, as all paths did before session 50.
GLUON_BCAST = os.environ.get("MHC_COMPILE_GLUON_BCAST", "1") != "0"


def gluon_stream(x: Tensor, bcast: bool) -> tuple[Tensor, bool]:
    """(x, bcast) as a Gluon kernel takes them: ``stream_arg``'s, or x made dense where its broadcast reads are off
    (``GLUON_BCAST``)."""
    if bcast and not GLUON_BCAST:
        return x.contiguous(), False
    return x, bcast


def gluon_build_failed(op: str, error: Exception, device: torch.device, failed: set, fallback: str,
                       stacklevel: int = 2) -> None:
    """A Gluon kernel that does not build (another Triton's Gluon, shared memory, ptxas: a TritonError, raised before
    any launch, so nothing was written): ``device`` joins the op's ``failed`` set, whose later calls go straight to
    ``fallback``, and the user is told once. ``stacklevel`` counts from the caller."""
    failed.add(device)
    warnings.warn(f"mhc {op}: the Gluon kernel does not build here ({type(error).__name__}: {str(error)[:200]}); "
                  f"using {fallback} on {device}", stacklevel=stacklevel + 1)


def is_broadcast(x: Tensor) -> bool:
    """Whether ``stream_arg`` reads x as one row a token for all its streams."""
    return x.shape[-2] > 1 and x.stride(-2) == 0 and x.select(-2, 0).is_contiguous()


def check_stream(op: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype not in STREAM_DTYPES:
            raise TypeError(
                f"mhc triton {op}: unsupported dtype {t.dtype}; expected one of "
                f"{', '.join(str(d) for d in STREAM_DTYPES)}"
            )


@functools.lru_cache(maxsize=None)  # a few dtype combinations, asked for at every launch
def acc_torch(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, ref.acc_dtype(d))
    return out


def acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(stream_dtype: torch.dtype) -> str:
    """tf32 tensor cores for half-precision streams (exact on their values), exact products otherwise."""
    return "tf32" if stream_dtype in (torch.bfloat16, torch.float16) else "ieee"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: keep grids tiny


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The GPU's name (per-device tuning tables match parts of it, e.g. "H100"); "cpu" elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type



# ---------------------------------------------------------------------------------------------
# grid planners: how far to split a reduction so the grid fills the SMs
# ---------------------------------------------------------------------------------------------
def wave_splits(cfg: DotCfg, device: torch.device, programs: int, steps: int, min_steps: int = 4) -> int:
    """How many ways to split a reduction of ``steps`` tiles so the grid fills ``cfg.waves`` per SM."""
    want = cdiv(cfg.waves * num_sms(device), max(programs, 1))
    return max(1, min(want, steps // min_steps))


def wave_efficiency(programs: int, slots: int) -> float:
    """Fraction of the SM slots busy over the grid's waves (equal programs, ``slots`` resident at a time)."""
    return programs / (cdiv(programs, slots) * slots)


def filling_splits(cfg: DotCfg, device: torch.device, programs: int, steps: int, occupancy: int = 1,
                    min_steps: int = 4) -> int:
    """The split count of a reduction of ``steps`` tiles, among those that leave each program >= ``min_steps``
    tiles and the grid <= ``cfg.waves`` programs an SM, whose grid keeps the most SM slots busy over its waves
    (``occupancy`` programs resident an SM); ties go to fewer splits (longer loops, fewer partials).

    A grid sized by waves alone can end in a nearly empty wave: proj at 8192 tokens has 64 token blocks, and
    "one program an SM" gave 3 splits = 192 programs = 1.45 waves on 132 SMs, 73 % of the slots busy
    (profile_step, session 7: 55 % of copy bandwidth in the step); 2 splits fill 97 %.
    """
    slots = max(1, occupancy) * num_sms(device)
    most = max(1, min(steps // min_steps, cdiv(cfg.waves * slots, max(programs, 1))))
    return least_idle_splits(programs, most, slots)


@functools.lru_cache(maxsize=4096)  # called every launch with the same few arguments; ~30 candidates each
def least_idle_splits(programs: int, most: int, slots: int, split_cost: float = 0.0) -> int:
    """Among 1 .. ``most`` splits of a grid of ``programs``, the one with the least predicted time:
    (1 + split_cost x splits, for more than one split) / the fraction of the ``slots`` busy over its waves;
    ties go to fewer splits. ``split_cost``: what one split's partial costs against the kernel's other bytes."""

    def cost(s):
        return (1.0 + (split_cost * s if s > 1 else 0.0)) / wave_efficiency(programs * s, slots)

    return min(range(1, max(1, most) + 1), key=lambda s: (round(cost(s), 6), s))



# ---------------------------------------------------------------------------------------------
# the tensor-core dots' operands: bf16 hi + lo halves of an fp32 operand, and rounding to the stream dtype
# ---------------------------------------------------------------------------------------------
def uses_hi_lo(stream_dtype: torch.dtype) -> bool:
    """bf16 streams multiply in bf16 with the fp32 operand split into hi + lo bf16 halves.

    X is exact in bf16 and hi + lo keeps ~16 mantissa bits of the fp32 operand (tf32 keeps 10). The tile of X
    then feeds the tensor cores as it was loaded instead of being widened to fp32 in registers: on an H100 this
    took proj from 34 % to 96 % of copy bandwidth at 32768 x 4096 (kernels-2026-11-24b-h100.md). fp16 keeps tf32:
    its 5-bit exponent would flush the lo half of small values.
    """
    return stream_dtype == torch.bfloat16


def half_dot_dtype():
    """The dtype hi/lo dots run in: bf16, or fp32 under Triton's interpreter, whose bf16 tl.dot is wrong
    (bf16 operands are exact in fp32, so the interpreter computes the GPU's products)."""
    return tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16


@triton.jit
def round_to(v, XT: tl.constexpr, RNE: tl.constexpr):
    """v (fp32) cast to a stream dtype XT. Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to
    nearest even), so under it (RNE: set only when interpreted, ``INTERPRETED``) bf16 is rounded by hand first:
    the tests then compare a stored stream with the reference's bit for bit instead of within an ulp."""
    if RNE:
        if XT == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(XT)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def hi_lo_kernel(src_ptr, dst_ptr, R, M, s_half, s_r, s_m, BR: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr,
                  STREAMS: tl.constexpr = 1):
    """dst[0] = bf16(src), dst[1] = bf16(src - dst[0]) for an fp32 [R, M] src, zero-padded to MP columns;
    dst element (half, r, m) at half * s_half + r * s_r + m * s_m (so it can write either orientation).
    BM: the power of two >= MP that a program's column range spans (MP is proj's column blocks times their
    width: 5 x 64 = 320 at n = 16). STREAMS > 1: src's rows are STREAMS blocks of R / STREAMS (phi's rows
    i*C + c), and source row i*C + c goes to dst row c*STREAMS + i (post_res_proj's one_dot)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ms = tl.arange(0, BM)
    rmask = rows < R
    r64 = rows.to(tl.int64)
    v = tl.load(src_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & (ms < M)[None, :], other=0.0)
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    if STREAMS > 1:
        per_stream = R // STREAMS
        r64 = (r64 % per_stream) * STREAMS + r64 // per_stream
    off = r64[:, None] * s_r + ms[None, :] * s_m
    smask = rmask[:, None]
    if MP != BM:  # columns from MP on lie outside dst; a power-of-two MP (every width but proj's) builds as before
        smask = smask & (ms < MP)[None, :]
    tl.store(dst_ptr + off, hi, mask=smask)
    tl.store(dst_ptr + s_half + off, lo, mask=smask)


def split_hi_lo(src: Tensor, mp: int, transpose: bool, interleave: bool = False, streams: int = 1) -> Tensor:
    """fp32 [..., M] (R rows) -> bf16 [2, R, mp] (hi, lo), or [2 * mp, R] with ``transpose`` (the A operand of
    X^T dp), or [R, 2, mp] with ``interleave`` (a row's hi then lo: one [rows, 2 mp] B tile of a dot).
    ``streams``: R is that many blocks of rows (phi's i*C + c), written in the order c*streams + i."""
    m = src.shape[-1]
    r = src.numel() // m
    if r % streams:
        raise ValueError(f"mhc triton split_hi_lo: {r} rows are not {streams} equal blocks")
    if transpose:
        dst = torch.empty((2 * mp, r), dtype=torch.bfloat16, device=src.device)
        strides = (mp * r, 1, r)
    elif interleave:
        dst = torch.empty((r, 2, mp), dtype=torch.bfloat16, device=src.device)
        strides = (mp, 2 * mp, 1)
    else:
        dst = torch.empty((2, r, mp), dtype=torch.bfloat16, device=src.device)
        strides = (r * mp, mp, 1)
    bm = pow2(mp)
    br = max(1, min(pow2(r), 4096 // bm))
    meta = dict(BR=br, MP=mp, BM=bm, STREAMS=streams) if streams > 1 else dict(BR=br, MP=mp, BM=bm)
    launch(hi_lo_kernel, (cdiv(r, br),), (src.float().contiguous(), dst, r, m, *strides), meta)
    return dst


# ---------------------------------------------------------------------------------------------
# stream gradients
# ---------------------------------------------------------------------------------------------
def grad_buffer(out: Tensor | None, like: Tensor, what: str, copied: Tensor | None = None) -> Tensor:
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
