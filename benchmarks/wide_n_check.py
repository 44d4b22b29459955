"""Every op at n past 4 on a GPU, against the reference: session 29 found that bf16 ``proj`` did not build at
n = 11, 12 and 16 (fixed, and checked there on the CPU only: sm_90a builds and the interpreter).

For each n and stream dtype, every op of ``launch_check.cases`` (triton_ops' and triton_fused's, forward and
backward) runs on the Triton kernels, then again with those modules' ops swapped for ``kernels/reference.py``'s on
the same inputs. Each output is held to the largest entry of the reference's: relative error <= 2e-2 for bf16
streams, 1e-4 for fp32 (the criterion of tests/test_triton_fused.py). Fallback warnings are listed (at n >= 11 the
one-pass proj backward does not fit an H100's shared memory and the dx + dphi pair runs).

    PYTHONPATH=. python benchmarks/wide_n_check.py [--n 5 8 11 12 16] [--t 1000] [--c 1024]

Writes $OUT/wide_n_check.md (or ./wide_n_check.md) and prints it; exit status 1 on a mismatch or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import warnings

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.launch_check import cases  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_fused as tf  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@contextlib.contextmanager
def reference_ops():
    """triton_ops' and triton_fused's ops (those ``cases`` calls) replaced by the reference's of the same name."""
    saved = []
    for module in (tk, tf):
        for name in [k for k in vars(module) if callable(getattr(ref, k, None)) and not k.startswith("_")]:
            if name in ("configure", "tuning", "launch"):
                continue
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, getattr(ref, name))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def worst_error(got, want) -> float:
    """The largest |got - want| over the largest |want|, over the outputs of one op."""
    worst = 0.0
    for a, b in zip(_flat(got), _flat(want)):
        if b.numel():
            err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)
            worst = max(worst, float(err))
    return worst


def check(dev: str, ns, dtypes, t: int, c: int) -> tuple[list[str], int, list[str]]:
    """(table rows, mismatches or errors, fallback warnings)."""
    rows, bad, fallbacks = [], 0, set()
    for n in ns:
        for dtype in dtypes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    calls = cases(t, n, c, dtype, dev)
                    got = {name: thunk() for name, thunk in calls}
                    with reference_ops():
                        want = {name: thunk() for name, thunk in calls}
                except Exception as e:  # noqa: BLE001 - a build or launch error is this check's finding
                    rows.append(f"| {n} | {str(dtype)[6:]} | all | {type(e).__name__}: {str(e)[:200]} | ERROR |")
                    bad += 1
                    continue
            fallbacks |= {f"n = {n}, {str(dtype)[6:]}: {w.message}"[:240] for w in caught if "mhc" in str(w.message)}
            for name in got:
                err = worst_error(got[name], want[name])
                ok = err <= TOL[dtype]
                bad += not ok
                rows.append(f"| {n} | {str(dtype)[6:]} | {name} | {err:.2e} | {'ok' if ok else 'MISMATCH'} |")
    return rows, bad, sorted(fallbacks)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="*", default=[5, 8, 11, 12, 16])
    ap.add_argument("--t", type=int, default=1000)
    ap.add_argument("--c", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("wide_n_check: needs a CUDA device", file=sys.stderr)
        return 2
    rows, bad, fallbacks = check("cuda", args.n, (torch.bfloat16, torch.float32), args.t, args.c)
    lines = [f"# Every op at wide n against the reference — {datetime.date.today()}", "",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}",
             f"- T = {args.t}, C = {args.c}; tolerance (largest error over the largest reference entry): bf16 "
             f"{TOL[torch.bfloat16]}, fp32 {TOL[torch.float32]}", "",
             "| n | dtype | op | worst relative error | result |", "|---|---|---|---|---|", *rows, "",
             f"mismatches or errors: {bad}", "", "Fallbacks:", "", *[f"- {f}" for f in fallbacks or ["none"]], ""]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(os.environ.get("OUT") or ".", "wide_n_check.md"), "w") as f:
        f.write(text)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
