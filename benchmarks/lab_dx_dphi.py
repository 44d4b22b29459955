"""Kernel lab: proj's folded backward (dx and dphi) in ONE pass over X, against the pair of kernels it replaced.

The pair (``triton_proj._proj_dx_kernel`` then ``_proj_dphi_kernel``, still the path of non-bf16 streams and
``configure("proj_dx_dphi", enabled=False)``) reads X twice (~0.9 ms a training step at 32768 tokens x C = 4096,
n = 4 on an H100, where it ran at 68-69 % of the byte floor, which counts X once). ``_proj_dx_dphi_kernel``
(mhc_compile/kernels/triton_proj_bwd.py, swept here) reads each X tile once and feeds it to both:

    program = (K block of BK flat columns k = i * C + c, token split); for each [BT, BK] tile of its tokens:
      dx tile   = dp_tile @ phi_slab + 2 dsq x + h_pre[t, i] dout[t, c] (+ acc)   -> stored, rounded once
      dphi_acc += A_tile @ x_tile        A = dp^T as bf16 hi rows then lo rows, [2 MP, BT]
    at the end: the [MP, BK] partial of dphi^T (hi + lo halves summed) -> dphi[split], summed on the host.

Why this shape (the earlier fused try, lab-2026-11-24-h100.md "fuse_dphi", spilled at every tile):
* the X tile is the dphi dot's B operand as loaded ([BT, BK], BK contiguous), never transposed (the earlier
  try fed tl.trans(x) and paid a layout conversion of a [BT, BK] tile a step); X, dp and A are the operands
  of the two dots, so Triton's pipeliner prefetches all three num_stages - 1 tiles ahead;
* 16 warps by default: the [2 MP, BK] = [64, 128] fp32 accumulator and the dx tile are 16 registers a thread
  each (the sm_90a compile of the default tile: 123 registers, no spills; ``--ptxas`` lists every tile);
* the steady state of the token loop reads whole tiles unmasked (the ragged tail tile runs once after it).
  In a first version (its sm_90a IR) A's row mask, which runs along A's contiguous token axis, cut its loads
  to 2 bytes, too narrow for cp.async, so the pipeliner left A synchronous; and X (pipeline stage 0) shared
  one [BT, BK] int64 offset and mask tensor with acc and the dx store (stage 2), which the pipeliner then
  carried across stages in registers;
* A's row stride is padded to 16 elements for the same reason: its rows then load as 16-byte vectors;
* token splits are few (plan_splits: whole waves of programs, weighed against the bytes of the fp32 dphi
  partials, splits x K x M x 4, written and summed on the host).

Knobs the sweep turns: BT, BK, warps, stages, splits, maxnreg (a register cap, to fit two programs on an SM),
pipeline_all (the token loop a tl.range with its own num_stages, so the pipeliner stages dout and acc too),
tma (X, dout, acc and dX as TMA blocks: swizzled shared tiles read in the MMA layout, dX stored from one).
The constexpr variants timed and removed (PREFETCH, DX_HI_LO, XT_A, SIDE_ACC, DIAG) are listed in
kernels/triton_proj_bwd.py and measured in results/session6- and session8-2026-12-02-h200.md. The "pair" rows
are the dx + dphi kernel pair (``configure("proj_dx_dphi", enabled=False)``), which reads X twice (before
session 8 those rows timed ``proj_pre_backward``, which by then took the one-pass kernel itself).

Measured on an H200 (benchmarks/results/lab-dx-dphi-2026-12-02-h200.md): the 16-warp default tile was no faster
than the pair; the fastest tile was 64 x 128, 8 warps, 2 stages, maxnreg 128 (two programs an SM, 34 registers
spilled): 1150.6 us against the pair's 1432.0 at 32768 x 4096 (71 % against 57 % of copy bandwidth), 11-20 %
faster than the pair at every shape timed, still short of 85 %. That tile, with PIPELINE_ALL (session 8, 82 %)
and TMA (session 11, 85 %: 971.4 against 995.5 us in lab-dx-dphi-2026-12-02-h200-s11-call1.md), is what bf16
streams now run (the kernel lives in mhc_compile/kernels/triton_proj_bwd.py; this file sweeps its knobs).

    PYTHONPATH=. OUT=DIR python benchmarks/lab_dx_dphi.py              # GPU: checks, sweep, DIR/lab_dx_dphi.md
    PYTHONPATH=. OUT=DIR python benchmarks/lab_dx_dphi.py --no-acc     # the same without acc (enter's backward)
    TRITON_INTERPRET=1 python benchmarks/lab_dx_dphi.py --smoke        # CPU: value checks on tiny shapes
    python benchmarks/lab_dx_dphi.py --ptxas [--no-acc] [--rows ..]    # no GPU: sm_90a registers / spills
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_kernels as bkm  # noqa: E402
from benchmarks import sm90_build  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_proj as tproj  # noqa: E402
from mhc_compile.kernels.triton_proj_bwd import (  # noqa: E402
    LAST_COMPILED, _proj_dx_dphi_kernel, proj_pre_backward_fused)


# ---------------------------------------------------------------------------------------------
# the lab: value checks, the timed sweep, the table
# ---------------------------------------------------------------------------------------------
def _cfg(bt, bk, warps, stages, **more):
    return dict(bt=bt, bk=bk, num_warps=warps, num_stages=stages, **more)


MAIN = _cfg(64, 128, 16, 3)
# Per tile: registers a thread, stack bytes (spills), shared memory, and the programs an H100 SM then holds, from
# this machine's sm_90a build (``--ptxas``, Triton 3.9; the GPU's Triton may differ). 'occupancy' is what the
# split planner assumes (plan_splits); the grid is (K blocks, token splits).
SWEEP = [
    MAIN,                                                           # 123, 0, 112 KB: 1 (16 warps)
    _cfg(64, 128, 16, 2),                                           # 124, 0, 80 KB: 1
    _cfg(64, 128, 16, 4),                                           # 128, 0, 144 KB: 1
    _cfg(64, 128, 16, 3, splits=4),                                 # 4x the programs, 4x shorter loops
    _cfg(64, 128, 8, 3),                                            # 248, 0, 112 KB: 1 (8 warps)
    _cfg(64, 128, 8, 2, maxnreg=128, occupancy=2),                  # 128, 280, 80 KB: 2 (the default)
    _cfg(32, 128, 8, 3),                                            # 221, 0, 56 KB: 1
    _cfg(32, 128, 16, 3),                                           # 128, 8, 60 KB: 1
    _cfg(64, 64, 8, 3, occupancy=2),                                # 124, 0, 80 KB: 2 (16 warps)
    _cfg(64, 64, 8, 2, occupancy=2),                                # 126, 0, 56 KB: 2
    _cfg(64, 64, 8, 4),                                             # 144, 0, 104 KB: 1
    _cfg(64, 64, 4, 3, occupancy=2),                                # 252, 0, 80 KB: 2
    _cfg(32, 64, 4, 3, occupancy=2),                                # 214, 0, 38 KB: 2
    _cfg(128, 64, 16, 3),                                           # 126, 0, 152 KB: 1
    # pipeline_all: every load of the token loop staged through shared memory (dout and acc too)
    _cfg(64, 128, 8, 2, maxnreg=128, occupancy=2, pipeline_all=True),
    _cfg(64, 128, 8, 2, pipeline_all=True),
    _cfg(64, 128, 16, 2, pipeline_all=True),
    _cfg(64, 64, 8, 2, occupancy=2, pipeline_all=True),
    _cfg(64, 64, 8, 3, occupancy=2, pipeline_all=True),
    _cfg(64, 64, 8, 2, maxnreg=128, occupancy=2, pipeline_all=True),
    _cfg(32, 128, 8, 2, occupancy=2, pipeline_all=True),
    _cfg(32, 128, 8, 3, pipeline_all=True),
    _cfg(64, 64, 4, 3, occupancy=2, pipeline_all=True),
    # tma: X, dout, acc and dX through TMA descriptors (swizzled shared tiles, no layout change before the store)
    _cfg(64, 128, 8, 2, maxnreg=128, occupancy=2, pipeline_all=True, tma=True),  # 128, 200, 113 KB: 2
    _cfg(64, 64, 8, 3, maxnreg=128, occupancy=2, pipeline_all=True, tma=True),   # 128, 0, 113 KB: 2
    _cfg(64, 128, 8, 2, pipeline_all=True, tma=True),                            # 238, 0, 113 KB: 1
    _cfg(64, 128, 8, 3, maxnreg=128, pipeline_all=True, tma=True),               # 128, 192, 177 KB: 1
    _cfg(64, 64, 4, 3, occupancy=2, pipeline_all=True, tma=True),                # 255, 0, 113 KB: 2
    _cfg(128, 64, 8, 2, maxnreg=128, occupancy=2, pipeline_all=True, tma=True),
    _cfg(64, 128, 8, 3, maxnreg=128, occupancy=2, pipeline_all=True, tma=True),
    # session 20: in Nsight Compute the shipped tile's warps spend 35 % of their stall samples on one TMA barrier
    # wait (the tile's loads not yet landed). Half the tokens a tile, for more stages in the same shared memory,
    # ran slower on an H200 at 32768 x 4096: with acc 1060.0 / 2109.0 us against 984.2 for the shipped tile, without
    # acc 966.4 / 1035.8 against 815.8 (results/session20-2026-12-03-h200/call8-*.md)
    _cfg(32, 128, 8, 3, maxnreg=128, occupancy=2, pipeline_all=True, tma=True),
    _cfg(32, 128, 8, 4, maxnreg=128, occupancy=2, pipeline_all=True, tma=True),
    _cfg(32, 128, 4, 4, occupancy=2, pipeline_all=True, tma=True),
]
# value checks on the GPU: odd token counts (a ragged tail tile), n = 1 / 3 / 4, bf16 and fp32, ONE_STREAM and
# the gather path (C = 1000 is no multiple of BK); the variants only on the first two shapes
CHECK_SHAPES = [(1000, 4, 768, torch.bfloat16), (1000, 4, 4096, torch.bfloat16), (1000, 4, 768, torch.float32),
                (1000, 1, 768, torch.bfloat16), (1000, 3, 768, torch.float32), (1000, 3, 1000, torch.bfloat16)]
CHECK_VARIANTS = [_cfg(32, 64, 4, 3, splits=3), _cfg(64, 128, 8, 2, maxnreg=128),
                  _cfg(64, 64, 8, 3, pipeline_all=True), _cfg(64, 128, 8, 2, maxnreg=128, pipeline_all=True, tma=True)]
SMOKE_SHAPES = [(37, 4, 64, torch.bfloat16), (37, 3, 24, torch.float32), (37, 1, 64, torch.bfloat16)]
# error budgets, max |err| / max |ref|: one bf16 rounding of dx (2^-8) plus tf32 products; hi/lo dphi ~2^-16 per
# product summed over 1000 tokens; fp32 streams multiply exactly
BUDGET = {torch.bfloat16: (1e-2, 1e-3), torch.float32: (1e-5, 1e-5)}


def make(t, n, c, device, dtype=torch.bfloat16, seed=0):
    """Inputs of the folded backward as kernel_lab.make draws them, in any stream dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    m = ref.num_coeffs(n)

    def rn(*s, dt=torch.float32, scale=1.0):
        return (scale * torch.randn(*s, generator=g, device=device)).to(dt)

    return dict(x=rn(t, n, c, dt=dtype), phi=rn(n * c, m, scale=(n * c) ** -0.5), dp=rn(t, m),
                dsq=rn(t, scale=1e-3), h=torch.rand(t, n, generator=g, device=device),
                g=rn(t, c, dt=dtype), acc=rn(t, n, c, dt=dtype))


