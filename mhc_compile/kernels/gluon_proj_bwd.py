"""proj's one-pass backward as a warp-specialized Gluon kernel for Hopper (sm_90): a TMA loader warp, dx warpgroups
and a dphi warpgroup.

    dx     = dp phi^T + 2 dsq X + h_pre[:, i] dout (+ acc)        stored, rounded once
    dphi  += [dp_hi; dp_lo]^T X                                   hi / lo halves summed on the host

The Triton kernel (``triton_proj_bwd._proj_dx_dphi_kernel``) runs two programs an SM, each with one X / dout / acc
buffer a pipeline stage and two stages, so a tile's loads are issued only when the tile before it is done. In
Nsight Compute 35 % of its stall samples sit on the wait for those loads (session 20), and it runs at 83-86 % of
copy bandwidth at 32768 x 4096 (the issue's target is 85 %). Triton's pipeliner cannot go deeper: a third stage
does not fit two programs an SM, and one program an SM with more stages ran slower (``lab_dx_dphi.SWEEP``).

Here one program an SM owns a block of BK = 128 columns of one stream (256-byte rows, read as two 64-channel TMA
boxes: session 21 measured 128-byte rows costing 9 points against 256) and walks its tokens in tiles of BT = 64:

- the loader warp fills a ring of three slots (four without acc; on an H100 two for the calls with dout:
  ``triton_config.PROJ_BWD_BY_DEVICE``, sessions 36-37), each holding the tile's X, dout and acc boxes,
  dp [BT, MP] in fp32 (the A operand of the tf32 dx dot), dp^T's bf16 hi / lo rows (the A operand of the dphi dot)
  and the packed per-token coefficients (h_pre, dsq);
- the dx warpgroups each take one 64-column half of every tile (or one takes both): dx = dp phi^T (tf32 wgmma;
  phi's [BK, MP] tile is loaded once), then the elementwise terms read straight from the slot in the dot's
  accumulator layout (no tile changes layout), dx written over the acc tile (or dout's, or a tile of its own where
  neither is read) and stored by TMA;
- the dphi warpgroup keeps the [2 MP, BK] accumulator of dphi^T in registers for all of the program's tokens and
  adds [dp_hi; dp_lo]^T X for every tile as soon as the slot lands (bf16 wgmma; X enters as loaded);
- a slot is free once the dx warpgroups' TMA stores have read it and the dphi warpgroup's wgmmas have completed.

The arithmetic is the Triton kernel's: the same dots in the same precisions, the elementwise terms added in its
order. The DX_HL build (``FusedBwdCfg.ws_dx_hl``, opt-in) differs in dx's dot only: two bf16 wgmmas of the slot's
dp^T hi / lo tile (the dphi dot's operand, read transposed) against phi's hi / lo planes (``phi_rows``), loaded once
a program, so a slot carries no fp32 dp tile: 8 KB less a 64-token tile through L2, which every program reads for
its tokens (session 35's profile: L2 at 94 % of its throughput, the unit nearest its limit), and a dot that keeps
~16 bits where tf32 keeps 11 (session 36, an H100: as precise as the default, since dx's error is its bf16
rounding, and no faster). GPU only (sm_90, bf16 streams, n <= 4, C a multiple of BK): ``FusedBwdCfg`` picks it
(``gluon_for``) and ``supported`` says where it runs; elsewhere the Triton kernel runs, and where it does not build
(a TritonError), ``triton_proj_bwd.proj_grads`` warns and runs the Triton kernel on that device from then on. Gluon
does not run under ``TRITON_INTERPRET=1``: the CPU tests build it for sm_90a and check the host-side packing;
benchmarks/gluon_proj_bwd_check.py compares it with the reference on an sm_90 GPU and times it beside the Triton
kernel.

Status (session 27, benchmarks/results/session27-2026-12-04-h200.md): matches the float64 reference at eight shapes
on an H200 (as the Triton kernel does), runs the issue's shapes without hanging (session 25's first build hung: ``_dx``
says why; tests/test_ring_protocol.py models it), and is the default for every call it supports
(``FusedBwdCfg.ws``): without acc faster in every run since session 26, with acc since dphi's hi + lo rows pair in
registers (session 27) faster or equal at every shape of that run.

Session 36 (benchmarks/results/session36-2026-12-05-h100.md), an H100: with those slot counts the kernel ran level
with the Triton kernel with acc and 15 % behind it without; Nsight Compute found the four-slot build moving 18 % more
DRAM bytes than the op's floor (L2 hit rate 53 % against the Triton kernel's 60 %; the likely reason, not
profiled apart: programs sharing a dout tile, and every token's per-token rows, read them further apart in time).
Two slots were fastest at every shape swept, with and without acc (86.8 % of copy bandwidth with acc at 32768 x
4096, 82.9 % with three).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mhc_compile.kernels import triton_common as tcom
from mhc_compile.kernels.gluon_common import (AVAILABLE, fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma,
                                              warpgroup_mma_wait, desc, pad_cols as zero_padded, SMEM as _SMEM,
                                              LOADER_REGS as _LOADER_REGS,
                                              tma_load as _tma_load, tma_store as _tma_store, waited as _waited,
                                              warps_barrier as _warps_barrier, PACE_SPIN, pace_wait as _pace_wait)
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.tma import tma_ok

LAUNCHES = 0  # kernel launches so far: lets GPU checks assert that this kernel ran
BT, BK, XB, MP = 64, 128, 64, 32  # tokens a tile (wgmma: 16 rows a warp), columns a program, a TMA box's, dp padded
CW = 8  # packed coefficient columns: h_pre at 0 .. n-1, dsq at DSQ (32-byte rows, as TMA wants)
DSQ = 4


def smem_bytes(stages: int, has_pre: bool, has_acc: bool, dx_hl: bool = False) -> int:
    """A slot: X, dout (has_pre), acc (has_acc) or dx's own tile (neither) as [BT, BK] bf16, dp [BT, MP] fp32 (not
    with dx_hl), dp^T's hi / lo rows [2 MP, BT] bf16 and the coefficients [BT, CW] fp32; plus phi's tile, loaded
    once: [BK, MP] fp32, or with dx_hl its two bf16 planes [BK, 2 MP] (``phi_rows``)."""
    tiles = 1 + has_pre + has_acc + (not (has_pre or has_acc))
    slot = tiles * BT * BK * 2 + (0 if dx_hl else BT * MP * 4) + 2 * MP * BT * 2 + BT * CW * 4
    return stages * slot + (2 * BK * 2 * MP * 2 if dx_hl else BK * MP * 4)


def stages_for(has_pre: bool, has_acc: bool, stages: int = 0, dx_hl: bool = False) -> int | None:
    """``stages`` slots, or as many as fit (at most 4); None when two do not fit."""
    st = stages or 4
    while not stages and st > 2 and smem_bytes(st, has_pre, has_acc, dx_hl) > _SMEM:
        st -= 1
    return st if st >= 2 and smem_bytes(st, has_pre, has_acc, dx_hl) <= _SMEM else None


def supported(x: Tensor, n: int, c: int, *others: Tensor, coeffs: int = 0) -> bool:
    """Whether the kernel can run the call: Gluon, an sm_90 GPU, bf16 streams (``others``: dout, acc, the output
    too) that TMA can address, n <= 4, at most MP = 32 coefficients (dp's columns, phi's: 2n + n^2 for the stream's
    own n, but a chain head's one-row call, ``triton_proj.proj_pre_backward_collapsed``, carries its n streams'
    count) and C a multiple of BK (no block crosses a stream)."""
    return (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and tma_ok(x, *others) and 1 <= n <= 4 and coeffs <= MP and c % BK == 0)


def pack_coefs(dsq: Tensor, h_pre: Tensor | None) -> Tensor:
    """fp32 [T, CW], a token a row: h_pre[:, i] at column i (when given), dsq at DSQ, zeros elsewhere (the
    plain-PyTorch reference of ``pack_tokens``' coefficients)."""
    t = dsq.shape[0]
    out = torch.zeros((t, CW), dtype=torch.float32, device=dsq.device)
    if h_pre is not None:
        out[:, :h_pre.shape[1]] = h_pre
    out[:, DSQ] = dsq
    return out


@triton.jit(do_not_specialize=["T"])  # as triton_ops' kernels: a new token count reuses the compiled kernel
def _pack_tokens_kernel(dp_ptr, dsq_ptr, hpre_ptr, hl_ptr, coef_ptr, T, M, T16, N: tl.constexpr,
                        HAS_PRE: tl.constexpr, BR: tl.constexpr, MP: tl.constexpr, CW: tl.constexpr,
                        DSQ: tl.constexpr):
    """BR tokens a program: dp [T, M] fp32 -> dp^T's bf16 hi and lo rows (hl [2 MP, T16] in ``hl_order``, rows of
    coefficients past M zero), and h_pre [T, N] / dsq [T] -> the packed coefficients [T, CW]."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    ms = tl.arange(0, MP)
    v = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & (ms < M)[None, :], other=0.0)
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)  # split_dp_t's rounding: dp = hi + lo to ~2^-16
    hi_row = (ms // 8) * 16 + ms % 8  # hl_order: coefficient c's hi row; its lo row is 8 further
    off = hi_row[None, :].to(tl.int64) * T16 + r64[:, None]
    tl.store(hl_ptr + off, hi, mask=rmask[:, None])
    tl.store(hl_ptr + 8 * T16 + off, lo, mask=rmask[:, None])
    cols = tl.arange(0, CW)
    coef = tl.zeros((BR, CW), tl.float32)
    if HAS_PRE:
        coef = tl.load(hpre_ptr + r64[:, None] * N + cols[None, :], mask=rmask[:, None] & (cols < N)[None, :],
                       other=0.0)
    d = tl.load(dsq_ptr + rows, mask=rmask, other=0.0)
    coef = tl.where((cols == DSQ)[None, :], d[:, None], coef)
    tl.store(coef_ptr + r64[:, None] * CW + cols[None, :], coef, mask=rmask[:, None])


def hl_order(mp: int) -> Tensor:
    """The rows of ``triton_proj_bwd.split_dp_t`` (hi rows of the mp coefficients, then their lo rows) in the order
    the kernel reads them: blocks of 16 rows, the hi rows of 8 coefficients then their lo rows, so that a wgmma
    accumulator thread, which holds rows r and r + 8 of its warp's 16, holds a coefficient's hi and lo sums."""
    r = torch.arange(2 * mp)
    return (r // 8) % 2 * mp + (r // 16) * 8 + r % 8


def pack_tokens(dp: Tensor, dsq: Tensor, h_pre: Tensor | None) -> tuple[Tensor, Tensor]:
    """One launch for the kernel's per-token operands: (``triton_proj_bwd.split_dp_t(dp, MP)[hl_order(MP)]``,
    ``pack_coefs(dsq, h_pre)``), the same values. Those took four small launches; with dphi's sum and transpose (now in the kernel)
    the launches around the kernel cost ~30 us a call at 32768 x 4096 on an H200 (session 26 call 1). fp32 dp
    [T, M], dsq [T], h_pre [T, n], contiguous."""
    t, m = dp.shape
    t16 = tcom.cdiv(t, 16) * 16
    hl = torch.empty((2 * MP, t16), dtype=torch.bfloat16, device=dp.device)
    coefs = torch.empty((t, CW), dtype=torch.float32, device=dp.device)
    br = 128
    n = h_pre.shape[1] if h_pre is not None else 1
    launch(_pack_tokens_kernel, (tcom.cdiv(t, br),),
           (dp, dsq, h_pre if h_pre is not None else dsq, hl, coefs, t, m, t16),
           dict(N=n, HAS_PRE=h_pre is not None, BR=br, MP=MP, CW=CW, DSQ=DSQ))
    return hl, coefs


def hl_coef(mp: int) -> tuple[Tensor, Tensor]:
    """(coefficient, is a lo row) of each of ``hl_order``'s 2 mp rows."""
    r = torch.arange(2 * mp)
    return (r // 16) * 8 + r % 8, (r // 8) % 2 == 1


def phi_rows_reference(phi: Tensor, mp: int = MP) -> Tensor:
    """phi fp32 [K, M] -> bf16 [K, 4 mp]: two planes of 2 mp columns, one a row of dp^T's hi / lo tile (hl_order), so
    that hl^T plane0 + hl^T plane1 = dp_hi phi_hi + dp_lo phi_hi + dp_hi phi_lo, dp phi^T to ~2^-16 (the dropped
    dp_lo phi_lo is 2^-16 of it): plane 0 holds phi_hi at both rows of a coefficient, plane 1 phi_lo at its hi row
    and zero at its lo row. Columns of coefficients past M are zero."""
    k, m = phi.shape
    phi = phi.float()
    hi = phi.to(torch.bfloat16)
    lo = (phi - hi.float()).to(torch.bfloat16)
    coef, is_lo = hl_coef(mp)
    inside = coef < m
    take = coef.clamp(max=m - 1)
    out = torch.zeros((k, 4 * mp), dtype=torch.bfloat16, device=phi.device)
    out[:, :2 * mp] = torch.where(inside, hi[:, take], 0)
    out[:, 2 * mp:] = torch.where(inside & ~is_lo, lo[:, take], 0)
    return out


@triton.jit
def _phi_rows_kernel(phi_ptr, out_ptr, K, M, BR: tl.constexpr, MP: tl.constexpr, RNE: tl.constexpr):
    """BR rows of phi [K, M] fp32 -> ``phi_rows_reference``'s [K, 4 MP] bf16 (each coefficient read at both of its
    hl rows: phi is K x 24 floats, a few hundred KB)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r64 = rows.to(tl.int64)
    rmask = rows < K
    r = tl.arange(0, 2 * MP)
    coef = (r // 16) * 8 + r % 8
    is_lo = (r // 8) % 2 == 1
    v = tl.load(phi_ptr + r64[:, None] * M + coef[None, :], mask=rmask[:, None] & (coef < M)[None, :], other=0.0)
    hi = tcom.round_to(v, tl.bfloat16, RNE)
    lo = tcom.round_to(v - hi.to(tl.float32), tl.bfloat16, RNE)
    lo = tl.where(is_lo[None, :], 0.0, lo.to(tl.float32)).to(tl.bfloat16)
    dst = out_ptr + r64[:, None] * (4 * MP) + r[None, :]
    tl.store(dst, hi, mask=rmask[:, None])
    tl.store(dst + 2 * MP, lo, mask=rmask[:, None])


def phi_rows(phi: Tensor) -> Tensor:
    """``phi_rows_reference(phi, MP)`` in one launch."""
    k, m = phi.shape
    out = torch.empty((k, 4 * MP), dtype=torch.bfloat16, device=phi.device)
    br = 64
    launch(_phi_rows_kernel, (tcom.cdiv(k, br),), (phi.float().contiguous(), out, k, m),
           dict(BR=br, MP=MP, RNE=tcom.INTERPRETED))
    return out


def pad_cols(v: Tensor, width: int) -> Tensor:
    """fp32 [R, width] over v [R, M]: v itself where its rows already suit TMA (M * 4 bytes a multiple of 16; the
    descriptor's [.., width] boxes then read columns past M as zeros), else a zero-padded copy."""
    v = v.float().contiguous()
    if (v.shape[1] * 4) % 16 == 0 and v.data_ptr() % 16 == 0:
        return v
    return zero_padded(v, width)


if AVAILABLE:
    @gluon.jit
    def _loader(x_desc, g_desc, a_desc, p_desc, l_desc, c_desc, w_desc, xs, gs, accs, dps, hls, coefs, phis, ready,
                empty, phi_ready, t_lo, k0, xcol, c0, n_tiles, pace_ptr, pace_of, HAS_PRE: gl.constexpr,
                HAS_ACC: gl.constexpr, BT: gl.constexpr, XB: gl.constexpr, MP: gl.constexpr, CW: gl.constexpr,
                STAGES: gl.constexpr, DX_HL: gl.constexpr, PACE: gl.constexpr, PACE_SPIN: gl.constexpr):
        """One warp: phi's tile once (DX_HL: its two bf16 planes), then for each token tile, once its slot is free,
        the slot's boxes (the two halves of each [BT, BK] tile back to back: one 256-byte run of each row; dp's
        fp32 tile only without DX_HL).

        PACE (tiles, 0: off): tile ``it`` is not loaded before the ``pace_of`` programs of this program's token split
        (their counter: ``pace_ptr``, which the dphi warpgroups add to) have finished tile ``it - PACE`` between
        them, so that the n blocks that read one dout tile, and all that read one token's dp and coefficient rows,
        stay near each other and find them in L2 (as ``gluon_step_bwd``'s loader; ``plan_pace`` says when). After
        PACE_SPIN polls in vain (a program of the split not resident) the program stops pacing."""
        if DX_HL:
            mbarrier.expect(phi_ready, 4 * XB * 2 * MP * 2)
            for h in gl.static_range(2):
                for pl in gl.static_range(2):
                    _tma_load(w_desc, [k0 + h * XB, pl * 2 * MP], phi_ready, phis.index(2 * h + pl))
        else:
            mbarrier.expect(phi_ready, 2 * XB * MP * 4)
            for h in gl.static_range(2):
                _tma_load(w_desc, [k0 + h * XB, 0], phi_ready, phis.index(h))
        tiles: gl.constexpr = 1 + HAS_PRE + HAS_ACC
        nbytes: gl.constexpr = (tiles * 2 * BT * XB * 2 + (0 if DX_HL else BT * MP * 4) + 2 * MP * BT * 2
                                + BT * CW * 4)
        pacing = 1
        for it in range(n_tiles):
            s = it % STAGES
            if PACE:
                if (pacing != 0) & (it >= PACE):
                    pacing = _pace_wait(pace_ptr, (it - PACE) * pace_of, PACE_SPIN)
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            t0 = t_lo + it * BT
            for h in gl.static_range(2):
                _tma_load(x_desc, [t0, xcol + h * XB], bar, xs[h].index(s))
            if HAS_ACC:
                for h in gl.static_range(2):
                    _tma_load(a_desc, [t0, k0 + h * XB], bar, accs[h].index(s))
            if HAS_PRE:
                for h in gl.static_range(2):
                    _tma_load(g_desc, [t0, c0 + h * XB], bar, gs[h].index(s))
            if not DX_HL:
                _tma_load(p_desc, [t0, 0], bar, dps.index(s))
            _tma_load(l_desc, [0, t0], bar, hls.index(s))
            _tma_load(c_desc, [t0, 0], bar, coefs.index(s))

    @gluon.jit
    def _col(coefs, s, k: gl.constexpr, layout: gl.constexpr):
        """Coefficient column k of slot s's tokens as [BT, 1] in the tiles' layout (broadcast along columns)."""
        return coefs.index(s).slice(k, 1, 1).load(layout)

    @gluon.jit
    def _dx(o_desc, xs, gs, accs, os, dps, hls, coefs, phis, ready, empty, phi_ready, t_lo, k0, i0, n_tiles,
            N: gl.constexpr, HAS_PRE: gl.constexpr, HAS_ACC: gl.constexpr, BT: gl.constexpr, XB: gl.constexpr,
            DSQ: gl.constexpr, STAGES: gl.constexpr, FIRST: gl.constexpr, MIXERS: gl.constexpr,
            DX_HL: gl.constexpr, num_warps: gl.constexpr):
        """dx warpgroup FIRST of MIXERS: halves FIRST, FIRST + MIXERS, ... of every tile. A half: the tf32 dot's
        accumulator, + 2 dsq X, + h_pre dout, + acc (the Triton kernel's order), rounded once into ``os`` (a tile
        of the slot already read) and stored by TMA.

        Every warpgroup takes every tile, so each waits on every slot in order. Warpgroups that took whole tiles
        in turn would wait on a slot whose previous tile was the other's: a parity wait tells only two phases
        apart, so with an odd number of slots a warpgroup could pass on the previous tile's phase (loads land out
        of order) and release the slot early. A build that did hung on an H200 at 512 tiles a program.

        DX_HL: dp phi^T as two bf16 wgmmas of dp^T's hi / lo tile (the dphi dot's operand, read transposed) against
        phi's planes (``phi_rows``), instead of one tf32 wgmma of dp's fp32 tile: the slot holds no fp32 dp (8 KB
        less a tile through L2, which bounds the kernel: session 35's profile), and the dot keeps ~16 bits of dp
        and phi where tf32 keeps 11."""
        L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, XB, 16 if DX_HL else 8])  # bf16 k 16, tf32 8
        zero = gl.zeros([BT, XB], gl.float32, L)
        mbarrier.wait(phi_ready, 0)
        for it in range(n_tiles):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            ds = ()
            for h in gl.static_range(FIRST, 2, MIXERS):
                if DX_HL:
                    a = hls.index(s).permute((1, 0))  # [BT, 2 MP]
                    d = warpgroup_mma(a, phis.index(2 * h).permute((1, 0)), zero, use_acc=False, is_async=True)
                    ds = ds + (warpgroup_mma(a, phis.index(2 * h + 1).permute((1, 0)), d, is_async=True),)
                else:
                    ds = ds + (warpgroup_mma(dps.index(s), phis.index(h).permute((1, 0)), zero, use_acc=False,
                                             is_async=True),)
            ds = _waited(warpgroup_mma_wait(num_outstanding=0, deps=ds), 2 // MIXERS)
            dsq2 = 2.0 * _col(coefs, s, DSQ, L)
            hp = dsq2 * 0.0
            if HAS_PRE:  # the block lies in stream i0: its h_pre column
                for i in gl.static_range(N):
                    hp = gl.where(i0 == i, _col(coefs, s, i, L), hp)
            for u in gl.static_range(2 // MIXERS):  # half FIRST + u * MIXERS
                d = ds[u] + dsq2 * xs[FIRST + u * MIXERS].index(s).load(L).to(gl.float32)
                if HAS_PRE:
                    d += hp * gs[FIRST + u * MIXERS].index(s).load(L).to(gl.float32)
                if HAS_ACC:
                    d += accs[FIRST + u * MIXERS].index(s).load(L).to(gl.float32)
                os[FIRST + u * MIXERS].index(s).store(d.to(gl.bfloat16))
            fence_async_shared()
            _warps_barrier()  # every warp's dx stores, before one thread issues the TMA stores
            t0 = t_lo + it * BT
            for h in gl.static_range(FIRST, 2, MIXERS):
                _tma_store(o_desc, [t0, k0 + h * XB], os[h].index(s))
            tma.store_wait(0)  # the stores have read the slot
            mbarrier.arrive(empty.index(s), count=1)

    @gluon.jit
    def _dphi(dphi_ptr, xs, hls, ready, empty, k0, n_tiles, part, K, M, pace_ptr, BT: gl.constexpr,
              XB: gl.constexpr, MP: gl.constexpr, STAGES: gl.constexpr, PACE: gl.constexpr, num_warps: gl.constexpr):
        """The dphi warpgroup: dphi^T [2 MP, BK] += [dp_hi; dp_lo]^T X for every tile (bf16 wgmmas, X as loaded; hl's
        rows in ``pack_tokens``' order), in registers for all of the program's tokens; then hi + lo, transposed into
        dphi_ptr[part] ([K, M]). PACE: one more tile of the token split done, on pace_ptr, after each tile's
        wgmmas (the loaders' pacing)."""
        LD: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, XB, 16])
        acc0 = gl.zeros([2 * MP, XB], gl.float32, LD)
        acc1 = gl.zeros([2 * MP, XB], gl.float32, LD)
        for it in range(n_tiles):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            acc0 = warpgroup_mma(hls.index(s), xs[0].index(s), acc0, is_async=True)
            acc1 = warpgroup_mma(hls.index(s), xs[1].index(s), acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
            mbarrier.arrive(empty.index(s), count=1)
            if PACE:
                gl.atomic_add(pace_ptr, 1, sem="relaxed")
        # hl's rows are ordered so that each thread holds a coefficient's hi and lo rows (``pack_tokens``): warp w's
        # 16 rows are the hi rows of coefficients 8w .. 8w+7, then their lo rows, and a wgmma accumulator thread
        # holds rows r and r + 8 of its warp. Splitting the accumulator along that register bit pairs them with no
        # data movement; the store then goes to dphi [K, M] transposed.
        prow = gl.arange(0, 2 * MP, gl.SliceLayout(1, LD))
        coef = (prow // 16) * 8 + prow % 8
        pcol = (k0 + gl.arange(0, XB, gl.SliceLayout(0, LD))).to(gl.int64)
        dst = dphi_ptr + part.to(gl.int64) * K * M + pcol[None, :] * M + coef[:, None]
        keep = (coef < M)[:, None] & (pcol < K)[None, :]  # [2 MP, XB] (every column lies in dphi)
        dst_hi, _ = _pair_rows(dst, MP, XB)
        keep_hi, _ = _pair_rows(keep, MP, XB)
        for h in gl.static_range(2):
            hi, lo = _pair_rows(acc0 if h == 0 else acc1, MP, XB)
            gl.store(dst_hi + h * XB * M, hi + lo, mask=keep_hi)

    @gluon.jit
    def _pair_rows(v, MP: gl.constexpr, XB: gl.constexpr):
        """[2 MP, XB] in the accumulator layout -> (rows 16w + j, rows 16w + 8 + j) for w < MP / 8, j < 8, each
        [MP / 8, 8, XB]: a thread's own two rows, so the split moves no data."""
        v = gl.reshape(v, [MP // 8, 2, 8, XB])
        v = gl.permute(v, (0, 2, 3, 1))
        return gl.split(v)

    @gluon.jit(do_not_specialize=["T"])
    def _proj_bwd_ws_kernel(x_desc, g_desc, a_desc, p_desc, l_desc, c_desc, w_desc, o_desc, dphi_ptr, pace_ptr, T, C,
                            M, T_SPLIT, N: gl.constexpr, HAS_PRE: gl.constexpr, HAS_ACC: gl.constexpr,
                            X_BCAST: gl.constexpr, BT: gl.constexpr, BK: gl.constexpr, XB: gl.constexpr,
                            MP: gl.constexpr, CW: gl.constexpr, DSQ: gl.constexpr, STAGES: gl.constexpr,
                            MIXERS: gl.constexpr, MIX_REGS: gl.constexpr, DPHI_REGS: gl.constexpr,
                            DX_HL: gl.constexpr, num_warps: gl.constexpr, PACE: gl.constexpr = 0,
                            PACE_SPIN: gl.constexpr = 256):
        """Program (K block of BK columns, token split). x_desc: X [T, N*C] (X_BCAST: its rows [T, C]), a_desc /
        o_desc: acc / dX [T, N*C], g_desc: dout [T, C], all in [BT, XB] boxes; p_desc: dp [T, MP] fp32 in
        [BT, MP]; l_desc: dp^T's bf16 hi rows then lo rows [2 MP, T] in [2 MP, BT]; c_desc: the packed
        coefficients [T, CW]; w_desc: phi [N*C, MP] fp32 in [XB, MP] (DX_HL: ``phi_rows`` [N*C, 4 MP] bf16 in
        [XB, 2 MP], and p_desc a placeholder never read); dphi_ptr: the splits' fp32 dphi
        [splits, N*C, M]. Absent operands (HAS_PRE, HAS_ACC off) are
        placeholders never read. Rows past T read as zeros and are not written; T_SPLIT is a multiple of BT. PACE:
        pace_ptr is an int32 counter a token split, zeroed, of the tiles its programs have finished (``_loader``);
        otherwise it is never read."""
        K = N * C
        k0 = gl.program_id(0) * BK
        part = gl.program_id(1)
        i0 = k0 // C  # the block's stream, and its first channel
        c0 = k0 - i0 * C
        if X_BCAST:
            xcol = c0
        else:
            xcol = k0
        t_lo = part * T_SPLIT
        n_tiles = (gl.minimum(t_lo + T_SPLIT, T) - t_lo + BT - 1) // BT
        pace_ptr += part  # PACE: this token split's counter, of its K // BK programs
        pace_of = K // BK
        # one allocation a role and half: the compiler's shared-memory hazard analysis puts a barrier between any
        # two accesses of one allocation that another thread might overlap (gluon_step_bwd.py)
        xs = (gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout),
              gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout))
        if HAS_PRE:
            gs = (gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout),
                  gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout))
        else:
            gs = xs
        if HAS_ACC:
            accs = (gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout),
                    gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout))
            os = accs  # dx goes over the acc tile it has just read
        elif HAS_PRE:
            accs = xs
            os = gs
        else:
            accs = xs
            os = (gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout),
                  gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, XB], x_desc.layout))
        hls = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 2 * MP, BT], l_desc.layout)
        coefs = gl.allocate_shared_memory(gl.float32, [STAGES, BT, CW], c_desc.layout)
        if DX_HL:
            dps = hls  # placeholder, never read
            phis = gl.allocate_shared_memory(gl.bfloat16, [4, XB, 2 * MP], w_desc.layout)  # (half, plane)
        else:
            dps = gl.allocate_shared_memory(gl.float32, [STAGES, BT, MP], p_desc.layout)
            phis = gl.allocate_shared_memory(gl.float32, [2, XB, MP], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        phi_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=MIXERS + 1)  # the dx warpgroups and the dphi warpgroup
        mbarrier.init(phi_ready, count=1)
        # the first dx warpgroup is the default partition (it gets the registers the others leave)
        if MIXERS == 1:
            gl.warp_specialize([
                (_dx, (o_desc, xs, gs, accs, os, dps, hls, coefs, phis, ready, empty, phi_ready, t_lo, k0, i0,
                       n_tiles, N, HAS_PRE, HAS_ACC, BT, XB, DSQ, STAGES, 0, 1, DX_HL, num_warps)),
                (_dphi, (dphi_ptr, xs, hls, ready, empty, k0, n_tiles, part, K, M, pace_ptr, BT, XB, MP, STAGES,
                         PACE, 4)),
                (_loader, (x_desc, g_desc, a_desc, p_desc, l_desc, c_desc, w_desc, xs, gs, accs, dps, hls, coefs,
                           phis, ready, empty, phi_ready, t_lo, k0, xcol, c0, n_tiles, pace_ptr, pace_of, HAS_PRE,
                           HAS_ACC, BT, XB, MP, CW, STAGES, DX_HL, PACE, PACE_SPIN)),
            ], [4, 1], [DPHI_REGS, _LOADER_REGS])
        else:
            gl.warp_specialize([
                (_dx, (o_desc, xs, gs, accs, os, dps, hls, coefs, phis, ready, empty, phi_ready, t_lo, k0, i0,
                       n_tiles, N, HAS_PRE, HAS_ACC, BT, XB, DSQ, STAGES, 0, 2, DX_HL, num_warps)),
                (_dx, (o_desc, xs, gs, accs, os, dps, hls, coefs, phis, ready, empty, phi_ready, t_lo, k0, i0,
                       n_tiles, N, HAS_PRE, HAS_ACC, BT, XB, DSQ, STAGES, 1, 2, DX_HL, num_warps)),
                (_dphi, (dphi_ptr, xs, hls, ready, empty, k0, n_tiles, part, K, M, pace_ptr, BT, XB, MP, STAGES,
                         PACE, 4)),
                (_loader, (x_desc, g_desc, a_desc, p_desc, l_desc, c_desc, w_desc, xs, gs, accs, dps, hls, coefs,
                           phis, ready, empty, phi_ready, t_lo, k0, xcol, c0, n_tiles, pace_ptr, pace_of, HAS_PRE,
                           HAS_ACC, BT, XB, MP, CW, STAGES, DX_HL, PACE, PACE_SPIN)),
            ], [num_warps, 4, 1], [MIX_REGS, DPHI_REGS, _LOADER_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))
        mbarrier.invalidate(phi_ready)


