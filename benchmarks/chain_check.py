"""post_res_chain (passes/fold_recompute_chain.py) on a GPU: bit-equal to k post_res calls, and its time beside theirs.

For each shape (n = 4, bf16 streams) and chain (k steps; ``b``: the first stream the embedding broadcast over the n
streams, as a chain head's first recompute block reads it): the chain's k streams against k post_res calls, bit for
bit; then both timed (CUDA graphs, median), each against its own bytes ((n + 1) k + n elements of C a token for the
chain, (2n + 1) k for the calls; a broadcast first stream is one row) over the copy bandwidth measured in the same
run. The bench's d = 7168 step rebuilds two runs a step: 3 steps from the broadcast embedding and 2 from a stored
stream (recompute blocks of 4, 3 and 1 sites).

    PYTHONPATH=. python benchmarks/chain_check.py [--shapes 8192x7168 ...]
    PYTHONPATH=. python benchmarks/chain_check.py --build    # no GPU: the sm_90 builds' float instructions

Writes $OUT/chain_check.md (or ./chain_check.md) and prints it; non-zero if a chain differs from the calls.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mhc_compile.kernels import triton_ops as tk  # noqa: E402

CHAINS = ((3, True), (2, False), (4, False))  # (k, first stream broadcast)


def operands(t: int, n: int, c: int, k: int, broadcast: bool, dev: str, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(t, 1 if broadcast else n, c, generator=g, device=dev).to(dtype)
    x = x.expand(t, n, c) if broadcast else x
    steps = []
    for _ in range(k):
        hr = torch.rand(t, n, n, generator=g, device=dev)
        steps.append((hr / hr.sum(-1, keepdim=True), 2 * torch.rand(t, n, generator=g, device=dev),
                      torch.randn(t, c, generator=g, device=dev).to(dtype)))
    return x, [s[0] for s in steps], [s[1] for s in steps], [s[2] for s in steps]


def calls(x, h_res, h_post, y):
    outs, cur = [], x
    for hr, hp, yk in zip(h_res, h_post, y):
        cur = tk.post_res(cur, hr, hp, yk)
        outs.append(cur)
    return outs


def _bits(v: torch.Tensor) -> torch.Tensor:
    """v's elements as integers of its width: compared, bit for bit, signed zeros too (torch.equal takes -0.0 for
    0.0)."""
    return v.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()])


def differing(t: int, n: int, c: int, k: int, broadcast: bool, dev: str) -> int:
    """Elements of the chain's k streams whose bits differ from the k post_res calls' (0: bit-equal)."""
    args = operands(t, n, c, k, broadcast, dev, seed=t + c + k)
    return sum(int((_bits(a) != _bits(b)).sum()) for a, b in zip(tk.post_res_chain(*args), calls(*args), strict=True))


def check(t: int, n: int, c: int, k: int, broadcast: bool, dev: str) -> bool:
    return differing(t, n, c, k, broadcast, dev) == 0


def float_ops(k: int = 3, t: int = 8192, n: int = 4, c: int = 7168) -> dict[str, dict[str, int]]:
    """The sm_90 builds' float instructions (no GPU: ``benchmarks/sm90_build.py``): post_res's kernel and a k-step
    chain's, which must be k times post_res's, with no FADD (each step an explicit FMA chain, h_post y its only
    product rounded alone). Contracted by the compiler instead, the chain's steps after the first had their own
    FADDs and differed from post_res by an ulp on an H100 (session 49)."""
    from benchmarks.sm90_build import builds_of, opcode_counts, sass
    from mhc_compile.kernels import triton_post_res as tp

    x = torch.empty(t, n, c, dtype=torch.bfloat16)
    hr, hp = [torch.empty(t, n, n)] * k, [torch.empty(t, n)] * k
    y = [torch.empty(t, c, dtype=torch.bfloat16)] * k
    out = {}
    for name, kernel, run in (("post_res", tp._post_res_fwd_kernel, lambda: tp.post_res(x, hr[0], hp[0], y[0])),
                              (f"chain k={k}", tp._post_res_chain_kernel, lambda: tp.post_res_chain(x, hr, hp, y))):
        with builds_of(tp, kernel) as built:
            run()
        out[name] = opcode_counts(sass(built[0]), ("FFMA", "FMUL", "FADD"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["8192x7168", "8192x4096", "32768x4096"])
    ap.add_argument("--build", action="store_true", help="no GPU: the sm_90 builds' float instructions (float_ops)")
    args = ap.parse_args()
    if args.build:
        for name, counts in float_ops().items():
            print(f"{name}: {counts}")
        return 0
    if not torch.cuda.is_available():
        print("chain_check: needs a CUDA device", file=sys.stderr)
        return 2
    from benchmarks.bench_kernels import copy_bandwidth

    dev, n = "cuda", 4
    bw = copy_bandwidth(dev)
    lines = [f"# post_res_chain against post_res calls — {datetime.date.today()}", "",
             f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
             f"copy bandwidth {bw / 1e9:.0f} GB/s", "",
             "| T x C | k (b: broadcast first stream) | bit-equal | chain us (eff) | k post_res us (eff) | saved us |",
             "|---|---|---|---|---|---|"]
    bad = 0
    for shape in args.shapes:
        t, c = (int(v) for v in shape.split("x"))
        for k, broadcast in CHAINS:
            diff = differing(t, n, c, k, broadcast, dev)
            bad += bool(diff)
            x, h_res, h_post, y = operands(t, n, c, k, broadcast, dev)
            first = 1 if broadcast else n
            row = t * c * 2  # bytes of one C-wide bf16 row a token
            chain_bytes = ((n + 1) * k + first) * row
            calls_bytes = ((2 * n + 1) * k - (n - first)) * row
            us_chain = triton.testing.do_bench_cudagraph(lambda: tk.post_res_chain(x, h_res, h_post, y), rep=200) * 1e3
            us_calls = triton.testing.do_bench_cudagraph(lambda: calls(x, h_res, h_post, y), rep=200) * 1e3
            same = "yes" if not diff else f"NO ({diff} elements)"
            lines.append(f"| {t}x{c} | {k}{' b' if broadcast else ''} | {same} | "
                         f"{us_chain:.1f} ({100 * chain_bytes / (us_chain * 1e-6) / bw:.1f} %) | "
                         f"{us_calls:.1f} ({100 * calls_bytes / (us_calls * 1e-6) / bw:.1f} %) | "
                         f"{us_calls - us_chain:.1f} |")
            print(lines[-1], flush=True)
            del x, h_res, h_post, y
    text = "\n".join(lines) + "\n"
    with open(os.path.join(os.environ.get("OUT") or ".", "chain_check.md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