def _args(d):
    return d["x"], d["phi"], d["dp"], d["dsq"], d["h"], d["g"], d["acc"]


def rel_err(a, e, rows=4096):
    """max |a - e| / max |e| in fp32, a chunk of tokens at a time (the stream tensors are GBs)."""
    num = den = 0.0
    for i in range(0, a.shape[0], rows):
        ai, ei = a[i:i + rows].float(), e[i:i + rows].float()
        num = max(num, (ai - ei).abs().max().item())
        den = max(den, ei.abs().max().item())
    return num / (den or 1.0)


def _label(cfg):
    """'64x128 w8 s2 maxnreg=128 occ2': BT x BK, warps, stages, then the other options."""
    keys = {"num_warps": "w", "num_stages": "s", "occupancy": "occ"}
    parts = [f"{cfg['bt']}x{cfg['bk']}"]
    for k, v in cfg.items():
        if k not in ("bt", "bk"):
            parts.append(keys[k] + str(v) if k in keys else k if v is True else f"{k}={v}")
    return " ".join(parts)


def _occupancy(regs, smem, warps):
    """Programs an H100 SM holds: 64K registers (granted per warp in units of 256), 228 KB shared memory
    (1 KB reserved a program), 64 warps."""
    by_regs = 65536 // (triton.cdiv(max(regs, 1) * 32, 256) * 256 * warps)
    by_smem = (228 * 1024) // (smem + 1024)
    return max(0, min(by_regs, by_smem, 64 // warps, 32))


def _compiled_stats(ck):
    """'regs/spills', 'smem KB', 'programs an SM' of a CompiledKernel, or '-' where Triton does not say."""
    try:
        regs, spills, smem = ck.n_regs, ck.n_spills, ck.metadata.shared
        warps = ck.metadata.num_warps
    except Exception:
        return "-", "-", "-"
    return f"{regs}/{spills}", f"{smem / 1024:.0f}", str(_occupancy(regs, smem, warps))


class _Recorder:
    """Records the CompiledKernel each launch of some jitted kernels returns (the pair's registers)."""

    def __init__(self, jit_fns):
        self.fns, self.seen = jit_fns, {}

    def __enter__(self):
        for f in self.fns:
            def run(*a, _orig=f.run, _f=f, **kw):
                ck = _orig(*a, **kw)
                self.seen[_f] = ck
                return ck
            f.run = run  # the instance attribute shadows JITFunction.run, which kernel[grid](...) calls
        return self

    def __exit__(self, *exc):
        for f in self.fns:
            f.__dict__.pop("run", None)


def _pair(*args):
    """The dx + dphi kernel pair (X read twice): triton_ops' bf16 path takes the one-pass kernel unless told not to."""
    with tk.tuning("proj_dx_dphi", enabled=False):
        return tk.proj_pre_backward(*args)


def _pair_stats(args):
    fns = [tproj._proj_dx_kernel, tproj._proj_dphi_kernel]
    try:
        with _Recorder(fns) as rec:
            _pair(*args)
        stats = [_compiled_stats(rec.seen[f]) for f in fns if rec.seen.get(f) is not None]
        return " + ".join(s[0] for s in stats) or "-", " + ".join(s[1] for s in stats) or "-", \
            " + ".join(s[2] for s in stats) or "-"
    except Exception:
        return "-", "-", "-"


def check_rows(device, shapes, variants):
    """(rows, all_ok): the fused kernel against the float64 reference and against the current pair."""
    rows, ok = [], True
    for i, (t, n, c, dtype) in enumerate(shapes):
        d = make(t, n, c, device, dtype, seed=1)
        x, phi, dp, dsq, h, g, acc = _args(d)
        want = ref.proj_pre_backward(*(v.double() for v in (x, phi, dp, dsq, h, g, acc)))
        pair = _pair(x, phi, dp, dsq, h, g, acc)
        budget = BUDGET[dtype]
        for cfg in [MAIN] + (variants if i < 2 else []):
            label = f"| {t}x{n}x{c} {str(dtype)[6:]} | {_label(cfg)} |"
            try:
                got = proj_pre_backward_fused(*_args(d), **cfg)
                errs = [rel_err(a, e) for a, e in zip(got, want)]
                vs_pair = [rel_err(a, e) for a, e in zip(got, pair)]
                good = all(a.dtype == e.dtype and a.shape == e.shape for a, e in zip(got, pair)) and \
                    errs[0] <= budget[0] and errs[1] <= budget[1]
                rows.append(f"{label} {errs[0]:.1e} / {errs[1]:.1e} | {vs_pair[0]:.1e} / {vs_pair[1]:.1e} | "
                            f"{'ok' if good else 'FAIL'} |")
            except Exception as exc:  # a config that does not compile or fit is a row, not a crash
                good = False
                rows.append(f"{label} {type(exc).__name__}: {str(exc)[:100]} | | FAIL |")
            ok &= good
            print(rows[-1], flush=True)
        del d, want, pair
    return rows, ok


def nbytes_of(t, n, c, m, with_acc=True):
    """Bytes the folded backward must move (kernel_lab.bwd_rows' count): X, acc (if any) and dX once each, dout,
    the per-token coefficients (dp, dsq, h_pre: fp32), phi read and dphi written (fp32)."""
    return (3 if with_acc else 2) * t * n * c * 2 + t * c * 2 + t * (m + 1 + n) * 4 + 2 * n * c * m * 4


TIMED = []  # {"t", "c", "cfg", "us"} of every timed fused row: lab_dx_dphi.json, for scripts that pick a tile


def sweep_rows(t, n, c, device, bw, configs, deadline, with_acc=True):
    """Timed rows at one shape; ``with_acc`` False: no stream-gradient accumulator (``enter``'s backward)."""
    d = make(t, n, c, device)
    args = _args(d)
    if not with_acc:
        args = args[:-1] + (None,)
    m = d["phi"].shape[1]
    nbytes = nbytes_of(t, n, c, m, with_acc)
    shape = f"T={t}, C={c}, n={n}{'' if with_acc else ', no acc'}"
    head = f"| **{shape}** | bytes {nbytes / 1e9:.2f} GB: floor {nbytes / bw * 1e6:.0f} us, " \
           f"85 % target {nbytes / (0.85 * bw) * 1e6:.0f} us | | | | | | | |"
    rows = [head]
    print(head, flush=True)

    def row(design, tile, us, err, regs, smem, occ, grid):
        eff = nbytes / (us * 1e-6) / bw
        rows.append(f"| {design} | {tile} | {us:.1f} | {eff:.0%} | {err} | {regs} | {smem} | {occ} | {grid} |")
        print(rows[-1], flush=True)

    expected = _pair(*args)
    us = bkm.bench_us(lambda: _pair(*args))
    row("pair: _proj_dx + _proj_dphi", "default", us, "-", *_pair_stats(args), "-")
    for cfg in configs:
        if time.time() > deadline:
            rows.append(f"| fused | {_label(cfg)} | skipped: time budget spent | | | | | | |")
            print(rows[-1], flush=True)
            continue
        try:
            got = proj_pre_backward_fused(*args, **cfg)
            stats = _compiled_stats(LAST_COMPILED.get("kernel")) if device != "cpu" else ("-", "-", "-")
            grid = "x".join(map(str, LAST_COMPILED.get("grid", ()))) or "-"
            err = f"{rel_err(got[0], expected[0]):.1e} / {rel_err(got[1], expected[1]):.1e}"
            us = bkm.bench_us(lambda: proj_pre_backward_fused(*args, **cfg))
        except Exception as exc:  # OutOfResources, a compile error: the config is a row, not a crash
            rows.append(f"| fused | {_label(cfg)} | failed: {type(exc).__name__}: {str(exc)[:90]} | | | | | | |")
            print(rows[-1], flush=True)
            continue
        row("fused", _label(cfg), us, err, *stats, grid)
        TIMED.append(dict(t=t, c=c, cfg=cfg, us=us))
    del d, args, expected
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# --ptxas: registers, spills and shared memory of each sweep config for sm_90a, compiled on this machine
# (no GPU: a stand-in driver names the target; Triton's ptxas builds the cubin, its cuobjdump reads it)
# ---------------------------------------------------------------------------------------------
def build(cfg: dict, n: int = 4, c: int = 4096, with_acc: bool = True, t: int = 8192, arch: int = 90):
    """The compiled ``_proj_dx_dphi_kernel`` that ``proj_pre_backward_fused`` would launch with this tile (TMA
    descriptors, acc or not, as on the GPU), built for sm_<arch> from CPU tensors (dp's hi / lo split before it
    is not built)."""
    from mhc_compile.kernels import triton_proj_bwd as tpb

    m = ref.num_coeffs(n)
    bf16, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    x = torch.zeros(t, n, c, **bf16)
    tile = {k: v for k, v in cfg.items() if k not in ("waves", "occupancy")}
    with sm90_build.builds_of(tpb, _proj_dx_dphi_kernel, arch) as built:
        proj_pre_backward_fused(x, torch.zeros(n * c, m, **f32), torch.zeros(t, m, **f32), torch.zeros(t, **f32),
                                torch.zeros(t, n, **f32), torch.zeros(t, c, **bf16),
                                torch.zeros_like(x) if with_acc else None, **tile)
    return built[0]


def ptxas_rows(configs, n=4, c=4096, arch=90, with_acc=True):
    rows = ["| tile | regs | stack bytes (spills) | smem KB | programs an SM | TMA |", "|---|---|---|---|---|---|"]
    for cfg in configs:
        label = _label(cfg)
        try:
            ck = build(cfg, n, c, with_acc, arch=arch)
            regs, stack = sm90_build.resources(ck, arch)
            smem = ck.metadata.shared
            tma = "yes" if "UTMALDG" in sm90_build.sass(ck, arch) else "no"
            rows.append(f"| {label} | {regs} | {stack} | {smem / 1024:.0f} | "
                        f"{_occupancy(regs, smem, cfg['num_warps'])} | {tma} |")
        except Exception as exc:
            rows.append(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:100]} | | | | |")
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 8192])
    ap.add_argument("--channels", type=int, nargs="+", default=[4096, 7168])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=200.0, help="sweep rows past this many seconds are skipped")
    ap.add_argument("--rows", type=int, nargs="+", help="time only these rows of SWEEP (0-based indices)")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1: value checks on tiny shapes")
    ap.add_argument("--ptxas", action="store_true", help="no GPU: sm_90a registers / spills of the sweep's tiles")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for lab_dx_dphi.md (default $OUT)")
    ap.add_argument("--no-acc", action="store_true", help="time without the stream-gradient accumulator (what "
                    "enter's backward runs)")
    args = ap.parse_args()
    start = time.time()
    if args.ptxas:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("lab_dx_dphi --ptxas: unset TRITON_INTERPRET (it compiles for the GPU)", file=sys.stderr)
            return 2
        configs = SWEEP if args.rows is None else [SWEEP[i] for i in args.rows]
        lines = [f"sm_90a build of the sweep's tiles, C = 4096, n = {args.n}, bf16, "
                 f"{'without' if args.no_acc else 'with'} acc, triton {triton.__version__}",
                 ""] + ptxas_rows(configs, n=args.n, with_acc=not args.no_acc)
        _emit(args.out, "lab_dx_dphi_ptxas.md", lines)
        return 0
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("lab_dx_dphi --smoke: run with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        bkm.SMOKE = True
        device, shapes, tokens, channels = "cpu", SMOKE_SHAPES, [64], [64]
        configs = [MAIN, _cfg(16, 32, 4, 2), _cfg(32, 64, 4, 3, splits=2), _cfg(16, 64, 4, 3, pipeline_all=True),
                   _cfg(16, 64, 4, 2, pipeline_all=True, tma=True)]
    else:
        if not torch.cuda.is_available():
            print("lab_dx_dphi: needs a CUDA device (or --smoke under TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
        device, shapes, tokens, channels, configs = "cuda", CHECK_SHAPES, args.tokens, args.channels, SWEEP
        if args.rows:
            configs = [SWEEP[i] for i in args.rows]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter: timings meaningless)"
    env = [f"- device: {name}", f"- torch {torch.__version__}, triton {triton.__version__}"]
    print("\n".join(env), flush=True)
    check = ["| shape | tile | err vs reference: dx / dphi | vs pair: dx / dphi | |", "|---|---|---|---|---|"]
    rows, ok = check_rows(device, shapes, CHECK_VARIANTS)
    check += rows
    bw = bkm.copy_bandwidth(device)
    env.append(f"- copy bandwidth (2 GiB bf16 device-to-device, read + write): {bw / 1e9:.0f} GB/s")
    table = ["| design | tile | us | eff | rel err vs pair: dx / dphi | regs/spills | smem KB | programs/SM | grid |",
             "|---|---|---|---|---|---|---|---|---|"]

    def report():
        return ["# lab_dx_dphi: dx and dphi of proj's folded backward in one pass over X", ""] + env + [
            f"- eff = bytes / (time x copy bandwidth); bf16 stream, n = {args.n}; time: "
            f"{'wall clock' if device == 'cpu' else 'CUDA-graph GPU time (bench_kernels.bench_us)'}",
            "- regs/spills, smem: the compiled kernel; programs/SM: what registers, shared memory and warps allow",
            f"- wall time of this run: {time.time() - start:.0f} s", "", "## values", ""] + check + [
            "", "## timing", ""] + table

    deadline = start + args.budget_s
    for c in channels:  # the target shape first: compiles happen there, and the time budget ends the least useful
        for t in tokens:
            table += sweep_rows(t, args.n, c, device, bw, configs, deadline, with_acc=not args.no_acc)
            _emit(args.out, "lab_dx_dphi.md", report(), echo=False)  # what is done survives a kill
            _emit(args.out, "lab_dx_dphi.json", [json.dumps(TIMED)], echo=False)
    _emit(args.out, "lab_dx_dphi.md", report())
    return 0 if ok else 1


def _emit(out_dir, name, lines, echo=True):
    text = "\n".join(lines)
    if echo:
        print(text, flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
