"""Tile and launch configurations of the Triton kernels: one frozen dataclass a kind of kernel, the tuned default of
each kernel (``DEFAULTS``, with the measurements that chose it), and ``configure`` / ``tuning`` to change one for
the process or for a with block (benchmark sweeps). ``cfg_of(kernel)`` is what a wrapper reads at each launch."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

from mhc_compile.kernels.triton_common import pow2


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
    # post_res_proj's Gluon kernel (session 31, not yet timed on a GPU): one wgmma a stream against phi's interleaved
    # [hi | lo] tile into a [BT, 2 MP] accumulator, instead of a hi and a lo wgmma (the Triton kernels' join_hi_lo):
    # half the wgmmas a chunk and each X' tile read from shared memory once, for the wgmma issue that session 22
    # found among the compute warpgroups' costs
    ws_join: bool = False

    def __post_init__(self):  # configure / tuning build configs through replace(), so a bad field fails there
        if self.ws_consumers not in (1, 2):
            raise ValueError(f"mhc DotCfg: ws_consumers={self.ws_consumers}; the Gluon post_res_proj runs 1 or 2 "
                             "compute warpgroups")


@dataclass(frozen=True)
class ProjBwdPlan:
    """The Gluon proj backward on one kind of GPU, by call: its ring slots for the calls with dout and for those
    without (0 = as many as fit), and whether the calls with dout and without acc (enter's backward under
    ``fuse=True``: a chain head carried in from another graph, or any head with ``collapse_head_grad`` off) keep the
    Triton kernel."""

    slots_with_dout: int = 0
    slots_without_dout: int = 0
    triton_for_enter: bool = False


# The plan by GPU (a part of torch.cuda.get_device_name); others get ProjBwdPlan(). H100 SXM, every build beside the
# Triton kernel in one run:
# - with dout (proj_pre_backward, enter's and the folded boundary's backward), with or without acc, two slots were
#   fastest at 32768 x 4096, 32768 x 7168 and 8192 x 4096 (session 36: with acc at 32768 x 4096 1322 us, 86.8 % of
#   copy bandwidth, against 1384 us with three; enter's call, without acc, 962 against 1058 with four);
# - without dout (proj's backward alone) a slot holds an X box only, and more slots pay: session 38's sweep
#   (benchmarks/results/session38-2026-12-06-h100.md) found three fastest at 32768 x 4096 (90.1-90.4 % of copy
#   bandwidth against 87.6-88.0 with four and 79.5 with two), 32768 x 7168 (89.1 against 85.7 / 80.8) and 8192 x 7168
#   (86.0-86.2 against 84.9-85.5 / 77.9);
# - enter's backward (dout, no acc) ran faster on the Triton kernel in sessions 36-38: session 38's sweep 88.3-88.4
#   against 85.8-86.0 % at 32768 x 4096 and 84.5 against 81.6 % at 32768 x 7168, level at 8192 x 7168 (81.4 against
#   82.0 %); session 37's table 87.2 against 85.1 %. Those rows ran enter on a dense x (a stream carried in from
#   another graph, runtime/carry.py); the "enter (broadcast)" rows time a chain head's embedding.
# The H200, on which sessions 25-27 tuned it with as many slots as fit, has not been swept.
PROJ_BWD_BY_DEVICE: tuple[tuple[str, ProjBwdPlan], ...] = (
    ("H100", ProjBwdPlan(slots_with_dout=2, slots_without_dout=3, triton_for_enter=True)),
)


def proj_bwd_plan(device_name: str) -> ProjBwdPlan:
    """The plan of the first entry whose name part the GPU's name holds, else the default one."""
    return next((plan for part, plan in PROJ_BWD_BY_DEVICE if part in device_name), ProjBwdPlan())


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
    # the Gluon kernel's dx dot in bf16 on dp's hi / lo tile (the dphi dot's operand) against phi's hi / lo planes
    # (gluon_proj_bwd.phi_rows), so no fp32 dp tile is loaded: 8 of the 18 KB of per-token operands each program
    # reads a 64-token tile, through an L2 that session 35's profile found 94 % busy. Opt-in: on an H100 (session 36)
    # correct and no faster (82.4 against 82.0 % in the kernel table; in the sweeps 1-2 points faster without acc,
    # up to half a point slower with it)
    ws_dx_hl: bool = False
    # the Gluon kernel's ring slots: 0 = as many as fit (3 with acc, 4 without), an int forces it, None = by device
    # and call (``PROJ_BWD_BY_DEVICE``, else as many as fit)
    ws_stages: int | None = None
    # the calls with dout and without acc (enter's backward): True = the Gluon kernel, False = the Triton one, None =
    # by device (``PROJ_BWD_BY_DEVICE``, else the Gluon kernel)
    ws_enter: bool | None = None
    # the Gluon kernel's programs paced this many tiles apart within their token split (``pace_for``: the calls with
    # dout and acc on n > 1 streams, where gluon_proj_bwd.plan_pace finds them all resident at once; 0: off). At
    # 32768 x 4096 its 128 programs are one wave of 512-tile walks, the boundary's shape, whose pacing ran 8.5-10.7 %
    # faster on an H100 (session 45): drifting programs read again from DRAM the tiles their neighbours had brought
    # into L2 (here the dout tile the n streams' blocks share; session 36's profile of this kernel: 18 % more DRAM
    # bytes than its floor). H100, session 50 (benchmarks/gluon_proj_bwd_check.py --pace, results/session50-
    # 2026-12-07-h100.md): proj_pre_backward with acc 1191 us paced 2 apart, 1216 at 3, 1237 at 4, against 1348
    # unpaced (96.4 against 85.1 % of copy bandwidth); proj_backward (no dout) 844 / 809 / 804 against 788 unpaced,
    # so it is not paced; at 8192 x 7168 (more programs than SMs) the plan is unpaced. Only walks of at least
    # ``ws_pace_walk`` tiles are paced: 512 (32768 tokens) was measured; shorter walks were not (the step backward
    # paced ran 4 % slower on 128-tile walks, session 46)
    ws_pace: int = 2
    ws_pace_walk: int = 512

    def __post_init__(self):
        if self.ws_pace < 0 or self.ws_pace_walk < 0:
            raise ValueError(f"mhc FusedBwdCfg: ws_pace={self.ws_pace}, ws_pace_walk={self.ws_pace_walk}; tiles, at "
                             "least 0 (ws_pace 0: off)")
        if self.ws_mixers not in (None, 1, 2):
            raise ValueError(f"mhc FusedBwdCfg: ws_mixers={self.ws_mixers}; the Gluon proj backward runs 1 or 2 dx "
                             "warpgroups (None: two with acc, one without)")
        if self.ws_stages not in (None, 0, 2, 3, 4):
            raise ValueError(f"mhc FusedBwdCfg: ws_stages={self.ws_stages}; the Gluon proj backward's ring has 2 to 4 "
                             "slots (0: as many as fit, None: by device)")

    def pace_for(self, has_acc: bool, has_dout: bool, n: int) -> int:
        """``ws_pace`` for a call with or without acc and dout on n streams: the calls that read dout's tile in n > 1
        blocks and acc (proj_pre_backward on the default path); 0 for the others (not measured paced, or slower)."""
        return self.ws_pace if has_acc and has_dout and n > 1 else 0

    def stages_on(self, device_name: str, has_dout: bool) -> int:
        """The ring slots for a call with or without dout on a GPU of this name (0: as many as fit)."""
        if self.ws_stages is not None:
            return self.ws_stages
        plan = proj_bwd_plan(device_name)
        return plan.slots_with_dout if has_dout else plan.slots_without_dout

    def gluon_for(self, has_acc: bool, has_dout: bool = False, device_name: str = "") -> int:
        """The Gluon kernel's dx warpgroups for a call with or without acc and dout on a GPU of this name; 0 where
        this config keeps the Triton kernel (whether the call can run on the Gluon kernel is
        gluon_proj_bwd.supported's to say)."""
        if not (self.ws or (self.ws_no_acc and not has_acc)):
            return 0
        if has_dout and not has_acc:  # enter's backward
            on_gluon = self.ws_enter if self.ws_enter is not None else not proj_bwd_plan(device_name).triton_for_enter
            if not on_gluon:
                return 0
        return self.ws_mixers or (2 if has_acc else 1)



