"""proj's forward (p = vec(X) phi, sq = |vec(X)|^2) as a warp-specialized Gluon kernel for Hopper (sm_90): a TMA
loader warp and one compute partition.

Why. The Triton kernel (``triton_proj._proj_fwd_kernel``) reads each X tile once for two users: the asynchronous
wgmmas and, through registers, sq. Triton 3.6's pipeliner gives such a load one shared-memory slot too few
(triton-lang/triton #6691 / #7110), so the next tile's cp.async could overwrite a tile a wgmma still read: p was
wrong at n = 8, 11 and 16 on an H200 (session 30). The fix there waits for each step's dots before the next load
is issued, at 9 % of the kernel's time (81-85 % of copy bandwidth at 32768 x 4096, against 89-94 % racy). Session
31 measured the two Triton rewrites that kept the dots asynchronous (sq from a second load, sq as a Gram diagonal):
70 % and 62 %.

Here the kernel owns its ring, so the tile can feed both users without a race:

- the loader warp fills a ring of STAGES slots, each SUBS boxes of X [BT, 64] (128-byte rows; SUBS = 2 gives a
  slot 256-byte runs of each row: session 21 measured proj's forward at 89 % of copy bandwidth reading 128-byte rows
  and 98 % reading 256-byte ones) and, for each box, phi's hi and lo tiles [64, MP];
- the compute partition waits for a slot, sums the squares of its boxes from shared memory, issues the slot's
  hi and lo wgmmas asynchronously, and then waits only for the previous slot's wgmmas (num_outstanding = this
  slot's), after which the previous slot is released: one slot's dots stay in flight while the next lands.

Measured (session 32, H200, Triton 3.6, ``proj_fwd_check.py --tune``): correct at n = 1 to 16 (the Triton kernel
takes n > 7), and 264.7-265.6 us, 95 % of copy bandwidth, at 32768 x 4 x 4096 against the Triton kernel's 305-307 us
(82 %) in the same run; 124-128 against 145 us at 8192 x 4 x 7168. So it is the default (DotCfg.ws for "proj").

Whether the wgmmas really stay in flight is ptxas's call: it serializes every wgmma of a kernel where it finds the
accumulators set by other instructions inside the pipeline (C7515, "Potential Performance Loss"). Triton 3.9's PTX
had such a path, the one that skips the slot loop, where the accumulators reach the final wait as zeros set by
plain moves; so the first slot is taken before the loop. The sm_90a builds (``proj_fwd_check.py --build``, column
depbar, which it requires) keep them in flight (DEPBAR.LE 2 with join) with Triton 3.6 and 3.9, at every MP and
warp count built. Session 32's GPU timings are of the build before that change, which Triton 3.6 also kept in
flight at n <= 4.

The arithmetic is the Triton kernel's with HI_LO: bf16 X against phi's bf16 hi and lo halves, fp32 accumulators
(hi and lo apart, added once at the end), sq in fp32 from the exact bf16 -> fp32 widening. With JOIN (DotCfg's
join_hi_lo, as the Triton kernel has it by default) a box's hi and lo columns are one [64, 2 MP] tile and one wgmma,
so the tensor cores read each X box from shared memory once instead of twice.

GPU only (sm_90, bf16 streams, K = n*C a multiple of 64, MP <= 64, i.e. n <= 7): ``supported`` and
``plan`` say where it runs; ``triton_proj.proj`` takes it with ``DotCfg.ws`` for "proj" (the default;
``configure("proj", ws=False)`` turns it off) and keeps the Triton kernel elsewhere and, with a warning, where it
does not build. Gluon does not run under ``TRITON_INTERPRET=1``: the CPU tests build it for sm_90a
(``benchmarks/proj_fwd_check.py --build``) and check the host-side plan; ``benchmarks/proj_fwd_check.py --tune
ws=false`` compares it with the reference on an sm_90 GPU and times it beside the Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhc_compile.kernels.gluon_common import (AVAILABLE, TensorDescriptor, bf16_to_f32, gl, gluon, hl_mma, hl_store,
                                              hl_wait, hl_zeros, mbarrier, shared_layout, SMEM as _SMEM,
                                              LOADER_REGS as _LOADER_REGS, tma_load as _tma_load,
                                              warps_barrier as _warps_barrier)
from mhc_compile.kernels.launch import launch as kernel_launch  # this module's launch() wraps it

LAUNCHES = 0  # kernel launches so far: lets GPU checks assert that this kernel, not the Triton one, ran
BK = 64  # columns of X a TMA box (128-byte rows: the widest box the 128-byte swizzle takes)
MAX_MP = 64  # the two [BT, MP] fp32 accumulators of 8 warps: 2 * MP / 2 registers a thread, beside sq's 32
MAX_STAGES = 4


def supported(x: Tensor, k: int, mp: int) -> bool:
    """Whether this kernel can run the call: Gluon present, a CUDA sm_90 GPU, a bf16 stream whose [T, K] rows TMA
    can address in whole 64-column boxes (K a multiple of 64), and phi's padded width a wgmma N this kernel's
    registers hold."""
    return (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.dtype == torch.bfloat16 and k % BK == 0 and 16 <= mp <= MAX_MP)


def warps_for(mp: int, num_warps: int) -> int:
    """The compute partition's warps (BT = 16 a warp): ``num_warps`` at MP <= 32, at most 4 past it. At MP = 64
    (n = 5 to 7) a ring of four slots fits shared memory with 64 tokens a tile (213 KB) and only three with 128
    (229 KB); at n = 4 on an H200 three slots ran at 90 % of copy bandwidth against four's 95 % (session 32). Four
    warps read phi's tiles twice as often for the same X bytes, which n <= 4 need not pay. (Before the first slot
    was peeled out of the loop, Triton 3.6's ptxas also serialized the wgmmas at MP = 64 with 8 warps.)"""
    return num_warps if mp <= 32 else min(num_warps, 4)


