"""``step``'s backward in two stream passes instead of three: the second one as a warp-specialized Gluon kernel.

``triton_fused.step_backward`` runs three stream passes (K2 writes X, proj_pre_backward writes G, post_res_backward
reads it): 8n+5 elements of C a token, 37 at n = 4, against the floor of 4n+5 = 21 (``cost.FUSED``). Two Triton
designs of one pass failed on the compiler's register layouts (session 13). This module takes the floor's shape:

    pass 1  K2 without its X store: dH_pre = <X, dx_in>, X rebuilt from X_prev and y (reads n+2)
    coeffs_backward -> dp, dsq
    pass 2  this kernel: X rebuilt again, G = dp phi^T + 2 dsq X + h_pre dx_in + dX, then dX_prev = H_res^T G,
            dy = h_post . G, dphi += dp^T X, and per-token partial sums of dH_res = G X_prev^T, dH_post = G y
            (reads X_prev, y, dx_in, dX; writes dX_prev, dy: 3n+3)

A program owns BC = 32 channels of all n streams and walks its tokens in tiles of BT = 64. A TMA loader warp fills a
ring of slots (three with one mixing warpgroup, two with two: ``stages_for``), each the tile's 2n+2 stream boxes
plus its per-token data (the coefficients in n + 3 groups of four, one tile each: ``pack_coefs``; dp for the G
dot). Two mixing warpgroups take the slots in turn:
G_i = dp phi_i^T is a tf32 wgmma whose accumulator layout every other tile is loaded in (no tile changes layout);
X_i, rebuilt as the forward rounded it, goes into G and over dX_i's tile, already read; then the dH partials, and
dX_prev / dy leave by TMA stores from the X_prev / y tiles. A fourth warpgroup keeps dphi^T's n [2 MP, BC]
accumulators (hi rows, then lo rows) in its registers for all of the program's tokens and adds [dp_hi; dp_lo]^T X_i
for each tile (bf16 wgmma) once its mixer has stored X_i, the hi / lo rows made from the slot's dp tile
(``_split_dp``). The sums over channels of dH_res / dH_post are added in L2 into one [n^2 + n, T] fp32 plane
(``dh_atomic``, the default since session 41; under ``torch.use_deterministic_algorithms`` each channel block writes
a plane of its own, [C / BC, n^2 + n, T], that the host sums: 80 bytes a token a block against the pass's 960,
written and read back). The per-token data is read by every block of a token tile at about the same time (from L2),
so each of its bytes a token costs C / BC bytes through L2: 256 a token since session 41 (432 before).

Measured on an H200 (session 23, benchmarks/results/session23-2026-12-04-h200.md): correct at six shapes (n = 1, 2,
4, ragged T, C up to 7168), with dH_res / dH_post 10-85x closer to the float64 reference than the three passes (G
stays fp32 instead of being rounded to bf16 between passes). Not faster: step's backward took 2567 against 2582 us
at 32768 x 4096, 4241 against 4538 at 32768 x 7168, 709 against 676 at 8192 x 4096, 1345 against 1400 at 32768 x
2048 (51-55 % of the 4n+5 floor), and the default path's backward on a saved X is faster than both (2256, 3958, 592,
1238 us). This pass alone runs at 43-47 % of copy bandwidth: the mixing warpgroups bound it. Nsight Compute puts
31 % of their stall samples on instruction fetch (two copies of a ~2500-instruction loop body), 21 % issuing, and
the loader warp waits on free slots 82 % of its time; the mixing does about 2000 instructions a tile a thread
(20 FMAs an element for X, dX_prev and the dH sums each, bf16 conversions, 20 row sums). Fewer barriers, no loop
spills, coalesced partials and 2 or 3 slots all landed within 3 %.

Session 28 (benchmarks/results/session28-2026-12-04-h200.md) cut the mixing's instructions: bf16 <-> fp32 in pairs
(gluon_common), and X_i mixed with j outer while the G dots run, so that each X_prev tile is widened once instead of
n times (a mixer's loop: 2620 -> 2166 sm_90a instructions). Outputs bit-equal to the j-inner build; 11-16 % faster
than session 27's kernel in all: 2290 against 2591 us at 32768 x 4096 (58 % of the floor), 3881 against 4326 at
32768 x 7168, 632 against 722 at 8192 x 4096, 1195 against 1364 at 32768 x 2048. That is faster than the three
passes at every one of these shapes (2560, 4565, 656, 1339 us), and faster than the default path's folded backward
at 32768 x 7168 only. Still opt-in: the path it serves, ``fuse=True``, made session 24's training step slower than
the default path (+14.7 against +12.4 % at d = 4096, ``bench_training.py --variants fusedws``), and no training step
has run since this change.

Session 30 (benchmarks/results/session30-2026-12-05-h200.md): the mixers' loops over X_prev's streams run at run
time (one copy of each loop body, against session 23's 31 % of the mixers' stall samples on instruction fetch), the
dH partials are summed by a reduce-scatter across each quad's lanes (``_quad_totals``: three shuffles for four sums
where gl.sum's butterflies take eight, and one store a lane), and one mixing warpgroup runs by default. A tile's
loop is 1147 sm_90a instructions instead of 2109 (one mixer). On an H200, interleaved with session 28's kernel
(two mixers, 2278-2280 us) and the default path's folded backward on a saved X (2187-2193 us): 2046-2054 us at
32768 x 4096 (65 % of the 4n+5 floor), 3571-3582 against 3827-3830 and 3901-3909 at 32768 x 7168, 565-568 against
633-634 and 563-564 at 8192 x 4096, 1071-1074 against 1197 and 1159-1161 at 32768 x 2048. With the new loops, one
mixer beat two by 5-7 % (call 1); with the unrolled loops two had beaten one by 16-20 % (session 23). Each change
alone (call 1): the loops were 0-3 % slower than session 28's kernel, the reduce-scatter 4 % faster. Every check
shape passes against float64, dH_res / dH_post to about 1e-4 (the three passes: 1.5-1.8e-3).

``boundary_grads`` (session 40) is the same kernel with X read from its own ring instead of rebuilt (``SAVED_X``)
and, with ``XIN``, the sublayer input written from the X_prev tiles: the default path's proj_pre_backward and the
post_res backward before it in one pass (kernels/triton_boundary.py). Two slots fit at n = 4.

Session 41 (benchmarks/results/session41-2026-12-06-h100.md, an H100): dp^T's hi / lo rows made in the kernel
instead of loaded (128 bytes a token a block), h_pre_prev's n columns in one coefficient group instead of n (48
bytes), the per-token operands packed in one Triton launch (``pack_tokens``) and the dH partials added in L2. Outputs
bit-equal to the build before at six shapes. The boundary's one pass: 2224-2254 us at 32768 x 4096 (78-79 % of its
4n + 4 floor) against 2889-2906 for the build before and 2667-2671 for the two ops; step's second pass with dH in
L2: 85.1-85.3 % of the 4n + 5 floor at 32768 x 4096 (73 % for the build before). Nsight Compute, the boundary at
32768 x 4096: 5.39 GB from DRAM against its 5.37 GB count (session 40's build: 6.46), DRAM 80 % busy, 30 % of the
stall samples on slots not yet landed: now bound by the two-slot ring's latency, not by bytes.

Session 42 (benchmarks/results/session42-2026-12-06-h100.md) tried to split the ring into two, each with its own
loader warp: a G ring (acc, X, dp), freed once G is formed, three slots deep, and an out ring (X_prev, y, dx_in, the
coefficients), two slots deep. It was correct, with outputs bit-equal to this build's, but 1-6 % slower at every
timed shape; with two G slots it was 4-13 % slower. It did not land, and its patch is kept beside the results.

Session 43 (benchmarks/results/session43-2026-12-06-h100.md) took dp out of the slots instead (both of its readers
load it into registers as their wgmmas' A), so that three slots fit: up to 16 % slower than two, and level with two;
this kernel is not waiting on a ring too shallow. Splitting a program's tokens into walks of at most 32 tiles ran
the boundary 5.5 % faster at 32768 x 4096 and 2.8 % slower at 8192 x 4096. Session 44
(benchmarks/results/session44-2026-12-06-h100.md) swept the cap at five shapes: walks of more than 128 tiles lose to
walks of 64, one wave of 128-tile walks wins, so the boundary caps walks over 128 tiles at 64 (``plan_splits``'
``long_walk``; 6-9 % faster at 32768 x 4096, 4 % at 32768 x 2048, 1.2-1.5 % at 16384 x 4096). Adding the token
splits' dphi partials in L2 instead of writing them was 1-2 % slower (its patch is kept beside those results).

Session 45 (benchmarks/results/session45-2026-12-06-h100.md) found why long walks lose: a program reads 64 bytes of
each token row, half an L2 line whose other half its neighbouring channel block reads, and all blocks read the same
per-token rows. Programs that drift apart miss what their neighbours brought into L2 and read it again from DRAM:
at 32768 x 4096 and a 1.8 GHz SM clock, up to 5.0 GB against the 3.76 GB the kernel reads once (3.8 GB, and 90-92 %
of the copy bandwidth, at Nsight Compute's 1.44 GHz). Where a plan's programs all fit the SMs at once, the loaders
now pace them (``plan_walks``, ``BoundaryBwdCfg.pace``): tile ``it`` waits until the token split has finished tile
``it - pace``. On an H100, whole walks paced 3 tiles apart ran the boundary 8.5-10.7 % faster than capped walks at
32768 x 4096 (82.5-84.6 % of its floor, the kernel alone 86.1 %) and read 3.8-4.1 GB.

Session 51 (benchmarks/results/session51-2026-12-07-h100.md, an H100): on X_prev broadcast over the streams (the
step after a chain head under fuse=True) the mixer reads and widens the row once a tile and makes dH_res's sums
once for all n columns, and where dX_prev is summed the loader brings one X_prev tile (1661 instructions a tile
against 1810; 1482 against 1652 us at 32768 x 4096, bit-equal). With three slots a mixer frees a tile's slot once
its next tile's stores are issued (``stores_lag``): the chain head's call 2.5 % faster, the full step's 1.6-1.9 %.
That call is latency-bound (Nsight Compute: 40 % of issue slots busy, DRAM 65 %): 74 % of its n + 8 floor.
Session 52: there dH_res's sum is stored once, as column 0, which ``finish`` reads for every column (1314
instructions a tile against 1621), and that call takes four slots: 1369-1380 against 1446-1452 us at 32768 x 4096,
bit-equal, 78-80 % of its floor; its Gluon pass runs at 80 % of its own bytes, more time than its instruction
count alone explains.
Session 53 (sm_90a builds only; no GPU came): X_DPHI (``StepBwdCfg.x_dphi``, off by default) moves X's mixing to the
dphi warpgroup, which mostly waited on the mixer (the mixer's tile 1307 -> 930 instructions on that call's row,
2048 -> 1555 on a dense X_prev); and X_prev's tiles are all read before any is written over, in two loops over j
(the boundary's loop, the default path's kernel: 12 -> 8 barriers a tile). Timed in session 55 (H100, bit-equal):
the boundary ran as fast as before (2009-2037 against 2009-2020 us at 32768 x 4096), so barriers are not what bounds
it; X_DPHI ran 1-4 % slower and stays off. Session 53 also freed STORE_LAG's slot before the tile's outputs were
written (one barrier fewer a tile), behind a wait for every store of the tile before: that cost the chain head's
dense pass 6.5 % (2022 against 1898 us at 32768 x 4096) and its row 1.4 %, as the wait came half a tile earlier than
the store-count wait after this tile's stores: undone in session 55.

GPU only (sm_90, bf16 streams, n <= 4, C a multiple of 32): ``StepBwdCfg.ws`` in ``triton_fused`` (on by default
since session 37) turns it on and ``supported`` says where it runs; elsewhere the three passes run. Gluon does not
run under ``TRITON_INTERPRET=1``: the CPU tests build it for sm_90a and check the two-pass decomposition
(``reference.step_grads``) and the host-side packing; benchmarks/gluon_step_bwd_check.py compares it with the
reference on an sm_90 GPU and times it beside the three passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.errors import TritonError

from mhc_compile.kernels import triton_common as tcom
from mhc_compile.kernels.gluon_common import (AVAILABLE, bf16_to_f32, f32_to_bf16, fence_async_shared, gl, gluon,
                                              mbarrier, pad_cols, round_bf16, tma, warpgroup_mma, warpgroup_mma_wait,
                                              desc, SMEM as _SMEM, LOADER_REGS as _LOADER_REGS,
                                              tma_load as _tma_load, tma_store as _tma_store, waited as _waited,
                                              warps_barrier as _warps_barrier, PACE_SPIN, pace_wait as _pace_wait)
from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.tma import tma_ok

LAUNCHES = 0  # kernel launches so far: lets GPU checks assert that this kernel ran
BT, BC, MP = 64, 32, 32  # tokens a tile (wgmma: 16 rows a warp), channels a program, dp's padded width


# the dphi warpgroup's registers where it mixes X (X_DPHI): its n accumulators and X's n tiles, spill-free from 176
# (Triton 3.6, sm_90a; 152 spills). At most 208: with the mixer's 256 and the loader's warpgroup's 40 the three
# warpgroups must fit the 384 x 168 registers the CTA starts with (its PTX's .reqntid / .maxnreg), or a
# setmaxnreg.inc waits for registers that never free
X_DPHI_REGS = 176
CW = 4  # coefficients a group: n <= 4 of them, a 16-byte row a token (TMA's least)


def coef_groups(n: int, xin: bool = False) -> int:
    """Groups of the packed per-token coefficients (``pack_coefs``): h_res's n columns, h_post, h_pre, dsq; with
    ``xin`` (``boundary_grads`` writing the sublayer input), one more: h_pre_prev."""
    return n + 3 + xin


def smem_bytes(n: int, stages: int, saved_x: bool = False, xin: bool = False, x_tiles: int | None = None,
               x_dphi: bool = False) -> int:
    """A slot: 2n+2 bf16 stream tiles (3n+2 with ``saved_x``, or ``x_dphi``: X's n too; X_prev's n are ``x_tiles``,
    one where the kernel reads a broadcast X_prev's row once, ``X_TILES``), the tile's packed coefficients and dp
    (fp32); plus phi's n [BC, MP] fp32 tiles, loaded once, and the dphi warpgroup's tile of dp^T's hi / lo rows."""
    tiles = (3 * n + 2 if saved_x or x_dphi else 2 * n + 2) - n + (n if x_tiles is None else x_tiles)
    slot = tiles * BT * BC * 2 + coef_groups(n, xin) * BT * CW * 4 + BT * MP * 4
    return stages * slot + n * BC * MP * 4 + 2 * MP * BT * 2


def stages_for(n: int, stages: int = 0, mixers: int = 1, saved_x: bool = False, xin: bool = False,
               x_tiles: int | None = None, x_dphi: bool = False) -> int | None:
    """``stages`` slots, or as many as fit (at most 3, 4 with one X_prev tile a slot, and a multiple of ``mixers``);
    None when two do not fit. ``x_tiles``: X_prev's tiles a slot (``smem_bytes``). One, the chain head's call on a
    broadcast X_prev, lets four fit at n = 4: H100, session 52, bit-equal, 0.3-1.2 % faster than three (1369-1372
    against 1372-1380 us at 32768 x 4096, 650.6-651.9 against 657.5-660.4 at 8192 x 7168).

    The mixers take the tiles in turn, so each waits on a slot whose previous tile was another's. A parity wait
    tells only two phases apart: on a ring whose slot count is no multiple of the mixers, a mixer can pass its
    wait on that previous tile's phase when loads land out of order, read the wrong tile and release the slot
    early (tests/test_ring_protocol.py models it; a kernel built that way hung on an H200 in session 25). With
    two mixers the ring therefore has two slots, each always serving the same mixer: session 23 measured two
    slots 1.4-2.3 % slower than three, which its timings used. ``x_dphi``: X's ring too (``smem_bytes``)."""
    if stages and stages % mixers:
        raise ValueError(f"mhc gluon step_grads: {stages} slots for {mixers} mixers taking tiles in turn; the "
                         "slot count must be a multiple of the mixers (even for two)")
    st = stages or (4 if x_tiles == 1 else 3)
    while not stages and st > 2 and (smem_bytes(n, st, saved_x, xin, x_tiles, x_dphi) > _SMEM or st % mixers):
        st -= 1
    return st if st >= 2 and smem_bytes(n, st, saved_x, xin, x_tiles, x_dphi) <= _SMEM else None


def supported(x_prev: Tensor, n: int, c: int, *others: Tensor) -> bool:
    """Whether the kernel can run the call: Gluon, an sm_90 GPU, bf16 streams (``others``: y, dx_in, dX too) that
    TMA can address (16-byte aligned), n <= 4 (dp's 2n + n^2 coefficients fit MP = 32) and C a multiple of BC (no
    block crosses a stream)."""
    return (AVAILABLE and x_prev.is_cuda and torch.cuda.get_device_capability(x_prev.device)[0] == 9
            and tma_ok(x_prev, *others) and 1 <= n <= 4 and c % BC == 0 and stages_for(n) is not None)


def pack_coefs(h_post: Tensor, h_res: Tensor, h_pre: Tensor, dsq: Tensor, h_pre_prev: Tensor | None = None) -> Tensor:
    """fp32 [coef_groups(n) * T, CW]: group g's row of token t at g * T + t, its column i holding
    h_res[t, i, g] for g < n (h_res's column g: what X_prev_g adds to X_i, and G_i to dX_prev_g), then h_post[t, i]
    (g = n), h_pre[t, i] (g = n + 1), and dsq[t] in column 0 of g = n + 2; with ``h_pre_prev`` (``boundary_grads``'
    sublayer input), h_pre_prev[t, j] at column j of g = n + 3; zero padding. A group is a leading index of the
    kernel's coefficient tiles, so a loop over g runs one copy of its body (shared memory can be indexed at run time
    along its leading dimension only). The plain-PyTorch reference of ``pack_tokens``' coefficients."""
    t, n = h_post.shape
    xin = h_pre_prev is not None
    out = torch.zeros((coef_groups(n, xin), t, CW), dtype=torch.float32, device=h_post.device)
    out[:n, :, :n] = h_res.permute(2, 0, 1)
    out[n, :, :n] = h_post
    out[n + 1, :, :n] = h_pre
    out[n + 2, :, 0] = dsq
    if xin:
        out[n + 3, :, :n] = h_pre_prev
    return out.view(-1, CW)


@triton.jit(do_not_specialize=["T"])  # as triton_ops' kernels: a new token count reuses the compiled kernel
def _pack_tokens_kernel(hres_ptr, hpost_ptr, hpre_ptr, dsq_ptr, hpp_ptr, dp_ptr, coef_ptr, dpad_ptr, T, M,
                        N: tl.constexpr, XIN: tl.constexpr, BR: tl.constexpr, CW: tl.constexpr, MP: tl.constexpr):
    """BR tokens a program: ``pack_coefs``' groups (h_res [T, N, N], h_post / h_pre / h_pre_prev [T, N], dsq [T],
    any float dtype) into coef [NG * T, CW] fp32, and dp [T, M] into dpad [T, MP] fp32, zero columns past M."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, CW)
    cmask = rmask[:, None] & (cols < N)[None, :]
    dst = coef_ptr + r64[:, None] * CW + cols[None, :]
    for g in tl.static_range(N):  # h_res's column g: h_res[t, i, g] at column i
        v = tl.load(hres_ptr + r64[:, None] * (N * N) + cols[None, :] * N + g, mask=cmask, other=0.0)
        tl.store(dst + g * T * CW, v.to(tl.float32), mask=rmask[:, None])
    rowwise = r64[:, None] * N + cols[None, :]
    v = tl.load(hpost_ptr + rowwise, mask=cmask, other=0.0)
    tl.store(dst + N * T * CW, v.to(tl.float32), mask=rmask[:, None])
    v = tl.load(hpre_ptr + rowwise, mask=cmask, other=0.0)
    tl.store(dst + (N + 1) * T * CW, v.to(tl.float32), mask=rmask[:, None])
    d = tl.load(dsq_ptr + r64, mask=rmask, other=0.0).to(tl.float32)
    tl.store(dst + (N + 2) * T * CW, tl.where((cols == 0)[None, :], d[:, None], 0.0), mask=rmask[:, None])
    if XIN:
        v = tl.load(hpp_ptr + rowwise, mask=cmask, other=0.0)
        tl.store(dst + (N + 3) * T * CW, v.to(tl.float32), mask=rmask[:, None])
    ms = tl.arange(0, MP)
    v = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & (ms < M)[None, :], other=0.0)
    tl.store(dpad_ptr + r64[:, None] * MP + ms[None, :], v.to(tl.float32), mask=rmask[:, None])


def pack_tokens(h_post: Tensor, h_res: Tensor, h_pre: Tensor, dsq: Tensor, dp: Tensor,
                h_pre_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One launch for the kernel's per-token operands: (``pack_coefs``, dp as fp32 [T, MP] with zero columns past
    its M), the same values as the plain-PyTorch packing, which took some ten small launches a call."""
    t, n = h_post.shape
    xin = h_pre_prev is not None
    m = dp.shape[-1]
    coefs = torch.empty((coef_groups(n, xin) * t, CW), dtype=torch.float32, device=h_post.device)
    dp_pad = torch.empty((t, MP), dtype=torch.float32, device=h_post.device)
    br = 128
    args = [v.contiguous() for v in (h_res, h_post, h_pre, dsq.reshape(t), h_pre_prev if xin else h_pre,
                                     dp.reshape(t, m))]
    launch(_pack_tokens_kernel, (tcom.cdiv(t, br),), (*args, coefs, dp_pad, t, m),
           dict(N=n, XIN=xin, BR=br, CW=CW, MP=MP))
    return coefs, dp_pad


@triton.jit(do_not_specialize=["T"])
def _step_bwd_finish_kernel(dphi_ptr, dh_ptr, dphi_out, dhres_out, dhpost_out, PARTS, NC, T, M, N, NN, NH,
                            MP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr,
                            ROW_DH: tl.constexpr = False):
    """The kernel's partials into its outputs, one launch: programs below cdiv(NC, BK) sum dphi's [PARTS, 2, MP, NC]
    partials (token splits, hi / lo rows) over their first two dims and write rows < M transposed, [NC, M] in
    dphi_out's dtype; the others write dH [NH, T] token-major, columns < NN into dh_res [T, NN] and the rest into
    dh_post [T, NH - NN]. Both read along their contiguous dim and write through a transpose in registers: torch's
    strided copies took two or three launches for this. ROW_DH: dH_res's column 0 (k = i N) stands for every column
    j (X_prev broadcast: the step kernel's X_BCAST stores it once)."""
    pid = tl.program_id(0)
    n_dphi = tl.cdiv(NC, BK)
    if pid < n_dphi:
        rows = tl.arange(0, MP)
        cols = pid * BK + tl.arange(0, BK)
        mask = (rows < M)[:, None] & (cols < NC)[None, :]
        acc = tl.zeros([MP, BK], dtype=tl.float32)
        for part in range(2 * PARTS):  # [parts, 2] as one dim: every split's hi rows, then its lo rows
            r64 = (part * MP + rows[:, None]).to(tl.int64)
            acc += tl.load(dphi_ptr + r64 * NC + cols[None, :], mask=mask, other=0.0)
        out = dphi_out + cols.to(tl.int64)[None, :] * M + rows[:, None]
        tl.store(out, acc.to(dphi_out.dtype.element_ty), mask=mask)
    else:
        ks = tl.arange(0, HP)
        toks = (pid - n_dphi) * BT + tl.arange(0, BT)
        mask = (ks < NH)[:, None] & (toks < T)[None, :]
        src = tl.where(ks < NN, ks - ks % N, ks) if ROW_DH else ks
        acc = tl.load(dh_ptr + src[:, None].to(tl.int64) * T + toks[None, :], mask=mask, other=0.0)
        t64 = toks.to(tl.int64)[None, :]
        tl.store(dhres_out + t64 * NN + ks[:, None], acc, mask=mask & (ks < NN)[:, None])
        tl.store(dhpost_out + t64 * (NH - NN) + (ks[:, None] - NN), acc, mask=mask & (ks >= NN)[:, None])


def finish(dphi_t: Tensor, dh: Tensor, m: int, n: int, dtype: torch.dtype,
           row_dh: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dH_res [T, n, n], dH_post [T, n], dphi [n C, m] in ``dtype``) from the kernel's partials: dphi_t [parts, 2 MP,
    n C] fp32, dh [planes, n^2 + n, T] fp32 (``finish_reference`` is the plain-PyTorch twin). ``row_dh``: dH_res's
    column 0 (rows i n of dh) is every column's, the others unwritten (a broadcast X_prev's, ``_mixer``)."""
    parts, nc = dphi_t.shape[0], dphi_t.shape[-1]
    planes, nh, t = dh.shape
    # a plane a channel block (dH not added in L2): torch's reduction, which at 32768 x 4096 (128 planes) ran about
    # 100 us faster than a loop over them in the kernel below (session 46, H100)
    dh = dh.sum(0) if planes > 1 else dh[0]
    dh_res = dh.new_empty((t, n, n))
    dh_post = dh.new_empty((t, n))
    dphi = dphi_t.new_empty((nc, m), dtype=dtype)
    bk, bt = 128, 128
    grid = (tcom.cdiv(nc, bk) + tcom.cdiv(t, bt),)
    launch(_step_bwd_finish_kernel, grid, (dphi_t, dh, dphi, dh_res, dh_post, parts, nc, t, m, n, n * n, nh),
           dict(MP=MP, BK=bk, BT=bt, HP=triton.next_power_of_2(nh), ROW_DH=row_dh))
    return dh_res, dh_post, dphi


def finish_reference(dphi_t: Tensor, dh: Tensor, m: int, n: int, dtype: torch.dtype,
                     row_dh: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``finish`` in torch ops (what ``_launch`` ran through session 45)."""
    t = dh.shape[-1]
    dphi = dphi_t.view(dphi_t.shape[0], 2, MP, -1).sum((0, 1))[:m].t()
    dh = dh.sum(0)
    dh_res = dh[:n * n].t().reshape(t, n, n)
    if row_dh:
        dh_res = dh_res[:, :, :1].expand(t, n, n)
    return dh_res.contiguous(), dh[n * n:].t().contiguous(), dphi.to(dtype).contiguous()


