"""What the warp-specialized Gluon kernels (gluon_post_res_proj, gluon_step_bwd, gluon_proj_bwd, gluon_proj) share.

- The Gluon imports, absent before Triton 3.5 (``AVAILABLE``).
- The names Triton changed after 3.6, the GPU machine's version: the TMA copies and the barrier of a
  partition's warps.
- The loader warp's register budget.
- TMA descriptors with the swizzle that TMA and wgmma agree on.
- The shared memory a block may take.
- fp32 operands padded with zero columns to a TMA box's width.
- p = X phi against phi's bf16 hi / lo halves: the accumulator pair, its wgmmas, waits and store.
"""

from __future__ import annotations

import functools

import torch

try:  # Gluon: Triton >= 3.5 (the GPU machine's 3.6 and this machine's later versions build these kernels)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None

AVAILABLE = gluon is not None
SMEM = 226 * 1024  # bytes of rings and tiles: an H100 / H200 block may take 227 KiB, barriers included

if AVAILABLE:
    LOADER_REGS = gl.constexpr(40)  # a loader warp computes coordinates only
    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global and the barrier of
    # a partition's warps thread_barrier; later versions: async_load / async_store (same arguments) and barrier
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    warps_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def pace_wait(pace_ptr, want, PACE_SPIN: gl.constexpr):
        """A paced loader's wait (gluon_step_bwd's and gluon_proj_bwd's ``_loader``): poll the int32 counter at
        pace_ptr until it reaches ``want``, at most PACE_SPIN times. Returns 1 if it did, 0 if the polls ran out (a
        program of the group not resident), after which the loader stops pacing."""
        polls = 0
        while (gl.load(pace_ptr, volatile=True) < want) & (polls < PACE_SPIN):
            polls += 1
        return (polls < PACE_SPIN).to(gl.int32)

    @gluon.jit
    def waited(done, N: gl.constexpr):
        """warpgroup_mma_wait's results as a tuple (it returns one tensor, not a 1-tuple, for one dependency)."""
        if N == 1:
            done = (done,)
        return done

    # bf16 <-> fp32 two elements at a time, on the 32-bit register that holds an adjacent pair (a layout whose
    # thread holds consecutive elements along the last dimension in pairs: BlockedLayout [.., 2k], wgmma's
    # accumulator layouts). LLVM widens a pair's high half with a PRMT and a shift (three instructions a pair) and
    # narrows one element at a time (F2F, then a PRMT to pack); these take two and one. Each conversion gives the same
    # bits: widening bf16 is exact, and cvt.rn.bf16x2.f32 rounds to nearest even as F2F.BF16.F32 does. The code
    # around them may contract into FMAs differently, though: on the H200 (session 28), post_res_proj's X' became
    # bit-equal to the Triton post_res kernel's at n = 2 and 4 (it was not before), and the step backward's dy_prev
    # moved in its last bits, at the same error against float64.
    @gluon.jit
    def bf16_to_f32(v):
        """v (bf16) as fp32."""
        return gl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [v],
                                         dtype=gl.float32, is_pure=True, pack=2)

    @gluon.jit
    def f32_to_bf16(v):
        """v (fp32) rounded to bf16, to nearest even."""
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [v], dtype=gl.bfloat16,
                                         is_pure=True, pack=2)

    @gluon.jit
    def round_bf16(v):
        """(v rounded to bf16, that value as fp32): a tile stored as bf16 and also used as rounded."""
        return gl.inline_asm_elementwise(
            "{ cvt.rn.bf16x2.f32 $0, $4, $3; shl.b32 $1, $0, 16; and.b32 $2, $0, 0xffff0000; }", "=r,=r,=r,r,r",
            [v], dtype=(gl.bfloat16, gl.float32), is_pure=True, pack=2)
    # p = X phi with phi split into bf16 hi and lo halves (proj's forward, post_res_proj): either a hi and a lo wgmma
    # into two [BT, MP] accumulators, or with JOIN one wgmma against phi's interleaved [hi | lo] tile into one
    # [BT, 2 MP] accumulator, whose halves are added at the end. With JOIN, acc_lo is acc and unused, so both ways
    # carry the same (acc, acc_lo) pair through the kernel's loop.
    @gluon.jit
    def hl_zeros(BT: gl.constexpr, MP: gl.constexpr, layout: gl.constexpr, JOIN: gl.constexpr):
        """The (acc, acc_lo) pair at zero; ``layout`` is the wgmma accumulator layout of N = 2 MP (JOIN) or MP."""
        if JOIN:
            acc = gl.zeros([BT, 2 * MP], gl.float32, layout)
            acc_lo = acc
        else:
            acc = gl.zeros([BT, MP], gl.float32, layout)
            acc_lo = gl.zeros([BT, MP], gl.float32, layout)
        return acc, acc_lo

    @gluon.jit
    def hl_mma(a, w_bufs, slot, acc, acc_lo, JOIN: gl.constexpr):
        """A's asynchronous wgmmas against phi's tiles of ``slot``: w_bufs[slot] ([hi | lo], JOIN), else
        w_bufs[2 slot] (hi) and w_bufs[2 slot + 1] (lo)."""
        if JOIN:
            acc = warpgroup_mma(a, w_bufs.index(slot), acc, is_async=True)
            acc_lo = acc
        else:
            acc = warpgroup_mma(a, w_bufs.index(2 * slot), acc, is_async=True)
            acc_lo = warpgroup_mma(a, w_bufs.index(2 * slot + 1), acc_lo, is_async=True)
        return acc, acc_lo

    @gluon.jit
    def hl_wait(acc, acc_lo, IN_FLIGHT: gl.constexpr, JOIN: gl.constexpr):
        """Wait until at most the wgmmas of the last IN_FLIGHT A tiles are outstanding (one a tile with JOIN,
        else two)."""
        if JOIN:
            acc = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc,))
            acc_lo = acc
        else:
            acc, acc_lo = warpgroup_mma_wait(num_outstanding=2 * IN_FLIGHT, deps=(acc, acc_lo))
        return acc, acc_lo

    @gluon.jit
    def hl_store(p_ptr, acc, acc_lo, base, t0, T, M, BT: gl.constexpr, MP: gl.constexpr, layout: gl.constexpr,
                 JOIN: gl.constexpr, PLAIN: gl.constexpr, num_warps: gl.constexpr):
        """p = hi + lo of a waited pair, rows t0 .. t0 + BT of the [T, M] partial at p_ptr + base * M (rows past T
        and columns past M not written). With JOIN or PLAIN the sum moves to a plain layout (4 adjacent columns a
        thread) through shared memory before its store; otherwise it is stored in the accumulators' ``layout``.
        (PLAIN: in proj's forward, whose wgmmas stay in flight across its loop, the sm_90a build of Triton 3.6 kept
        them asynchronous only with the move: DEPBAR.LE 4 with it, 0 without.)"""
        if JOIN:
            pv = gl.sum(gl.reshape(acc, [BT, 2, MP]), axis=1)
        else:
            pv = acc + acc_lo
        if JOIN or PLAIN:
            out: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (MP // 4), MP // 4], [num_warps, 1], [1, 0])
            pv = gl.convert_layout(pv, out)
            prow = t0 + gl.arange(0, BT, gl.SliceLayout(1, out))
            pcol = gl.arange(0, MP, gl.SliceLayout(0, out))
        else:
            prow = t0 + gl.arange(0, BT, gl.SliceLayout(1, layout))
            pcol = gl.arange(0, MP, gl.SliceLayout(0, layout))
        poff = (base + prow.to(gl.int64))[:, None] * M + pcol[None, :]
        gl.store(p_ptr + poff, pv, mask=(prow < T)[:, None] & (pcol < M)[None, :])
else:  # pragma: no cover - depends on the installed Triton
    LOADER_REGS = tma_load = tma_store = warps_barrier = waited = bf16_to_f32 = f32_to_bf16 = round_bf16 = None
    hl_zeros = hl_mma = hl_wait = hl_store = pace_wait = None


# Polls a paced loader makes for its token split before it stops pacing (``pace_wait``): session 45's measured value.
# A program of the split that is not resident (another kernel holding SMs, as an overlapped all-reduce would) makes
# the paced ones wait out these polls: pacing a plan of more programs than SMs (8192 x 7168) ran 1365 against 982 us
# in session 45. A scheduler that overlaps such kernels with the paced ones should run them unpaced
# (BoundaryBwdCfg.pace=0, FusedBwdCfg.ws_pace=0).
PACE_SPIN = 256


@functools.lru_cache(maxsize=64)
def shared_layout(block: tuple[int, ...], dtype) -> "gl.NVMMASharedLayout":
    """The swizzle TMA and wgmma agree on for a ``block`` tile of ``dtype`` (it also spreads a column of a narrow
    per-token tile over the banks). A frozen value, so built once a tile shape: ``get_default_for`` costs ~7 us of
    host time a call on a CPU core, and a Gluon launch builds two to eight descriptors."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def desc(v, shape, strides, block, dtype) -> "TensorDescriptor":
    """A TMA descriptor of ``shape`` over v's memory in ``block`` tiles (``shared_layout``)."""
    return TensorDescriptor(v, list(shape), list(strides), list(block), shared_layout(tuple(block), dtype))


def pad_cols(v: "torch.Tensor", width: int) -> "torch.Tensor":
    """fp32 [R, width]: v [R, M] with zero columns past M (dp and phi as tf32 wgmma operands)."""
    out = torch.zeros((v.shape[0], width), dtype=torch.float32, device=v.device)
    out[:, :v.shape[1]] = v
    return out
