"""proj's backward in one pass over the stream: dx and dphi from the same X tile (Triton).

    program = (K block of BK flat columns k = i * C + c, token split); for each [BT, BK] tile of its tokens:
      dx tile   = dp_tile @ phi_slab + 2 dsq x + h_pre[t, i] dout[t, c] (+ acc)   -> stored, rounded once
      dphi_acc += A_tile @ x_tile        A = dp^T as bf16 hi rows then lo rows, [2 MP, BT]
    at the end: the [MP, BK] partial of dphi^T (hi + lo halves summed) -> dphi[split], summed on the host.

``triton_ops.proj_backward`` / ``proj_pre_backward`` call ``proj_grads`` for bf16 streams; the two-kernel path
(``_proj_dx_kernel`` + ``_proj_dphi_kernel``) reads X twice and stays for the other dtypes and as the side-by-side
baseline (``triton_ops.configure("proj_dx_dphi", enabled=False)``). The shipped tile: 64 x 128, 8 warps, 2 stages,
128 registers (two programs an SM), PIPELINE_ALL, TMA. On an H200 the pointer build ran at 75-82 % of copy bandwidth
(1005.8 us at 32768 x 4096, 478.7 at 8192 x 7168; benchmarks/results/session8-2026-12-02-h200.md), against 55-58 %
for the pair (1415.2 and 657.9 us); TMA took it to 85 % (971.4 against 995.5 us in one run,
benchmarks/results/session11-2026-12-02-h200.md). ``benchmarks/lab_dx_dphi.py`` sweeps its tiles and says why the
kernel is shaped this way (the earlier fused try spilled at every tile).

TMA (host-side tensor descriptors): X, dout, acc and dX move as [BT, BK] blocks. In the sm_90a build the three
loads land in 128-byte-swizzled shared tiles that are read straight into the MMA layout the dx dot produces, and
dX is written from registers into a swizzled tile that the TMA engine stores: the loop has no register layout
change left (the pointer build has one for the dx store and reads dout from an unswizzled tile, with bank
conflicts), and ptxas spills 200 bytes instead of 280. Rows past T read as zeros and are not written, which is
what the masks did.

Designs tried on an H200 and removed (their code is in git history, their timings in
benchmarks/results/session6-2026-12-02-h200.md and session8-2026-12-02-h200.md):
* PREFETCH (the next tile's side operands in registers a step ahead), DX_HI_LO (dp @ phi^T as three bf16 dots):
  slower;
* XT_A (dphi = X^T @ dp, a [BK, MP] accumulator): no faster (-1 to +1 %);
* SIDE_ACC (dx's dot accumulating onto its elementwise terms): 16-27 % slower, though the sm_90a build had
  fewer spills and layout conversions;
* DIAG (every dx term a tensor-core dot: diag(2 dsq) @ X, diag(h_pre) @ dout, I @ acc, and dp @ phi^T as bf16
  hi / lo dots, so dx never leaves the MMA layout and dout and acc are pipelined dot operands): 1.4-3x slower
  (up to 255 registers, one program an SM, and each dot waited on before the next).
"""

from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

from mhc_compile.kernels import triton_ops as tk
from mhc_compile.kernels import triton_common as tcom
from mhc_compile.kernels import triton_proj as tproj
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.tma import descriptor, tma_ok


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ld(ptr, mask, MASK_ROWS: tl.constexpr, EVEN_K: tl.constexpr):
    """A load masked only where it has to be: the steady state of the token loop (MASK_ROWS off) reads whole
    tiles unmasked when K is a multiple of BK, so its loads vectorise (the pipeliner skips loads whose mask
    breaks the 4-byte vectors) and no [BT, BK] predicate tensor is carried between pipeline stages."""
    if MASK_ROWS:
        v = tl.load(ptr, mask=mask, other=0.0)
    elif EVEN_K:
        v = tl.load(ptr)
    else:
        v = tl.load(ptr, mask=mask, other=0.0)
    return v


@triton.jit
def _tile_mask(rmask, kmask, EVEN_K: tl.constexpr):
    """[BT, BK] mask of a tile, as [BT, 1] when every column is in range (loads broadcast it)."""
    if EVEN_K:
        m2 = rmask[:, None]
    else:
        m2 = rmask[:, None] & kmask[None, :]
    return m2