# Defaults = the fastest tiles of the sweep in benchmarks/bench_kernels.py on an H100 (T=8192, C=4096, n=4,
# bf16; benchmarks/results/kernels-2026-11-23-h100.md). Full-width C (1024) won for the backward kernels too.
@dataclass(frozen=True)
class GluonStepCfg:
    """How the Gluon kernel of kernels/gluon_step_bwd.py runs, for the ops that launch it (``StepBwdCfg`` in
    triton_fused, ``BoundaryBwdCfg``). ``ws``: run it where it runs (sm_90, bf16, n <= 4, C a multiple of 32),
    else the op's Triton passes; ``stages``: its ring's slots (0: as many as fit, a multiple of ``mixers``:
    gluon_step_bwd.stages_for says why); ``mixers``: mixing warpgroups (1 or 2) taking the token tiles in turn;
    ``mix_regs`` / ``dphi_regs``: registers a thread of the second mixing warpgroup / of the dphi warpgroup (the
    first mixing warpgroup gets what the others leave of the 64K; 112 since the dphi warpgroup splits dp into its hi
    / lo rows itself, session 41: at 96 or 104 some Triton 3.9 builds spilled); ``dh_atomic``: the dH partials added
    in L2 (fp32 reductions into one [n^2 + n, T] plane) instead of written a plane a channel block for torch to sum.
    On by default since session 41 (H100: the step backward 5-17 % faster with it, the boundary 9-11 %, and the
    partials' buffer, [C / 32, n^2 + n, T] fp32, gone); like torch's own atomic-add kernels it is not deterministic
    (the order of the adds varies), so it is off under ``torch.use_deterministic_algorithms``, where the partials
    run. ``walk_tiles``: at most this many token tiles (64 tokens each) a program walks, by more token splits, where
    the plan that fills the SMs' waves (``gluon_step_bwd.plan_splits``) walks more than ``long_walk`` tiles (0: no
    cap). Off for step's backward (session 44, H100: walks of 32 tiles 3 % slower at 32768 x 4096); the boundary
    caps walks of more than 128 tiles at 64 (``BoundaryBwdCfg``). ``pace``: where the plan is one wave, each program
    loads token tile it only once its token split has finished tile it - pace, and walks are not capped (0: off;
    ``gluon_step_bwd.plan_walks`` says why and when). ``pace_waves``: with ``pace``, a plan of several waves whose walks
    are at least this many tiles (its last split whole) is paced too, each run of num_SMs programs in launch order (a wave, as they start)
    by one counter, its walks capped as without pacing (0: off). ``pace_walk``: with ``pace``, a one-wave plan is paced
    only where its walks are at least this many tiles, else capped and not paced (0: every one-wave plan).
    ``store_lag``: a mixer frees a tile's slot once it has issued its next tile's stores instead of waiting for the
    tile's own to read it, where the ring leaves the loader a slot besides the two each mixer then holds
    (``gluon_step_bwd.stores_lag``: step's one-mixer ring of three slots, four on a broadcast X_prev; the boundary's
    two slots never)."""

    ws: bool = True
    stages: int = 0
    mixers: int = 1
    mix_regs: int = 176
    dphi_regs: int = 112
    dh_atomic: bool = True
    walk_tiles: int = 0
    long_walk: int = 0
    pace: int = 0
    pace_waves: int = 0
    pace_walk: int = 0
    store_lag: bool = True

    # the token-tile counts, each >= 0, and what each means (for the error)
    _TILE_COUNTS = {
        "pace": "a program loads token tile it once its token split has finished tile it - pace (0: no pacing)",
        "pace_waves": "multi-wave plans whose walks are at least that many token tiles are paced a wave at a time "
                      "(0: never)",
        "pace_walk": "one-wave plans are paced only where their walks are at least that many token tiles (0: any)",
        "walk_tiles": "at most that many token tiles a program walks (0: no limit)",
        "long_walk": "walks of more token tiles than that are capped at walk_tiles (0: any walk longer than "
                     "walk_tiles)",
    }

    def __post_init__(self):
        name = type(self).__name__
        for field, meaning in self._TILE_COUNTS.items():
            if getattr(self, field) < 0:
                raise ValueError(f"mhc {name}: {field}={getattr(self, field)}; {meaning}")
        if self.mixers not in (1, 2):
            raise ValueError(f"mhc {name}: mixers={self.mixers}; the Gluon step backward runs 1 or 2 mixing "
                             "warpgroups")
        if self.stages and self.stages % self.mixers:
            raise ValueError(f"mhc {name}: stages={self.stages} for mixers={self.mixers}; mixers taking tiles in "
                             "turn need a slot count that is a multiple of theirs (gluon_step_bwd.stages_for)")


