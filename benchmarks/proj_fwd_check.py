"""proj's forward on the GPU: this build and others side by side, correctness first, then times.

    PYTHONPATH=. python benchmarks/proj_fwd_check.py                       # this build
    git show wip/x:mhc_compile/kernels/triton_proj.py > proj_x.py           # another build of the module, then
    PYTHONPATH=. python benchmarks/proj_fwd_check.py --against proj_x.py    # both, in one process
    PYTHONPATH=. python benchmarks/proj_fwd_check.py --tune bk=64 num_stages=4,num_warps=4   # this build, retiled
    PYTHONPATH=. python benchmarks/proj_fwd_check.py --tune ws=false        # the Triton kernel beside the Gluon one
    PYTHONPATH=. python benchmarks/proj_fwd_check.py --build                # no GPU: its sm_90a builds

Session 30 found p wrong by 30-40 % on an H200 at n = 8, 11 and 16 (bf16), from a shared-memory race that
repeated calls do not always hit: each build runs every shape three times, and the worst error counts. Then
each passing build's time at 32768 x 4096 and 8192 x 7168, n = 4, bf16, interleaved, with its efficiency against the
copy bandwidth measured in the same run. Writes $OUT/proj_fwd_check.md (or ./); exit status 1 on a mismatch.
The results say how many launches the Gluon kernel took (a ws=true build must show some: at n > 7 the Triton kernel
runs). ``--build`` compiles the Gluon kernel for sm_90a on this machine at a few shapes (registers, spills, shared
memory, the loop's instructions; fails with spills or past 227 KB): the CPU tests run it, since Gluon kernels do not
run under the interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.against import Lines, load_module, parse_tune  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_config, triton_proj  # noqa: E402
from mhc_compile.kernels.triton_common import cdiv, pow2  # noqa: E402

TOL = {torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float32: 1e-4}  # of p's scale; the race gave 3e-1
# n = 1, 2 and 4 also run the Gluon kernel where a build asks for it (n <= 7); 8, 11 and 16 had the race
CHECKS = [(1000, n, 1024, dt) for n in (1, 2, 4, 8, 11, 16) for dt in (torch.bfloat16, torch.float32)]
# ragged token counts (one token: phi's rows split over programs), and K = n*C an odd number of 64-column boxes
# (the Gluon kernel's slot halved to one box)
CHECKS += [(t, n, c, torch.bfloat16) for t, n, c in ((1, 4, 4096), (5, 4, 64), (77, 3, 320), (129, 2, 96))]
TIMES = [(32768, 4, 4096), (8192, 4, 7168)]


class Tuned:
    """This build's proj with other DotCfg fields for "proj" (``--tune``): each call runs under
    ``triton_config.tuning``."""

    def __init__(self, fields: dict):
        dataclasses.replace(triton_config.DEFAULTS["proj"], **fields)  # a bad field fails here, not mid-run
        self.fields = fields

    def proj(self, x, phi):
        with triton_config.tuning("proj", **self.fields):
            return triton_proj.proj(x, phi)


def builds(files: list[str], tunes: list[str] = ()) -> list[tuple[str, object]]:
    """(label, module-like object with a ``proj``) for this build, each --tune spec of it and each --against
    file."""
    return ([("this build", triton_proj)] + [(f"this build ({spec})", Tuned(parse_tune(spec, "--tune")))
                                             for spec in tunes]
            + [(os.path.splitext(os.path.basename(f))[0], load_module(f, f"proj_{k}")) for k, f in enumerate(files)])


def check(mods, shapes, device: str, calls: int = 3, out: list | None = None) -> tuple[list[str], set[str]]:
    """Rows '| T x n x C | dtype | build | p error | sq error | ok |' (also appended to ``out`` as they come) and the
    labels of the builds that failed."""
    rows, bad = [], set()
    for t, n, c, dtype in shapes:
        g = torch.Generator(device=device).manual_seed(t + n + c)
        m = ref.num_coeffs(n)
        x = torch.randn(t, n, c, generator=g, device=device).to(dtype)
        phi = torch.randn(n * c, m, generator=g, device=device) * 0.05
        want_p, want_sq = ref.proj(x, phi)
        for label, mod in mods:
            ep = es = 0.0
            for _ in range(calls):
                p, sq = mod.proj(x, phi)
                ep = max(ep, ((p - want_p).abs().max() / want_p.abs().max()).item())
                es = max(es, ((sq - want_sq).abs().max() / want_sq.abs().max()).item())
            ok = ep <= TOL[dtype] and es <= TOL[dtype]
            if not ok:
                bad.add(label)
            rows.append(f"| {t}x{n}x{c} | {str(dtype)[6:]} | {label} | {ep:.2e} | {es:.2e} | {'ok' if ok else 'FAIL'} |")
            print(rows[-1], flush=True)
            if out is not None:
                out.append(rows[-1])
    return rows, bad


def times(mods, rounds: int = 3, out: list | None = None) -> list[str]:
    """Each build's time at TIMES, ``rounds`` interleaved rounds: the rows, appended to ``out`` (a Lines writes
    each as it comes) when given."""
    import triton.testing

    from benchmarks.bench_kernels import copy_bandwidth

    bw = copy_bandwidth("cuda")
    rows = out if out is not None else []
    rows += [f"\ncopy bandwidth {bw / 1e9:.0f} GB/s\n", "| T x n x C | round | " + " | ".join(
        f"{label} us (eff)" for label, _ in mods) + " |", "|---|---|" + "---|" * len(mods)]
    for t, n, c in TIMES:
        m = ref.num_coeffs(n)
        x = torch.randn(t, n, c, device="cuda").to(torch.bfloat16)
        phi = torch.randn(n * c, m, device="cuda") * 0.05
        nbytes = x.numel() * 2
        for rnd in range(rounds):
            cells = []
            for _, mod in mods:
                us = triton.testing.do_bench_cudagraph(lambda mod=mod: mod.proj(x, phi), rep=200) * 1e3
                cells.append(f"{us:.1f} ({100 * nbytes / (us * 1e-6) / bw:.1f} %)")
            rows.append(f"| {t}x{n}x{c} | {rnd} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


# T, n, C, warps, subs, join
BUILDS = [(256, 4, 512, 8, 2, True), (256, 4, 512, 8, 2, False), (256, 4, 512, 4, 1, True), (200, 7, 512, 4, 2, True),
          (200, 7, 512, 4, 2, False), (200, 7, 512, 8, 2, True), (100, 2, 64, 8, 2, True), (77, 3, 320, 8, 2, True)]


def _warm(t: int, n: int, c: int, warps: int, subs: int, join: bool):
    """The Gluon kernel's sm_90a build for a launch at these sizes (two K splits), as a GPU launch would pick it:
    (the CompiledKernel, BT, MP, subs, stages)."""
    from benchmarks import sm90_build
    from mhc_compile.kernels import gluon_proj as gp

    k, m = n * c, ref.num_coeffs(n)
    mp, bt = max(16, pow2(m)), 16 * warps
    subs, stages = gp.plan(k, bt, mp, subs, 0)
    x = torch.zeros(t, k, dtype=torch.bfloat16)
    w = torch.zeros((k, 2, mp) if join else (2, k, mp), dtype=torch.bfloat16)
    with sm90_build.cpu_target(90):
        built = gp._proj_ws_kernel.warmup(*gp.descriptors(x, w, t, k, bt, mp, join), torch.zeros(2, t, m),
                                          torch.zeros(2, t), t, k, m, k // 2, BT=bt, MP=mp, SUBS=subs,
                                          STAGES=stages, JOIN=join, num_warps=warps, grid=(cdiv(t, bt), 2))
    return built, bt, mp, subs, stages


def _builds_cached() -> int:
    from mhc_compile.kernels import gluon_proj as gp

    return sum(len(cache[0]) for cache in gp._proj_ws_kernel.device_caches.values())


def build() -> int:
    """sm_90a builds of the Gluon kernel (no GPU needed) at BUILDS: one line each, and 1 if any spills or overflows
    shared memory; then the first of them at other token counts, which must reuse its build (issue 3: no recompile
    per token count; T reaches the kernel in the X descriptor's shape and as an unspecialized int)."""
    from benchmarks import sm90_build

    failed = 0
    for t, n, c, warps, subs, join in BUILDS:
        built, bt, mp, subs, stages = _warm(t, n, c, warps, subs, join)
        regs, spill = sm90_build.resources(built)
        smem = built.metadata.shared
        sass = sm90_build.sass(built)
        loop = sm90_build.ws_loop_counts(sass, ("HGMMA", "SYNCS", "BAR.SYNC", "LDS"))
        # the design's point: each slot waits for the previous slot's wgmmas only (this slot's stay in flight: the
        # first slot's wait, the loop's, then one for all at the end), and ptxas keeps them so (DEPBAR.LE of that
        # count in the SASS, not only 0: ptxas serializes every wgmma of the kernel where it sees the accumulators
        # set by other instructions inside the pipeline, C7515)
        waits = re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", built.asm["ptx"])
        depbar = sorted({int(v, 16) for v in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)})
        in_flight = subs if join else 2 * subs
        ok = (spill == 0 and smem <= sm90_build.SMEM_LIMIT and loop.get("HGMMA", 0) > 0
              and waits == [str(in_flight), str(in_flight), "0"] and in_flight in depbar)
        failed += not ok
        print(f"n={n} C={c} BT={bt} MP={mp} join={join} subs={subs} stages={stages} regs={regs} spill={spill} "
              f"smem={smem} waits={waits} depbar={depbar} loop={loop} {'ok' if ok else 'FAIL'}", flush=True)
    t, *rest = BUILDS[0]
    before = _builds_cached()
    others = (t + 1, t + 77, 40000 + 13)
    for other in others:
        _warm(other, *rest)
    same = _builds_cached() == before
    failed += not same
    print(f"token counts {t}, {', '.join(map(str, others))}: {'one build' if same else 'new builds'} "
          f"{'ok' if same else 'FAIL'}", flush=True)
    return int(failed > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", nargs="*", default=[], help="other builds of kernels/triton_proj.py")
    ap.add_argument("--tune", nargs="*", default=[], help="DotCfg fields for this build's proj, one build a spec: "
                    "e.g. bk=64,num_stages=4")
    ap.add_argument("--no-times", action="store_true")
    ap.add_argument("--build", action="store_true", help="the Gluon kernel's sm_90a builds on this machine, no GPU")
    args = ap.parse_args()
    if args.build:
        return build()
    if not torch.cuda.is_available():
        print("proj_fwd_check: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    mods = builds(args.against, args.tune)
    # written at every line: a build that hangs (a new Gluon kernel) leaves the rows before it
    lines = Lines(os.path.join(os.environ.get("OUT") or ".", "proj_fwd_check.md"), [
        f"# proj_fwd_check, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}\n", "Worst relative error of three calls, against the reference.\n",
        "| shape | dtype | build | p | sq | |", "|---|---|---|---|---|---|"])
    from mhc_compile.kernels import gluon_proj

    rows, bad = check(mods, CHECKS, "cuda", out=lines)
    lines += [f"\nbuilds that failed (not timed): {', '.join(sorted(bad)) or 'none'}",
                     f"Gluon proj kernel launches in the checks: {gluon_proj.LAUNCHES}"]
    passed = [(label, mod) for label, mod in mods if label not in bad]
    if passed and not args.no_times:
        times(passed, out=lines)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