@triton.jit
def _x_load(x_ptr, rows, t_hi, C, ks, kmask, cc, N: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_K: tl.constexpr,
            X_BCAST: tl.constexpr):
    """The X tile [BT, BK] as stored (bf16 feeds the tensor cores as loaded). Its pointers start from a [BT] row
    base: no [BT, BK] int64 offset tensor shared with other loads for the pipeliner to carry across stages.
    X_BCAST: x is [T, C], the one row every stream of a token holds, read at the block's channels cc."""
    if X_BCAST:
        xrow = rows.to(tl.int64) * C
        ptrs = x_ptr + xrow[:, None] + cc[None, :]
    else:
        xrow = rows.to(tl.int64) * (N * C)
        ptrs = x_ptr + xrow[:, None] + ks[None, :]
    return _ld(ptrs, _tile_mask(rows < t_hi, kmask, EVEN_K), MASK_ROWS, EVEN_K)


@triton.jit
def _side_loads(dsq_ptr, h_ptr, g_ptr, acc_ptr, rows, t_hi, C, ks, kmask, ii, cc, t0, c0, k0, N: tl.constexpr,
                HAS_PRE: tl.constexpr, ONE_STREAM: tl.constexpr, HAS_ACC: tl.constexpr, MASK_ROWS: tl.constexpr,
                EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """The other loads of a tile's dx, in their stored dtypes (widened where used): (dsq, h_pre, dout tile, acc
    tile); absent terms are 0.0 placeholders. TMA: g_ptr and acc_ptr are tensor descriptors of dout [T, C] and
    acc [T, K], read at (t0, c0) and (t0, k0); rows past T read as zeros."""
    r64 = rows.to(tl.int64)
    rmask = rows < t_hi
    m2 = _tile_mask(rmask, kmask, EVEN_K)
    dsq = _ld(dsq_ptr + r64, rmask, MASK_ROWS, EVEN_K)
    h = 0.0
    g = 0.0
    a = 0.0
    if HAS_PRE:
        if TMA:
            g = g_ptr.load([t0, c0])
        else:
            g = _ld(g_ptr + (r64 * C)[:, None] + cc[None, :], m2, MASK_ROWS, EVEN_K)
        if ONE_STREAM:  # the block lies in one stream: h_pre is one value a token
            h = _ld(h_ptr + r64 * N + ii, rmask, MASK_ROWS, EVEN_K)
        else:
            h = _ld(h_ptr + (r64 * N)[:, None] + ii[None, :], m2, MASK_ROWS, EVEN_K)
    if HAS_ACC:
        if TMA:
            a = acc_ptr.load([t0, k0])
        else:
            a = _ld(acc_ptr + (r64 * (N * C))[:, None] + ks[None, :], m2, MASK_ROWS, EVEN_K)
    return dsq, h, g, a


@triton.jit
def _plus_side(dx, dsq, xt, h, g, a, HAS_PRE: tl.constexpr, ONE_STREAM: tl.constexpr, HAS_ACC: tl.constexpr,
               ACC: tl.constexpr):
    """dx + 2 dsq x + h_pre dout + acc, added elementwise in that order."""
    dx += 2.0 * dsq.to(ACC)[:, None] * xt.to(ACC)
    if HAS_PRE:
        if ONE_STREAM:
            dx += h.to(ACC)[:, None] * g.to(ACC)
        else:
            dx += h.to(ACC) * g.to(ACC)
    if HAS_ACC:
        dx += a.to(ACC)
    return dx


@triton.jit
def _tile(dphi, xt, dsq, h, g, a, rows, t_hi, dp_ptr, a_ptr, dx_ptr, phi_t, K, M, s_am, s_at, ks, kmask, ms,
          mmask, mas, arow, t0, k0, HAS_PRE: tl.constexpr, ONE_STREAM: tl.constexpr, HAS_ACC: tl.constexpr,
          HI_LO: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
          PREC: tl.constexpr, TMA: tl.constexpr):
    """One [BT, BK] tile: store its dx (all terms meet in ACC, rounded once) and return dphi + A @ X. TMA: dx_ptr
    is a tensor descriptor of dX [T, K] (bf16), written at (t0, k0); rows past T are dropped."""
    r64 = rows.to(tl.int64)
    rmask = rows < t_hi
    # dp and A feed dots: Triton's pipeliner prefetches them (and X) num_stages - 1 tiles ahead. Their column /
    # row masks (M < MP, zero padding of A) are loop-invariant; the row mask only exists in the tail tile.
    if MASK_ROWS:
        dmask = rmask[:, None] & mmask[None, :]
        amask = arow[:, None] & rmask[None, :]
    else:
        dmask = mmask[None, :]
        amask = arow[:, None]
    dp = tl.load(dp_ptr + (r64 * M)[:, None] + ms[None, :], mask=dmask, other=0.0).to(ACC)
    at = tl.load(a_ptr + mas[:, None] * s_am + (r64 * s_at)[None, :], mask=amask, other=0.0)
    dx = tl.dot(dp, phi_t, input_precision=PREC, out_dtype=ACC)
    dx = _plus_side(dx, dsq, xt, h, g, a, HAS_PRE, ONE_STREAM, HAS_ACC, ACC)
    if TMA:
        dx_ptr.store([t0, k0], dx.to(tl.bfloat16))
    else:
        dx_ptrs = dx_ptr + (r64 * K)[:, None] + ks[None, :]
        if MASK_ROWS:
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=_tile_mask(rmask, kmask, EVEN_K))
        elif EVEN_K:
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty))
        else:
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=_tile_mask(rmask, kmask, EVEN_K))
    if HI_LO:  # the X tile enters the tensor cores as loaded
        dphi = tl.dot(at.to(DOT), xt.to(DOT), dphi, out_dtype=ACC)
    else:
        dphi = tl.dot(at.to(ACC), xt.to(ACC), dphi, input_precision=PREC, out_dtype=ACC)
    # A use of dphi inside the iteration, so that its wgmma is waited on here. Without it, Triton's pipeliner (3.6
    # and 3.9) leaves that wgmma in flight across the next tile's loads (TMA or cp.async) into the one X buffer it
    # reads (no wgmma.wait_group between them in the sm_90a PTX): a write-after-read race that the PTX memory model
    # does not order, though no GPU run has shown it (benchmarks/results/session24-2026-12-04-h200.md). "+ 0.0" is
    # kept by the compilers (only "+ -0.0" is an identity for floats); benchmarks/sm90_build.py --hazards reads the
    # sm_90a builds for the wait, and a test runs it. On an H200 (TMA build) it cost nothing: 951.5 against 965.2 us at
    # 32768 x 4096, 465.9 against 464.0 at 8192 x 7168; issuing dphi's dot first instead cost 2-8 %.
    return dphi + 0.0