def descriptors(x, bcast: bool, dout, acc, dp_pad, hl, coefs, phi_pad, dx, t: int, n: int, c: int) -> tuple:
    """The kernel's eight TMA descriptors (absent dout / acc / dp: X's as a placeholder). dp and phi may have fewer
    than MP columns (``pad_cols``): their boxes read the columns past M as zeros. dp's hi / lo rows are read as
    [2 MP, T] though their rows are padded to T16: columns past T then read as zeros. A bf16 ``phi_pad`` is
    ``phi_rows``' planes (the DX_HL build), read in [XB, 2 MP] boxes."""
    bf, f32 = gl.bfloat16, gl.float32
    k = n * c
    xd = (desc(x.select(-2, 0).reshape(t, c), (t, c), (c, 1), (BT, XB), bf) if bcast
          else desc(x.reshape(t, k), (t, k), (k, 1), (BT, XB), bf))
    gd = desc(dout.reshape(t, c), (t, c), (c, 1), (BT, XB), bf) if dout is not None else xd
    ad = desc(acc.reshape(t, k), (t, k), (k, 1), (BT, XB), bf) if acc is not None else xd
    planes = phi_pad.dtype == torch.bfloat16
    return (xd, gd, ad,
            desc(dp_pad, (t, dp_pad.shape[1]), (dp_pad.stride(0), 1), (BT, MP), f32) if dp_pad is not None else xd,
            desc(hl, (2 * MP, t), (hl.stride(0), 1), (2 * MP, BT), bf),
            desc(coefs, (t, CW), (CW, 1), (BT, CW), f32),
            desc(phi_pad, (k, phi_pad.shape[1]), (phi_pad.stride(0), 1), (XB, 2 * MP) if planes else (XB, MP),
                 bf if planes else f32),
            desc(dx.reshape(t, k), (t, k), (k, 1), (BT, XB), bf))


