"""proj's one-pass backward in Gluon (kernels/gluon_proj_bwd.py): sm_90a builds here, checks and times on a GPU.

    PYTHONPATH=. python benchmarks/gluon_proj_bwd_check.py --build    # no GPU: sm_90a builds, resources
    PYTHONPATH=. python benchmarks/gluon_proj_bwd_check.py --out DIR  # sm_90 GPU: checks, then times
    git show main:mhc_compile/kernels/gluon_proj_bwd.py > against_main.py   # another build of the module, then
    PYTHONPATH=. python benchmarks/gluon_proj_bwd_check.py --against against_main.py  # both, in one process

On the GPU: at every check shape, (dx, dphi) of the Gluon kernel against the float64 reference (``reference.
proj_pre_backward`` / ``proj_backward``), beside the Triton kernel's errors (the bar to meet), with and without
dout and acc, x broadcast over its streams (a chain's head), and dx written over acc (``out=acc``, as
passes/inplace_stream_grads.py asks: bit-equal to the call without ``out``), and the dx_hl build (dx within the
same bar, dphi bit-equal). Then, interleaved in rounds, the Triton kernel and the Gluon kernel (with two and with one
dx warpgroup, and the dx_hl build) at the issue's shapes (``--shapes``), with and without acc, each as the op runs
it (its host-side packing included) and the Gluon launch alone; efficiency is bytes over time and the copy bandwidth
measured in the same run. A check that fails is reported and nothing is timed; the
exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mhc_compile.kernels import gluon_proj_bwd as gp  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory an H100 / H200 block may take
# (T, n, C, dout given, acc given, x broadcast over its streams)
CHECKS = [(1000, 4, 2048, True, True, False), (4099, 4, 4096, True, True, False), (333, 2, 1024, True, False, False),
          (200, 1, 256, False, False, False), (777, 3, 512, True, True, False), (1000, 4, 768, True, False, True),
          (8192, 4, 7168, True, True, False), (100, 4, 1024, False, True, False)]
TIMES = [(32768, 4, 4096), (8192, 4, 7168), (32768, 4, 7168), (8192, 4, 4096)]


def build() -> int:
    """sm_90a builds at n = 4, C = 512, with and without acc and dout, two and one dx warpgroups, the dx_hl build and
    the H100's two slots (registers, spilled bytes, shared memory, opcodes in the loops); non-zero if one spills in a
    loop or does not fit."""
    import triton

    from benchmarks import sm90_build

    failed = 0
    t, n, c = 256, 4, 512
    m = ref.num_coeffs(n)
    x, g = torch.zeros(t, n, c, dtype=torch.bfloat16), torch.zeros(t, c, dtype=torch.bfloat16)
    dp, phi = torch.zeros(t, m), torch.zeros(n * c, m)
    hl, coefs = torch.zeros(2 * gp.MP, t, dtype=torch.bfloat16), torch.zeros(t, gp.CW)
    dphi = torch.zeros(1, n * c, m)
    planes = gp.phi_rows_reference(phi)
    # (dout, acc, dx warpgroups, dx_hl, slots: 0 = as many as fit; 2 = the H100's, PROJ_BWD_BY_DEVICE; pace)
    for has_pre, has_acc, mixers, dx_hl, slots, pace in (
            (True, True, 2, False, 0, 0), (True, True, 1, False, 0, 0), (True, False, 2, False, 0, 0),
            (False, False, 2, False, 0, 0), (True, True, 2, True, 0, 0), (True, True, 1, True, 0, 0),
            (True, False, 1, True, 0, 0), (False, False, 1, True, 0, 0),
            (True, True, 2, False, 2, 0), (True, False, 1, False, 2, 0), (True, True, 2, False, 2, 3)):
        st = gp.stages_for(has_pre, has_acc, slots, dx_hl=dx_hl)
        with sm90_build.cpu_target(90):
            built = gp._proj_bwd_ws_kernel.warmup(
                *gp.descriptors(x, False, g if has_pre else None, x if has_acc else None,
                                None if dx_hl else gp.pad_cols(dp, gp.MP), hl, coefs,
                                planes if dx_hl else gp.pad_cols(phi, gp.MP), x, t, n, c),
                dphi, torch.zeros(1, dtype=torch.int32), t, c, m, t, N=n, HAS_PRE=has_pre, HAS_ACC=has_acc,
                X_BCAST=False, BT=gp.BT, BK=gp.BK, XB=gp.XB, MP=gp.MP, CW=gp.CW, DSQ=gp.DSQ, STAGES=st,
                MIXERS=mixers, MIX_REGS=192, DPHI_REGS=104, DX_HL=dx_hl, num_warps=4, PACE=pace,
                PACE_SPIN=gp.PACE_SPIN, grid=(n * c // gp.BK, 1))
        regs, spill = sm90_build.resources(built)
        smem = built.metadata.shared
        text = sm90_build.sass(built)  # the dx warpgroup's loop; spills counted in every loop
        loop = sm90_build.ws_loop_counts(text, ("HGMMA", "UTMASTG", "SYNCS", "BAR.SYNC"))
        ok = (spill <= 8 and loop["LDL"] <= 1 and loop["STL"] == 0 and smem <= SMEM_LIMIT
              and sm90_build.opcode_counts(text, ("HGMMA",))["HGMMA"] > 0)
        failed += not ok
        print(f"pre={has_pre} acc={has_acc} mixers={mixers} dx_hl={dx_hl}{f' pace={pace}' if pace else ''}: "
              f"triton {triton.__version__} stages={st} "
              f"regs={regs} spill={spill} smem={smem} loop={loop} {'ok' if ok else 'FAIL'}", flush=True)
    return int(failed > 0)


def _inputs(t, n, c, has_pre, has_acc, bcast, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16

    def r(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    m = ref.num_coeffs(n)
    x = r(t, 1, c, dtype=bf).expand(t, n, c) if bcast else r(t, n, c, dtype=bf)
    return dict(x=x, phi=r(n * c, m, scale=(n * c) ** -0.5), dp=r(t, m), dsq=r(t, scale=0.1),
                h_pre=torch.sigmoid(r(t, n)) if has_pre else None, dout=r(t, c, dtype=bf) if has_pre else None,
                acc=r(t, n, c, dtype=bf) if has_acc else None)


def _reference(v):
    d = {k: (a.double() if a is not None else None) for k, a in v.items()}
    x = d["x"].contiguous()
    if d["h_pre"] is None:
        dx, dphi = ref.proj_backward(x, d["phi"], d["dp"], d["dsq"])
        if d["acc"] is not None:
            dx = dx + d["acc"]
        return dx, dphi
    return ref.proj_pre_backward(x, d["phi"], d["dp"], d["dsq"], d["h_pre"], d["dout"], d["acc"])


def _triton(v, out=None):
    from mhc_compile.kernels import triton_ops as tk
    from mhc_compile.kernels import triton_config as tcfg
    from mhc_compile.kernels import triton_proj_bwd as tpb

    with tk.tuning("proj_dx_dphi", ws=False, ws_no_acc=False):
        return tpb.proj_grads(v["x"], v["phi"], v["dp"], v["dsq"], v["h_pre"], v["dout"], v["acc"],
                              tcfg.cfg_of("proj_dx_dphi"), out=out)


def _gluon(v, out=None, **kw):
    return gp.proj_grads(v["x"], v["phi"], v["dp"], v["dsq"], v["h_pre"], v["dout"], v["acc"], out=out, **kw)


def _err(out, want) -> float:
    """max |out - want| / max |want|, want in float64."""
    return (out.double() - want).abs().max().item() / (want.abs().max().item() or 1.0)


def check(t, n, c, has_pre, has_acc, bcast, lines, against=None) -> bool:
    v = _inputs(t, n, c, has_pre, has_acc, bcast, seed=t + n + c)
    want = _reference(v)
    tri = _triton(v)
    before = gp.LAUNCHES
    got = _gluon(v)
    ran = gp.LAUNCHES > before
    ok = ran
    name = f"{t}x{n}x{c}{' dout' if has_pre else ''}{' acc' if has_acc else ''}{' bcast' if bcast else ''}"
    for what, w, a, b in zip(("dx", "dphi"), want, tri, got):
        et, eg = _err(a, w), _err(b, w)
        good = eg <= max(2 * et, 1e-5) and torch.isfinite(b).all().item() and b.shape == w.shape
        ok &= good
        lines.append(f"| {name} | {what} | {et:.2e} | {eg:.2e} | {'ok' if good else 'FAIL'} |")
    one = _gluon(v, mixers=1)
    same1 = all(torch.equal(a, b) for a, b in zip(one, got))
    ok &= same1
    lines.append(f"| {name} | one dx warpgroup: the same outputs | | | {'ok' if same1 else 'FAIL'} |")
    two_slots = [_gluon(v, stages=2, mixers=m) for m in (1, 2)]  # the H100's ring (PROJ_BWD_BY_DEVICE)
    same2 = all(torch.equal(a, b) for run in two_slots for a, b in zip(run, got))
    ok &= same2
    lines.append(f"| {name} | two slots: the same outputs | | | {'ok' if same2 else 'FAIL'} |")
    # paced (FusedBwdCfg.ws_pace): the loaders wait on their token split, the arithmetic is the same
    paced = _gluon(v, stages=2, pace=3)
    same_p = all(torch.equal(a, b) for a, b in zip(paced, got))
    ok &= same_p
    lines.append(f"| {name} | paced 3 tiles apart: the same outputs | | | {'ok' if same_p else 'FAIL'} |")
    # the dx_hl build (FusedBwdCfg.ws_dx_hl): dx from a bf16 dot, held to the same bar; dphi's dot is unchanged
    hl2, hl1 = _gluon(v, dx_hl=True), _gluon(v, dx_hl=True, mixers=1)
    et, eh = _err(tri[0], want[0]), _err(hl2[0], want[0])
    good = (eh <= max(2 * et, 1e-5) and torch.isfinite(hl2[0]).all().item() and torch.equal(hl2[1], got[1])
            and all(torch.equal(a, b) for a, b in zip(hl1, hl2)))
    ok &= good
    lines.append(f"| {name} | dx_hl: dx (dphi bit-equal, one warpgroup the same) | {et:.2e} | {eh:.2e} | "
                 f"{'ok' if good else 'FAIL'} |")
    if has_acc:  # dx written over acc, as inplace_stream_grads asks: the same outputs
        w = dict(v, acc=v["acc"].clone())
        inplace = _gluon(w, out=w["acc"])
        same = inplace[0].data_ptr() == w["acc"].data_ptr() and all(torch.equal(a, b) for a, b in zip(inplace, got))
        ok &= same
        lines.append(f"| {name} | out = acc: the same outputs, in place | | | {'ok' if same else 'FAIL'} |")
    lines.append(f"| {name} | (the Gluon kernel ran) | | | {'ok' if ran else 'FAIL'} |")
    shown = 7 + has_acc
    if against is not None:  # the other build: its errors beside this one's (a report, not a pass / fail)
        other = against.proj_grads(v["x"], v["phi"], v["dp"], v["dsq"], v["h_pre"], v["dout"], v["acc"])
        same = all(torch.equal(a, b) for a, b in zip(other, got))
        errs = ", ".join(f"{what} {_err(b, w):.2e}" for what, w, b in zip(("dx", "dphi"), want, other))
        lines.append(f"| {name} | --against build: {'bit-equal to this one' if same else errs} | | | |")
        shown += 1
    print("\n".join(lines[-shown:]), flush=True)
    return ok


def times(shapes, lines, rounds: int = 3, saved=lambda: None, against=None) -> None:
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth

    bw = copy_bandwidth("cuda")
    lines.append(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s\n")
    lines.append("| T x C | acc | round | Triton us (eff) | Gluon, 2 dx warpgroups (eff) | Gluon, 1 (eff) | Gluon "
                 "launch alone, 2 (eff) | launch alone, 1 (eff) | dx_hl, 2 (eff) | dx_hl, 1 (eff) |"
                 + (" --against, 2 (eff) |" if against else ""))
    lines.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if against else ""))
    for t, n, c in shapes:
        for has_acc in (True, False):
            v = _inputs(t, n, c, True, has_acc, False, seed=1)
            nbytes = ((2 + has_acc) * n * c + c) * t * 2  # X, dX, acc; dout once

            def tri():
                return _triton(v)

            def two():
                return _gluon(v)

            def one():
                return _gluon(v, mixers=1)

            # the launch alone: the host-side packing done once, outside the timed call
            dp32 = v["dp"].float().contiguous()
            hl, coefs = gp.pack_tokens(dp32, v["dsq"], v["h_pre"])
            dx = torch.empty_like(v["x"])
            kblocks = n * c // gp.BK
            splits, t_split = gp.plan_splits(t, kblocks, dx.device)
            m = dp32.shape[1]
            dphi = torch.empty((splits, n * c, m), dtype=torch.float32, device="cuda")
            descs = gp.descriptors(v["x"], False, v["dout"], v["acc"], gp.pad_cols(dp32, gp.MP), hl, coefs,
                                   gp.pad_cols(v["phi"], gp.MP), dx, t, n, c)
            st = gp.stages_for(True, has_acc)

            def launch(mixers):
                gp._proj_bwd_ws_kernel[(kblocks, splits)](
                    *descs, dphi, dphi, t, c, m, t_split, N=n, HAS_PRE=True, HAS_ACC=has_acc, X_BCAST=False,
                    BT=gp.BT, BK=gp.BK, XB=gp.XB, MP=gp.MP, CW=gp.CW, DSQ=gp.DSQ, STAGES=st, MIXERS=mixers,
                    MIX_REGS=192, DPHI_REGS=104, DX_HL=False, num_warps=4)

            def alone():
                launch(2)

            def alone1():
                launch(1)

            def hl2():
                return _gluon(v, dx_hl=True)

            def hl1():
                return _gluon(v, dx_hl=True, mixers=1)

            def other():
                return against.proj_grads(v["x"], v["phi"], v["dp"], v["dsq"], v["h_pre"], v["dout"], v["acc"])

            for rnd in range(rounds):
                us = []
                for f in (tri, one, two, alone, alone1, hl2, hl1) + ((other,) if against else ()):  # a line a timing: a
                    us.append(triton.testing.do_bench_cudagraph(f, rep=200) * 1e3)    # cut run says where
                    print(f"  {t}x{c} acc={has_acc} {f.__name__}: {us[-1]:.1f} us", flush=True)
                us = [us[0], us[2], us[1]] + us[3:]
                cells = " | ".join(f"{u:.1f} ({100 * nbytes / (u * 1e-6) / bw:.1f} %)" for u in us)
                lines.append(f"| {t}x{c} | {has_acc} | {rnd} | {cells} |")
                print(lines[-1], flush=True)
                saved()


def pace_times(shapes, lines, paces=(0, 2, 3, 4), rounds: int = 3) -> None:
    """The Gluon kernel as the op runs it (host packing included; the device's slots and dx warpgroups from
    ``FusedBwdCfg``) at each pace of ``paces``, beside the Triton kernel, interleaved in rounds: with dout and acc
    (proj_pre_backward), with neither (proj_backward), and with dout but no acc (enter's backward, which keeps the
    Triton kernel on an H100: is it slower there only unpaced?). Efficiency over each op's bytes (bench_kernels'
    rows). The pace is given to the kernel directly, so calls that ``FusedBwdCfg.pace_for`` leaves unpaced are timed
    paced too."""
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth
    from mhc_compile.kernels import triton_common as tcom
    from mhc_compile.kernels import triton_config as tcfg

    bw = copy_bandwidth("cuda")
    cfg, gpu = tcfg.cfg_of("proj_dx_dphi"), tcom.device_name(torch.device("cuda"))
    lines.append(f"\n## pace, copy bandwidth {bw / 1e9:.0f} GB/s\n")
    lines.append("| T x C | op | round | Triton us (eff) | " + " | ".join(f"pace {p} us (eff)" for p in paces)
                 + " | plan_pace(3) |")
    lines.append("|---|---|---|---|" + "---|" * (len(paces) + 1))
    # (op, dout, acc, bytes a token a channel over 2): proj_pre_backward reads X, acc, dout and writes dX;
    # proj_backward reads X and writes dX; enter's backward reads X and dout and writes dX
    ops = (("proj_pre_backward", True, True, lambda n: 3 * n + 1), ("proj_backward", False, False, lambda n: 2 * n),
           ("enter backward", True, False, lambda n: 2 * n + 1))
    for t, n, c in shapes:
        for op, has_dout, has_acc, words in ops:
            v = _inputs(t, n, c, has_dout, has_acc, False, seed=1)
            nbytes = words(n) * c * t * 2
            mixers = cfg.gluon_for(has_acc, has_dout, gpu) or (2 if has_acc else 1)  # enter: Triton's by plan
            kw = dict(mixers=mixers, stages=cfg.stages_on(gpu, has_dout))
            kblocks = n * c // gp.BK
            planned = gp.plan_pace(kblocks, *gp.plan_splits(t, kblocks, v["x"].device), v["x"].device, 3)

            def cell(fn):
                us = triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3
                return f"{us:.1f} ({100 * nbytes / (us * 1e-6) / bw:.1f} %)"

            for rnd in range(rounds):
                cells = [cell(lambda: _triton(v))] + [cell(lambda: _gluon(v, pace=p, **kw)) for p in paces]
                lines.append(f"| {t}x{c} | {op} | {rnd} | {' | '.join(cells)} | {planned or 'off'} |")
                print(lines[-1], flush=True)


def sweep(shapes, lines, rounds: int = 2) -> None:
    """The Gluon kernel's ring depth and dx warpgroups (every (stages, mixers) whose slots fit), as the op runs it,
    beside the Triton kernel, with and without acc: which build a device wants (one tuned on an H200 ran 15 % behind
    the Triton kernel without acc on an H100, session 36)."""
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth

    bw = copy_bandwidth("cuda")
    lines.append(f"\n## sweep, copy bandwidth {bw / 1e9:.0f} GB/s\n")
    lines.append("| T x C | acc | round | build | us | eff |")
    lines.append("|---|---|---|---|---|---|")
    for t, n, c in shapes:
        for has_acc in (False, True):
            v = _inputs(t, n, c, True, has_acc, False, seed=1)
            nbytes = ((2 + has_acc) * n * c + c) * t * 2
            builds = [("triton", lambda: _triton(v))]
            for st in (2, 3, 4):
                for dx_hl in (False, True):
                    if gp.stages_for(True, has_acc, st, dx_hl) is None:
                        continue
                    for mixers in (1, 2):
                        kw = dict(stages=st, mixers=mixers, dx_hl=dx_hl)
                        builds.append((f"stages={st} mixers={mixers}{' dx_hl' if dx_hl else ''}",
                                       lambda kw=kw: _gluon(v, **kw)))
            for rnd in range(rounds):
                for name, f in builds:
                    us = triton.testing.do_bench_cudagraph(f, rep=100) * 1e3
                    lines.append(f"| {t}x{c} | {has_acc} | {rnd} | {name} | {us:.1f} | "
                                 f"{100 * nbytes / (us * 1e-6) / bw:.1f} % |")
                    print(lines[-1], flush=True)


def probe() -> int:
    """Each call synchronised and printed as it ends, T growing at C = 4096, then T = 32768 cut into splits of
    fewer tiles: where a call never ends, the last line says which."""
    for t, splits, mixers in ((4096, None, 1), (8192, None, 1), (8192, 1, 1), (16384, 1, 1), (32768, 8, 1),
                              (32768, 4, 1), (32768, 2, 1), (32768, 1, 1), (32768, None, 2)):
        v = _inputs(t, 4, 4096, True, True, False, seed=1)
        start = time.time()
        _gluon(v, mixers=mixers, splits=splits)
        torch.cuda.synchronize()
        print(f"T={t} splits={splits} mixers={mixers}: {time.time() - start:.2f} s", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="sm_90a builds on this machine, no GPU")
    ap.add_argument("--out", default=None, help="folder for the results file (GPU mode)")
    ap.add_argument("--no-times", action="store_true")
    ap.add_argument("--probe", action="store_true", help="one call a shape, synchronised, growing T (finds a hang)")
    ap.add_argument("--no-checks", action="store_true", help="time only (after a run whose checks passed)")
    ap.add_argument("--sweep", action="store_true", help="time the Gluon kernel's (stages, mixers, dx_hl) builds "
                    "beside the Triton kernel at --shapes (no checks)")
    ap.add_argument("--pace", action="store_true", help="time the kernel paced 0, 2, 3, 4 tiles apart at --shapes "
                    "(after the checks)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="*", default=None, help="timed shapes as TxC (n = 4); default: TIMES")
    ap.add_argument("--against", default=None, help="another build of kernels/gluon_proj_bwd.py, checked and timed "
                    "beside this one")
    args = ap.parse_args()
    if args.build:
        return build()
    if args.probe:
        return probe()
    if not torch.cuda.is_available():
        print("gluon_proj_bwd_check: no CUDA device (use --build on a CPU machine)")
        return 2
    import triton

    shapes = [(int(a), 4, int(b)) for a, b in (sh.split("x") for sh in args.shapes)] if args.shapes else TIMES

    against = load_module(args.against) if args.against else None
    lines = [f"# gluon_proj_bwd_check, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, triton {triton.__version__}\n",
             "Errors: max |out - reference| / max |reference|, the reference in float64.\n",
             "| shape | output | Triton kernel | Gluon kernel | |", "|---|---|---|---|---|"]
    if args.sweep:
        sweep(shapes, lines, args.rounds)
        save(args.out, lines)
        return 0
    ok = True
    start = time.time()
    for shape in ([] if args.no_checks else CHECKS):
        try:
            ok &= check(*shape, lines, against)
            print(f"  ({time.time() - start:.0f} s since the checks began)", flush=True)
        except Exception as exc:  # report and go on: the other shapes still say something
            ok = False
            lines.append(f"| {shape} | error: {type(exc).__name__}: {str(exc)[:300]} | | | FAIL |")
            print(lines[-1], flush=True)
    save(args.out, lines)
    if ok and args.pace:
        pace_times(shapes, lines, rounds=args.rounds)
    elif ok and not args.no_times:
        times(shapes, lines, args.rounds, lambda: save(args.out, lines), against)
    save(args.out, lines)
    return 0 if ok else 1


def load_module(path: str):
    """kernels/gluon_proj_bwd.py as another build has it (a file), importable beside this build's."""
    from benchmarks.against import load_module as load

    return load(path, "gluon_proj_bwd_against")


def save(out, lines) -> None:
    """The results so far (each timed row is saved as it lands: a run cut short keeps what it measured)."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gluon_proj_bwd_check.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