@triton.jit
def _tokens(dphi, t0, t_hi, x_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dp_ptr, a_ptr, dx_ptr, phi_t, C, K, M, s_am, s_at,
            ks, kmask, ii, cc, ms, mmask, mas, arow, c0, k0, N: tl.constexpr, BT: tl.constexpr,
            HAS_PRE: tl.constexpr, ONE_STREAM: tl.constexpr, HAS_ACC: tl.constexpr, HI_LO: tl.constexpr,
            MASK_ROWS: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
            TMA: tl.constexpr, X_BCAST: tl.constexpr):
    """The tile of tokens t0 .. t0 + BT: its loads, then _tile (MASK_ROWS: the ragged tail, rows past t_hi)."""
    rows = t0 + tl.arange(0, BT)
    if TMA and X_BCAST:  # x_ptr: a tensor descriptor of the rows [T, C]; the block lies in one stream, at c0
        xt = x_ptr.load([t0, c0])
    elif TMA:  # x_ptr: a tensor descriptor of X [T, K]
        xt = x_ptr.load([t0, k0])
    else:
        xt = _x_load(x_ptr, rows, t_hi, C, ks, kmask, cc, N, MASK_ROWS, EVEN_K, X_BCAST)
    dsq, h, g, a = _side_loads(dsq_ptr, h_ptr, g_ptr, acc_ptr, rows, t_hi, C, ks, kmask, ii, cc, t0, c0, k0, N,
                               HAS_PRE, ONE_STREAM, HAS_ACC, MASK_ROWS, EVEN_K, TMA)
    return _tile(dphi, xt, dsq, h, g, a, rows, t_hi, dp_ptr, a_ptr, dx_ptr, phi_t, K, M, s_am, s_at, ks, kmask, ms,
                 mmask, mas, arow, t0, k0, HAS_PRE, ONE_STREAM, HAS_ACC, HI_LO, MASK_ROWS, EVEN_K, DOT, ACC, PREC,
                 TMA)