@dataclass(frozen=True)
class BoundaryBwdCfg(GluonStepCfg):
    """How ``boundary_backward`` (kernels/triton_boundary.py) runs: ``ws``, one pass, the Gluon kernel with X read
    (``gluon_step_bwd.boundary_grads``; two slots fit at n = 4); off, or where it does not run: proj_pre_backward,
    then the post_res backward. Session 40 (H100): two mixers slower at every shape. Session 41 (H100, with
    ``dh_atomic`` and the per-token data made in the kernel): 18-25 % faster than the two ops at every measured shape
    (benchmarks/results/session41-2026-12-06-h100.md). Walks of more than 128 token tiles are split into walks of at
    most 64 (``walk_tiles`` / ``long_walk``): on an H100 (session 44) that ran it 6-9 % faster at 32768 x 4096 (512-tile
    walks otherwise), 4 % at 32768 x 2048 (256) and 1.2-1.5 % at 16384 x 4096 (256), while at 8192 x 4096 one wave of
    128-tile walks beat walks of 64 by 3 % (benchmarks/results/session44-2026-12-06-h100.md). Where the plan is one
    wave (C up to 4096 on an H100) its programs are paced 3 tiles apart instead, and walk their whole split: on an
    H100 (session 45) 8.5-10.7 % faster than the capped walks at 32768 x 4096, 2.5 % at 16384 x 4096 and 1.2-1.8 %
    at 8192 x 4096 (benchmarks/results/session45-2026-12-06-h100.md). Plans of several waves (C = 7168) are paced a
    wave at a time where walks are at least 64 tiles (``pace_waves``): on an H100 (session 46, bit-equal outputs)
    7-17 % faster at 32768 x 7168 (128-tile walks) and 0.5-2 % at 16384 x 7168 (64); at 8192 x 7168, the d = 7168
    training shape (32-tile walks), 2 % slower in two runs of three, so not paced
    (benchmarks/results/session46-2026-12-06-h100.md)."""

    walk_tiles: int = 64
    long_walk: int = 128
    pace: int = 3
    pace_waves: int = 64