def smem_bytes(bt: int, mp: int, subs: int, stages: int) -> int:
    """Shared memory of a launch: ``stages`` slots of ``subs`` X boxes [BT, 64] and their phi hi / lo tiles
    [64, MP], all bf16, and the epilogue's [BT, MP] fp32 (p's layout change before its store; the sm_90a builds
    show it beside the ring, not in it)."""
    return 2 * stages * subs * (bt * BK + 2 * BK * mp) + 4 * bt * mp


def plan(k: int, bt: int, mp: int, subs: int, stages: int) -> tuple[int, int] | None:
    """(subs, stages) of a launch: ``subs`` halved until K splits into whole slots; ``stages`` 0: as many as fit,
    at most MAX_STAGES. None when two slots do not fit."""
    subs = max(1, subs)
    while (k // BK) % subs:
        subs //= 2
    st = stages or MAX_STAGES
    while not stages and st > 2 and smem_bytes(bt, mp, subs, st) > _SMEM:
        st -= 1
    if st < 2 or smem_bytes(bt, mp, subs, st) > _SMEM:
        return None
    return subs, st


if AVAILABLE:
    _BK = gl.constexpr(BK)

    @gluon.jit
    def _loader(x_desc, w_desc, x_bufs, w_bufs, ready, empty, t0, k_lo, n_slots, K, BT: gl.constexpr,
                MP: gl.constexpr, SUBS: gl.constexpr, STAGES: gl.constexpr, JOIN: gl.constexpr):
        """One warp. For each slot: wait until the compute partition has released it (not on its first use), then
        issue its SUBS X boxes and their phi hi / lo tiles (JOIN: one [64, 2 MP] tile a box) on one barrier."""
        nbytes: gl.constexpr = SUBS * (BT * _BK + 2 * _BK * MP) * 2
        for it in range(n_slots):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            for u in gl.static_range(SUBS):
                k0 = k_lo + (it * SUBS + u) * _BK
                _tma_load(x_desc, [t0, k0], bar, x_bufs.index(s * SUBS + u))
                if JOIN:  # phi's rows k0 .., each its hi columns then its lo columns
                    _tma_load(w_desc, [k0, 0], bar, w_bufs.index(s * SUBS + u))
                else:
                    _tma_load(w_desc, [k0, 0], bar, w_bufs.index(2 * (s * SUBS + u)))  # phi's hi rows
                    _tma_load(w_desc, [K + k0, 0], bar, w_bufs.index(2 * (s * SUBS + u) + 1))  # its lo rows

    @gluon.jit
    def _take_slot(it, x_bufs, w_bufs, ready, acc, acc_lo, sq, tile: gl.constexpr, SUBS: gl.constexpr,
                   STAGES: gl.constexpr, JOIN: gl.constexpr):
        """Slot ``it``'s boxes: wait until they land, add their squares to sq (from shared memory), issue their
        wgmmas; then wait for the previous slot's wgmmas (this slot's stay in flight) and for every warp to have
        read this slot's boxes, so the previous slot may be released."""
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        for u in gl.static_range(SUBS):
            xb = x_bufs.index(s * SUBS + u)
            xf = bf16_to_f32(xb.load(tile))
            sq += xf * xf
            acc, acc_lo = hl_mma(xb, w_bufs, s * SUBS + u, acc, acc_lo, JOIN)
        acc, acc_lo = hl_wait(acc, acc_lo, SUBS, JOIN)
        _warps_barrier()
        return acc, acc_lo, sq

    @gluon.jit
    def _compute(p_ptr, sq_ptr, x_bufs, w_bufs, ready, empty, t0, n_slots, split, T, M, BT: gl.constexpr,
                 MP: gl.constexpr, SUBS: gl.constexpr, STAGES: gl.constexpr, JOIN: gl.constexpr,
                 num_warps: gl.constexpr):
        """All BT rows: sq from each box in shared memory, p's hi and lo partials by wgmma (JOIN: one wgmma a box,
        into [BT, 2 MP], halves added at the end); writes the program's partials at p_ptr[split] / sq_ptr[split].
        A program has at least one slot (``launch`` checks it)."""
        # a box [BT, 64] as registers: 16-byte runs of 8 columns a thread, so the shared-memory loads are vectors
        tile: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (_BK // 8), _BK // 8], [num_warps, 1], [1, 0])
        WN: gl.constexpr = 2 * MP if JOIN else MP
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, WN, 16])
        acc, acc_lo = hl_zeros(BT, MP, acc_layout, JOIN)
        sq = gl.zeros([BT, _BK], gl.float32, tile)  # reduced across columns once, after the loop
        # the first slot outside the loop: with it inside, the path that skips the loop (no slot) reaches the final
        # wait with the accumulators set to zero by plain moves, and ptxas then serializes every wgmma of the kernel
        # (C7515; Triton 3.9's PTX had that path, 3.6's did not)
        acc, acc_lo, sq = _take_slot(0, x_bufs, w_bufs, ready, acc, acc_lo, sq, tile, SUBS, STAGES, JOIN)
        for it in range(1, n_slots):
            acc, acc_lo, sq = _take_slot(it, x_bufs, w_bufs, ready, acc, acc_lo, sq, tile, SUBS, STAGES, JOIN)
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1)
        acc, acc_lo = hl_wait(acc, acc_lo, 0, JOIN)
        base = split.to(gl.int64) * T
        hl_store(p_ptr, acc, acc_lo, base, t0, T, M, BT, MP, acc_layout, JOIN, True, num_warps)
        rows = t0 + gl.arange(0, BT, gl.SliceLayout(1, tile))
        gl.store(sq_ptr + base + rows.to(gl.int64), gl.sum(sq, axis=1), mask=rows < T)

    @gluon.jit(do_not_specialize=["T"])
    def _proj_ws_kernel(x_desc, w_desc, p_ptr, sq_ptr, T, K, M, K_SPLIT, BT: gl.constexpr, MP: gl.constexpr,
                        SUBS: gl.constexpr, STAGES: gl.constexpr, JOIN: gl.constexpr, num_warps: gl.constexpr):
        """Program (token block, K split): [BT, M] / [BT] partials of p / sq at p_ptr[split] / sq_ptr[split].
        x_desc: X as [T, K] in [BT, 64] blocks (rows past T read as zeros and are not written); w_desc:
        split_hi_lo's [2K, MP] (hi rows, then lo rows) in [64, MP] blocks, or with JOIN its interleaved [K, 2 MP]
        (a row's hi columns, then its lo columns) in [64, 2 MP] blocks. K_SPLIT is a multiple of SUBS * 64."""
        t0 = gl.program_id(0) * BT
        split = gl.program_id(1)
        k_lo = split * K_SPLIT
        n_slots = (gl.minimum(k_lo + K_SPLIT, K) - k_lo) // (SUBS * _BK)
        x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * SUBS, BT, _BK], x_desc.layout)
        if JOIN:
            w_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * SUBS, _BK, 2 * MP], w_desc.layout)
        else:
            w_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * SUBS * 2, _BK, MP], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        gl.warp_specialize([
            (_compute, (p_ptr, sq_ptr, x_bufs, w_bufs, ready, empty, t0, n_slots, split, T, M, BT, MP, SUBS, STAGES,
                        JOIN, num_warps)),
            (_loader, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, t0, k_lo, n_slots, K, BT, MP, SUBS, STAGES,
                       JOIN)),
        ], [1], [_LOADER_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))