def plan_splits(t: int, kblocks: int, device) -> tuple[int, int]:
    """(splits, tokens a split, a multiple of BT): K blocks x splits that keep the SMs' one program each busiest
    (``triton_common.least_idle_splits``; a split costs one [2 MP, K] fp32 dphi partial, small beside the stream)."""
    tiles = tcom.cdiv(t, BT)
    most = max(1, min(tiles, 8 * tcom.num_sms(device) // max(kblocks, 1)))
    splits = tcom.least_idle_splits(kblocks, most, tcom.num_sms(device))
    t_split = tcom.cdiv(tcom.cdiv(t, splits), BT) * BT
    return tcom.cdiv(t, t_split), t_split


def plan_pace(kblocks: int, splits: int, t_split: int, device, pace: int, min_walk: int = 0) -> int:
    """The PACE a launch of ``kblocks`` x ``splits`` programs, each walking ``t_split`` tokens, runs with: ``pace``
    where they are all resident at once (one an SM) and walk at least ``min_walk`` tiles, else 0. Paced programs wait
    on the others of their token split; in a plan of more programs than SMs those may not have started, and the
    waits would only cost polls (``gluon_step_bwd.plan_walks``, session 45: 40 % slower at 8192 x 7168). Short walks
    drift apart less (the step backward paced ran 5 % faster on 512-tile walks and 4 % slower on 128, session 46)."""
    one_wave = kblocks * splits <= tcom.num_sms(device)
    return pace if pace and one_wave and t_split // BT >= min_walk else 0


def proj_grads(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor | None, dout: Tensor | None,
               acc: Tensor | None, out: Tensor | None = None, *, stages: int = 0, mixers: int = 2,
               mix_regs: int = 192, dphi_regs: int = 104, splits: int | None = None,
               dx_hl: bool = False, pace: int = 0, pace_walk: int = 0) -> tuple[Tensor, Tensor]:
    """(dx, dphi) of ``triton_ops.proj_pre_backward`` (h_pre and dout given) or ``proj_backward`` (neither), as
    ``triton_proj_bwd.proj_pre_backward_fused`` computes them, from one pass over the stream. bf16 x ([T, n, C],
    or broadcast over its streams: ``triton_common.stream_arg``), dout, acc; fp32 dp [T, M], dsq [T], h_pre [T, n].
    ``out``: dx's buffer (contiguous; it may be acc: a tile of acc is read before the tile of dx there is written,
    by the same program). ``dx_hl``: the DX_HL build (``_dx``: dx's dot in bf16 on dp's hi / lo tile and
    ``phi_rows``, no fp32 dp tile). ``pace``: tiles a program may run ahead of its token split (``_loader``;
    ``plan_pace`` says where it applies, with ``pace_walk`` its least walk in tiles; 0: off)."""
    global LAUNCHES
    (x, bcast) = tcom.stream_arg(x)
    _, t, n, c = tcom.stream_dims(x)
    k, m = phi.shape
    has_pre, has_acc = h_pre is not None, acc is not None
    st = stages_for(has_pre, has_acc, stages, dx_hl)
    if mixers not in (1, 2) or st is None or c % BK or not 1 <= n <= 4 or k != n * c or m > MP:
        raise ValueError(f"mhc gluon proj_grads: n = {n} (1 to 4), C = {c} (a multiple of {BK}), phi {tuple(phi.shape)}"
                         f" (n*C rows, at most {MP} columns), mixers = {mixers} (1 or 2), stages = {stages} (two must "
                         f"fit {_SMEM} bytes)")
    dev = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev) if out is None else out  # dense, x broadcast or not
    dp32 = dp.reshape(t, m).float().contiguous()
    hl, coefs = pack_tokens(dp32, dsq.reshape(t).float().contiguous(),
                            h_pre.reshape(t, n).float().contiguous() if has_pre else None)
    dout = dout.contiguous() if has_pre else None
    acc = acc.contiguous() if has_acc else None
    kblocks = k // BK
    if splits is None:
        splits, t_split = plan_splits(t, kblocks, dev)
    else:  # given (probes): whole tiles a split
        t_split = tcom.cdiv(tcom.cdiv(t, splits), BT) * BT
        splits = tcom.cdiv(t, t_split)
    dphi = torch.empty((splits, k, m), dtype=torch.float32, device=dev)
    pace = plan_pace(kblocks, splits, t_split, dev, pace, pace_walk)
    counters = torch.zeros(splits, dtype=torch.int32, device=dev) if pace else dphi.view(torch.int32)  # unread if 0
    LAUNCHES += 1
    launch(_proj_bwd_ws_kernel, (kblocks, splits),
           (*descriptors(x, bcast, dout, acc, None if dx_hl else pad_cols(dp32, MP), hl, coefs,
                         phi_rows(phi) if dx_hl else pad_cols(phi, MP), dx, t, n, c), dphi, counters, t, c, m,
            t_split),
           dict(N=n, HAS_PRE=has_pre, HAS_ACC=has_acc, X_BCAST=bcast, BT=BT, BK=BK, XB=XB, MP=MP, CW=CW, DSQ=DSQ,
                STAGES=st, MIXERS=mixers, MIX_REGS=mix_regs, DPHI_REGS=dphi_regs, DX_HL=dx_hl, num_warps=4,
                PACE=pace, PACE_SPIN=PACE_SPIN),
           shrink_stages=False)
    # one split (the shapes): dphi as the kernel wrote it, no further launch (the Triton kernel's way)
    return dx, (dphi[0] if splits == 1 else dphi.sum(0)).to(phi.dtype)