DEFAULTS = {
    "pre": StreamCfg(budget=2048),
    "pre_backward": StreamCfg(),
    "pre_backward_dh": StreamCfg(),  # untuned: pre_backward's tile (one stream-sized write fewer)
    "post_res": StreamCfg(),
    "post_res_backward": PostResBwdCfg(),
    # hi/lo bf16 dots: the fastest tile at 8192 and 32768 tokens (benchmarks/results/lab-2026-11-24-h100.md);
    # one program an SM (three stages of its tiles take 144 KB of shared memory); K splits: filling_splits
    # Session 15: join_hi_lo (one dot a step against phi's [hi | lo] columns, the X tile read from shared memory
    # once): 132.1 against 143.9 us at 8192 x 7168 (84 against 78 %), 258.2 us (98 %) at 32768 x 4096 against
    # 269.8 in session 11 (kernels-2026-12-03-h200-s15-call2.md)
    # ws: kernels/gluon_proj.py, the warp-specialized Gluon kernel, where it runs (sm_90, bf16, n <= 7); elsewhere
    # the Triton kernel. Session 32 (H200, proj_fwd_check.py --tune, 3 interleaved rounds, all builds correct at
    # n = 1 .. 16): 264.7-265.6 us (95 % of copy bandwidth) against the Triton kernel's 305.2-307.4 (82 %) at
    # 32768 x 4 x 4096, and 124.4-128.0 against 144.5-144.9 at 8192 x 4 x 7168 (session32-2026-12-05-h200/).
    # Its slots: ws_subs 64-column boxes of X a slot, ws_stages slots (0: as many as fit, at most 4; 3: 90 %).
    # Timed with Triton 3.6 only, before its first slot was peeled out of the loop (which keeps its wgmmas in flight
    # with Triton 3.9's ptxas too: gluon_proj.py's docstring)
    "proj": DotCfg(bt=128, bk=128, num_warps=8, num_stages=3, waves=4, join_hi_lo=True, ws=True),
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
    "boundary_backward": BoundaryBwdCfg(),
}
_OVERRIDES: dict[str, object] = {}


def cfg_of(kernel: str):
    return _OVERRIDES.get(kernel, DEFAULTS[kernel])


def configure(kernel: str, **fields) -> None:
    """Change one kernel's tile configuration for the rest of the process (e.g. to a benchmark's winner)."""
    _OVERRIDES[kernel] = replace(DEFAULTS[kernel], **fields)


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
    return overriding(_OVERRIDES, DEFAULTS, kernel, fields)


def stream_tile(kernel: str, t: int, c: int, np_: int) -> tuple[int, int, int]:
    """(BT, BC, num_warps): wide along C for vector loads, extra tokens only when C is small."""
    return _stream_tile_of(cfg_of(kernel), t, c, np_)


@functools.lru_cache(maxsize=4096)  # every launch asks again with the same few shapes
def _stream_tile_of(cfg: StreamCfg, t: int, c: int, np_: int) -> tuple[int, int, int]:
    bc = min(pow2(c), cfg.max_bc, max(16, cfg.budget // np_))
    bt = max(1, min(pow2(t), cfg.budget // (np_ * bc)))
    return bt, bc, cfg.num_warps
