"""post_res_proj as a warp-specialized Gluon kernel for Hopper (sm_90): a loader warp and a compute warpgroup.

The Triton kernel (``triton_ops._post_res_proj_kernel``) reaches 76-77 % of copy bandwidth on an H200 and Nsight
Compute says why (benchmarks/results/session20-2026-12-03-h200.md): its TMA loads have not landed when the chunk
starts. Triton's software pipeline issues a chunk's loads from the same warps that compute, two chunks ahead, and
each stage's buffers also hold phi's tiles, so two programs an SM keep too few bytes in flight.

Here one warp does nothing but issue TMA loads into a ring of ``STAGES`` buffers (the chunk's n stream tiles, y's
tile and phi's hi / lo tiles), gated by an ``empty`` barrier a slot; the compute warps wait on a ``ready``
barrier, mix X' = h_post y + H_res X in registers, write each X' tile once to shared memory, from where it
leaves by a TMA store and feeds the wgmmas of p += X' phi as their A operand (no register layout change for the
dot), and release the slot once the chunk's wgmmas, the last readers of its phi tiles, have completed.

GPU only: Gluon kernels do not run under ``TRITON_INTERPRET=1``. The CPU tests build it for sm_90a and the GPU
checks (benchmarks/gpu_check.py, benchmarks/issue3.py, tests/test_gluon_post_res_proj.py on a GPU) compare its
outputs with the reference. ``DotCfg.ws`` turns it on; ``triton_ops.post_res_proj`` falls back to the Triton
kernel where it cannot run (see ``supported``).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Gluon: Triton >= 3.5 (the GPU machine's 3.6 and this machine's later versions build this file)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

AVAILABLE = gluon is not None
LAUNCHES = 0  # kernel launches so far: lets GPU checks assert that this kernel, not the Triton one, ran
_SMEM = 220 * 1024  # bytes of ring and X' buffers (an H100 / H200 block may take 227 KiB)


def supported(x: Tensor, n: int, c: int, bc: int, mp: int) -> bool:
    """Whether this kernel can run the call: Gluon present, a CUDA sm_90 GPU, a bf16 stream whose [T, n*C]
    rows TMA can address in [BT, BC] blocks with no block crossing a stream, and phi's padded width a wgmma N."""
    return (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.dtype == torch.bfloat16 and c % bc == 0 and c % 8 == 0 and 8 <= mp <= 256)


def x_buffers(tma_store: bool, eager: bool) -> int:
    """Sets of X' tiles a compute warpgroup cycles through: one when nothing reads a set after its chunk ends
    (pointer stores; the chunk's wgmmas waited for), else two (a TMA store or a wgmma may still be reading)."""
    return 1 if eager and not tma_store else 2


def stages_for(n: int, bt: int, bc: int, mp: int, obuf: int) -> int:
    """Ring slots that fit _SMEM beside ``obuf`` sets of the block's n X' tiles: a slot holds n + 1 input tiles
    and 2n phi tiles (hi and lo), all bf16. 0 when not even two fit."""
    slot = (n + 1) * bt * bc * 2 + 2 * n * bc * mp * 2
    stages = (_SMEM - obuf * n * bt * bc * 2) // slot
    return stages if stages >= 2 else 0