@triton.jit(do_not_specialize=["T"])
def _proj_dx_dphi_kernel(x_ptr, phi_ptr, dp_ptr, a_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dx_ptr, dphi_ptr,
                         T, C, M, T_SPLIT, s_am, s_at, N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         MP: tl.constexpr, MA: tl.constexpr, HAS_PRE: tl.constexpr, ONE_STREAM: tl.constexpr,
                         HAS_ACC: tl.constexpr, EVEN_K: tl.constexpr, HI_LO: tl.constexpr, DOT: tl.constexpr,
                         ACC: tl.constexpr, PREC: tl.constexpr, LOOP_STAGES: tl.constexpr, TMA: tl.constexpr,
                         X_BCAST: tl.constexpr = False):
    """Program (K block, token split): dx of its [tokens, BK] slab and the [MP, BK] partial of dphi^T over its
    tokens, written transposed into dphi_ptr[split] ([K, M]); X is read once.

    phi_ptr: phi [K, M] in ACC. a_ptr: the A operand of dphi^T = A @ X: with HI_LO dp^T as bf16 hi rows then lo
    rows ([2 MP, s_am], s_at = 1, MA = 2 MP; s_am a multiple of 16 so A's rows load as 16-byte vectors), else
    dp^T read in place (MA = MP) and the X tile widened to ACC. ONE_STREAM (C % BK == 0): the block lies in one
    stream i0, so h_pre is one value a token and dout's channels a contiguous run; otherwise both are gathered
    per lane. EVEN_K (K % BK == 0): no column mask. Whole tiles run unmasked in the loop; the ragged tail tile of
    the split runs once after it.
    PIPELINE_ALL (LOOP_STAGES = the launch's num_stages, else None): the token loop is a ``tl.range`` with its own
    num_stages, which makes Triton's pipeliner stage every load of the loop (dsq, h_pre, dout and acc too)
    through shared memory num_stages - 1 tiles ahead; without it only the dots' operands are, and dout and acc
    wait a memory latency every step. At the shipped tile it
    takes 112 KB of shared memory instead of 80 (still two programs an H100 / H200 SM) and ran 19 % faster on an
    H200: 478 against 592 us at 8192 x 7168, 1819 against 2197 at 32768 x 7168 (session8-2026-12-02-h200.md).
    X_BCAST: x is [T, C], the one row every stream of a token holds (``triton_common.stream_arg``), read at the
    block's channels cc (TMA: x_ptr is a descriptor of those rows, read at c0); acc and dX keep the dense layout.
    """
    K = N * C
    split = tl.program_id(1)
    ks, kmask, ks64, ms, mmask, ii, cc = tproj.k_block(C, M, N, BK, MP, ONE_STREAM)
    k0 = tl.program_id(0) * BK  # the block's first column, and (TMA, where the block lies in one stream) its
    c0 = k0 % C  # first channel: the descriptors' column offsets
    mas = tl.arange(0, MA)
    # the phi slab [MP, BK] is loaded once for the program's whole token range
    phi_t = tl.load(phi_ptr + ks64[None, :] * M + ms[:, None], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(ACC)
    # rows of A past M are zero padding: masking them skips their reads (the hi and lo halves alike)
    if HI_LO:
        arow = (mas % MP) < M
    else:
        arow = mas < M
    dphi = tl.zeros([MA, BK], dtype=ACC)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(t_lo + T_SPLIT, T)
    t_full = t_lo + (t_hi - t_lo) // BT * BT  # end of the whole tiles
    # LOOP_STAGES (PIPELINE_ALL): a loop with its own num_stages, whose every load the pipeliner stages through
    # shared memory, dout and acc included; None: a plain loop, where it stages the dots' operands X, dp and A
    for t0 in tl.range(t_lo, t_full, BT, num_stages=LOOP_STAGES):
        dphi = _tokens(dphi, t0, t_hi, x_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dp_ptr, a_ptr, dx_ptr, phi_t, C, K, M,
                       s_am, s_at, ks, kmask, ii, cc, ms, mmask, mas, arow, c0, k0, N, BT, HAS_PRE, ONE_STREAM,
                       HAS_ACC, HI_LO, False, EVEN_K, DOT, ACC, PREC, TMA, X_BCAST)
    if t_full < t_hi:  # the ragged tail tile, masked
        dphi = _tokens(dphi, t_full, t_hi, x_ptr, dsq_ptr, h_ptr, g_ptr, acc_ptr, dp_ptr, a_ptr, dx_ptr, phi_t, C, K,
                       M, s_am, s_at, ks, kmask, ii, cc, ms, mmask, mas, arow, c0, k0, N, BT, HAS_PRE, ONE_STREAM,
                       HAS_ACC, HI_LO, True, EVEN_K, DOT, ACC, PREC, TMA, X_BCAST)
    if HI_LO:
        dphi = tl.sum(tl.reshape(dphi, (2, MP, BK)), axis=0)
    out_rows = split.to(tl.int64) * K + ks64
    tl.store(dphi_ptr + out_rows[None, :] * M + ms[:, None], dphi, mask=mmask[:, None] & kmask[None, :])


# ---------------------------------------------------------------------------------------------
# host wrapper
# ---------------------------------------------------------------------------------------------
LAST_COMPILED = {}  # the CompiledKernel of the latest launch (GPU only): registers, spills, shared memory


def split_dp_t(dp, mp: int):
    """dp^T as bf16 hi rows then lo rows, [2 MP, T] in a [2 MP, T16] buffer (T16 = T rounded up to 16): a row
    stride that is a multiple of 16 elements lets the kernel load A's rows as 16-byte vectors, which the
    pipeliner needs (triton_common.split_hi_lo writes the same values with row stride T)."""
    m = dp.shape[-1]
    t = dp.numel() // m
    t16 = tcom.cdiv(t, 16) * 16
    dst = torch.empty((2 * mp, t16), dtype=torch.bfloat16, device=dp.device)
    br = max(1, min(tcom.pow2(t), 4096 // mp))
    launch(tcom.hi_lo_kernel, (tcom.cdiv(t, br),), (dp.float().contiguous(), dst, t, m, mp * t16, 1, t16),
           dict(BR=br, MP=mp, BM=mp))
    return dst


def plan_splits(t: int, bt: int, kblocks: int, waves: float, occupancy: int, device, splits: int | None = None,
                split_cost: float = 0.0):
    """(splits, tokens per split). Among 1 .. ``waves`` programs an SM, the split count with the least predicted
    time: (1 + split_cost x splits) / (fraction of SM slots busy over the grid's waves, ``occupancy`` programs
    resident an SM); ``split_cost`` = bytes of one split's dphi partial (written, then read by the host sum) /
    the kernel's other bytes; ties go to fewer splits. E.g. K = 28672 in 224 blocks on 132 SMs, one program an
    SM: 1 split = 224 programs, 85 % of 2 waves; 4 splits = 896 programs, 97 % of 7 waves."""
    tiles = tcom.cdiv(t, bt)
    if splits is None:
        sms = tcom.num_sms(device)
        most = max(1, min(tiles, int(waves * sms) // max(kblocks, 1)))
        splits = tcom.least_idle_splits(kblocks, most, max(1, occupancy) * sms, split_cost)
    splits = max(1, min(splits, tiles))
    t_split = tcom.cdiv(tcom.cdiv(t, splits), bt) * bt
    return tcom.cdiv(t, t_split), t_split


def _launch_plan(t, n, c, m, stream_dtype, acc_t, has_pre, has_acc, *, bt, bk, num_warps, num_stages, maxnreg,
                 pipeline_all=False, tma=False, x_bcast=False):
    """(tile, constexpr meta, launch options) of one call: shared by the wrapper and the --ptxas report. The
    mappings are shared between calls (cached), hence read-only. ``tma``: the caller checked that the tensors
    allow descriptors (``tma.tma_ok``); the plan takes TMA where the tile allows it too. ``x_bcast``: the
    kernel's X_BCAST (x broadcast over its streams)."""
    return _cached_plan(t, n, c, m, stream_dtype, acc_t, has_pre, has_acc, bt, bk, num_warps, num_stages, maxnreg,
                        pipeline_all, tma, x_bcast, tcom.half_dot_dtype())


@functools.lru_cache(maxsize=1024)  # every launch asks again with the same shapes (and the interpreter setting)
def _cached_plan(t, n, c, m, stream_dtype, acc_t, has_pre, has_acc, bt, bk, num_warps, num_stages, maxnreg,
                 pipeline_all, tma, x_bcast, dot):
    k = n * c
    mp = max(16, tcom.pow2(m))
    hi_lo = tcom.uses_hi_lo(stream_dtype) and acc_t == torch.float32
    bt = max(16, min(bt, tcom.pow2(t)))  # tl.dot needs >= 16 rows
    bk = max(16, min(bk, tcom.pow2(k)))
    one_stream, even_k = c % bk == 0, k % bk == 0
    meta = dict(N=n, BT=bt, BK=bk, MP=mp, MA=2 * mp if hi_lo else mp, HAS_PRE=has_pre, ONE_STREAM=one_stream,
                HAS_ACC=has_acc, EVEN_K=even_k, HI_LO=hi_lo, DOT=dot,
                ACC=tcom.acc_tl(acc_t), PREC=tcom.dot_precision(stream_dtype),
                LOOP_STAGES=num_stages if pipeline_all else None,
                TMA=bool(tma and hi_lo and one_stream and even_k and bt <= 256 and bk <= 256), X_BCAST=x_bcast)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return bt, bk, types.MappingProxyType(meta), types.MappingProxyType(opts)


def proj_pre_backward_fused(x, phi, dp, dsq, h_pre=None, dout=None, acc=None, *, bt=64, bk=128, num_warps=16,
                            num_stages=3, waves=16.0, occupancy=1, splits=None, maxnreg=None, pipeline_all=False,
                            tma=False, out=None):
    """(dx, dphi) of ``triton_ops.proj_pre_backward`` (h_pre and dout given) or ``proj_backward`` (both None),
    from one kernel that reads X once. dx in x.dtype, dphi in phi.dtype. Token splits: see plan_splits
    (``waves``, ``occupancy``), or ``splits`` given. ``maxnreg`` caps registers a thread (ptxas spills past it),
    e.g. 128 to fit two 8-warp programs on an SM. ``pipeline_all``: the kernel's PIPELINE_ALL. ``tma``: X, dout,
    acc and dX move as [BT, BK] blocks through TMA descriptors (bf16 streams whose K blocks lie in one stream,
    16-byte aligned; otherwise the pointer loads). ``out``: dx's buffer (contiguous, x's shape and dtype); it may
    be acc, whose every tile the program that stores that dx tile has read first. x may be broadcast over its n
    streams (``triton_common.stream_arg``): the kernel then reads its one row a token."""
    tcom.check_stream("proj_pre_backward_fused", x, phi)
    _, t, n, c = tcom.stream_dims(x)  # any leading dims: the kernel needs T and contiguous memory
    k, m = phi.shape
    if k != n * c:
        raise ValueError(f"proj_pre_backward_fused: phi has {k} rows, expected n*C = {n * c}")
    if (h_pre is None) != (dout is None):
        raise ValueError("proj_pre_backward_fused: give both h_pre and dout, or neither")
    if acc is not None and acc.shape != x.shape:
        raise ValueError(f"proj_pre_backward_fused: acc has shape {tuple(acc.shape)}, expected {tuple(x.shape)}")
    (x, bcast), phi, dp, dsq = tcom.stream_arg(x), phi.contiguous(), dp.contiguous(), dsq.contiguous()
    has_pre = h_pre is not None
    if has_pre:
        h_pre, dout = h_pre.contiguous(), dout.contiguous()
    acc = acc.contiguous() if acc is not None else None
    acc_t = tcom.acc_torch(x.dtype, phi.dtype, *((dout.dtype,) if has_pre else ()))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out  # dense, x broadcast or not
    if t == 0 or k == 0:
        return dx, torch.zeros_like(phi)
    tma = tma and tma_ok(x, dx, *((dout,) if has_pre else ()), *((acc,) if acc is not None else ()))
    bt, bk, meta, opts = _launch_plan(t, n, c, m, x.dtype, acc_t, has_pre, acc is not None, bt=bt, bk=bk,
                                      num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
                                      pipeline_all=pipeline_all, tma=tma, x_bcast=bcast)
    if meta["HI_LO"]:  # dp^T as bf16 hi rows then lo rows, [2 MP, T] with a row stride padded to 16
        a = split_dp_t(dp, meta["MP"])
        s_am, s_at = a.stride(0), 1
    else:  # dp^T read in place
        a, s_am, s_at = dp, 1, m
    kblocks = tcom.cdiv(k, bk)
    split_cost = (k * m * 4 * 2) / (3 * x.numel() * x.element_size())  # a dphi partial / X, acc and dX
    splits, t_split = plan_splits(t, bt, kblocks, waves, occupancy, x.device, splits, split_cost)
    dphi = torch.empty((splits, k, m), dtype=acc_t, device=x.device)
    # absent operands are placeholders that their constexpr flag never lets the kernel read
    xs, gs, accs, dxs = x, dout if has_pre else x, acc if acc is not None else x, dx
    if meta["TMA"]:
        block = (bt, bk)
        # a broadcast x: a descriptor of its rows [T, C] (TMA blocks lie in one stream: the kernel reads at c0)
        xs = descriptor(x.select(-2, 0), t, c, block) if bcast else descriptor(x, t, k, block)
        dxs = descriptor(dx, t, k, block)
        gs = descriptor(dout, t, c, block) if has_pre else xs
        accs = descriptor(acc, t, k, block) if acc is not None else xs
    args = (xs, phi, dp, a, dsq, h_pre if has_pre else dsq, gs, accs, dxs, dphi, t, c, m, t_split, s_am, s_at)
    # no stage retry: an OutOfResources goes to triton_proj._proj_grads, which drops PIPELINE_ALL, then the tile
    ck = launch(_proj_dx_dphi_kernel, (kblocks, splits), args, meta, shrink_stages=False, **opts)
    if ck is not None:
        LAST_COMPILED["kernel"] = ck
        LAST_COMPILED["grid"] = (kblocks, splits)
    return dx, (dphi[0] if splits == 1 else dphi.sum(0)).to(phi.dtype)


_NO_GLUON: set = set()  # devices where the Gluon kernel failed to build: the Triton kernel runs there instead


def proj_grads(x, phi, dp, dsq, h_pre, dout, acc, cfg: "tk.FusedBwdCfg", out=None):
    """triton_ops' entry: (dx, dphi) with ``cfg``'s tile; the register cap applies on the GPU only (the
    interpreter has no registers). The [2 MP, BK] dphi accumulator lives in registers, so BK shrinks as the
    coefficient count grows (n = 4: MP = 32, BK = 128 as configured; n = 8: MP = 128, BK = 32), as the pair's
    dphi kernel does."""
    gpu = tcom.device_name(x.device)
    mixers = cfg.gluon_for(acc is not None, dout is not None, gpu)
    if mixers and x.device not in _NO_GLUON:
        from mhc_compile.kernels import gluon_proj_bwd

        n, c = x.shape[-2:]
        if gluon_proj_bwd.supported(x, n, c, *(v for v in (dout, acc, out) if v is not None), coeffs=phi.shape[1]):
            try:
                return gluon_proj_bwd.proj_grads(x, phi, dp, dsq, h_pre, dout, acc, out, mixers=mixers,
                                                 dx_hl=cfg.ws_dx_hl,
                                                 pace=cfg.pace_for(acc is not None, dout is not None, n),
                                                 pace_walk=cfg.ws_pace_walk,
                                                 stages=cfg.stages_on(gpu, dout is not None))
            except TritonError as e:  # a build error (another Triton's Gluon, shared memory, ptxas): before launch,
                # so nothing was written; it must not reach _proj_grads, whose OutOfResources handling is the Triton
                # kernel's
                tcom.gluon_build_failed("proj backward", e, x.device, _NO_GLUON, "the Triton kernel")
    two_mp = 2 * max(16, tcom.pow2(phi.shape[1]))
    bk = max(16, min(cfg.bk, 8192 // two_mp))
    return proj_pre_backward_fused(x, phi, dp, dsq, h_pre, dout, acc, bt=cfg.bt, bk=bk, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages, waves=cfg.waves, occupancy=cfg.occupancy,
                                   maxnreg=cfg.maxnreg if x.is_cuda else None, pipeline_all=cfg.pipeline_all,
                                   tma=cfg.tma, out=out)
