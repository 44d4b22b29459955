"""The Gluon kernels' ring depths on the GPU at hand: kernel-table rows timed under config variants, side by side.

    PYTHONPATH=. python benchmarks/ring_sweep.py --out DIR [--t 32768] [--c 4096] [--rounds 2] [--rows ROW ...]
    PYTHONPATH=. python benchmarks/ring_sweep.py --out DIR --shapes 32768x4096 8192x7168 ...   # one table a shape
    TRITON_INTERPRET=1 python benchmarks/ring_sweep.py --device cpu --t 37 --c 128   # a smoke run of this script

Session 36 found the Gluon proj backward two slots deep 4-7 % faster on an H100 than with as many as fit, the depth
sessions 25-27 had tuned on H200s. This times each row of bench_kernels' table that runs a ring (proj's backward
inside proj_pre_backward, enter's and the folded boundary's backward; post_res_proj and step's forward; the
two-pass step backward) as the table times it (``bench_kernels.bench_us``: CUDA-graph replays, bytes over time and
the copy bandwidth of the same run), under its default config and each variant of ``VARIANTS``, interleaved in
rounds. A variant that does not fit or does not build is reported, not timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_kernels as bk  # noqa: E402
from mhc_compile.kernels import triton_fused as tf  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402

# (module whose ``tuning`` takes the config, its kernel name, fields) a variant; "default" runs the shipped config
_PROJ_BWD = [(tk, "proj_dx_dphi", dict(ws_stages=s)) for s in (2, 3, 4)] + [
    (tk, "proj_dx_dphi", dict(ws_stages=2, ws_dx_hl=True)), (tk, "proj_dx_dphi", dict(ws=False, ws_no_acc=False))]
# enter's call (dout, no acc), which keeps the Triton kernel on an H100 (triton_config.PROJ_BWD_BY_DEVICE): the Gluon
# kernel's variants force it
_ENTER = [(mod, kernel, {**fields, "ws_enter": True}) if fields.get("ws", True) else (mod, kernel, fields)
          for mod, kernel, fields in _PROJ_BWD]
_PRP = [(tk, "post_res_proj", dict(ws_stages=s, ws_wstages=w)) for s in (2, 3) for w in (2, 4)]
VARIANTS = {
    "proj bwd": _PROJ_BWD,  # the call without dout: a slot holds X alone
    "proj_pre_backward bwd": _PROJ_BWD,
    "enter bwd": _ENTER,
    "enter (broadcast) bwd": _ENTER,  # a chain head's embedding: one X row a token
    # a chain head's calls with collapse_head_grad (on by default): one-row calls with acc
    "head bwd": _PROJ_BWD,
    "enter (collapsed) bwd": _PROJ_BWD,
    "folded step bwd": _PROJ_BWD,
    "post_res_proj fwd": _PRP,
    "step fwd": _PRP,
    "step bwd": [(tf, "step_bwd", dict(ws=True, stages=s)) for s in (2, 3)],
}


def label(variant) -> str:
    _, kernel, fields = variant
    return f"{kernel}: " + ", ".join(f"{k}={v}" for k, v in fields.items())


def gluon_launches() -> dict:
    """Launches so far of each Gluon kernel (a variant whose config a kernel cannot take falls back to the Triton
    kernel: the row then says which kernels ran)."""
    from mhc_compile.kernels import gluon_post_res_proj, gluon_proj, gluon_proj_bwd, gluon_step_bwd

    mods = {"proj": gluon_proj, "proj_bwd": gluon_proj_bwd, "post_res_proj": gluon_post_res_proj,
            "step_bwd": gluon_step_bwd}
    return {k: m.LAUNCHES for k, m in mods.items()}


def timed(case, variant) -> tuple[float, str]:
    """(microseconds of the row under the variant (None: the shipped config), the Gluon kernels one call ran)."""
    def call():
        return bk._call(case, tk)

    def run():
        before = gluon_launches()
        call()  # builds it (and fails here where it does not fit)
        after = gluon_launches()
        ran = ", ".join(k for k in after if after[k] > before[k]) or "none"
        return bk.bench_us(call), ran

    if variant is None:
        return run()
    module, kernel, fields = variant
    with module.tuning(kernel, **fields):
        return run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=32768)
    ap.add_argument("--c", type=int, default=4096)
    ap.add_argument("--shapes", nargs="*", default=None, metavar="TxC",
                    help="several shapes, one table each, in one process (instead of --t / --c)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", nargs="*", default=list(VARIANTS), help=f"rows of {sorted(VARIANTS)}")
    ap.add_argument("--out", default=None, help="folder for ring_sweep.md")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (this script only)")
    args = ap.parse_args(argv)
    unknown = set(args.rows) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; rows: {sorted(VARIANTS)}")
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes or [f"{args.t}x{args.c}"]]
    except ValueError:
        ap.error(f"--shapes takes TxC, e.g. 32768x4096: {args.shapes}")
    if any(len(shape) != 2 for shape in shapes):
        ap.error(f"--shapes takes TxC, e.g. 32768x4096: {args.shapes}")
    smoke = args.device == "cpu"
    bk.SMOKE = smoke
    import triton

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter smoke run)"
    bw = bk.copy_bandwidth(args.device, nbytes=(2 << 30) if not smoke else (1 << 20))
    lines = [f"# ring_sweep, {datetime.date.today()}, {name}, torch {torch.__version__}, triton {triton.__version__}",
             "", f"n = {args.n}, bf16; copy bandwidth {bw / 1e9:.0f} GB/s"]
    print("\n".join(lines), flush=True)
    for t, c in shapes:
        sweep_shape(t, c, args, bw, lines)
    return 0


def sweep_shape(t: int, c: int, args, bw: float, lines: list[str]) -> None:
    """One shape's table, appended to ``lines`` (and the file rewritten) row by row: a hung or killed run keeps
    what came before."""
    inp = bk.make_inputs(t, args.n, c, torch.bfloat16, args.device)
    lines += ["", f"T = {t}, C = {c}", "", "| row | round | config | us | eff | Gluon kernels that ran |",
              "|---|---|---|---|---|---|"]
    print("\n".join(lines[-5:]), flush=True)
    rows = {f"{case.kernel} {case.direction}": case for case in bk.cases(inp)}
    broken = set()
    for rnd in range(args.rounds):
        for row in args.rows:
            case = rows[row]
            for variant in [None] + VARIANTS[row]:
                what = "default" if variant is None else label(variant)
                if (row, what) in broken:
                    continue
                try:
                    us, ran = timed(case, variant)
                    cell = f"{us:.1f} | {100 * case.nbytes / (us * 1e-6) / bw:.1f} % | {ran}"
                except Exception as exc:  # a depth that does not fit, a build that fails: say so, go on
                    broken.add((row, what))
                    cell = f"not run: {type(exc).__name__}: {str(exc)[:120]} | | "
                lines.append(f"| {row} | {rnd} | {what} | {cell} |")
                print(lines[-1], flush=True)
                if args.out:
                    os.makedirs(args.out, exist_ok=True)
                    with open(os.path.join(args.out, "ring_sweep.md"), "w") as f:
                        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
