"""post_res_proj as a warp-specialized Gluon kernel for Hopper (sm_90): a TMA loader warp and compute warpgroups.

The Triton kernel (``triton_post_res_proj``) reads the stream in [64 tokens, 32 channels] tiles, each
row a 64-byte run of memory, and its pipeline stages hold phi's tiles beside the stream's. On an H200 it reaches
76-77 % of copy bandwidth. Session 21 (benchmarks/results/session21-2026-12-03-h200.md) measured why: a loader
warp with a five-slot ring of the same tiles (the first build of this file) reached the same 77 %, and post_res
alone reads at 49 % with 64-byte rows, 65 % with 128 and 93 % with 256 (proj's forward: 58, 89, 98 %).

So here a slot of the stream ring holds SUBS adjacent chunks of BC channels, read as TMA boxes of up to 64
channels (128-byte rows), all issued at once by the loader warp, and phi's hi / lo tiles move through their own
ring of one chunk a slot. The compute warpgroups take each slot's chunks in turn, all of the block's rows: each
mixes X' = h_post y + H_res X in registers, stores X' to global memory and to a shared tile that is the A operand
of p += X' phi (wgmma), and keeps its own p / sq partials. A phi slot always serves the same warpgroup and is
freed once its wgmmas have completed; a stream slot is freed once every warpgroup has mixed its chunks.

Session 22 (benchmarks/results/session22-2026-12-03-h200.md) timed where the time goes. The loader alone reads
faster than a copy. The mixing, the X' stores and the wgmmas each add time in the one warpgroup that runs them
all. Two warpgroups taking the chunks in turn (the default) ran about 2-5 % faster at 32768 tokens. Ten other
designs did not: deeper or decoupled rings, 256-byte rows, TMA stores, wgmmas left in flight, warpgroups over rows.

GPU only: Gluon kernels do not run under ``TRITON_INTERPRET=1``. The CPU tests build it for sm_90a
(benchmarks/gluon_check.py --build); on an sm_90 GPU benchmarks/gluon_check.py compares its outputs with the
reference and times it beside the Triton kernel. ``DotCfg.ws`` picks it (the default since session 27: faster than
the Triton kernel at every shape of sessions 24's and 27's kernel tables); ``triton_ops.post_res_proj`` keeps the
Triton kernel where it cannot run (``supported``, ``plan``) and, with a warning, where it does not build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhc_compile.kernels.gluon_common import (AVAILABLE, TensorDescriptor, bf16_to_f32, fence_async_shared, gl, gluon,
                                              hl_mma, hl_store, hl_wait, hl_zeros, mbarrier, round_bf16, shared_layout,
                                              SMEM as _SMEM, LOADER_REGS as _LOADER_REGS, tma_load as _tma_load)
from mhc_compile.kernels.launch import launch as kernel_launch  # this module's launch() wraps it

LAUNCHES = 0  # kernel launches so far: lets GPU checks assert that this kernel, not the Triton one, ran


def supported(x: Tensor, n: int, c: int, bc: int, mp: int) -> bool:
    """Whether this kernel can run the call: Gluon present, a CUDA sm_90 GPU, a bf16 stream whose [T, n*C]
    rows TMA can address in [BT, BC] blocks with no block crossing a stream, and phi's padded width a wgmma N."""
    return (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.dtype == torch.bfloat16 and c % bc == 0 and c % 8 == 0 and 8 <= mp <= 256)


def smem_bytes(n: int, bt: int, bc: int, mp: int, subs: int, stages: int, wstages: int, consumers: int = 1,
               join: bool = False) -> int:
    """Shared memory of a launch: ``stages`` stream slots of subs * (n + 1) [BT, BC] tiles, ``wstages`` phi slots
    of 2n [BC, MP] tiles (n [BC, 2 MP] with ``join``: the same bytes), and each compute warpgroup's n X' tiles, all
    bf16; with ``join`` also each warpgroup's [BT, MP] fp32 epilogue tile (p's layout change before its store)."""
    ring = 2 * (stages * subs * (n + 1) * bt * bc + wstages * 2 * n * bc * mp + consumers * n * bt * bc)
    return ring + (consumers * 4 * bt * mp if join else 0)


