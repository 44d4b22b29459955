"""The warp-specialized Gluon post_res_proj (``DotCfg.ws``): correctness on an sm_90 GPU, then its time beside
the Triton kernel's, side by side in one process.

    PYTHONPATH=. python benchmarks/gluon_check.py [--out DIR] [--shapes 32768x4096 ...] [--configs ws ...]
    PYTHONPATH=. python benchmarks/gluon_check.py --build     # no GPU needed: sm_90a builds, resources
    git show main:mhc_compile/kernels/gluon_post_res_proj.py > against_main.py   # another build, then
    PYTHONPATH=. python benchmarks/gluon_check.py --against against_main.py        # both, in one process

(1) Correctness of each ``--configs`` entry (a name in CONFIGS: DotCfg fields of post_res_proj), at ragged
token counts, n in {1, 2, 3, 4} and C from 256 to 2048: X' within bf16 rounding of the float64 reference (and
whether it equals the Triton post_res kernel's bit for bit, reported, not required); p against the float64
projection of that X' within the bound of a hi / lo bf16 dot; sq against float64. Every row asserts the Gluon
kernel ran. The shapes with n > 1 are checked again with X broadcast over its streams (stride 0, as the step
after a chain head gets its embedding under fuse=True), rows marked "bcast". (2) Times (median of CUDA-graph
replays) of the Triton kernel and each config that passed, at each
shape, with the copy bandwidth measured in the same run -> gluon-check.md, written at every line; with ``--step``,
bench_kernels' step forward row beside them (the op that calls post_res_proj in training). Exit status 1 when a
check fails.
``--build`` compiles the kernel for sm_90a on this machine (registers, spills, shared memory; fails past
227 KB or with spills): the CPU tests run it, since Gluon kernels do not run under the interpreter. With
``--bcast`` each config is also built for a broadcast X (rows "<config>+bcast").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.against import Lines, load_module, serving  # noqa: E402
from mhc_compile.kernels import gluon_post_res_proj as gp  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_common as tcom  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_config as tcfg  # noqa: E402
from mhc_compile.kernels import triton_post_res_proj as tprp  # noqa: E402

CHECK_SHAPES = [(300, 4, 512), (129, 4, 768), (64, 1, 256), (1000, 2, 1024), (77, 3, 384), (4099, 4, 2048)]
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a block may take on an H100 / H200
TRITON = dict(ws=False)  # the Triton post_res_proj, every row's baseline (the Gluon kernel is the default on sm_90)
# name -> DotCfg fields for post_res_proj
CONFIGS = {
    "ws": dict(ws=True),  # DotCfg's ws defaults: two compute warpgroups, two 32-channel chunks a slot, 64-channel boxes
    "ws-c1": dict(ws=True, ws_consumers=1),  # one compute warpgroup (session 21's default)
    "ws-box32": dict(ws=True, ws_box=32),
    "ws-s3": dict(ws=True, ws_consumers=1, ws_stages=3),
    "ws-sub1": dict(ws=True, ws_consumers=1, ws_subs=1, ws_box=32, ws_stages=4),
    "ws-join": dict(ws=True, ws_join=True),  # one wgmma a stream against phi's [hi | lo] tile (session 31)
}


def _inputs(t: int, n: int, c: int, seed: int, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    m = n * n + 2 * n
    x = torch.randn(t, n, c, generator=g, device=device).bfloat16()
    y = torch.randn(t, c, generator=g, device=device).bfloat16()
    h_post = 2 * torch.rand(t, n, generator=g, device=device)
    h_res = torch.rand(t, n, n, generator=g, device=device)
    phi = torch.randn(n * c, m, generator=g, device=device) * (n * c) ** -0.5
    return x, h_res, h_post, y, phi


def _check(t: int, n: int, c: int, name: str, against=None, bcast: bool = False) -> tuple[str, bool]:
    x, h_res, h_post, y, phi = _inputs(t, n, c, seed=t + 7 * n + c)
    if bcast:  # stream 0's rows as every stream's: stride 0 over n, the rows dense (triton_common.is_broadcast)
        x = x[:, 0].contiguous().unsqueeze(1).expand(t, n, c)
    ran = gp.LAUNCHES
    with tk.tuning("post_res_proj", **CONFIGS[name]):
        out, p, sq = tk.post_res_proj(x, h_res, h_post, y, phi)
    torch.cuda.synchronize()
    used = gp.LAUNCHES > ran
    x_bits = torch.equal(out, tk.post_res(x, h_res, h_post, y))
    x_err = (out.double() - ref.post_res(x.double(), h_res.double(), h_post.double(), y.double())).abs().max().item()
    xs = out.double().reshape(t, -1)
    p_ref = xs @ phi.double()
    # a hi / lo bf16 dot: each product within 2^-14 relative (tests/test_triton_kernels._close_hi_lo), plus fp32 sums
    bound = 2.0 ** -14 * (xs.abs() @ phi.double().abs()) + 1e-5
    p_excess = ((p.double() - p_ref).abs() - bound).max().item()
    sq_ref = (xs * xs).sum(1)
    sq_err = ((sq.double() - sq_ref).abs() / sq_ref.clamp_min(1e-30)).max().item()
    good = used and x_err <= 1.6e-2 * max(1.0, out.double().abs().max().item()) and p_excess <= 0 and sq_err <= 1e-5
    row = (f"| {name}{' bcast' if bcast else ''} | {t}x{n}x{c} | {'yes' if used else 'NO'} | "
           f"{'yes' if x_bits else 'no'} | {x_err:.2e} | "
           f"{p_excess:.2e} | {sq_err:.2e} | {'ok' if good else 'FAIL'} |")
    if against is not None:  # the other build's outputs beside this one's (a report, not a pass / fail)
        with tk.tuning("post_res_proj", **CONFIGS[name]), serving(tk, "_gluon_prp", against):
            other = tk.post_res_proj(x, h_res, h_post, y, phi)
        same = all(torch.equal(a, b) for a, b in zip(other, (out, p, sq)))
        row += f"\n| {name} | {t}x{n}x{c} | --against build: {'bit-equal' if same else 'DIFFERS'} | | | | | |"
    return row, good


def _time(shapes, configs, lines: list[str], against=None) -> None:
    from benchmarks.bench_kernels import _nb, bench_us, copy_bandwidth

    bw = copy_bandwidth("cuda")
    lines += ["", f"Copy bandwidth: {bw / 1e9:.0f} GB/s (2 GiB bf16, read + write).", "",
              "| shape | config | us | % of copy bw | max abs diff of p from the Triton kernel's |", "|---|---|---|---|---|"]
    for t, c in shapes:
        x, h_res, h_post, y, phi = _inputs(t, 4, c, seed=1)
        nbytes = _nb(x, h_res, h_post, y, phi, x) + t * phi.shape[1] * 4 + t * 4
        with tk.tuning("post_res_proj", **TRITON):
            base = tk.post_res_proj(x, h_res, h_post, y, phi)
        for name in ["triton"] + configs + ([f"{c} --against" for c in configs] if against is not None else []):
            other = name.endswith(" --against")
            fields = TRITON if name == "triton" else CONFIGS[name.removesuffix(" --against")]
            try:
                with tk.tuning("post_res_proj", **fields), \
                        (serving(tk, "_gluon_prp", against) if other else contextlib.nullcontext()):
                    got = tk.post_res_proj(x, h_res, h_post, y, phi)
                    us = bench_us(lambda: tk.post_res_proj(x, h_res, h_post, y, phi))
            except Exception as exc:  # a tile that does not build or fit: report it and go on
                lines.append(f"| {t}x{c} | {name} | {type(exc).__name__}: {str(exc)[:100]} | | |")
                print(lines[-1], flush=True)
                continue
            diff = (got[1] - base[1]).abs().max().item()
            same_x = "X' equal" if torch.equal(got[0], base[0]) else "X' DIFFERS"
            lines.append(f"| {t}x{c} | {name} | {us:.1f} | {100 * nbytes / (us * 1e-6) / bw:.1f} | "
                         f"{diff:.1e}, {same_x} |")
            print(lines[-1], flush=True)
        del x, h_res, h_post, y, phi, base


def step(shapes, configs, lines: list[str]) -> None:
    """bench_kernels' ``step`` forward row (post_res_proj, then the next sublayer's coefficients and pre) with the
    Triton post_res_proj and with each config; its bytes and its error against the reference as there."""
    from benchmarks.bench_kernels import _call, _rel_err, _tuple, bench_us, cases, copy_bandwidth, make_inputs

    bw = copy_bandwidth("cuda")
    lines += ["", "## step forward", "", f"Copy bandwidth: {bw / 1e9:.0f} GB/s.", "",
              "| shape | post_res_proj | Gluon ran | us | % of copy bw | error against the reference |",
              "|---|---|---|---|---|---|"]
    for t, c in shapes:
        inp = make_inputs(t, 4, c, torch.bfloat16, "cuda")
        case = next(k for k in cases(inp) if (k.kernel, k.direction) == ("step", "fwd"))
        want = _tuple(_call(case, ref))
        for name in ["triton"] + configs:
            ran = gp.LAUNCHES
            with tk.tuning("post_res_proj", **(TRITON if name == "triton" else CONFIGS[name])):
                got = _call(case, tk)
                us = bench_us(lambda: _call(case, tk))
            err = max(_rel_err(a, e) for a, e in zip(_tuple(got), want))
            lines.append(f"| {t}x{c} | {name} | {gp.LAUNCHES > ran} | {us:.1f} | "
                         f"{100 * case.nbytes / (us * 1e-6) / bw:.1f} | {err:.1e} |")
            print(lines[-1], flush=True)
        del inp


def segments(shapes, lines: list[str]) -> None:
    """How the bytes a TMA box row or a tile row covers move the stream kernels: post_res at tiles of 8192
    elements that read rows of 32 .. 256 channels (64 .. 512 bytes), and proj's forward with 32 .. 128 channels
    of K a step, beside each shipped tile."""
    from benchmarks.bench_kernels import _nb, bench_us, copy_bandwidth

    bw = copy_bandwidth("cuda")
    lines += ["", "## Row segments", "", f"Copy bandwidth: {bw / 1e9:.0f} GB/s.", "",
              "| shape | kernel | tile | us | % of copy bw |", "|---|---|---|---|---|"]
    for t, c in shapes:
        x, h_res, h_post, y, phi = _inputs(t, 4, c, seed=1)
        runs = [("post_res", {}, lambda: tk.post_res(x, h_res, h_post, y), _nb(x, h_res, h_post, y, x))]
        runs += [("post_res", dict(budget=8192, max_bc=bc), runs[0][2], runs[0][3]) for bc in (32, 64, 128, 256)]
        proj_bytes = _nb(x, phi) + t * (phi.shape[1] + 1) * 4
        runs += [("proj", {}, lambda: tk.proj(x, phi), proj_bytes)]
        runs += [("proj", dict(bk=bk), runs[-1][2], proj_bytes) for bk in (32, 64)]
        for kernel, fields, fn, nbytes in runs:
            with tk.tuning(kernel, **fields):
                us = bench_us(fn)
            lines.append(f"| {t}x{c} | {kernel} | {fields or 'shipped'} | {us:.1f} | "
                         f"{100 * nbytes / (us * 1e-6) / bw:.1f} |")
            print(lines[-1], flush=True)
        del x, h_res, h_post, y, phi


def build(configs, bcast: bool = False) -> int:
    """sm_90a builds of the kernel at C = 512 for each config: (registers, spilled bytes, shared memory); with
    ``bcast`` each also for X broadcast over its streams."""
    from benchmarks import sm90_build

    failed = 0
    for name, x_bcast in [(c, b) for c in configs for b in ((False, True) if bcast else (False,))]:
        cfg = dataclasses.replace(tcfg.DEFAULTS["post_res_proj"], **CONFIGS[name])
        t, n, c = 256, 4, 512
        _, bc, mp = tprp._post_res_proj_tile(cfg, t, n, c, n * n + 2 * n)
        bt = 16 * cfg.num_warps
        subs, stages, wstages = gp.plan(n, c, bt, bc, mp, cfg.ws_subs, cfg.ws_stages, cfg.ws_wstages,
                                        cfg.ws_consumers, cfg.ws_join)
        x, y = torch.zeros(t, n, c, dtype=torch.bfloat16), torch.zeros(t, c, dtype=torch.bfloat16)
        w = torch.zeros((n * c, 2, mp) if cfg.ws_join else (2, n * c, mp), dtype=torch.bfloat16)
        with sm90_build.cpu_target(90):
            if x_bcast:
                x = x[:, 0].contiguous().unsqueeze(1).expand(t, n, c)
            built = gp._post_res_proj_ws_kernel.warmup(
                *gp.descriptors(x, y, w, t, n, c, n * c, bt, bc, mp, min(cfg.ws_box or bc, subs * bc), cfg.ws_join,
                                x_bcast),
                torch.empty_like(x), torch.zeros(t, n, n),
                torch.zeros(t, n), torch.zeros(2, t, n * n + 2 * n), torch.zeros(2, t),
                t, c, n * c, n * n + 2 * n, c, N=n, BT=bt, BC=bc, MP=mp, SUBS=subs,
                BOXES=subs * bc // min(cfg.ws_box or bc, subs * bc), STAGES=stages, WSTAGES=wstages,
                CONSUMERS=cfg.ws_consumers, COMPUTE_REGS=cfg.ws_regs, num_warps=cfg.num_warps, JOIN=cfg.ws_join,
                X_BCAST=x_bcast, grid=(t // bt, 1))
        regs, spill = sm90_build.resources(built)
        smem = built.metadata.shared
        text = sm90_build.sass(built)  # a compute warpgroup's loop; spills counted in every loop
        loop = sm90_build.ws_loop_counts(text, ("HGMMA", "SYNCS", "BAR.SYNC"))
        ok = spill == 0 and smem <= SMEM_LIMIT
        failed += not ok
        print(f"{name}{'+bcast' if x_bcast else ''}: BT={bt} BC={bc} subs={subs} stages={stages} wstages={wstages} "
              f"regs={regs} spill={spill} "
              f"smem={smem} loop={loop} {'ok' if ok else 'FAIL'}", flush=True)
    return int(failed > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--shapes", nargs="*", default=["32768x4096", "8192x4096", "32768x7168", "8192x7168"])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--build", action="store_true", help="sm_90a builds on this machine, no GPU")
    ap.add_argument("--bcast", action="store_true", help="with --build: each config also for a broadcast X")
    ap.add_argument("--segments", action="store_true", help="also time post_res and proj at narrow tile rows")
    ap.add_argument("--step", action="store_true", help="also time step's forward with each config")
    ap.add_argument("--against", default=None, help="another build of kernels/gluon_post_res_proj.py, checked and "
                    "timed beside this one (benchmarks/against.py)")
    args = ap.parse_args()
    tcom.GLUON_BCAST = True  # the broadcast rows check the Gluon kernels' broadcast reads, also where the
    # environment turned them off (MHC_COMPILE_GLUON_BCAST=0)
    if args.build:
        return build(args.configs, args.bcast)
    against = load_module(args.against, "gluon_post_res_proj_against") if args.against else None
    if not gp.supported(torch.empty(1, device="cuda", dtype=torch.bfloat16), 4, 4096, 32, 32):
        print("gluon_check: needs Gluon and an sm_90 GPU", file=sys.stderr)
        return 2
    import triton

    # written at every line: a config that hangs leaves the rows before it
    lines = Lines(os.path.join(args.out, "gluon-check.md"), [
        f"# Gluon post_res_proj, {datetime.date.today()}", "",
        f"- Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", "",
        "| config | T x n x C | Gluon ran | X' = post_res kernel | X' max err (ref) | p excess over hi/lo "
        "bound | sq rel err | |", "|---|---|---|---|---|---|---|---|"])
    passed = []
    for name in args.configs:
        good = True
        for (t, n, c), bcast in [(s, False) for s in CHECK_SHAPES] + [(s, True) for s in CHECK_SHAPES if s[1] > 1]:
            row, ok = _check(t, n, c, name, against, bcast)
            good &= ok
            lines.append(row)
            print(row, flush=True)
        if good:
            passed.append(name)
    lines += ["", f"configs that failed (not timed): {', '.join(c for c in args.configs if c not in passed) or 'none'}"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if passed:
        _time(shapes, passed, lines, against)
    if passed and args.step:
        step(shapes, passed, lines)
    if args.segments:
        segments(shapes, lines)
    return 0 if len(passed) == len(args.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
