"""``post_res_proj``: post_res of sublayer l fused with proj of sublayer l+1 (the cross-layer boundary of
``fuse=True``): one read of x and y, one write of X', and the next p and sq accumulated on the way."""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.errors import TritonError

from mhc_compile.kernels.launch import launch
from mhc_compile.kernels.tma import descriptor, tma_ok
from mhc_compile.kernels.triton_common import (INTERPRETED, acc_tl, acc_torch, cdiv, check_stream, dot_precision,
                                               filling_splits, gluon_build_failed, gluon_stream, half_dot_dtype, pow2,
                                               round_to, split_hi_lo, stream_arg, stream_dims, uses_hi_lo)
from mhc_compile.kernels.triton_config import DotCfg, cfg_of


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
PRP_HOIST = 20  # up to this many coefficient vectors (n*n + n; n <= 4) are loaded once per program


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def _post_res_proj_tile(cfg: DotCfg, t: int, n: int, c: int, m: int) -> tuple[int, int, int]:
    """(BT, BC, MP) within the per-thread budget; tl.dot needs BT >= 16 rows and BC >= 16 channels (K).

    At the defaults: n = 4 (MP = 32): BT = 64, BC = 32; n = 16 (MP = 512): BT = BC = 32.
    """
    mp = max(16, pow2(m))
    budget = cfg.per_thread * 32 * cfg.num_warps
    bt = max(16, min(cfg.bt, pow2(t), _pow2_floor(budget // mp)))
    bc = max(16, min(cfg.bk, pow2(c), _pow2_floor(budget // (n * bt)), _pow2_floor(budget // mp)))
    bt = max(16, min(bt, _pow2_floor(budget // (n * bc))))  # BC at its floor of 16: fewer tokens instead
    return bt, bc, mp


def _post_res_proj_stages(cfg: DotCfg, n: int, bt: int, bc: int, mp: int, stream_bytes: int, phi_bytes: int,
                          hi_lo: bool) -> int:
    """Pipeline stages whose buffers fit _PRP_SMEM: a stage holds n + 1 input tiles and the chunk's phi tiles."""
    per_stage = (n + 1) * bt * bc * stream_bytes + (2 if hi_lo else 1) * n * bc * mp * phi_bytes
    return max(1, min(cfg.num_stages, _PRP_SMEM // per_stage))


@triton.jit
def coeff_vectors(hres_ptr, hpost_ptr, r64, rmask, N: tl.constexpr, ACC: tl.constexpr):
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
                          JOIN: tl.constexpr, ONE_DOT: tl.constexpr = False, X_BCAST: tl.constexpr = False):
    """Program (token block, channel split): stores its X' chunk, writes [BT, M] / [BT] partials of p / sq.

    Partials go to p_ptr[split] / sq_ptr[split]. HI_LO: hi_ptr / lo_ptr are the halves of split_hi_lo's
    [2, K, MPAD] and X'_i enters both dots as bf16 (DOT); otherwise hi_ptr is phi [K, M] (lo_ptr unused) and
    X'_i is widened to ACC. HOIST: the coefficient vectors are loaded once, before the channel loop.
    TMA (bf16, HI_LO, C and C_SPLIT multiples of BC): x_ptr is a tensor descriptor of X as [T, N*C], y_ptr of
    y [T, C], both in [BT, BC] blocks, and hi_ptr of the halves as [2K, MPAD] in [BC, MP] blocks (lo_ptr unused);
    with TMA_STORE out_ptr is a descriptor like x_ptr's, else X' is stored through pointers. Rows past T read as
    zeros and are not written; no chunk crosses a stream or a split. JOIN (with TMA): hi_ptr is a descriptor of
    the halves interleaved ([K, 2 MPAD], split_hi_lo's interleave) in [BC, 2 MP] blocks, so each stream's chunk
    takes one dot of twice the width; the hi and lo column halves of the accumulator are added at the end.
    ONE_DOT (with JOIN, N in {1, 2, 4}, N*BC <= 256): hi_ptr's rows are phi's reordered so that row c*N + i holds
    phi[i*C + c], in [N*BC, 2 MP] blocks; the chunk's N X' tiles enter one transposed dot as [N*BC, BT]
    (_streams_along_k). X_BCAST: X is [T, C] (with TMA a descriptor of it, in [BT, BC] blocks), the one row every
    stream of a token holds (a chain head's broadcast embedding, ``stream_arg``): loaded once a chunk and mixed as
    each of the n rows; X' is stored dense.
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    ms = tl.arange(0, MP)
    mmask = ms < M
    if HOIST:
        coef = coeff_vectors(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
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
            if X_BCAST:
                row = x_ptr.load([t0, c0])
                for j in tl.static_range(N):
                    xs = xs + (row,)
            else:
                for j in tl.static_range(N):
                    xs = xs + (x_ptr.load([t0, j * C + c0]),)
        else:
            y = tl.load(y_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
            if X_BCAST:
                row = tl.load(x_ptr + r64[:, None] * C + cols[None, :], mask=m2, other=0.0)
                for j in tl.static_range(N):
                    xs = xs + (row,)
            else:
                for j in tl.static_range(N):
                    xs = xs + (tl.load(x_ptr + (r64 * N + j)[:, None] * C + cols[None, :], mask=m2, other=0.0),)
        if not HOIST:
            coef = coeff_vectors(hres_ptr, hpost_ptr, r64, rmask, N, ACC)
        xws = ()  # ONE_DOT: the chunk's X' tiles, for one dot after the loop
        for i in tl.static_range(N):
            # _mix_tile's order: h_post y, then an FMA a term, h_res[i, j] x_j for j = 0 .. N-1
            xi = coef[i][:, None] * y
            for j in tl.static_range(N):
                xi = tl.fma(coef[N + i * N + j][:, None], xs[j].to(ACC), xi)
            if TMA and TMA_STORE:
                xo = round_to(xi, tl.bfloat16, RNE)
                out_ptr.store([t0, i * C + c0], xo)
            else:
                xo = round_to(xi, out_ptr.dtype.element_ty, RNE)  # what the unfused proj would read; masked lanes 0
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
                acc = tl.dot(xw.to(ACC), ph, acc, input_precision=PREC, out_dtype=ACC)
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


def _post_res_proj_ws(cfg: DotCfg, x: Tensor, bcast: bool, h_res: Tensor, h_post: Tensor, y: Tensor,
                      phi_next: Tensor, out: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """post_res_proj on the warp-specialized Gluon kernel (one program an SM: its ring takes the shared memory),
    or None where it does not run: off sm_90, a shape it does not take, or a build error (another Triton's
    Gluon, shared memory, ptxas), after which the device keeps the Triton kernel, with a warning. A build error
    comes before the launch, so nothing has been written. ``bcast``: x is broadcast over its streams (``stream_arg``;
    made dense first where the Gluon kernels' broadcast reads are off, ``gluon_stream``)."""
    lead, t, n, c = stream_dims(x)
    m = phi_next.shape[1]
    bt, bc, mp = _post_res_proj_tile(cfg, t, n, c, m)
    gp = _gluon_prp()
    x, bcast = gluon_stream(x, bcast)
    if not gp.supported(x, n, c, bc, mp):
        return None
    chosen = gp.choose(n, c, bc, mp, cfg.num_warps, cfg.ws_subs, cfg.ws_stages, cfg.ws_wstages, cfg.ws_consumers,
                       cfg.ws_join)
    if chosen is None:
        return None
    bt, slots, consumers = chosen
    chunk = bc * slots[0]  # the Gluon kernel's splits are whole stream slots
    splits = filling_splits(cfg, x.device, cdiv(t, bt), cdiv(c, chunk), occupancy=1)
    c_split = cdiv(cdiv(c, splits), chunk) * chunk
    parts = cdiv(c, c_split) * consumers  # a partial a compute warpgroup
    p = torch.empty((parts,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((parts,) + lead, dtype=acc, device=x.device)
    try:
        gp.launch(x.reshape(t, n, c), h_res.view(t, n, n), h_post.view(t, n), y.view(t, c),
                  split_hi_lo(phi_next, mp, transpose=False, interleave=cfg.ws_join), out.view(t, n, c),
                  p.view(parts, t, m), sq.view(parts, t), c_split, bc, mp, cfg.num_warps, consumers, *slots,
                  cfg.ws_regs, cfg.ws_box, join=cfg.ws_join, x_bcast=bcast)
    except TritonError as e:
        gluon_build_failed("post_res_proj", e, x.device, _NO_GLUON_PRP, "the Triton kernel", stacklevel=3)
        return None
    return (out, p[0], sq[0]) if parts == 1 else (out, p.sum(0), sq.sum(0))


def post_res_proj(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi_next: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(post_res(x, h_res, h_post, y), *proj(that, phi_next)) with one read of x and y and one write of X'. x may be
    broadcast over its n streams (under fuse=True the step after a chain head gets the embedding so): its one row a
    token is read (``stream_arg``), X' is written dense."""
    check_stream("post_res_proj", x, y, phi_next)
    lead, t, n, c = stream_dims(x)
    k, m = phi_next.shape
    if k != n * c:
        raise ValueError(f"mhc triton post_res_proj: phi_next has {k} rows, expected n*C = {n * c}")
    (x, bcast), h_res, h_post = stream_arg(x), h_res.contiguous(), h_post.contiguous()
    y, phi_next = y.contiguous(), phi_next.contiguous()
    acc = acc_torch(x.dtype, phi_next.dtype)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # dense, also where x is broadcast
    if t == 0 or c == 0:
        zeros = torch.zeros(lead + (m,), dtype=acc, device=x.device)
        return out, zeros, torch.zeros(lead, dtype=acc, device=x.device)
    cfg = cfg_of("post_res_proj")
    hi_lo = uses_hi_lo(x.dtype) and acc == torch.float32
    if cfg.ws and hi_lo and x.device not in _NO_GLUON_PRP:  # DotCfg.ws: the Gluon kernel where it runs
        done = _post_res_proj_ws(cfg, x, bcast, h_res, h_post, y, phi_next, out, acc)
        if done is not None:
            return done
    bt, bc, mp = _post_res_proj_tile(cfg, t, n, c, m)
    # TMA boxes are at most 256 elements a side: n = 16 (m = 288, MP = 512) keeps the pointer build
    tma = cfg.tma and hi_lo and c % bc == 0 and max(bt, bc, mp) <= 256 and tma_ok(x, y, out)
    join = tma and cfg.join_hi_lo and 2 * mp <= 256
    one_dot = join and cfg.one_dot and n in (1, 2, 4) and n * bc <= 256
    tblocks = cdiv(t, bt)
    splits = filling_splits(cfg, x.device, tblocks, cdiv(c, bc), occupancy=cfg.occupancy)
    c_split = cdiv(cdiv(c, splits), bc) * bc
    splits = cdiv(c, c_split)
    p = torch.empty((splits,) + lead + (m,), dtype=acc, device=x.device)
    sq = torch.empty((splits,) + lead, dtype=acc, device=x.device)
    if hi_lo:  # one_dot: row c*n + i holds phi[i*C + c], so a chunk's rows for all n streams are one block
        w = split_hi_lo(phi_next, mp, transpose=False, interleave=join, streams=n if one_dot else 1)
        hi, lo = (w, w) if join else (w[0], w[1])
    else:
        w = hi = lo = phi_next
    if tma:  # c_split is a multiple of bc: with c % bc == 0 no chunk crosses a stream or a split
        x_arg = descriptor(x.select(-2, 0), t, c, (bt, bc)) if bcast else descriptor(x, t, n * c, (bt, bc))
        y_arg = descriptor(y, t, c, (bt, bc))
        out_arg = descriptor(out, t, n * c, (bt, bc)) if cfg.tma_store else out
        rows = n * bc if one_dot else bc
        hi = lo = descriptor(w, k, 2 * mp, (rows, 2 * mp)) if join else descriptor(w, 2 * k, mp, (bc, mp))
    else:
        x_arg, y_arg, out_arg = x, y, out
    meta = dict(N=n, BT=bt, BC=bc, MP=mp, ACC=acc_tl(acc), PREC=dot_precision(x.dtype), HI_LO=hi_lo,
                DOT=half_dot_dtype(), HOIST=n * n + n <= PRP_HOIST, RNE=INTERPRETED, TMA=tma,
                TMA_STORE=tma and cfg.tma_store, JOIN=join, ONE_DOT=one_dot, X_BCAST=bcast)
    stages = _post_res_proj_stages(cfg, n, bt, bc, mp, x.element_size(), w.element_size(), hi_lo)
    launch(_post_res_proj_kernel, (tblocks, splits),
           (x_arg, h_res, h_post, y_arg, hi, lo, out_arg, p, sq, t, c, m, mp, c_split),
           meta, num_warps=cfg.num_warps, num_stages=stages,
           **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and x.is_cuda else {}))
    if splits == 1:
        return out, p[0], sq[0]
    return out, p.sum(0), sq.sum(0)
