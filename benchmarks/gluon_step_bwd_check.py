"""The two-pass ``step`` backward (kernels/gluon_step_bwd.py): sm_90a builds here, correctness and times on a GPU.

    PYTHONPATH=. python benchmarks/gluon_step_bwd_check.py --build    # no GPU: sm_90a builds, resources
    PYTHONPATH=. python benchmarks/gluon_step_bwd_check.py --out DIR  # sm_90 GPU: checks, then times
    PYTHONPATH=. python benchmarks/gluon_step_bwd_check.py --boundary --out DIR  # the same for boundary_grads
    ... --boundary --against against_main.py  # another build's boundary_grads too (checked, timed)
    git show main:mhc_compile/kernels/gluon_step_bwd.py > against_main.py   # another build of the module, then
    PYTHONPATH=. python benchmarks/gluon_step_bwd_check.py --against against_main.py  # both, in one process
    ... --against against_main.py --against-tune mix_regs=184  # the other build at its own StepBwdCfg registers
    ... --against main.py scatter.py --against-tune mix_regs=184 mix_regs=176  # several builds, a tune each
    ... --head --against against_main.py  # the chain head's call (dX_prev summed, fuse=True) timed instead

On the GPU: every check shape's outputs (dX_prev, dH_res_prev, dH_post_prev, dy, dphi, dbias, dalpha) against the
float64 reference of ``step_backward`` and, beside them, the three-pass pipeline's errors (the bar to meet), and
the same call with dX_prev written over dX (``out``, as passes/inplace_stream_grads.py asks); then
``step_backward`` timed with StepBwdCfg.ws on and off, interleaved, with the default path's folded backward on a
saved X (``bench_kernels``' "folded step" row) as a third column, and the efficiency of each against the 4n+5
floor of ``cost.FUSED``, with the copy bandwidth measured in the same run. A check that fails is reported and its
shape is not timed; the exit status says whether all passed. Each --against build's outputs are reported beside this
build's (not checked), with the dH partials a plane a block and added in L2, and on the chain head's call on X_prev
broadcast over its streams (the row ``--head`` times); a build that raises (one that does not compile, say) is
reported with its error and left out of the later checks and the timings; the rest still run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.against import Lines, load_module, parse_tune, serving  # noqa: E402
from mhc_compile import cost  # noqa: E402
from mhc_compile.kernels import gluon_step_bwd as gs  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_common as tcom  # noqa: E402
from mhc_compile.kernels import triton_fused as tf  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory an H100 / H200 block may take
CHECKS = [(256, 4, 512), (1000, 4, 2048), (4099, 4, 4096), (333, 2, 1024), (200, 1, 96), (8192, 4, 7168)]
TIMES = [(32768, 4, 4096), (32768, 4, 7168), (8192, 4, 4096), (32768, 4, 2048)]


def build(builds=((2, False, False, False), (1, False, False, False), (1, True, True, False), (1, True, False, False),
                  (2, True, True, False), (1, False, True, False), (1, False, True, True),
                  (1, True, True, False, 4), (1, False, True, True, 0, True), (1, False, True, True, 0, True, True),
                  (1, False, True, True, 0, True, True, 4), (1, False, True, True, 0, True, True, 0, True),
                  (1, False, True, False, 0, False, False, 0, True))) -> int:
    """sm_90a builds at n = 4, C = 512 (registers, spilled bytes, shared memory, opcodes in the loops); non-zero if
    a loop spills or a build does not fit. ``builds``: (mixers, saved_x, xin, collapse) each: step's second pass with
    two and one mixing warpgroups, then ``boundary_grads`` (X read, with and without x_in; with x_in its dH added in
    L2, DH_ATOMIC), then step's pass with its dH added in L2 (saved_x off, the third flag on: DH_ATOMIC alone), and
    the same with dX_prev summed over the streams (COLLAPSE: a chain head's under fuse=True); a fifth field paces the
    loader (``PACE`` tiles: the boundary with x_in, paced), a sixth reads X_prev broadcast over the streams (X_BCAST:
    the chain head's call itself, whose X_prev is the embedding), a seventh frees a slot a tile late (STORE_LAG, on
    by default where the ring has three slots, ``gluon_step_bwd.stores_lag``), an eighth asks for that many slots
    (the chain head's call on four, freeing them late: its one X_prev tile a slot lets four fit; two mixers there
    spill 48 bytes a thread with Triton 3.6), a ninth has the dphi warpgroup mix X (X_DPHI: that call, and step's
    pass on a dense X_prev)."""
    import triton

    from benchmarks import sm90_build

    failed = 0
    t, n, c = 256, 4, 512
    m = n * n + 2 * n
    x, y = torch.zeros(t, n, c, dtype=torch.bfloat16), torch.zeros(t, c, dtype=torch.bfloat16)
    dp_pad = torch.zeros(t, gs.MP)
    phi_pad = torch.zeros(n * c, gs.MP)
    for mixers, saved_x, xin, collapse, *extra in builds:
        pace, bcast, lag, stages, x_dphi = (tuple(extra) + (0, False, False, 0, False))[:5]
        atomic = xin  # with X read: x_in (and dH in L2); with X rebuilt, this flag is dH in L2 alone
        xin = xin and saved_x
        coefs = torch.zeros(gs.coef_groups(n, xin) * t, gs.CW)
        st = gs.stages_for(n, stages, mixers=mixers, saved_x=saved_x, xin=xin, x_tiles=1 if bcast and collapse else n,
                           x_dphi=x_dphi)
        with sm90_build.cpu_target(90):
            xp = x[:, 0].contiguous().unsqueeze(1).expand(t, n, c) if bcast else x
            descs = gs.descriptors(xp, y, y, x, coefs, dp_pad, phi_pad, y if collapse else x, y, t, n, c, collapse,
                                   bcast)
            built = gs._step_bwd_ws_kernel.warmup(
                *descs, descs[0], descs[-1], torch.zeros(1, 2 * gs.MP, n * c), torch.zeros(c // gs.BC, n * n + n, t),
                torch.zeros(1, dtype=torch.int32), t, c, t, n, c // gs.BC, N=n, BT=gs.BT, BC=gs.BC, MP=gs.MP,
                NG=gs.coef_groups(n, xin), CW=gs.CW, STAGES=st, MIXERS=mixers, SAVED_X=saved_x, XIN=xin,
                DH_ATOMIC=atomic, COLLAPSE=collapse, MIX_REGS=tf.StepBwdCfg.mix_regs,
                DPHI_REGS=gs.X_DPHI_REGS if x_dphi else tf.StepBwdCfg.dphi_regs, PACE=pace, PACE_SPIN=gs.PACE_SPIN,
                num_warps=4, X_BCAST=bcast, STORE_LAG=lag and gs.stores_lag(True, st, mixers), X_DPHI=x_dphi,
                grid=(c // gs.BC, 1))
        regs, spill = sm90_build.resources(built)
        smem = built.metadata.shared
        text = sm90_build.sass(built)  # the mixing warpgroup's loop; spills counted in every loop
        loop = sm90_build.ws_loop_counts(text, ("HGMMA", "SYNCS", "BAR.SYNC", "STG", "SHFL"))
        # what a tile runs: the tile loop's own instructions, and the loops over j n times each
        tile_loop = sm90_build.biggest_loop(text)
        inner = [body for body in sm90_build.innermost_loops(text) if body in tile_loop and body != tile_loop]
        per_tile = loop["total"] + (n - 1) * sum(sm90_build.opcode_counts(body, ())["total"] for body in inner)
        bars = loop["BAR.SYNC"] + (n - 1) * sum(sm90_build.opcode_counts(body, ("BAR.SYNC",))["BAR.SYNC"]
                                                for body in inner)  # the mixer's barriers a tile
        # The two-mixer build with Triton 3.6 (the GPU machine's) stores up to four values to the stack at the
        # kernel's entry, before the partitions split, and the mixers reload them once a tile, outside the loops
        # over j (L1 hits, against some 2000 instructions a tile); a reload in a loop over j, or a store in any
        # loop, is a spill that costs.
        # Triton 3.9 gives the first mixer (the default partition) fewer registers than its code needs: there only
        # the one-mixer build must be spill-free
        strict = mixers == 1 or triton.__version__.startswith("3.6")
        inner_ldl = sum(sm90_build.opcode_counts(body, ("LDL",))["LDL"] for body in sm90_build.innermost_loops(text))
        clean = spill <= 16 and loop["LDL"] <= 4 * mixers and inner_ldl == 0 and loop["STL"] == 0
        ok = (clean or not strict) and smem <= SMEM_LIMIT and loop["HGMMA"] > 0
        failed += not ok
        pace_note = f", pace={pace}" if pace else ""
        what = (f"boundary (x_in {'on' if xin else 'off'}, mixers={mixers}{pace_note})" if saved_x
                else f"mixers={mixers}" + (f" stages={stages}" if stages else "") + (" dH in L2" if atomic else "")
                + (" dX_prev summed" if collapse else "")
                + (" X_prev broadcast" if bcast else "") + (" slots freed late" if lag else "")
                + (" X mixed by dphi" if x_dphi else ""))
        print(f"{what}: triton {triton.__version__} stages={st} regs={regs} spill={spill} smem={smem} "
              f"m={m} bars={bars} loop={loop} a tile: {per_tile} {'ok' if ok else 'FAIL'}", flush=True)
    return int(failed > 0)


DEVICE = "cuda"  # a test runs check() and times() on CPU tensors (the Gluon kernel then falls back, and says so)


def _inputs(t: int, n: int, c: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev, bf = DEVICE, torch.bfloat16

    def r(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    m = n * n + 2 * n
    h_res = torch.softmax(r(t, n, n), -1)
    return dict(x_prev=r(t, n, c, dtype=bf), h_res=h_res, h_post=2 * torch.sigmoid(r(t, n)), y=r(t, c, dtype=bf),
                phi=r(n * c, m, scale=(n * c) ** -0.5), bias=r(m, scale=0.1), alpha=r(3, scale=0.1).abs() + 0.01,
                dx=r(t, n, c, dtype=bf), dx_in=r(t, c, dtype=bf), dh_post=r(t, n, scale=0.1),
                dh_res=r(t, n, n, scale=0.1))


def _forward_saves(v: dict, n: int, c: int):
    """(h_pre, p, sq) that step's forward saves, from the reference."""
    _, _, h_pre, _, _, p, sq = ref.step(v["x_prev"], v["h_res"], v["h_post"], v["y"], v["phi"], v["bias"],
                                        v["alpha"], n, n * c, 1e-6, 20, "mhc")
    return h_pre, p, sq


def _call(fn, v, h_pre, p, sq, n, c, **kw):
    return fn(v["x_prev"], v["h_res"], v["h_post"], v["y"], v["phi"], v["bias"], v["alpha"], h_pre, p, sq, v["dx"],
              v["dx_in"], v["dh_post"], v["dh_res"], n, n * c, 1e-6, 20, "mhc", **kw)


class Against:
    """An --against build: its module, the StepBwdCfg fields it runs with (``--against-tune``) and a label."""

    def __init__(self, module, tune: dict, label: str):
        self.module, self.tune, self.label = module, tune, label
        self.error = None  # what stopped it in a check (``_against_rows``): it is left out of the timings

    def run(self, v, h_pre, p, sq, n, c, dh_atomic: bool = False, **kw):
        with tf.tuning("step_bwd", ws=True, **{"dh_atomic": dh_atomic, **self.tune}), \
                serving(tf, "_gluon_step_bwd", self.module):
            return _call(tf.step_backward, v, h_pre, p, sq, n, c, **kw)

    def boundary(self, args, dh_atomic: bool = False):
        """boundary_backward on this build (its tune as BoundaryBwdCfg fields)."""
        from mhc_compile.kernels import triton_boundary as tb
        from mhc_compile.kernels import triton_ops as tk

        with tk.tuning("boundary_backward", ws=True, **{**self.tune, "dh_atomic": dh_atomic}), \
                serving(tb, "_gluon", self.module):
            return tk.boundary_backward(*args)


def load_against(files: list[str], tunes: list[str]) -> list[Against]:
    """The --against builds: one --against-tune spec for all of them, or one each (in order). A build's label is
    its file's name, with its spec where it has one (one file may run with two specs)."""
    if len(tunes) not in (0, 1, len(files)):
        raise SystemExit(f"gluon_step_bwd_check: {len(files)} --against files and {len(tunes)} --against-tune specs"
                         " (give none, one for all, or one each)")
    specs = tunes if len(tunes) == len(files) else tunes * len(files) if tunes else [""] * len(files)
    return [Against(load_module(f, f"gluon_step_bwd_against{k}"), parse_tune(spec),
                    os.path.splitext(os.path.basename(f))[0] + (f" ({spec})" if spec else ""))
            for k, (f, spec) in enumerate(zip(files, specs))]


NAMES = ("dx_prev", "dh_res_prev", "dh_post_prev", "dy_prev", "dphi", "dbias", "dalpha")


def _rel_err(a, w) -> float:
    """max |a - w| / max |w|, w the float64 reference."""
    return ((a.double() - w).abs().max() / (w.abs().max() or 1.0)).item()


def _broadcast(x_prev):
    """X_prev's stream 0 broadcast over its n streams (stride 0), as fuse=True gives the step after a chain head."""
    return x_prev[:, 0].contiguous().unsqueeze(1).expand_as(x_prev)


def _reference(v, h_pre, p, sq, n, c):
    """``step_backward``'s float64 reference on inputs ``v`` (``_inputs``) and forward saves."""
    return _call(ref.step_backward, {k: (x.double() if x.is_floating_point() else x) for k, x in v.items()},
                 h_pre.double(), p.double(), sq.double(), n, c)


def _against_rows(shape: str, against, names, run, base, want, lines, note: str = "") -> None:
    """Each --against build's row (``_against_row``; ``note`` after its label) from ``run(build)``, its outputs. A
    build that raises (a Gluon copy the GPU's ptxas rejects, say) gets a row saying so and is left out of the later
    rows and shapes and of the timings (``timed``); the other builds and this one's own checks still run and are
    timed."""
    for build in timed(against):
        try:
            other = run(build)
        except Exception as exc:  # another build's failure is a report, not this run's end
            build.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            lines.append(f"| {shape} | --against {build.label}{note}: error, not timed: {build.error} | | | |")
            continue
        lines.append(_against_row(shape, build.label + note, names, other, base, want))


def timed(against) -> list:
    """The --against builds that ran every check shape (``_against_rows``)."""
    return [build for build in against if build.error is None]


def _against_row(shape: str, label: str, names, other, base, want) -> str:
    """An --against build's row: which of its outputs differ from this build's (``base``) and its worst error against
    the float64 reference (empty outputs, a boundary's x_in without h_pre_prev, left out). A report, not a check."""
    diff = [name for name, a, b in zip(names, other, base) if not torch.equal(a, b)]
    worst = max((_rel_err(o, w) for o, w in zip(other, want) if w.numel()), default=0.0)
    return (f"| {shape} | --against {label}: {'bit-equal' if not diff else 'differs in ' + ', '.join(diff)}; "
            f"its worst error {worst:.2e} | | | |")


def _collapsed_row(shape: str, v, h_pre, p, sq, n, c, base, want, lines) -> bool:
    """dX_prev summed over the streams (``collapse_dx``: under fuse=True a chain head's, passes/collapse_head_grad.py)
    by the Gluon kernel, against the float64 sum of the reference's rows: as close as the n rows are to theirs (the
    sum rounded once), every other output bit-equal to the call without it. Appends the row; whether it holds."""
    before = gs.LAUNCHES
    with tf.tuning("step_bwd", ws=True, dh_atomic=False):
        got = tf.step_backward(v["x_prev"], v["h_res"], v["h_post"], v["y"], v["phi"], v["bias"], v["alpha"], h_pre, p,
                               sq, v["dx"], v["dx_in"], v["dh_post"], v["dh_res"], n, n * c, 1e-6, 20, "mhc",
                               collapse_dx=True)
    ran = gs.LAUNCHES > before
    row = want[0].sum(1, keepdim=True)
    err, rows_err = _rel_err(got[0], row), _rel_err(base[0], want[0])
    same = all(torch.equal(a, b) for a, b in zip(got[1:], base[1:]))
    good = ran and got[0].shape == row.shape and err <= max(2 * rows_err, 1e-5) and same
    lines.append(f"| {shape} | (dX_prev summed over the streams: {err:.2e} against the rows' {rows_err:.2e}; the rest "
                 f"bit-equal) | | | {'ok' if good else 'FAIL'} |")
    return good


def _broadcast_row(shape: str, v, n: int, c: int, lines) -> bool:
    """X_prev broadcast over its streams (stride 0: under fuse=True the step after a chain head gets the embedding
    so), read by the Gluon kernel as its one row a token: every output bit-equal to the same call on its dense copy,
    with dX_prev as n rows and summed (``collapse_dx``, the head's call). Appends the row; whether it holds."""
    xb = _broadcast(v["x_prev"])
    vb, vd = {**v, "x_prev": xb}, {**v, "x_prev": xb.contiguous()}
    h_pre, p, sq = _forward_saves(vd, n, c)
    good = True
    for collapse in (False, True):
        with tf.tuning("step_bwd", ws=True, dh_atomic=False):
            before = gs.LAUNCHES
            got = _call(tf.step_backward, vb, h_pre, p, sq, n, c, collapse_dx=collapse)
            ran = gs.LAUNCHES > before
            want = _call(tf.step_backward, vd, h_pre, p, sq, n, c, collapse_dx=collapse)
        good &= ran and all(torch.equal(a, b) for a, b in zip(got, want))
    lines.append(f"| {shape} | (X_prev broadcast: bit-equal to its dense copy, dX_prev as rows and summed) | | | "
                 f"{'ok' if good else 'FAIL'} |")
    return good


def _against_head_rows(shape: str, v, n: int, c: int, against, lines) -> None:
    """Each --against build on the chain head's call as fuse=True makes it (X_prev broadcast over its streams, dX_prev
    summed, dH added in L2: what ``head_times`` times as the row), beside this build's and against the float64
    reference of its dense copy, dX_prev's rows summed: the row path (X_BCAST) the dense rows above do not run."""
    xb = _broadcast(v["x_prev"])
    vb, vd = {**v, "x_prev": xb}, {**v, "x_prev": xb.contiguous()}
    h_pre, p, sq = _forward_saves(vd, n, c)
    want = list(_reference(vd, h_pre, p, sq, n, c))
    want[0] = want[0].sum(1, keepdim=True)
    with tf.tuning("step_bwd", ws=True, dh_atomic=True):
        base = _call(tf.step_backward, vb, h_pre, p, sq, n, c, collapse_dx=True)
    _against_rows(shape, against, NAMES, lambda b: b.run(vb, h_pre, p, sq, n, c, dh_atomic=True, collapse_dx=True),
                  base, want, lines, ", the head's row")


def _x_dphi_row(shape: str, v, n: int, c: int, lines) -> bool:
    """X mixed by the dphi warpgroup (``StepBwdCfg.x_dphi``, X_DPHI): every output bit-equal to the call whose mixer
    mixes it, on the dense X_prev and on X_prev broadcast over its streams, dX_prev as rows and summed (the chain
    head's call). Appends the row; whether it holds."""
    xb = _broadcast(v["x_prev"])
    h_pre, p, sq = _forward_saves(v, n, c)
    good = True
    for x_prev, collapse in ((v["x_prev"], False), (xb, False), (xb, True)):
        vx = {**v, "x_prev": x_prev}
        got = {}
        for x_dphi in (False, True):
            with tf.tuning("step_bwd", ws=True, dh_atomic=False, x_dphi=x_dphi):
                before = gs.LAUNCHES
                got[x_dphi] = _call(tf.step_backward, vx, h_pre, p, sq, n, c, collapse_dx=collapse)
                good &= gs.LAUNCHES > before
        good &= all(torch.equal(a, b) for a, b in zip(got[False], got[True]))
    lines.append(f"| {shape} | (X mixed by the dphi warpgroup: bit-equal, dense and broadcast, rows and summed) | | | "
                 f"{'ok' if good else 'FAIL'} |")
    return good


def _dh_in_l2_row(shape: str, atomic, base, want, lines, names=NAMES) -> bool:
    """The outputs with dH added in L2 (dh_atomic) against the same call without: dH_res and dH_post (summed in
    another order) as close to float64, every other output bit-equal. ``names``: the outputs' names (step's or the
    boundary's). Appends the row; whether it holds."""
    summed = tuple(k for k, name in enumerate(names) if name.startswith("dh_"))
    same = all(torch.equal(a, b) for k, (a, b) in enumerate(zip(atomic, base)) if k not in summed)
    close = all(_rel_err(atomic[k], want[k]) <= 2 * _rel_err(base[k], want[k]) + 1e-6 for k in summed)
    lines.append(f"| {shape} | (dH added in L2: the rest bit-equal, dH as close to float64) | | | "
                 f"{'ok' if same and close else 'FAIL'} |")
    return same and close


def check(t, n, c, lines, against=()) -> bool:
    first = len(lines)
    v = _inputs(t, n, c, seed=t + n + c)
    h_pre, p, sq = _forward_saves(v, n, c)
    want = _reference(v, h_pre, p, sq, n, c)
    with tf.tuning("step_bwd", ws=False):  # the three Triton passes (ws is the default since session 37)
        three = _call(tf.step_backward, v, h_pre, p, sq, n, c)
    before = gs.LAUNCHES
    with tf.tuning("step_bwd", ws=True, dh_atomic=False):  # dH's partials summed in a fixed order: comparable bits
        two = _call(tf.step_backward, v, h_pre, p, sq, n, c)
    ran = gs.LAUNCHES > before
    ok = ran
    for name, w, a, b in zip(NAMES, want, three, two):
        e3, e2 = _rel_err(a, w), _rel_err(b, w)
        good = e2 <= max(2 * e3, 1e-5) and torch.isfinite(b).all().item()
        ok &= good
        lines.append(f"| {t}x{n}x{c} | {name} | {e3:.2e} | {e2:.2e} | {'ok' if good else 'FAIL'} |")
    lines.append(f"| {t}x{n}x{c} | (the Gluon kernel ran) | | | {'ok' if ran else 'FAIL'} |")
    # dX_prev written over dX itself (passes/inplace_stream_grads.py's out=dx): the same outputs, bit for bit
    dxc = v["dx"].clone()
    with tf.tuning("step_bwd", ws=True, dh_atomic=False):
        inplace = tf.step_backward(v["x_prev"], v["h_res"], v["h_post"], v["y"], v["phi"], v["bias"], v["alpha"],
                                   h_pre, p, sq, dxc, v["dx_in"], v["dh_post"], v["dh_res"], n, n * c, 1e-6, 20,
                                   "mhc", out=dxc)
    same = inplace[0].data_ptr() == dxc.data_ptr() and all(torch.equal(a, b) for a, b in zip(inplace, two))
    ok &= same
    lines.append(f"| {t}x{n}x{c} | (out = dX: the same outputs, in place) | | | {'ok' if same else 'FAIL'} |")
    with tf.tuning("step_bwd", ws=True, dh_atomic=True):  # dH added in L2: the rest bit-equal, dH as close
        atomic = _call(tf.step_backward, v, h_pre, p, sq, n, c)
    ok &= _dh_in_l2_row(f"{t}x{n}x{c}", atomic, two, want, lines)
    ok &= _collapsed_row(f"{t}x{n}x{c}", v, h_pre, p, sq, n, c, two, want, lines)
    if n > 1:
        ok &= _broadcast_row(f"{t}x{n}x{c}", v, n, c, lines)
    ok &= _x_dphi_row(f"{t}x{n}x{c}", v, n, c, lines)
    # the other builds' outputs beside this one's (a report, not a pass / fail), with the dH partials a plane a
    # block and added in L2 (the default, the timings' path)
    _against_rows(f"{t}x{n}x{c}", against, NAMES, lambda b: b.run(v, h_pre, p, sq, n, c), two, want, lines)
    _against_rows(f"{t}x{n}x{c}", against, NAMES, lambda b: b.run(v, h_pre, p, sq, n, c, dh_atomic=True), atomic,
                  want, lines, ", dH in L2")
    if n > 1 and against:
        _against_head_rows(f"{t}x{n}x{c}", v, n, c, against, lines)
    print("\n".join(lines[first:]), flush=True)
    return ok


def times(shapes, lines, rounds: int = 3, against=()) -> None:
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth
    from mhc_compile.kernels import triton_ops as tk

    bw = copy_bandwidth(DEVICE)
    lines.append(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s\n")
    lines.append("| T x C | round | three passes us (eff) | two passes, Gluon us (eff) | the same, dH added in "
                 "L2 | folded, saved X us (eff) | Gluon pass alone us (eff against its 3n+3) |"
                 + "".join(f" two passes, --against {b.label} us (eff) |" for b in against))
    lines.append("|---|---|---|---|---|---|---|" + "---|" * len(against))
    for t, n, c in shapes:
        v = _inputs(t, n, c, seed=1)
        h_pre, p, sq = _forward_saves(v, n, c)
        floor = int(cost.FUSED.backward.subs(cost.n, n)) * t * c * 2
        x_saved = ref.post_res(v["x_prev"], v["h_res"], v["h_post"], v["y"])
        ca = (n, n * c, 1e-6, 20, "mhc")

        def folded():
            dh_pre = tk.pre_backward_dh(x_saved, h_pre, v["dx_in"])
            dp, dsq, _, _ = tk.coeffs_backward(p, sq, v["bias"], v["alpha"], dh_pre, v["dh_post"], v["dh_res"], *ca)
            g, _ = tk.proj_pre_backward(x_saved, v["phi"], dp, dsq, h_pre, v["dx_in"], v["dx"])
            return tk.post_res_backward(v["x_prev"], v["h_res"], v["h_post"], v["y"], g)

        def three():
            with tf.tuning("step_bwd", ws=False):
                return _call(tf.step_backward, v, h_pre, p, sq, n, c)

        def two():
            with tf.tuning("step_bwd", ws=True, dh_atomic=False):
                return _call(tf.step_backward, v, h_pre, p, sq, n, c)

        def two_one():  # dH added in L2 (StepBwdCfg.dh_atomic, the default since session 41)
            with tf.tuning("step_bwd", ws=True, dh_atomic=True):
                return _call(tf.step_backward, v, h_pre, p, sq, n, c)

        dh_pre = tk.pre_backward_dh(x_saved, h_pre, v["dx_in"])
        dp, dsq, _, _ = tk.coeffs_backward(p, sq, v["bias"], v["alpha"], dh_pre, v["dh_post"], v["dh_res"], *ca)
        pass_bytes = (3 * n + 3) * t * c * 2

        def alone():
            return gs.step_grads(v["x_prev"], v["h_res"], v["h_post"], v["y"], v["phi"], h_pre, dp, dsq, v["dx"],
                                 v["dx_in"])

        others = tuple((lambda b=b: b.run(v, h_pre, p, sq, n, c)) for b in against)
        fns = (three, two, two_one, folded, alone) + others
        for rnd in range(rounds):
            us = [triton.testing.do_bench_cudagraph(f, rep=200) * 1e3 for f in fns]
            cells = " | ".join(f"{u:.1f} ({100 * floor / (u * 1e-6) / bw:.1f} %)" for u in us[:4])
            cells += f" | {us[4]:.1f} ({100 * pass_bytes / (us[4] * 1e-6) / bw:.1f} %)"
            cells += "".join(f" | {u:.1f} ({100 * floor / (u * 1e-6) / bw:.1f} %)" for u in us[5:])
            lines.append(f"| {t}x{c} | {rnd} | {cells} |")
            print(lines[-1], flush=True)
        del v, x_saved


def head_times(shapes, lines, rounds: int = 3, against=()) -> None:
    """A chain head's step backward under fuse=True (``collapse_dx``: dX_prev summed over the streams) with dH added
    in L2 (the default), this build's and each --against build's interleaved: on a dense X_prev against the call's
    3n + 6 floor (bench_kernels' "step (head)" row), and on X_prev broadcast over its streams, as the model calls it
    since session 50, against n + 8 ("step (head, row)")."""
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth

    bw = copy_bandwidth(DEVICE)
    lines.append(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s\n")
    lines.append("| T x C | X_prev | round | step (head), this build us (eff) |"
                 + "".join(f" --against {b.label} us (eff) |" for b in against))
    lines.append("|---|---|---|---|" + "---|" * len(against))
    for t, n, c in shapes:
        dense = _inputs(t, n, c, seed=1)
        h_pre, p, sq = _forward_saves(dense, n, c)
        row = {**dense, "x_prev": _broadcast(dense["x_prev"])}
        for label, v, words in (("dense (3n+6)", dense, 3 * n + 6), ("row (n+8)", row, n + 8)):
            floor = words * t * c * 2

            def this(v=v):
                with tf.tuning("step_bwd", ws=True, dh_atomic=True):
                    return _call(tf.step_backward, v, h_pre, p, sq, n, c, collapse_dx=True)

            fns = (this,) + tuple((lambda b=b, v=v: b.run(v, h_pre, p, sq, n, c, dh_atomic=True, collapse_dx=True))
                                  for b in against)
            for rnd in range(rounds):
                us = [triton.testing.do_bench_cudagraph(f, rep=200) * 1e3 for f in fns]
                cells = " | ".join(f"{u:.1f} ({100 * floor / (u * 1e-6) / bw:.1f} %)" for u in us)
                lines.append(f"| {t}x{c} | {label} | {rnd} | {cells} |")
                print(lines[-1], flush=True)
        del dense, row


# --- boundary_grads: the same kernel with X read (kernels/triton_boundary.py, passes/fold_boundary_grads.py) ------
B_NAMES = ("dx_prev", "dh_res", "dh_post", "dy", "x_in", "dphi")


def _boundary_inputs(t: int, n: int, c: int, seed: int, pre: bool = True) -> tuple:
    """boundary_backward's operands: X_l = post_res(X_prev, ...) as the forward stored it, bf16 streams, fp32
    coefficients, dp, dsq."""
    v = _inputs(t, n, c, seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    m = n * n + 2 * n
    x = ref.post_res(v["x_prev"], v["h_res"], v["h_post"], v["y"])
    dp = torch.randn(t, m, generator=g, device=DEVICE) * 0.1
    dsq = torch.randn(t, generator=g, device=DEVICE) * 1e-3
    h_pre = torch.sigmoid(torch.randn(t, n, generator=g, device=DEVICE))
    h_pre_prev = torch.sigmoid(torch.randn(t, n, generator=g, device=DEVICE)) if pre else None
    return (x, v["phi"], dp, dsq, h_pre, v["dx_in"], v["dx"], v["x_prev"], v["h_res"], v["h_post"], v["y"],
            h_pre_prev)


def _two_ops(args, out=None):
    from mhc_compile.kernels import triton_ops as tk

    with tk.tuning("boundary_backward", ws=False):
        return tk.boundary_backward(*args, out=out)


def boundary_check(t, n, c, lines, pre: bool = True, against=()) -> bool:
    from mhc_compile.kernels import triton_ops as tk

    first = len(lines)
    args = _boundary_inputs(t, n, c, seed=t + n + c, pre=pre)
    want = ref.boundary_backward(*(a.double() if a is not None else None for a in args))
    two = _two_ops(args)
    before = gs.LAUNCHES
    with tk.tuning("boundary_backward", dh_atomic=False):  # dH's partials summed in a fixed order: comparable bits
        one = tk.boundary_backward(*args)
    ran = gs.LAUNCHES > before
    ok = ran
    for name, w, a, b in zip(B_NAMES, want, two, one):
        if not w.numel():
            continue
        e2, e1 = _rel_err(a, w), _rel_err(b, w)
        good = e1 <= max(2 * e2, 1e-5) and torch.isfinite(b).all().item()
        ok &= good
        lines.append(f"| {t}x{n}x{c} x_in {'on' if pre else 'off'} | {name} | {e2:.2e} | {e1:.2e} | "
                     f"{'ok' if good else 'FAIL'} |")
    lines.append(f"| {t}x{n}x{c} | (the Gluon kernel ran) | | | {'ok' if ran else 'FAIL'} |")
    acc = args[6].clone()  # dX_prev written over acc (passes/inplace_stream_grads.py): the same outputs, bit for bit
    with tk.tuning("boundary_backward", dh_atomic=False):
        inplace = tk.boundary_backward(*args[:6], acc, *args[7:], out=acc)
    same = inplace[0].data_ptr() == acc.data_ptr() and all(torch.equal(a, b) for a, b in zip(inplace, one))
    ok &= same
    lines.append(f"| {t}x{n}x{c} | (out = acc: the same outputs, in place) | | | {'ok' if same else 'FAIL'} |")
    with tk.tuning("boundary_backward", mixers=2, dh_atomic=False):  # two mixing warpgroups: the same arithmetic
        two_mixers = tk.boundary_backward(*args)
    same = all(torch.equal(a, b) for a, b in zip(two_mixers, one))
    ok &= same
    lines.append(f"| {t}x{n}x{c} | (two mixers: the same outputs) | | | {'ok' if same else 'FAIL'} |")
    with tk.tuning("boundary_backward", dh_atomic=True):  # dH added in L2: the same but for dH's order of adds
        atomic = tk.boundary_backward(*args)
    ok &= _dh_in_l2_row(f"{t}x{n}x{c}", atomic, one, want, lines, B_NAMES)
    # another build's outputs against this one's: dH partials summed by torch (a fixed order), and added in L2 (the
    # default, the timings' path)
    _against_rows(f"{t}x{n}x{c}", against, B_NAMES, lambda b: b.boundary(args), one, want, lines)
    _against_rows(f"{t}x{n}x{c}", against, B_NAMES, lambda b: b.boundary(args, dh_atomic=True), atomic, want, lines,
                  ", dH in L2")
    print("\n".join(lines[first:]), flush=True)
    return ok


def boundary_times(shapes, lines, rounds: int = 3, against=(), l2_only: bool = False) -> None:
    """The one pass against proj_pre_backward + post_res_backward_pre (BoundaryBwdCfg.ws off), interleaved; each
    against its own bytes (4n + 4 against 6n + 4 elements of C a token); the one pass with its dH partials summed by
    torch and added in L2 (``dh_atomic``), this build's and each --against build's; ``l2_only``: added in L2 only
    (the default path's), so that a sweep of many builds fits a device call."""
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth
    from mhc_compile.kernels import triton_ops as tk

    bw = copy_bandwidth(DEVICE)
    lines.append(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s\n")

    def one(dh_atomic, build=None):
        def run(args):
            if build is not None:
                return build.boundary(args, dh_atomic=dh_atomic)
            with tk.tuning("boundary_backward", dh_atomic=dh_atomic):
                return tk.boundary_backward(*args)
        return run

    modes = (True,) if l2_only else (False, True)
    fns = [("one pass" + (", dH added in L2" if atomic else ""), one(atomic)) for atomic in modes]
    for build in against:
        fns += [(f"--against {build.label}" + (", dH in L2" if atomic else ""), one(atomic, build)) for atomic in modes]
    fns.append(("two ops", _two_ops))
    lines.append("| T x C | round | " + " | ".join(f"{name} us (eff)" for name, _ in fns) + " | two ops / "
                 "one pass, dH in L2 |")
    lines.append("|---|---|" + "---|" * (len(fns) + 1))
    for t, n, c in shapes:
        args = _boundary_inputs(t, n, c, seed=1)
        one_bytes, two_bytes = (4 * n + 4) * t * c * 2, (6 * n + 4) * t * c * 2
        for rnd in range(rounds):
            us = [triton.testing.do_bench_cudagraph(lambda f=f: f(args), rep=200) * 1e3 for _, f in fns]
            effs = [100 * (two_bytes if k == len(fns) - 1 else one_bytes) / (u * 1e-6) / bw for k, u in enumerate(us)]
            cells = " | ".join(f"{u:.1f} ({e:.1f} %)" for u, e in zip(us, effs))
            lines.append(f"| {t}x{c} | {rnd} | {cells} | {us[-1] / us[len(modes) - 1]:.3f} |")
            print(lines[-1], flush=True)
        del args


def boundary_main(out: str | None, no_times: bool, against=(), shapes=None, l2_only: bool = False) -> int:
    import triton

    path = os.path.join(out, "boundary_check.md") if out else None
    lines = Lines(path, [f"# boundary_grads check, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch "
                         f"{torch.__version__}, triton {triton.__version__}\n",
                         "Errors: max |out - reference| / max |reference|, the reference in float64.\n",
                         "| shape | output | two ops | one pass (Gluon) | |", "|---|---|---|---|---|"])
    ok = True
    for k, shape in enumerate(CHECKS):
        try:
            ok &= boundary_check(*shape, lines, pre=k % 3 != 2, against=against)
        except Exception as exc:  # report and go on
            ok = False
            lines.append(f"| {shape} | error: {type(exc).__name__}: {str(exc)[:300]} | | | FAIL |")
            print(lines[-1], flush=True)
    if ok and not no_times:
        boundary_times(shapes or TIMES[:1] + [(8192, 4, 7168)] + TIMES[1:3], lines, against=timed(against),
                       l2_only=l2_only)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="sm_90a builds on this machine, no GPU")
    ap.add_argument("--out", default=None, help="folder for the results file (GPU mode)")
    ap.add_argument("--no-times", action="store_true")
    ap.add_argument("--against", nargs="*", default=[], help="other builds of kernels/gluon_step_bwd.py, checked and "
                    "timed beside this one (benchmarks/against.py)")
    ap.add_argument("--against-tune", nargs="*", default=[], help="StepBwdCfg fields the --against builds run with, "
                    "e.g. mix_regs=184 (a build whose registers were tuned apart): one spec for all, or one each; "
                    "this build runs the defaults")
    ap.add_argument("--boundary", action="store_true", help="boundary_grads (X read, kernels/triton_boundary.py) "
                    "against the two ops it replaces, instead of step's backward")
    ap.add_argument("--shapes", nargs="*", default=None, help="TxC shapes timed (n = 4), e.g. 16384x4096; the "
                    "default: the boundary's 32768x4096 8192x7168 32768x7168 8192x4096, step's TIMES")
    ap.add_argument("--l2-only", action="store_true", help="time the boundary with its partials added in L2 only")
    ap.add_argument("--head", action="store_true", help="after step's checks, time its chain-head call (collapse_dx, "
                    "dH in L2) instead of the full call, this build's beside each --against build's")
    args = ap.parse_args()
    tcom.GLUON_BCAST = True  # the broadcast rows check the Gluon kernels' broadcast reads, also where the
    # environment turned them off (MHC_COMPILE_GLUON_BCAST=0)
    if args.build:
        return build()
    against = load_against(args.against, args.against_tune)
    if args.boundary:
        if not torch.cuda.is_available():
            print("gluon_step_bwd_check: no CUDA device (use --build on a CPU machine)")
            return 2
        shapes = [(int(s.split("x")[0]), 4, int(s.split("x")[1])) for s in args.shapes or []]
        return boundary_main(args.out, args.no_times, against, shapes, args.l2_only)
    if not torch.cuda.is_available():
        print("gluon_step_bwd_check: no CUDA device (use --build on a CPU machine)")
        return 2
    import triton

    path = os.path.join(args.out, "gluon_step_bwd_check.md") if args.out else None
    lines = Lines(path, [f"# gluon_step_bwd_check, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch "
                         f"{torch.__version__}, triton {triton.__version__}\n",
                         "Errors: max |out - reference| / max |reference|, the reference in float64.\n",
                         "| shape | output | three passes | two passes (Gluon) | |", "|---|---|---|---|---|"])
    ok = True
    for shape in CHECKS:
        try:
            ok &= check(*shape, lines, against)
        except Exception as exc:  # report and go on: the other shapes still say something
            ok = False
            lines.append(f"| {shape} | error: {type(exc).__name__}: {str(exc)[:300]} | | | FAIL |")
            print(lines[-1], flush=True)
    if ok and not args.no_times:
        shapes = [(int(s.split("x")[0]), 4, int(s.split("x")[1])) for s in args.shapes] if args.shapes else TIMES
        (head_times if args.head else times)(shapes, lines, against=timed(against))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