def plan(n: int, c: int, bt: int, bc: int, mp: int, subs: int, stages: int, wstages: int, consumers: int = 1,
         join: bool = False):
    """(subs, stages, wstages) for a call: ``subs`` halved until C / BC chunks split into whole slots, and a
    multiple of ``consumers`` (the compute warpgroups take a slot's chunks in turn); 0 stages or wstages: as many
    as fit, at most 2 stream slots and 3 phi slots a warpgroup, wstages a multiple of consumers (each phi slot
    then always serves the same warpgroup). None when two of each do not fit."""
    subs = max(1, subs)
    while (c // bc) % subs:
        subs //= 2
    if subs % consumers:
        return None
    st, ws = stages or 2, wstages or (3 if consumers == 1 else 2 * consumers)
    while not wstages and ws > 2 and smem_bytes(n, bt, bc, mp, subs, st, ws, consumers, join) > _SMEM:
        ws -= consumers if consumers > 1 else 1
    if st < 2 or ws < 2 or ws % consumers or smem_bytes(n, bt, bc, mp, subs, st, ws, consumers, join) > _SMEM:
        return None
    return subs, st, ws


def choose(n: int, c: int, bc: int, mp: int, num_warps: int, subs: int, stages: int, wstages: int,
           consumers: int, join: bool = False):
    """(BT, (subs, stages, wstages), consumers) of a launch, or None where ``plan`` finds no slots: the
    consumers' warpgroups where C's chunks split evenly between them, else one warpgroup."""
    bt = 16 * num_warps  # wgmma: 16 rows a warp
    for k in dict.fromkeys((consumers, 1)):
        slots = plan(n, c, bt, bc, mp, subs, stages, wstages, k, join)
        if slots is not None:
            return bt, slots, k
    return None


if AVAILABLE:
    from triton.runtime.jit import constexpr_function

    @constexpr_function
    def _box_col(u, bc, per_box):
        """The first column of chunk u within its TMA box of per_box chunks of bc channels."""
        return (u % per_box) * bc

    @constexpr_function
    def _chunk(v, consumers, first):
        """The slot's chunk that is compute warpgroup ``first``'s v-th (warpgroups take a slot's chunks in turn)."""
        return v * consumers + first

    @gluon.jit
    def _loader(x_desc, y_desc, w_desc, x_bufs, w_bufs, x_ready, x_empty, w_ready, w_empty, t0, c_lo, n_slots, C,
                K, N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr, MP: gl.constexpr, SUBS: gl.constexpr,
                BOXES: gl.constexpr, STAGES: gl.constexpr, WSTAGES: gl.constexpr, JOIN: gl.constexpr,
                X_BCAST: gl.constexpr):
        """One warp. For each stream slot: wait until it is free, issue its SUBS chunks' n + 1 tile loads at once
        (adjacent runs of each row, close in time; X_BCAST: 2, X's one row into stream 0's tile), then each chunk's
        2n phi loads (JOIN: n) as phi slots free up."""
        XN: gl.constexpr = 1 if X_BCAST else N  # X tiles a chunk loads
        x_bytes: gl.constexpr = SUBS * (XN + 1) * BT * BC * 2
        w_bytes: gl.constexpr = 2 * N * BC * MP * 2
        for it in range(n_slots):
            s = it % STAGES
            # a slot's first use needs no release; later ones wait for the compute warps' release of the last
            mbarrier.wait(x_empty.index(s), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            bar = x_ready.index(s)
            mbarrier.expect(bar, x_bytes)
            for v in gl.static_range(BOXES):  # BOXES boxes of XB = SUBS * BC / BOXES channels a row
                c0 = c_lo + it * SUBS * BC + v * (SUBS * BC // BOXES)
                base = (s * BOXES + v) * (N + 1)
                for j in gl.static_range(XN):  # x_desc is X's [T, C] row with X_BCAST (j = 0 only)
                    _tma_load(x_desc, [t0, j * C + c0], bar, x_bufs.index(base + j))
                _tma_load(y_desc, [t0, c0], bar, x_bufs.index(base + N))
            for u in gl.static_range(SUBS):
                g = it * SUBS + u
                q = g % WSTAGES
                c0 = c_lo + g * BC
                mbarrier.wait(w_empty.index(q), ((g // WSTAGES) & 1) ^ 1, pred=g >= WSTAGES)
                wbar = w_ready.index(q)
                mbarrier.expect(wbar, w_bytes)
                for i in gl.static_range(N):
                    if JOIN:  # phi's rows i*C + c0 .., each its hi columns then its lo columns
                        _tma_load(w_desc, [i * C + c0, 0], wbar, w_bufs.index(q * N + i))
                    else:  # phi's rows i*C + c0 .. of the hi half, then of the lo half
                        _tma_load(w_desc, [i * C + c0, 0], wbar, w_bufs.index(2 * (q * N + i)))
                        _tma_load(w_desc, [K + i * C + c0, 0], wbar, w_bufs.index(2 * (q * N + i) + 1))

    @gluon.jit
    def _compute(out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, w_bufs, o_bufs, x_ready, x_empty, w_ready,
                 w_empty, t0, c_lo, n_slots, split, T, C, M, N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr,
                 MP: gl.constexpr, SUBS: gl.constexpr, BOXES: gl.constexpr, STAGES: gl.constexpr,
                 WSTAGES: gl.constexpr, FIRST: gl.constexpr, CONSUMERS: gl.constexpr, JOIN: gl.constexpr,
                 X_BCAST: gl.constexpr, num_warps: gl.constexpr):
        """Compute warpgroup FIRST of CONSUMERS: chunks u = FIRST, FIRST + CONSUMERS, ... of every slot, all BT
        rows. Mixes X', stores it, projects it (JOIN: one wgmma a stream against phi's [hi | lo] tile, into
        [BT, 2 MP], halves added at the end); writes its p and sq partials at p_ptr[split * CONSUMERS + FIRST]
        / sq_ptr[...]. Its chunks' phi slots are its own (WSTAGES is a multiple of CONSUMERS). X_BCAST: the chunk's
        one X tile (stream 0's slot) is every stream's."""
        # [BT, BC] tiles: 16-byte rows of 8 channels a thread, so shared-memory loads and global stores are vectors
        tile: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BC // 8), BC // 8], [num_warps, 1], [1, 0])
        WN: gl.constexpr = 2 * MP if JOIN else MP
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, WN, 16])
        rows = t0 + gl.arange(0, BT, gl.SliceLayout(1, tile))
        rmask = rows < T
        r64 = rows.to(gl.int64)
        cols = gl.arange(0, BC, gl.SliceLayout(0, tile))
        # the per-token coefficients, loaded once: h_post[:, i], then h_res[:, i, j] at N + i*N + j
        coef = ()
        for i in gl.static_range(N):
            coef = coef + (gl.load(hpost_ptr + r64 * N + i, mask=rmask, other=0.0),)
        for k in gl.static_range(N * N):
            coef = coef + (gl.load(hres_ptr + r64 * (N * N) + k, mask=rmask, other=0.0),)
        acc, acc_lo = hl_zeros(BT, MP, acc_layout, JOIN)
        sq = gl.zeros([BT, BC], gl.float32, tile)  # reduced across channels once, after the loop
        for it in range(n_slots):
            s = it % STAGES
            mbarrier.wait(x_ready.index(s), (it // STAGES) & 1)
            for v in gl.static_range(SUBS // CONSUMERS):
                g = it * SUBS + _chunk(v, CONSUMERS, FIRST)
                q = g % WSTAGES
                c0 = c_lo + g * BC
                # this chunk is columns _box_col(..) .. of box u // (SUBS // BOXES) (of SUBS * BC / BOXES channels)
                base = (s * BOXES + _chunk(v, CONSUMERS, FIRST) // (SUBS // BOXES)) * (N + 1)
                y = x_bufs.index(base + N).slice(_box_col(_chunk(v, CONSUMERS, FIRST), BC, SUBS // BOXES), BC, 1)
                y = bf16_to_f32(y.load(tile))
                xs = ()
                for j in gl.static_range(N):
                    if X_BCAST and j > 0:
                        xs = xs + (xs[0],)
                    else:
                        xj = x_bufs.index(base + j).slice(_box_col(_chunk(v, CONSUMERS, FIRST), BC, SUBS // BOXES),
                                                          BC, 1)
                        xs = xs + (bf16_to_f32(xj.load(tile)),)
                for i in gl.static_range(N):
                    xi = coef[i][:, None] * y  # _mix_tile's order: h_post y, then an FMA a term h_res[i, j] x_j
                    for j in gl.static_range(N):
                        xi = gl.fma(coef[N + i * N + j][:, None], xs[j], xi)
                    xo, xf = round_bf16(xi)  # X' as stored, and as proj reads it
                    sq += xf * xf
                    # the previous chunk's wgmmas, which read this tile, completed before it ended (the wait below)
                    o_bufs.index(FIRST * N + i).store(xo)
                    gl.store(out_ptr + (r64 * N + i)[:, None] * C + (c0 + cols)[None, :], xo, mask=rmask[:, None])
                fence_async_shared()  # the X' tiles' generic-proxy stores, before the wgmmas read them
                if v == SUBS // CONSUMERS - 1:  # its chunks of the slot are read: the loader may refill it
                    mbarrier.arrive(x_empty.index(s), count=1)
                mbarrier.wait(w_ready.index(q), (g // WSTAGES) & 1)
                for i in gl.static_range(N):
                    acc, acc_lo = hl_mma(o_bufs.index(FIRST * N + i), w_bufs, q * N + i, acc, acc_lo, JOIN)
                acc, acc_lo = hl_wait(acc, acc_lo, 0, JOIN)
                mbarrier.arrive(w_empty.index(q), count=1)
        base = (split * CONSUMERS + FIRST).to(gl.int64) * T
        hl_store(p_ptr, acc, acc_lo, base, t0, T, M, BT, MP, acc_layout, JOIN, False, num_warps)
        gl.store(sq_ptr + base + r64, gl.sum(sq, axis=1), mask=rmask)

    @gluon.jit(do_not_specialize=["T"])
    def _post_res_proj_ws_kernel(x_desc, y_desc, w_desc, out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, T, C, K, M,
                                 C_SPLIT, N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr, MP: gl.constexpr,
                                 SUBS: gl.constexpr, BOXES: gl.constexpr, STAGES: gl.constexpr,
                                 WSTAGES: gl.constexpr, CONSUMERS: gl.constexpr, COMPUTE_REGS: gl.constexpr,
                                 num_warps: gl.constexpr, JOIN: gl.constexpr = False,
                                 X_BCAST: gl.constexpr = False):
        """Program (token block, channel split): X' of its chunks (stored through out_ptr), and [BT, M] / [BT]
        partials of p / sq at p_ptr[split * CONSUMERS + w] / sq_ptr[...] for each compute warpgroup w. x_desc: X
        as [T, N*C], y_desc: y as [T, C], both in [BT, BC] blocks; w_desc: split_hi_lo's [2K, MP] (hi rows, then
        lo rows) in [BC, MP] blocks, or with JOIN its interleaved [K, 2 MP] in [BC, 2 MP] blocks. C_SPLIT is a multiple of SUBS * BC. Rows past T read as zeros and are not
        written. CONSUMERS (1 or 2) compute warpgroups share each slot, taking its chunks in turn; a slot is free
        once all have released it. X_BCAST: x_desc is X's one row a token as [T, C] (a stream broadcast over N),
        loaded once a chunk."""
        t0 = gl.program_id(0) * BT
        split = gl.program_id(1)
        c_lo = split * C_SPLIT
        n_slots = (gl.minimum(c_lo + C_SPLIT, C) - c_lo) // (SUBS * BC)
        x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * BOXES * (N + 1), BT, SUBS * BC // BOXES],
                                           x_desc.layout)
        if JOIN:
            w_bufs = gl.allocate_shared_memory(gl.bfloat16, [WSTAGES * N, BC, 2 * MP], w_desc.layout)
        else:
            w_bufs = gl.allocate_shared_memory(gl.bfloat16, [WSTAGES * N * 2, BC, MP], w_desc.layout)
        o_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, BC], gl.bfloat16)
        o_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS * N, BT, BC], o_layout)
        x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        w_ready = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
        w_empty = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(x_ready.index(s), count=1)
            mbarrier.init(x_empty.index(s), count=CONSUMERS)
        for s in gl.static_range(WSTAGES):
            mbarrier.init(w_ready.index(s), count=1)
            mbarrier.init(w_empty.index(s), count=1)  # a phi slot serves one warpgroup's chunks
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_compute, (out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, w_bufs, o_bufs, x_ready, x_empty,
                            w_ready, w_empty, t0, c_lo, n_slots, split, T, C, M, N, BT, BC, MP, SUBS, BOXES, STAGES,
                            WSTAGES, 0, 1, JOIN, X_BCAST, num_warps)),
                (_loader, (x_desc, y_desc, w_desc, x_bufs, w_bufs, x_ready, x_empty, w_ready, w_empty, t0, c_lo,
                           n_slots, C, K, N, BT, BC, MP, SUBS, BOXES, STAGES, WSTAGES, JOIN, X_BCAST)),
            ], [1], [_LOADER_REGS])
        else:
            gl.warp_specialize([
                (_compute, (out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, w_bufs, o_bufs, x_ready, x_empty,
                            w_ready, w_empty, t0, c_lo, n_slots, split, T, C, M, N, BT, BC, MP, SUBS, BOXES, STAGES,
                            WSTAGES, 0, 2, JOIN, X_BCAST, num_warps)),
                (_compute, (out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, w_bufs, o_bufs, x_ready, x_empty,
                            w_ready, w_empty, t0, c_lo, n_slots, split, T, C, M, N, BT, BC, MP, SUBS, BOXES, STAGES,
                            WSTAGES, 1, 2, JOIN, X_BCAST, num_warps)),
                (_loader, (x_desc, y_desc, w_desc, x_bufs, w_bufs, x_ready, x_empty, w_ready, w_empty, t0, c_lo,
                           n_slots, C, K, N, BT, BC, MP, SUBS, BOXES, STAGES, WSTAGES, JOIN, X_BCAST)),
            ], [num_warps, 1], [COMPUTE_REGS, _LOADER_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(x_ready.index(s))
            mbarrier.invalidate(x_empty.index(s))
        for s in gl.static_range(WSTAGES):
            mbarrier.invalidate(w_ready.index(s))
            mbarrier.invalidate(w_empty.index(s))


def descriptors(x: Tensor, y: Tensor, w: Tensor, t: int, n: int, c: int, k: int, bt: int, bc: int, mp: int,
                xb: int = 0, join: bool = False, x_bcast: bool = False):
    """Gluon TMA descriptors: X as [T, n*C] (``x_bcast``: its one row a token as [T, C]) and y as [T, C] in
    [BT, BC] blocks, the hi / lo halves of phi (``w``, [2, K, MP]) as [2K, MP] in [BC, MP] blocks, or with ``join``
    the interleaved ``w`` ([K, 2, MP]) as [K, 2 MP] in [BC, 2 MP] blocks; each with the swizzle that TMA and wgmma
    agree on."""
    xb = xb or bc
    wn = 2 * mp if join else mp
    tile = shared_layout((bt, xb), gl.bfloat16)
    phi = shared_layout((bc, wn), gl.bfloat16)
    xv = x.select(1, 0) if x_bcast else x.view(t, n * c)
    return (TensorDescriptor.from_tensor(xv, [bt, xb], tile),
            TensorDescriptor.from_tensor(y.view(t, c), [bt, xb], tile),
            TensorDescriptor.from_tensor(w.reshape(-1, wn), [bc, wn], phi))


def launch(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, w: Tensor, out: Tensor, p: Tensor, sq: Tensor,
           c_split: int, bc: int, mp: int, num_warps: int = 4, consumers: int = 1, subs: int = 2, stages: int = 0,
           wstages: int = 0, compute_regs: int = 232, box: int = 64, join: bool = False,
           x_bcast: bool = False) -> None:
    """Run the kernel on contiguous bf16 X [T, n, C] (``x_bcast``: broadcast over n, stride 0, its [T, C] rows
    dense), y [T, C], fp32 h_res [T, n, n] / h_post [T, n] and phi's
    hi / lo halves ``w`` (split_hi_lo's [2, K, MP], or with ``join`` its interleaved [K, 2, MP]); writes X' into
    ``out`` and the partials into p [splits, T, M] / sq [splits * consumers, T]. Token blocks of 16 * num_warps rows (wgmma: 16 rows a warp); ``plan`` picks the
    slots (c_split must be a multiple of the slot's subs * BC channels)."""
    global LAUNCHES
    t, n, c = x.shape
    k, m = n * c, p.shape[-1]
    bt = 16 * num_warps
    chosen = plan(n, c, bt, bc, mp, subs, stages, wstages, consumers, join)
    if tuple(w.shape) != ((k, 2, mp) if join else (2, k, mp)):
        raise ValueError(f"mhc gluon post_res_proj: phi's halves have shape {tuple(w.shape)}, expected "
                         f"{'[K, 2, MP]' if join else '[2, K, MP]'} for K = {k}")
    if consumers not in (1, 2) or chosen is None or c % bc or c_split % (chosen[0] * bc) or p.shape[0] % consumers:
        raise ValueError(f"mhc gluon post_res_proj: {consumers} consumers (1 or 2), slots {chosen} (None: two "
                         f"do not fit {_SMEM} bytes); C = {c} and its split {c_split} must be whole slots, p's "
                         f"{p.shape[0]} partials a multiple of the consumers")
    subs, stages, wstages = chosen
    xb = min(box or bc, subs * bc)  # channels a TMA box row reads: 128 bytes at most (its swizzle's width)
    LAUNCHES += 1
    grid = ((t + bt - 1) // bt, p.shape[0] // consumers)
    kernel_launch(_post_res_proj_ws_kernel, grid,
                  (*descriptors(x, y, w, t, n, c, k, bt, bc, mp, xb, join, x_bcast), out, h_res, h_post, p, sq, t, c,
                   k, m, c_split),
                  dict(N=n, BT=bt, BC=bc, MP=mp, SUBS=subs, BOXES=subs * bc // xb, STAGES=stages, WSTAGES=wstages,
                       CONSUMERS=consumers, COMPUTE_REGS=compute_regs, num_warps=num_warps, JOIN=join,
                       X_BCAST=x_bcast),
                  shrink_stages=False)