if AVAILABLE:
    from triton.runtime.jit import constexpr_function

    @gluon.jit
    def _loader(x_desc, y_desc, g_desc, d_desc, c_desc, p_desc, w_desc, s_desc, xp, ys, gins, dxs, xsv,
                coefs, dps, phis, ready, empty, phi_ready, t_lo, c0, n_tiles, T, C, pace_ptr, pace_of,
                N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr, MP: gl.constexpr, NG: gl.constexpr,
                CW: gl.constexpr, STAGES: gl.constexpr, SAVED_X: gl.constexpr, PACE: gl.constexpr,
                PACE_SPIN: gl.constexpr, X_BCAST: gl.constexpr, X_TILES: gl.constexpr):
        """One warp: phi's n tiles once, then for each token tile, once its slot is free, the slot's 2n + 2 stream
        boxes (with SAVED_X X's n more, from s_desc) and its per-token data. X_BCAST: x_desc is X_prev's one row a
        token, [T, C], and the slot's first X_TILES X_prev tiles are loaded from it: n where the mixers store
        dX_prev_j over tile j (one row read from DRAM, the n - 1 loads after the first served by L2), one where they
        store dX_prev summed over the streams (COLLAPSE) and read the row once.

        PACE (tiles, 0: off): tile ``it`` is not loaded before the ``pace_of`` programs of this program's pace group
        (a token split's channel blocks, or a wave's programs; their counter: ``pace_ptr``) have finished tile
        ``it - PACE`` between them, so that the channel blocks that read the halves of one 128-byte line, and the
        same per-token rows, stay near each other and find them in L2 (``plan_walks`` says when). The wait is a hint
        the result never needs: after PACE_SPIN polls in vain (a program of the group not resident) the program
        stops pacing."""
        phi_bytes: gl.constexpr = N * BC * MP * 4
        mbarrier.expect(phi_ready, phi_bytes)
        for i in gl.static_range(N):
            _tma_load(w_desc, [i * C + c0, 0], phi_ready, phis.index(i))
        nbytes: gl.constexpr = (X_TILES + N + 2 + N * SAVED_X) * BT * BC * 2 + NG * BT * CW * 4 + BT * MP * 4
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
            for j in gl.static_range(X_TILES):
                if X_BCAST:
                    _tma_load(x_desc, [t0, c0], bar, xp.index(j * STAGES + s))
                else:
                    _tma_load(x_desc, [t0, j * C + c0], bar, xp.index(j * STAGES + s))
            _tma_load(y_desc, [t0, c0], bar, ys.index(s))
            _tma_load(g_desc, [t0, c0], bar, gins.index(s))
            for i in gl.static_range(N):
                _tma_load(d_desc, [t0, i * C + c0], bar, dxs[i].index(s))
            if SAVED_X:
                for i in gl.static_range(N):
                    _tma_load(s_desc, [t0, i * C + c0], bar, xsv.index(i * STAGES + s))
            for g in gl.static_range(NG):  # rows past T read the next group's tokens (finite) or zeros
                _tma_load(c_desc, [g * T + t0, 0], bar, coefs.index(s * NG + g))
            _tma_load(p_desc, [t0, 0], bar, dps.index(s))

    @gluon.jit
    def _row(coefs, s, g, i: gl.constexpr, NG: gl.constexpr, layout: gl.constexpr):
        """Coefficient i of group g (``pack_coefs``; g may be a run-time value) of slot s's tokens as a [BT, 1] column
        in the tiles' layout (broadcast along channels)."""
        return coefs.index(s * NG + g).slice(i, 1, 1).load(layout)

    @gluon.jit
    def _mix_x(xp, ys, coefs, s, NJ, N: gl.constexpr, NG: gl.constexpr, STAGES: gl.constexpr,
               X_BCAST: gl.constexpr, layout: gl.constexpr):
        """(X_i, y, X_BCAST: X_prev's row) of slot s, widened: X_i = h_post_i y + sum_j h_res[i, j] X_prev_j in fp32.
        j outer: each X_prev_j tile is read and widened once, not n times; every X_i still adds its terms in j order
        (an FMA a term, as the forward's ``_mix_tile``), so the same bits in any layout and on the row as on the
        dense copy. Without X_BCAST the row returned is y (not to be read)."""
        y = bf16_to_f32(ys.index(s).load(layout))
        if X_BCAST:
            xrow = bf16_to_f32(xp.index(s).load(layout))
        else:
            xrow = y
        xs = ()
        for i in gl.static_range(N):
            xs = xs + (_row(coefs, s, N, i, NG, layout) * y,)
        for j in range(NJ):
            if X_BCAST:
                xj = xrow
            else:
                xj = bf16_to_f32(xp.index(j * STAGES + s).load(layout))
            nx = ()
            for i in gl.static_range(N):
                nx = nx + (gl.fma(_row(coefs, s, j, i, NG, layout), xj, xs[i]),)
            xs = nx
        return xs, y, xrow

    @gluon.jit
    def _by_lane(v):
        """v [BT, BC] in the wgmma accumulator layout, where a thread holds columns 8k + 2q + e (q: its lane in its
        quad), viewed as [BT, q, (k, e)]: the reshapes and the permute only relabel registers."""
        BT: gl.constexpr = v.shape[0]
        BC: gl.constexpr = v.shape[1]
        return gl.reshape(gl.permute(gl.reshape(v, [BT, BC // 8, 4, 2]), [0, 2, 1, 3]), [BT, 4, BC // 4])

    @gluon.jit
    def _lane_sums(v):
        """Each thread's sum over its own columns of v, [BT, 4] with q along dim 1. One sum along the last dim adds
        a thread's values in a chain, which LLVM contracts with the products into FMAs."""
        return gl.sum(_by_lane(v), axis=2)

    # Reduce-scatter across a quad's lanes, one level: a lane whose bit (the last input, 0 or not) is clear keeps
    # a, one whose bit is set keeps b, each summed with its partner's (lane ^ 1, lane ^ 2); one shuffle serves two
    # sums. Two levels leave lane q of each quad with value q's quad total: three shuffles and three adds (and six
    # selects) for four values, where gl.sum's butterfly takes eight of each and leaves every lane every total;
    # and each lane stores one value instead of four lanes storing the same four.
    @constexpr_function
    def _keep_add_asm(lanes):
        """One level's PTX: swap partners at lane distance ``lanes``."""
        return ("{ .reg .pred p; .reg .b32 s, k, r; setp.ne.u32 p, $3, 0; selp.b32 s, $1, $2, p; selp.b32 k, $2, $1, p; "
                f"shfl.sync.bfly.b32 r, s, {lanes}, 0x1f, 0xffffffff; add.f32 $0, k, r; }}")

    @gluon.jit
    def _keep_add(a, b, bit, LANES: gl.constexpr):
        return gl.inline_asm_elementwise(_keep_add_asm(LANES), "=r,r,r,r", [a, b, bit], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _quad_totals(v0, v1, v2, v3, q):
        """Four [BT, 4] lane sums (``_lane_sums``) -> lane q of each quad holds v_q's total over the quad."""
        return _keep_add(_keep_add(v0, v1, q & 1, 1), _keep_add(v2, v3, q & 1, 1), q & 2, 2)

    @gluon.jit
    def _put_dh(ptr, val, mask, DH_ATOMIC: gl.constexpr):
        """A channel block's dH partials: stored in its own plane, or (DH_ATOMIC) added in L2 to the one plane."""
        if DH_ATOMIC:
            gl.atomic_add(ptr, val, mask=mask, sem="relaxed")
        else:
            gl.store(ptr, val, mask=mask)

    @gluon.jit
    def _mixer(o_desc, dy_desc, xin_desc, dh_ptr, xp, ys, gins, dxs, xsv, coefs, dps, phis, ready, mixed, empty,
               phi_ready, t_lo, c0, n_tiles, T, C, NJ, pace_ptr, N: gl.constexpr, BT: gl.constexpr,
               BC: gl.constexpr, MP: gl.constexpr, NG: gl.constexpr, STAGES: gl.constexpr, FIRST: gl.constexpr,
               MIXERS: gl.constexpr, SAVED_X: gl.constexpr, XIN: gl.constexpr, DH_ATOMIC: gl.constexpr,
               COLLAPSE: gl.constexpr, PACE: gl.constexpr, X_BCAST: gl.constexpr, STORE_LAG: gl.constexpr,
               X_DPHI: gl.constexpr, num_warps: gl.constexpr):
        """Mixing warpgroup FIRST of MIXERS: tiles FIRST, FIRST + MIXERS, ... of the program's tokens.

        A tile: the G dots G_i = dp phi_i^T (tf32 wgmma) start; all n X_i are mixed in registers meanwhile; then
        G_i += h_pre_i dx_in + dX_i, which frees dX_i's tile; X_i, rounded as the forward stored it, is added as
        2 dsq X_i and stored over dX_i (then ``mixed``: the dphi warpgroup may read them); the dH partials ([C / BC,
        n^2 + n, T], summed across a quad's lanes by ``_quad_totals``: each lane stores one of four coefficients);
        dX_prev and dy into the X_prev and y
        tiles, read for the last time, and out by TMA stores. Every [BT, BC] tile lives in the G dot's accumulator
        layout: none changes layout.

        The loops over X_prev's streams j run at run time (to NJ = N, a run-time argument, which LLVM does not
        unroll as it would a loop of a constant count): their bodies are one copy each, not n. Unrolled, the loop over a tile was about 2100 instructions, and two mixers ran two
        copies of it: Nsight Compute put 31 % of the mixers' stall samples on instruction fetch (session 23). A
        stream's tile and h_res's column j are indexed by j in shared memory (X_prev's ring is one allocation, the
        coefficients a group a column of h_res); the loops over i stay unrolled, as the G_i and X_i they carry
        live in registers.

        SAVED_X (``boundary_grads``): X_i is read from its own tiles (xsv), not rebuilt, and the dphi warpgroup reads
        them as they land (no ``mixed``). XIN: x_in = sum_j h_pre_prev[j] X_prev_j is also made, in the loop over j
        that reads X_prev for dH_res, and leaves by TMA store from dx_in's tile. COLLAPSE (a chain head's step under
        fuse=True): dX_prev summed over its n streams in registers (as sum_i r_i G_i, r_i h_res's row sums), rounded
        once, and stored as one tile from X_prev stream 0's, read by then.

        X_BCAST (the step after a chain head under fuse=True): every X_prev_j is the one row, so it is read and
        widened once a tile (tile 0, loaded first) and dH_res[:, j] = <G_i, row> is one sum for every j, made once
        and stored once, as column 0 (``finish``'s ROW_DH reads it for every j): n products an element for the dH_res
        sums instead of n^2, and n + n partials a token leave the block instead of n^2 + n (1621 -> 1314
        instructions a tile at n = 4, Triton 3.6). X_i still adds its n terms in j order: the same bits as on the
        dense copy.

        X_DPHI: the dphi warpgroup mixes X_i (``_dphi``) into their own ring (xsv) and arrives on ``mixed``; here they
        are read as SAVED_X reads them, once ``mixed`` says so. The mixer, one warpgroup that waits on each of its
        steps in turn, sheds the n^2 FMAs an element of the mixing and the X_i stores to a warpgroup that otherwise
        waits on it."""
        MIX_HERE: gl.constexpr = not SAVED_X and not X_DPHI  # X_i mixed by this warpgroup
        L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BC, 8])  # the tf32 G dot's (k = 8)
        R: gl.constexpr = gl.SliceLayout(1, L)
        NH: gl.constexpr = N * N + N  # dH partials a token: dH_res (i*N + j), then dH_post
        zero = gl.zeros([BT, BC], gl.float32, L)
        # a thread's quad lane q and its rows, in the layout of _lane_sums' results (columns 8k + 2q + e)
        cols = gl.arange(0, BC, gl.SliceLayout(0, L))[None, :] + gl.zeros([BT, BC], gl.int32, L)
        qlane = gl.max(_by_lane((cols // 2) % 4), axis=2)
        qrow = gl.max(_by_lane(gl.arange(0, BT, R)[:, None] + gl.zeros([BT, BC], gl.int32, L)), axis=2)
        qzero = gl.zeros_like(qlane).to(gl.float32)
        mbarrier.wait(phi_ready, 0)
        cb = c0 // BC
        for it in range(FIRST, n_tiles, MIXERS):
            s = it % STAGES
            t0 = t_lo + it * BT
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            gs = ()
            for i in gl.static_range(N):  # G_i = dp phi_i^T: fp32 operands, so tf32 (the CUDA default)
                gs = gs + (warpgroup_mma(dps.index(s), phis.index(i).permute((1, 0)), zero, use_acc=False,
                                         is_async=True),)
            if MIX_HERE:  # X_i mixed while the G dots run
                xs, y, xrow = _mix_x(xp, ys, coefs, s, NJ, N, NG, STAGES, X_BCAST, L)
            gs = _waited(warpgroup_mma_wait(num_outstanding=0, deps=gs), N)
            dxin = bf16_to_f32(gins.index(s).load(L))
            g = ()
            for i in gl.static_range(N):  # G_i = dot + h_pre dx_in + dX, then + 2 dsq X_i below
                gi = gs[i] + _row(coefs, s, N + 1, i, NG, L) * dxin
                gi += bf16_to_f32(dxs[i].index(s).load(L))
                g = g + (gi,)
            dsq2 = 2.0 * _row(coefs, s, N + 2, 0, NG, L)
            gx = ()
            if MIX_HERE:
                for i in gl.static_range(N):
                    xo, xf = round_bf16(xs[i])  # X_i as the forward stored it, and as a float
                    gx = gx + (g[i] + dsq2 * xf,)
                    dxs[i].index(s).store(xo)
            else:  # X_i read as stored: loaded (SAVED_X) or mixed by the dphi warpgroup (X_DPHI), the same bits
                if X_DPHI:
                    mbarrier.wait(mixed.index(s), (it // STAGES) & 1)
                for i in gl.static_range(N):
                    gx = gx + (g[i] + dsq2 * bf16_to_f32(xsv.index(i * STAGES + s).load(L)),)
            g = gx
            if MIX_HERE:
                fence_async_shared()
                _warps_barrier()  # every warp's X_i stores, before one thread hands them over
                mbarrier.arrive(mixed.index(s), count=1)
            # this block's partial sums over its channels, a [NH, T] plane a block. Group j: the sums of G_i X_prev_j
            # for i = 0 .. N-1 (k = i N + j), summed across a quad by _quad_totals: lane q of a quad stores i = q;
            # then the group of G_i y (k = N^2 + i)
            if DH_ATOMIC:  # one [NH, T] plane that every channel block adds to
                hrow = dh_ptr + t0 + qrow
            else:
                hrow = dh_ptr + cb.to(gl.int64) * NH * T + t0 + qrow
            qmask = (t0 + qrow < T) & (qlane < N)
            if not (MIX_HERE and X_BCAST):  # on the row, X mixed here: y and the row stay in registers from it
                y = bf16_to_f32(ys.index(s).load(L))
            v = ()
            for i in gl.static_range(4):
                v = v + (_lane_sums(g[i] * y) if i < N else qzero,)
            _put_dh(hrow + (N * N + qlane) * T, _quad_totals(v[0], v[1], v[2], v[3], qlane), qmask, DH_ATOMIC)
            xin = zero
            if X_BCAST:  # dH_res[:, j] = <G_i, row>, the same sums for every j
                if not MIX_HERE:
                    xrow = bf16_to_f32(xp.index(s).load(L))
                v = ()
                for i in gl.static_range(4):
                    v = v + (_lane_sums(g[i] * xrow) if i < N else qzero,)
                # stored once, as column 0 (k = i N): ``finish`` reads it for every j (n + n partials a token
                # leave a block, not n^2 + n)
                _put_dh(hrow + qlane * N * T, _quad_totals(v[0], v[1], v[2], v[3], qlane), qmask, DH_ATOMIC)
            for j in range(NJ):  # dH_res[:, j] = <G_i, X_prev_j> (and XIN: x_in's terms)
                if X_BCAST:
                    xj = xrow
                else:
                    xj = bf16_to_f32(xp.index(j * STAGES + s).load(L))
                    v = ()
                    for i in gl.static_range(4):
                        v = v + (_lane_sums(g[i] * xj) if i < N else qzero,)
                    _put_dh(hrow + (qlane * N + j) * T, _quad_totals(v[0], v[1], v[2], v[3], qlane), qmask,
                            DH_ATOMIC)
                if XIN:  # h_pre_prev's n columns share a group, and a column is no run-time index: pick column j
                    hj = _row(coefs, s, N + 3, 0, NG, L)
                    for k in gl.static_range(1, N):
                        hj = gl.where(j == k, _row(coefs, s, N + 3, k, NG, L), hj)
                    xin += hj * xj
            # X_prev's tiles are read (above) before any is written over (below): in two loops over j, not one, as
            # the compiler's hazard analysis cannot tell X_prev's tiles apart (one allocation, a run-time index) and
            # would put a barrier before each load and each store (the boundary's loop: 12 -> 8 barriers a tile)
            if not COLLAPSE:
                _warps_barrier()
                for j in range(NJ):  # dX_prev_j = sum_i h_res[i, j] G_i over X_prev_j
                    dxp = _row(coefs, s, j, 0, NG, L) * g[0]
                    for i in gl.static_range(1, N):
                        dxp += _row(coefs, s, j, i, NG, L) * g[i]
                    xp.index(j * STAGES + s).store(f32_to_bf16(dxp))
            if COLLAPSE:  # every X_prev tile is read: the sum leaves from stream 0's
                # sum_j dX_prev_j = sum_i r_i G_i with r_i = sum_j h_res[i, j], h_res's row sums a token: n FMAs an
                # element instead of the n^2 of the n dX_prev_j (2068 -> 1810 instructions a tile at n = 4; 3 % faster
                # at 32768 x 4096, session 47); the row sums are [BT, 1] columns, n^2 adds a row, not an element
                dsum = zero
                for i in gl.static_range(N):
                    r = _row(coefs, s, 0, i, NG, L)
                    for j in gl.static_range(1, N):
                        r += _row(coefs, s, j, i, NG, L)
                    dsum += r * g[i]
                xp.index(s).store(f32_to_bf16(dsum))
            dy = _row(coefs, s, N, 0, NG, L) * g[0]
            for i in gl.static_range(1, N):
                dy += _row(coefs, s, N, i, NG, L) * g[i]
            ys.index(s).store(f32_to_bf16(dy))
            if XIN:  # over dx_in's tile, read above
                gins.index(s).store(f32_to_bf16(xin))
            fence_async_shared()
            _warps_barrier()  # every warp's stores, before one thread issues the TMA stores
            if COLLAPSE:  # o_desc: [T, C]
                _tma_store(o_desc, [t0, c0], xp.index(s))
            else:
                for j in gl.static_range(N):  # unrolled: a TMA store is few instructions, a loop's overhead more
                    _tma_store(o_desc, [t0, j * C + c0], xp.index(j * STAGES + s))
            _tma_store(dy_desc, [t0, c0], ys.index(s))
            if XIN:
                _tma_store(xin_desc, [t0, c0], gins.index(s))
            if STORE_LAG:  # this tile's stores stay in flight; the tile before's have read their slot: free it
                tma.store_wait((1 if COLLAPSE else N) + 1 + (1 if XIN else 0))
                if it >= FIRST + MIXERS:
                    mbarrier.arrive(empty.index((it - MIXERS) % STAGES), count=1)
                    if PACE:
                        gl.atomic_add(pace_ptr, 1, sem="relaxed")
            else:
                tma.store_wait(0)  # the stores have read the slot's tiles
                mbarrier.arrive(empty.index(s), count=1)
                if PACE:  # one more tile done in this token split (the loaders' PACE, _loader)
                    gl.atomic_add(pace_ptr, 1, sem="relaxed")
        if STORE_LAG:  # the last tile's slot
            tma.store_wait(0)
            if n_tiles > FIRST:
                mbarrier.arrive(empty.index((FIRST + (n_tiles - 1 - FIRST) // MIXERS * MIXERS) % STAGES), count=1)
                if PACE:
                    gl.atomic_add(pace_ptr, 1, sem="relaxed")

    @gluon.jit
    def _split_dp(dps, s, hlw, MP: gl.constexpr, BT: gl.constexpr, num_warps: gl.constexpr):
        """Slot s's dp tile [BT, MP] fp32 -> dp^T's bf16 hi rows, then its lo rows, in hlw [2 MP, BT]: the dphi dot's
        A, with ``split_dp_t``'s rounding (dp = hi + lo to ~2^-16). Read transposed, four adjacent tokens a thread,
        so that each thread's hi / lo values leave as 8-byte rows."""
        LT: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
        dpt = dps.index(s).permute((1, 0)).load(LT)
        hi = dpt.to(gl.bfloat16)
        lo = (dpt - hi.to(gl.float32)).to(gl.bfloat16)
        hlw.slice(0, MP).store(hi)
        hlw.slice(MP, MP).store(lo)

    @gluon.jit
    def _dphi(dphi_ptr, dxs, xsv, xp, ys, coefs, dps, hlw, ready, mixed, empty, c0, n_tiles, part, C, NJ,
              N: gl.constexpr, BT: gl.constexpr, BC: gl.constexpr, MP: gl.constexpr, NG: gl.constexpr,
              STAGES: gl.constexpr, SAVED_X: gl.constexpr, X_DPHI: gl.constexpr, X_BCAST: gl.constexpr,
              num_warps: gl.constexpr):
        """The dphi warpgroup: for every tile, once its X_i are in the slot (rebuilt by the mixer over dX_i's tiles,
        or with SAVED_X loaded into their own), dphi^T += [dp_hi; dp_lo]^T X_i (bf16 wgmma); the n [2 MP, BC]
        accumulators (hi rows, then lo rows) stay in its registers and go to dphi_ptr[part] at the end, the halves
        summed on the host. The hi / lo rows are made here from the slot's dp tile (``_split_dp``) into this
        warpgroup's own tile hlw, not loaded: every channel block reads a token tile's per-token data, so each byte
        of it a token costs C / BC bytes through L2 (session 40's profile: 432 bytes a token of it, of which dp^T's
        hi / lo rows were 128, L2 hitting 58 %).

        X_DPHI: this warpgroup mixes X_i itself as soon as the slot lands (``_mix_x``, in the mixer's layout: the
        same bits), rounds them as the forward stored them into their own ring (xsv), and arrives on ``mixed`` for
        the mixer, which reads them there."""
        LD: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BC, 16])
        L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BC, 8])  # the mixer's
        acc = ()
        for i in gl.static_range(N):
            acc = acc + (gl.zeros([2 * MP, BC], gl.float32, LD),)
        for it in range(n_tiles):
            s = it % STAGES
            if SAVED_X or X_DPHI:
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            else:
                mbarrier.wait(mixed.index(s), (it // STAGES) & 1)
            if X_DPHI:
                xs = _mix_x(xp, ys, coefs, s, NJ, N, NG, STAGES, X_BCAST, L)[0]
                for i in gl.static_range(N):
                    # rounded as the forward stored X_i (round_bf16's bits)
                    xsv.index(i * STAGES + s).store(f32_to_bf16(xs[i]))
            _warps_barrier()  # every warp has waited on the last tile's wgmmas, which read hlw
            _split_dp(dps, s, hlw, MP, BT, num_warps)
            fence_async_shared()
            _warps_barrier()  # every warp's rows of hlw (X_DPHI: and X_i), before the wgmmas (and the mixer) read them
            if X_DPHI:
                mbarrier.arrive(mixed.index(s), count=1)
            new = ()
            for i in gl.static_range(N):
                xi = xsv.index(i * STAGES + s) if SAVED_X or X_DPHI else dxs[i].index(s)
                new = new + (warpgroup_mma(hlw, xi, acc[i], is_async=True),)
            acc = _waited(warpgroup_mma_wait(num_outstanding=0, deps=new), N)
            mbarrier.arrive(empty.index(s), count=1)
        prow = gl.arange(0, 2 * MP, gl.SliceLayout(1, LD)).to(gl.int64)
        pcols = c0 + gl.arange(0, BC, gl.SliceLayout(0, LD))
        pbase = dphi_ptr + part.to(gl.int64) * (2 * MP) * (N * C)
        for i in gl.static_range(N):
            gl.store(pbase + prow[:, None] * (N * C) + (i * C + pcols)[None, :], acc[i])

    @gluon.jit(do_not_specialize=["T"])
    def _step_bwd_ws_kernel(x_desc, y_desc, g_desc, d_desc, c_desc, p_desc, w_desc, o_desc, dy_desc,
                            s_desc, xin_desc, dphi_ptr, dh_ptr, pace_ptr, T, C, T_SPLIT, NJ, PACE_GROUP,
                            N: gl.constexpr,
                            BT: gl.constexpr, BC: gl.constexpr, MP: gl.constexpr, NG: gl.constexpr, CW: gl.constexpr,
                            STAGES: gl.constexpr, MIXERS: gl.constexpr, SAVED_X: gl.constexpr, XIN: gl.constexpr,
                            DH_ATOMIC: gl.constexpr, COLLAPSE: gl.constexpr, MIX_REGS: gl.constexpr,
                            DPHI_REGS: gl.constexpr, PACE: gl.constexpr, PACE_SPIN: gl.constexpr,
                            num_warps: gl.constexpr, X_BCAST: gl.constexpr = False,
                            STORE_LAG: gl.constexpr = 0, X_DPHI: gl.constexpr = False):
        """Program (channel block, token split). x_desc / d_desc: X_prev / dX as [T, N*C], y_desc / g_desc: y /
        dx_in as [T, C], all in [BT, BC] boxes; c_desc: the packed coefficients [NG * T, CW] in [BT, CW] boxes; p_desc:
        dp [T, MP] fp32 in [BT, MP]; w_desc: phi [N*C, MP] fp32 in [BC, MP]; o_desc / dy_desc: dX_prev / dy like
        X_prev / y. Rows past T read as zeros and are not written; T_SPLIT is a multiple of BT. A slot is free once
        its mixing warpgroup has stored its outputs and the dphi warpgroup has read its X_i (``empty``: two
        arrivals). SAVED_X (``boundary_grads``): s_desc is X [T, N*C], read instead of rebuilt; XIN: xin_desc [T, C]
        receives the sublayer input (otherwise both stand in for descriptors the kernel does not use). COLLAPSE:
        o_desc is dX_prev summed over the streams, [T, C] (``step_grads``' ``collapse_dx``). PACE: pace_ptr is an
        int32 counter a pace group, zeroed, of the tiles its programs have finished (``_loader``); a group is
        PACE_GROUP programs in launch order (``plan_walks``: a token split's C / BC, or a wave's num_SMs). X_BCAST:
        x_desc is X_prev broadcast over its streams, its one row a token as [T, C] (``_loader``). X_DPHI: X_i mixed by
        the dphi warpgroup into a ring of their own, not by the mixer over dX_i's tiles (``_mixer``)."""
        c0 = gl.program_id(0) * BC
        part = gl.program_id(1)
        t_lo = part * T_SPLIT
        # X_prev's tiles a slot: its n streams, or, broadcast and with dX_prev summed, its one row once (_loader)
        X_TILES: gl.constexpr = 1 if X_BCAST and COLLAPSE else N
        n_tiles = (gl.minimum(t_lo + T_SPLIT, T) - t_lo + BT - 1) // BT
        # PACE: the counter of tiles done of this program's group (PACE_GROUP programs in launch order), and how
        # many programs add to it
        nb = C // BC
        group = (part * nb + gl.program_id(0)) // PACE_GROUP
        pace_ptr += group
        pace_of = gl.minimum(PACE_GROUP, nb * gl.num_programs(1) - group * PACE_GROUP)
        # dX's ring: one allocation a stream. The compiler's shared-memory hazard analysis does not tell the slots of
        # one allocation apart (the slot index is dynamic), and puts a barrier between any two accesses of one
        # allocation that another thread might overlap; apart, the X_i stores of a tile take one barrier, not four.
        # X_prev's ring is one allocation, [N * STAGES] tiles (stream j of slot s at j * STAGES + s), as the mixers'
        # loops over j index it at run time
        xp = gl.allocate_shared_memory(gl.bfloat16, [X_TILES * STAGES, BT, BC], x_desc.layout)  # later dX_prev's
        dxs = ()  # dX_i's ring, later X_i's
        for i in gl.static_range(N):
            dxs = dxs + (gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, BC], x_desc.layout),)
        if SAVED_X:  # X's ring, one allocation as X_prev's
            xsv = gl.allocate_shared_memory(gl.bfloat16, [N * STAGES, BT, BC], x_desc.layout)
        elif X_DPHI:  # X's ring, where the dphi warpgroup mixes X_i
            xsv = gl.allocate_shared_memory(gl.bfloat16, [N * STAGES, BT, BC], x_desc.layout)
        else:  # not read: X_i is rebuilt over dX_i's tiles
            xsv = xp
        ys = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, BC], x_desc.layout)
        gins = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, BC], x_desc.layout)
        coefs = gl.allocate_shared_memory(gl.float32, [STAGES * NG, BT, CW], c_desc.layout)
        dps = gl.allocate_shared_memory(gl.float32, [STAGES, BT, MP], p_desc.layout)
        # dp^T's hi / lo rows, made by the dphi warpgroup a tile at a time (the wgmma's A: 128-byte rows)
        hlw = gl.allocate_shared_memory(gl.bfloat16, [2 * MP, BT],
                                        gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16))
        phis = gl.allocate_shared_memory(gl.float32, [N, BC, MP], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mixed = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        phi_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(mixed.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)
        mbarrier.init(phi_ready, count=1)
        # the first mixing warpgroup is the default partition (it gets the registers the others leave)
        if MIXERS == 1:
            gl.warp_specialize([
                (_mixer, (o_desc, dy_desc, xin_desc, dh_ptr, xp, ys, gins, dxs, xsv, coefs, dps, phis, ready, mixed,
                          empty, phi_ready, t_lo, c0, n_tiles, T, C, NJ, pace_ptr, N, BT, BC, MP, NG, STAGES, 0, 1,
                          SAVED_X, XIN, DH_ATOMIC, COLLAPSE, PACE, X_BCAST, STORE_LAG, X_DPHI, num_warps)),
                (_dphi, (dphi_ptr, dxs, xsv, xp, ys, coefs, dps, hlw, ready, mixed, empty, c0, n_tiles, part, C, NJ,
                         N, BT, BC, MP, NG, STAGES, SAVED_X, X_DPHI, X_BCAST, 4)),
                (_loader, (x_desc, y_desc, g_desc, d_desc, c_desc, p_desc, w_desc, s_desc, xp, ys, gins, dxs,
                           xsv, coefs, dps, phis, ready, empty, phi_ready, t_lo, c0, n_tiles, T, C, pace_ptr,
                           pace_of, N, BT, BC, MP, NG, CW, STAGES, SAVED_X, PACE, PACE_SPIN, X_BCAST, X_TILES)),
            ], [4, 1], [DPHI_REGS, _LOADER_REGS])
        else:
            gl.warp_specialize([
                (_mixer, (o_desc, dy_desc, xin_desc, dh_ptr, xp, ys, gins, dxs, xsv, coefs, dps, phis, ready, mixed,
                          empty, phi_ready, t_lo, c0, n_tiles, T, C, NJ, pace_ptr, N, BT, BC, MP, NG, STAGES, 0, 2,
                          SAVED_X, XIN, DH_ATOMIC, COLLAPSE, PACE, X_BCAST, STORE_LAG, X_DPHI, num_warps)),
                (_mixer, (o_desc, dy_desc, xin_desc, dh_ptr, xp, ys, gins, dxs, xsv, coefs, dps, phis, ready, mixed,
                          empty, phi_ready, t_lo, c0, n_tiles, T, C, NJ, pace_ptr, N, BT, BC, MP, NG, STAGES, 1, 2,
                          SAVED_X, XIN, DH_ATOMIC, COLLAPSE, PACE, X_BCAST, STORE_LAG, X_DPHI, num_warps)),
                (_dphi, (dphi_ptr, dxs, xsv, xp, ys, coefs, dps, hlw, ready, mixed, empty, c0, n_tiles, part, C, NJ,
                         N, BT, BC, MP, NG, STAGES, SAVED_X, X_DPHI, X_BCAST, 4)),
                (_loader, (x_desc, y_desc, g_desc, d_desc, c_desc, p_desc, w_desc, s_desc, xp, ys, gins, dxs,
                           xsv, coefs, dps, phis, ready, empty, phi_ready, t_lo, c0, n_tiles, T, C, pace_ptr,
                           pace_of, N, BT, BC, MP, NG, CW, STAGES, SAVED_X, PACE, PACE_SPIN, X_BCAST, X_TILES)),
            ], [num_warps, 4, 1], [MIX_REGS, DPHI_REGS, _LOADER_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(mixed.index(s))
            mbarrier.invalidate(empty.index(s))
        mbarrier.invalidate(phi_ready)


def stores_lag(store_lag: bool, stages: int, mixers: int) -> bool:
    """Whether a mixer frees a tile's slot only once it has issued its next tile's stores (``STORE_LAG``), so that
    it does not wait for the TMA stores to read the slot before it goes on: where its ring leaves the loader a slot
    besides the two each mixer then holds. H100, session 51, bit-equal: with one mixer and three slots the chain
    head's call ran 1-2.6 % faster (1430 against 1467 us at 32768 x 4096 on a broadcast X_prev), the full step's
    1.6-1.9 % (2269 against 2307 us; 1060 against 1080 at 8192 x 7168); the boundary, two slots, ran 19-22 % slower
    (its loader left none). Freeing it earlier in the next tile, behind a wait for all the tile before's stores,
    cost 1.4-6.5 % (session 55: the module's docstring). Freeing it two tiles late (the chain head's row, whose four
    slots still leave the loader one at that lag) was bit-equal and 2.6 % slower (session 56: 1372-1374 against
    1334-1339 us at 32768 x 4096, 653.6-654.2 against 638.1-639.1 at 8192 x 7168), so the lag stays one tile."""
    return store_lag and stages >= 2 * mixers + 1


def descriptors(x_prev, y, dx_in, dx, coefs, dp_pad, phi_w, dx_prev, dy, t: int, n: int, c: int,
                collapse: bool = False, x_bcast: bool = False) -> tuple:
    """The kernel's nine TMA descriptors. The packed coefficients are [NG * T, CW]: a tile's rows past T read the
    next group's first tokens (finite) or zeros, and their rows are not written; dp's rows past T read as zeros, so
    tokens past T add nothing to dphi. ``phi_w``: ``phi_operand``'s, m or MP columns. ``collapse``: dx_prev is one
    row a token, [T, C]. ``x_bcast``: x_prev is broadcast over its streams (``triton_common.stream_arg``), read as
    its rows [T, C]."""
    bf, f32 = gl.bfloat16, gl.float32
    k = n * c
    ko = c if collapse else k
    kx = c if x_bcast else k
    return (desc(x_prev, (t, kx), (kx, 1), (BT, BC), bf), desc(y, (t, c), (c, 1), (BT, BC), bf),
            desc(dx_in, (t, c), (c, 1), (BT, BC), bf), desc(dx, (t, k), (k, 1), (BT, BC), bf),
            desc(coefs, (coefs.shape[0], CW), (CW, 1), (BT, CW), f32),
            desc(dp_pad, (t, MP), (MP, 1), (BT, MP), f32),
            desc(phi_w, (k, phi_w.shape[1]), (phi_w.shape[1], 1), (BC, MP), f32),
            desc(dx_prev, (t, ko), (ko, 1), (BT, BC), bf), desc(dy, (t, c), (c, 1), (BT, BC), bf))


def phi_operand(phi: Tensor) -> Tensor:
    """phi [n C, m] as the G dots' fp32 operand, read in [BC, MP] boxes: as it is where TMA can address its rows (fp32,
    contiguous, 16-byte rows and base: m = 8 at n = 2, 24 at n = 4), the box's columns past m then read as zeros;
    otherwise a zero-padded fp32 copy [n C, MP]. dp's columns past m are zeros either way, so those columns add
    nothing to G. Session 45: the copy is one of the small torch ops around the kernel, 30-51 us a call in all at
    32768 x 4096."""
    v = phi.float()
    if v.is_contiguous() and (v.shape[1] * 4) % 16 == 0 and v.data_ptr() % 16 == 0:
        return v
    return pad_cols(v, MP)


def plan_splits(t: int, c: int, device, walk_tiles: int = 0, long_walk: int = 0) -> tuple[int, int]:
    """(splits, tokens a split, a multiple of BT): channel blocks x splits that keep the SMs' one slot each
    busiest (``triton_common.least_idle_splits``; a split costs one dphi partial, small beside the stream); with
    ``walk_tiles``, where that plan walks a program over more than ``long_walk`` (and ``walk_tiles``) token tiles,
    enough splits that none walks more than ``walk_tiles`` (``GluonStepCfg``: the boundary caps walks over 128 tiles
    at 64; sessions 43 and 44 on an H100 say why)."""
    tiles, blocks = tcom.cdiv(t, BT), c // BC
    most = max(1, min(tiles, 8 * tcom.num_sms(device) // max(blocks, 1)))
    splits = tcom.least_idle_splits(blocks, most, tcom.num_sms(device))
    if walk_tiles and tcom.cdiv(tiles, splits) > max(walk_tiles, long_walk):
        splits = max(splits, tcom.cdiv(tiles, walk_tiles))
    t_split = tcom.cdiv(tcom.cdiv(t, splits), BT) * BT
    return tcom.cdiv(t, t_split), t_split


def plan_walks(t: int, c: int, device, walk_tiles: int = 0, long_walk: int = 0,
               pace: int = 0, pace_waves: int = 0, pace_walk: int = 0) -> tuple[int, int, int, int]:
    """(splits, tokens a split, pace, programs a pace counter): ``plan_splits``' plan, paced where it is one wave,
    and with ``pace_waves`` a wave at a time where it is more and walks long. With ``pace`` and a plan
    whose C / BC x splits programs are all resident at once (one an SM, as the kernel's shared memory allows),
    every program waits before its tile ``it`` until its token split has finished tile ``it - pace`` (``_loader``),
    and walks its whole split: walks drift apart otherwise, and a channel block then reads from DRAM again the half
    of a 128-byte line, and the per-token rows, that its neighbours had brought into L2 (session 45, H100, Nsight
    Compute at 32768 x 4096: 4.3-5.0 GB read against the 3.76 GB the kernel reads once, at 1.8 GHz; 3.8 GB at the
    profiler's 1.44 GHz, where it ran faster). Where the plan takes more than one wave, programs of a split do not
    run together and pacing a split would stall them (session 45: 40 % slower at 8192 x 7168): ``walk_tiles`` caps
    the walks (shorter walks drift less) as ``plan_splits`` says, and ``pace`` is 0; or, where walks are at least
    ``pace_waves`` tiles and the last split is whole, each run of num_SMs programs in launch order (the programs that
    start together) shares a counter. (A run spans two splits. A short last split's programs would stop adding to
    the counter before the others' waits are met, and those would poll PACE_SPIN times in vain.) Session 46, H100,
    C = 7168 (6.8 waves), on against off: walks of 128 tiles (32768 tokens) 7-17 % faster, of 64 (16384) 0.5-2 %
    faster, of 32 (8192) 2 % slower in two runs and 1.5 % faster in a third. ``pace_walk``: a one-wave plan is
    paced only where its walks are at least this many tiles, else capped and not paced (step's backward, session 46,
    H100: paced 5 % faster at 32768 x 4096, 512-tile walks, and 4 % slower at 8192 x 4096, 128)."""
    nb = c // BC
    one_wave = False
    if pace:
        splits, t_split = plan_splits(t, c, device)
        one_wave = nb * splits <= tcom.num_sms(device)
        if one_wave and t_split // BT >= pace_walk:
            return splits, t_split, pace, nb
    splits, t_split = plan_splits(t, c, device, walk_tiles, long_walk)
    if pace and pace_waves and not one_wave and t_split // BT >= pace_waves and t % t_split == 0:
        return splits, t_split, pace, tcom.num_sms(device)
    return splits, t_split, 0, nb


def step_grads(x_prev: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi: Tensor, h_pre: Tensor, dp: Tensor,
               dsq: Tensor, dx: Tensor, dx_in: Tensor, out: Tensor | None = None, *, stages: int = 0,
               mixers: int = 1, mix_regs: int = 176, dphi_regs: int = 112, dh_atomic: bool = True,
               collapse_dx: bool = False, walk_tiles: int = 0, long_walk: int = 0, pace: int = 0,
               pace_waves: int = 0, pace_walk: int = 0, store_lag: bool = True, x_dphi: bool = False):
    """(dX_prev, dH_res_prev, dH_post_prev, dy, dphi) of ``step`` from one pass over the stream, given dp and dsq
    (coeffs_backward's) and h_pre. Contiguous [T, n, C] bf16 X_prev (or broadcast over n: ``stream_arg``) / dX,
    [T, C] y / dx_in; ``out``: dX_prev's
    buffer (may be dx: a tile of dx is read before the tile of dX_prev there is written, by the same program).
    ``dh_atomic``: the dH partials added in L2, as ``boundary_grads``' (not deterministic: off under
    ``torch.use_deterministic_algorithms``). ``collapse_dx``: dX_prev summed over the n streams in registers and
    written as one row a token, [T, 1, C] (no ``out``). ``walk_tiles`` / ``long_walk`` / ``pace`` / ``pace_waves`` /
    ``pace_walk``: ``plan_walks``'. ``store_lag``: ``stores_lag``'. ``x_dphi``: X mixed by the dphi warpgroup
    (``X_DPHI``), with X_DPHI_REGS registers, not ``dphi_regs``."""
    if mixers not in (1, 2):
        raise ValueError(f"mhc gluon step_grads: mixers = {mixers} (1 or 2)")
    if collapse_dx and out is not None:
        raise ValueError("mhc gluon step_grads: collapse_dx writes one row a token, not over a stream-sized out")
    return _launch("step_grads", None, x_prev, h_res, h_post, y, phi, h_pre, dp, dsq, dx, dx_in, None, out, stages,
                   mixers, mix_regs, dphi_regs, dh_atomic and not torch.are_deterministic_algorithms_enabled(),
                   collapse=collapse_dx, walk_tiles=walk_tiles, long_walk=long_walk, pace=pace,
                   pace_waves=pace_waves, pace_walk=pace_walk, store_lag=store_lag, x_dphi=x_dphi)[:5]


def boundary_supported(x: Tensor, n: int, c: int, xin: bool, *others: Tensor) -> bool:
    """Whether ``boundary_grads`` can run the call: as ``supported``, with X's ring (and h_pre_prev's groups) in
    two slots."""
    return (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and tma_ok(x, *others) and 1 <= n <= 4 and c % BC == 0
            and stages_for(n, saved_x=True, xin=xin) is not None)


def boundary_grads(x: Tensor, x_prev: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi: Tensor, h_pre: Tensor,
                   dp: Tensor, dsq: Tensor, acc: Tensor, dx_in: Tensor, h_pre_prev: Tensor | None = None,
                   out: Tensor | None = None, *, stages: int = 0, mixers: int = 1, mix_regs: int = 176,
                   dphi_regs: int = 112, dh_atomic: bool = True, walk_tiles: int = 0, long_walk: int = 0,
                   pace: int = 0, pace_waves: int = 0, pace_walk: int = 0, store_lag: bool = True):
    """(dX_prev, dH_res, dH_post, dy, dphi, x_in or None): a site's proj_pre_backward (its stream ``x`` = X, phi, dp,
    dsq, h_pre, dx_in, acc) and the post_res backward of the site before it (X = post_res(x_prev, h_res, h_post, y))
    from one pass: this kernel with X read from ``x`` instead of rebuilt, so G = X's whole gradient never leaves
    the registers. With ``h_pre_prev`` it also writes x_in = pre(x_prev, h_pre_prev) (post_res_backward_pre's).
    Reads X, X_prev, acc (n rows each), y, dx_in; writes dX_prev (n), dy (and x_in): 4n + 3 (4n + 4) elements of C a
    token, where the two ops move 6n + 3 (6n + 4): dX written and read back, X_prev's pass apart.
    ``out``: dX_prev's buffer (may be acc, as in ``step_grads``). ``mixers``: mixing warpgroups taking the tiles in
    turn, as in ``step_grads`` (two slots either way at n = 4). ``dh_atomic``: the channel blocks' dH partials added
    in L2 (fp32 reductions into one [n^2 + n, T] plane) instead of written a plane a block for torch to sum: not
    deterministic (the order of the adds varies), so never under ``torch.use_deterministic_algorithms``.
    ``walk_tiles`` / ``long_walk`` / ``pace``: ``plan_walks``'. ``store_lag``: ``stores_lag``' (two slots at n = 4:
    off)."""
    if mixers not in (1, 2):
        raise ValueError(f"mhc gluon boundary_grads: mixers = {mixers} (1 or 2)")
    return _launch("boundary_grads", x, x_prev, h_res, h_post, y, phi, h_pre, dp, dsq, acc, dx_in, h_pre_prev, out,
                   stages, mixers, mix_regs, dphi_regs,
                   dh_atomic and not torch.are_deterministic_algorithms_enabled(), walk_tiles=walk_tiles,
                   long_walk=long_walk, pace=pace, pace_waves=pace_waves, pace_walk=pace_walk, store_lag=store_lag)


def _launch(what, x, x_prev, h_res, h_post, y, phi, h_pre, dp, dsq, dx, dx_in, h_pre_prev, out, stages, mixers,
            mix_regs, dphi_regs, dh_atomic, collapse=False, walk_tiles=0, long_walk=0, pace=0, pace_waves=0,
            pace_walk=0, store_lag=False, x_dphi=False):
    """The kernel's launch for ``step_grads`` (x None: X rebuilt) and ``boundary_grads`` (X read from x)."""
    global LAUNCHES
    t, n, c = x_prev.shape
    m = phi.shape[1]
    saved_x, xin = x is not None, h_pre_prev is not None
    x_dphi = x_dphi and not saved_x  # X read, not mixed, by boundary_grads
    dphi_regs = X_DPHI_REGS if x_dphi else dphi_regs
    bcast = tcom.is_broadcast(x_prev)  # the stream after a chain head, under fuse=True: read as its one row a token
    st = stages_for(n, stages, mixers, saved_x, xin, 1 if bcast and collapse else n, x_dphi)
    if st is None or c % BC or n > 4:
        raise ValueError(f"mhc gluon {what}: n = {n} (at most 4), C = {c} (a multiple of {BC}), mixers = "
                         f"{mixers} (1 or 2), stages = {stages} (two must fit {_SMEM} bytes)")
    dev = x_prev.device
    dx_prev = x_prev.new_empty((t, 1, c) if collapse else (t, n, c)) if out is None else out
    dy = torch.empty_like(y)
    x_in = torch.empty_like(y) if xin else None
    coefs, dp_pad = pack_tokens(h_post, h_res, h_pre, dsq, dp, h_pre_prev)
    phi_w = phi_operand(phi)
    splits, t_split, pace, group = plan_walks(t, c, dev, walk_tiles, long_walk, pace, pace_waves, pace_walk)
    parts = splits
    dphi_t = torch.empty((parts, 2 * MP, n * c), dtype=torch.float32, device=dev)
    nh, groups = n * n + n, tcom.cdiv((c // BC) * splits, group) if pace else 0
    if dh_atomic:  # one zeroed buffer, one memset: the plane the blocks add to, then the pace counters (0.0 is 0)
        zeroed = torch.zeros(nh * t + groups, dtype=torch.float32, device=dev)
        dh = zeroed[:nh * t].view(1, nh, t)
        counters = zeroed[nh * t:].view(torch.int32) if pace else dh.view(torch.int32)
    else:
        dh = torch.empty((c // BC, nh, t), dtype=torch.float32, device=dev)
        counters = torch.zeros(groups, dtype=torch.int32, device=dev) if pace else dh.view(torch.int32)  # unread
    descs = descriptors(x_prev, y, dx_in, dx, coefs, dp_pad, phi_w, dx_prev, dy, t, n, c, collapse, bcast)
    k, bf = n * c, gl.bfloat16
    s_desc = desc(x, (t, k), (k, 1), (BT, BC), bf) if saved_x else descs[0]
    xin_desc = desc(x_in, (t, c), (c, 1), (BT, BC), bf) if xin else descs[-1]
    LAUNCHES += 1
    launch(_step_bwd_ws_kernel, (c // BC, splits),
           (*descs, s_desc, xin_desc, dphi_t, dh, counters, t, c, t_split, n, group),
           dict(N=n, BT=BT, BC=BC, MP=MP, NG=coef_groups(n, xin), CW=CW, STAGES=st, MIXERS=mixers, SAVED_X=saved_x,
                XIN=xin, DH_ATOMIC=dh_atomic, COLLAPSE=collapse, MIX_REGS=mix_regs, DPHI_REGS=dphi_regs, PACE=pace,
                PACE_SPIN=PACE_SPIN, num_warps=4, X_BCAST=bcast, STORE_LAG=stores_lag(store_lag, st, mixers),
                X_DPHI=x_dphi),
           shrink_stages=False)
    try:
        dh_res, dh_post, dphi = finish(dphi_t, dh, m, n, phi.dtype, row_dh=bcast)
    except TritonError:  # the kernel above has written (over acc, in place, maybe): no error may reach the callers'
        # fallback, which would start over from acc; the torch twin sums the partials instead
        dh_res, dh_post, dphi = finish_reference(dphi_t, dh, m, n, phi.dtype, row_dh=bcast)
    return dx_prev, dh_res, dh_post, dy, dphi, x_in