def descriptors(x: Tensor, w: Tensor, t: int, k: int, bt: int, mp: int, join: bool = False):
    """Gluon TMA descriptors: X as [T, K] in [BT, 64] blocks, phi's hi / lo halves (``w``, [2, K, MP]) as [2K, MP]
    in [64, MP] blocks, or with ``join`` the interleaved ``w`` ([K, 2, MP]) as [K, 2 MP] in [64, 2 MP] blocks; each
    with the swizzle that TMA and wgmma agree on."""
    wn = 2 * mp if join else mp
    tile = shared_layout((bt, BK), gl.bfloat16)
    phi = shared_layout((BK, wn), gl.bfloat16)
    return (TensorDescriptor.from_tensor(x.view(t, k), [bt, BK], tile),
            TensorDescriptor.from_tensor(w.reshape(-1, wn), [BK, wn], phi))


def launch(x: Tensor, w: Tensor, p: Tensor, sq: Tensor, k_split: int, num_warps: int = 8, subs: int = 2,
           stages: int = 0, join: bool = False) -> None:
    """Run the kernel on a contiguous bf16 X [T, K] and phi's hi / lo halves ``w`` (split_hi_lo's [2, K, MP], or
    with ``join`` its interleaved [K, 2, MP]); writes the partials into p [splits, T, M] / sq [splits, T]. Token
    blocks of 16 * num_warps rows (wgmma: 16 rows a warp); ``plan`` picks the slots (k_split must be a multiple of
    the slot's subs * 64 columns)."""
    global LAUNCHES
    t, k = x.shape
    mp = w.shape[-1]
    if tuple(w.shape) != ((k, 2, mp) if join else (2, k, mp)):
        raise ValueError(f"mhc gluon proj: phi's halves have shape {tuple(w.shape)}, expected "
                         f"{'[K, 2, MP]' if join else '[2, K, MP]'} for K = {k}")
    bt = 16 * num_warps
    chosen = plan(k, bt, mp, subs, stages)
    if chosen is None or k % BK or k_split % (chosen[0] * BK) or not 16 <= mp <= MAX_MP:
        raise ValueError(f"mhc gluon proj: slots {chosen} (None: two do not fit {_SMEM} bytes); K = {k} and its "
                         f"split {k_split} must be whole slots of 64-column boxes, phi's width {mp} in 16 .. {MAX_MP}")
    subs, stages = chosen
    splits = (k + k_split - 1) // k_split
    if p.shape[0] != splits:  # each program takes at least one slot (_compute)
        raise ValueError(f"mhc gluon proj: {p.shape[0]} K splits of {k_split} columns for K = {k}; expected {splits}")
    LAUNCHES += 1
    grid = ((t + bt - 1) // bt, splits)
    kernel_launch(_proj_ws_kernel, grid, (*descriptors(x, w, t, k, bt, mp, join), p, sq, t, k, p.shape[-1], k_split),
                  dict(BT=bt, MP=mp, SUBS=subs, STAGES=stages, JOIN=join, num_warps=num_warps), shrink_stages=False)