if AVAILABLE:
    _LOADER_REGS = gl.constexpr(40)  # the loader warp computes coordinates only
    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later versions
    # removed those names for async_load / async_store (same arguments)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def _loader(x_desc, y_desc, w_desc, x_bufs, y_bufs, w_bufs, ready, empty, t0, c_lo, n_chunks, C, K,
                N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr, MP: gl.constexpr, STAGES: gl.constexpr):
        """One warp: chunk by chunk, wait for a free slot and issue its 3n + 1 TMA loads on the slot's barrier."""
        nbytes: gl.constexpr = (N + 1) * BT * BC * 2 + 2 * N * BC * MP * 2
        for it in range(n_chunks):
            s = it % STAGES
            # a slot's first use needs no release; afterwards wait for the compute warps' release of its last use
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            c0 = c_lo + it * BC
            for j in gl.static_range(N):
                _tma_load(x_desc, [t0, j * C + c0], bar, x_bufs.index(s * N + j))
            _tma_load(y_desc, [t0, c0], bar, y_bufs.index(s))
            for i in gl.static_range(N):  # phi's rows i*C + c0 .. of the hi half, then of the lo half
                _tma_load(w_desc, [i * C + c0, 0], bar, w_bufs.index(2 * (s * N + i)))
                _tma_load(w_desc, [K + i * C + c0, 0], bar, w_bufs.index(2 * (s * N + i) + 1))

    @gluon.jit
    def _compute(out_desc, out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, y_bufs, w_bufs, o_bufs, ready,
                 empty, t0, c_lo, n_chunks, split, T, C, M, N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr,
                 MP: gl.constexpr, STAGES: gl.constexpr, OBUF: gl.constexpr, FIRST: gl.constexpr,
                 CONSUMERS: gl.constexpr, TMA_STORE: gl.constexpr, EAGER: gl.constexpr, num_warps: gl.constexpr):
        """A compute partition (warpgroup FIRST of CONSUMERS): rows [FIRST*SUB, (FIRST+1)*SUB) of the token
        block, SUB = BT / CONSUMERS, for every chunk. Mixes X', stores it, projects it; writes those rows' p and
        sq partials at p_ptr[split] / sq_ptr[split]."""
        SUB: gl.constexpr = BT // CONSUMERS
        # [SUB, BC] tiles: 16-byte rows of 8 channels a thread, so shared-memory loads and stores are vectors
        tile: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BC // 8), BC // 8], [num_warps, 1], [1, 0])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, MP, 16])
        r0 = t0 + FIRST * SUB
        rows = r0 + gl.arange(0, SUB, gl.SliceLayout(1, tile))
        rmask = rows < T
        r64 = rows.to(gl.int64)
        cols = gl.arange(0, BC, gl.SliceLayout(0, tile))
        # the per-token coefficients, loaded once: h_post[:, i], then h_res[:, i, j] at N + i*N + j
        coef = ()
        for i in gl.static_range(N):
            coef = coef + (gl.load(hpost_ptr + r64 * N + i, mask=rmask, other=0.0),)
        for k in gl.static_range(N * N):
            coef = coef + (gl.load(hres_ptr + r64 * (N * N) + k, mask=rmask, other=0.0),)
        acc_hi = gl.zeros([SUB, MP], gl.float32, acc_layout)
        acc_lo = gl.zeros([SUB, MP], gl.float32, acc_layout)
        sq = gl.zeros([SUB, BC], gl.float32, tile)  # reduced across channels once, after the loop
        for it in range(n_chunks):
            s = it % STAGES
            ob = it % OBUF
            c0 = c_lo + it * BC
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            y = y_bufs.index(s).slice(FIRST * SUB, SUB).load(tile).to(gl.float32)
            xs = ()
            for j in gl.static_range(N):
                xs = xs + (x_bufs.index(s * N + j).slice(FIRST * SUB, SUB).load(tile),)
            # this partition's X' buffers of OBUF chunks ago: their wgmmas have completed (the waits below); their
            # TMA stores must have read them: only the later chunks' stores may still be pending
            if TMA_STORE:
                tma.store_wait(pendings=(OBUF - 1) * N)
            for i in gl.static_range(N):
                xi = coef[i][:, None] * y  # _mix_tile's order: h_post y, then + h_res[i, j] x_j, j = 0 .. N-1
                for j in gl.static_range(N):
                    xi += coef[N + i * N + j][:, None] * xs[j].to(gl.float32)
                xo = xi.to(gl.bfloat16)
                xf = xo.to(gl.float32)
                sq += xf * xf
                o_bufs.index((FIRST * OBUF + ob) * N + i).store(xo)
                if not TMA_STORE:
                    off = (r64 * N + i)[:, None] * C + (c0 + cols)[None, :]
                    gl.store(out_ptr + off, xo, mask=rmask[:, None])
            fence_async_shared()  # the generic-proxy stores above, before the TMA stores and wgmmas read them
            if TMA_STORE:
                for i in gl.static_range(N):
                    _tma_store(out_desc, [r0, i * C + c0], o_bufs.index((FIRST * OBUF + ob) * N + i))
            for i in gl.static_range(N):
                a = o_bufs.index((FIRST * OBUF + ob) * N + i)
                acc_hi = warpgroup_mma(a, w_bufs.index(2 * (s * N + i)), acc_hi, is_async=True)
                acc_lo = warpgroup_mma(a, w_bufs.index(2 * (s * N + i) + 1), acc_lo, is_async=True)
            if EAGER:  # wait for this chunk's wgmmas, the last readers of its slot, and release the slot now
                acc_hi, acc_lo = warpgroup_mma_wait(num_outstanding=0, deps=(acc_hi, acc_lo))
                mbarrier.arrive(empty.index(s), count=1)
            else:  # leave them in flight: the previous chunk's have completed, so release its slot
                acc_hi, acc_lo = warpgroup_mma_wait(num_outstanding=2 * N, deps=(acc_hi, acc_lo))
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1, pred=it > 0)
        acc_hi, acc_lo = warpgroup_mma_wait(num_outstanding=0, deps=(acc_hi, acc_lo))
        acc = acc_hi + acc_lo
        base = split.to(gl.int64) * T
        prow = r0 + gl.arange(0, SUB, gl.SliceLayout(1, acc_layout))
        pcol = gl.arange(0, MP, gl.SliceLayout(0, acc_layout))
        poff = (base + prow.to(gl.int64))[:, None] * M + pcol[None, :]
        gl.store(p_ptr + poff, acc, mask=(prow < T)[:, None] & (pcol < M)[None, :])
        gl.store(sq_ptr + base + r64, gl.sum(sq, axis=1), mask=rmask)
        if TMA_STORE:
            tma.store_wait(pendings=0)

    @gluon.jit(do_not_specialize=["T"])
    def _post_res_proj_ws_kernel(x_desc, y_desc, w_desc, out_desc, out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, T, C,
                                 K, M, C_SPLIT, N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr,
                                 MP: gl.constexpr, STAGES: gl.constexpr, OBUF: gl.constexpr,
                                 CONSUMERS: gl.constexpr, TMA_STORE: gl.constexpr, EAGER: gl.constexpr,
                                 COMPUTE_REGS: gl.constexpr,
                                 num_warps: gl.constexpr):
        """Program (token block, channel split): X' of its chunks, and [BT, M] / [BT] partials of p / sq at
        p_ptr[split * CONSUMERS + consumer] / sq_ptr[..]. x_desc / out_desc: X and X' as [T, N*C] in [BT, BC]
        blocks, out_desc in [BT / CONSUMERS, BC] blocks (out_ptr: X' for pointer stores, TMA_STORE False); y_desc:
        y [T, C]; w_desc: _split_hi_lo's [2K, MP] (hi rows, then lo rows) in [BC, MP] blocks. Rows past T read as
        zeros and are not written. CONSUMERS (1 or 2) compute warpgroups share each chunk's phi tiles, each
        with its BT / CONSUMERS rows; a slot is free once every one of them has released it."""
        t0 = gl.program_id(0) * BT
        split = gl.program_id(1)
        c_lo = split * C_SPLIT
        n_chunks = (gl.minimum(c_lo + C_SPLIT, C) - c_lo + BC - 1) // BC
        x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * N, BT, BC], x_desc.layout)
        y_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, BC], y_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * N * 2, BC, MP], w_desc.layout)
        o_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS * OBUF * N, BT // CONSUMERS, BC], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=CONSUMERS)
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_compute, (out_desc, out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, y_bufs, w_bufs, o_bufs,
                            ready, empty, t0, c_lo, n_chunks, split, T, C, M, N, BT, BC, MP, STAGES, OBUF, 0, 1,
                            TMA_STORE, EAGER, num_warps)),
                (_loader, (x_desc, y_desc, w_desc, x_bufs, y_bufs, w_bufs, ready, empty, t0, c_lo, n_chunks, C, K,
                           N, BT, BC, MP, STAGES)),
            ], [1], [_LOADER_REGS])
        else:
            gl.warp_specialize([
                (_compute, (out_desc, out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, y_bufs, w_bufs, o_bufs,
                            ready, empty, t0, c_lo, n_chunks, split, T, C, M, N, BT, BC, MP, STAGES, OBUF, 0, 2,
                            TMA_STORE, EAGER, num_warps)),
                (_compute, (out_desc, out_ptr, hres_ptr, hpost_ptr, p_ptr, sq_ptr, x_bufs, y_bufs, w_bufs, o_bufs,
                            ready, empty, t0, c_lo, n_chunks, split, T, C, M, N, BT, BC, MP, STAGES, OBUF, 1, 2,
                            TMA_STORE, EAGER, num_warps)),
                (_loader, (x_desc, y_desc, w_desc, x_bufs, y_bufs, w_bufs, ready, empty, t0, c_lo, n_chunks, C, K,
                           N, BT, BC, MP, STAGES)),
            ], [num_warps, 1], [COMPUTE_REGS, _LOADER_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))


def descriptors(x: Tensor, y: Tensor, w: Tensor, out: Tensor, t: int, n: int, c: int, k: int, bt: int, bc: int,
                mp: int, consumers: int = 1):
    """Gluon TMA descriptors: X as [T, n*C] and y as [T, C] in [BT, BC] blocks, X' as [T, n*C] in the
    [BT / consumers, BC] blocks of one compute warpgroup; the hi / lo halves of phi (``w``, [2, K, MP]) as
    [2K, MP] in [BC, MP] blocks; each with the swizzle that TMA and wgmma agree on."""
    tile = gl.NVMMASharedLayout.get_default_for([bt, bc], gl.bfloat16)
    sub = gl.NVMMASharedLayout.get_default_for([bt // consumers, bc], gl.bfloat16)
    phi = gl.NVMMASharedLayout.get_default_for([bc, mp], gl.bfloat16)
    return (TensorDescriptor.from_tensor(x.view(t, n * c), [bt, bc], tile),
            TensorDescriptor.from_tensor(y.view(t, c), [bt, bc], tile),
            TensorDescriptor.from_tensor(w.view(2 * k, mp), [bc, mp], phi),
            TensorDescriptor.from_tensor(out.view(t, n * c), [bt // consumers, bc], sub))


def launch(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, w: Tensor, out: Tensor, p: Tensor, sq: Tensor,
           c_split: int, bc: int, mp: int, num_warps: int = 4, consumers: int = 1, stages: int = 0,
           tma_store: bool = True, eager: bool = False, compute_regs: int = 232) -> None:
    """Run the kernel on contiguous bf16 X [T, n, C], y [T, C], fp32 h_res [T, n, n] / h_post [T, n] and phi's
    hi / lo halves ``w`` ([2, K, MP]); writes X' into ``out`` and the partials into p [splits, T, M] /
    sq [splits, T], the channel split c_split a multiple of BC. Token blocks of 16 * num_warps * consumers rows
    (wgmma: 16 rows a warp). ``stages`` 0: as many ring slots as fit."""
    global LAUNCHES
    t, n, c = x.shape
    k, m = n * c, p.shape[-1]
    bt = 16 * num_warps * consumers
    obuf = x_buffers(tma_store, eager)
    stages = stages or stages_for(n, bt, bc, mp, obuf)
    if consumers not in (1, 2) or stages < 2 or c % bc or c_split % bc:
        raise ValueError(f"mhc gluon post_res_proj: {consumers} consumers (1 or 2), {stages} ring slots (>= 2 fit "
                         f"in {_SMEM} bytes?), C = {c} and its split {c_split} must be multiples of BC = {bc}")
    LAUNCHES += 1
    grid = ((t + bt - 1) // bt, p.shape[0])
    _post_res_proj_ws_kernel[grid](*descriptors(x, y, w, out, t, n, c, k, bt, bc, mp, consumers), out, h_res, h_post,
                                   p, sq, t, c, k, m, c_split, N=n, BT=bt, BC=bc, MP=mp, STAGES=stages, OBUF=obuf,
                                   CONSUMERS=consumers, TMA_STORE=tma_store, EAGER=eager, COMPUTE_REGS=compute_regs,
                                   num_warps=num_warps)
