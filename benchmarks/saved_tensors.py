"""What a compiled training step's forward saves for backward, by shape: the residual stack vs backend="mhc".

memory_peak.py says what is alive at the step's peak; this says which of those tensors the forward handed to
the backward (``torch.autograd.graph.saved_tensors_hooks`` around the compiled call), and the recompute blocks
the backend chose, so that a stream kept by the partition can be told from one kept by the allocator. Shapes
are printed in units of C (``n x C`` is one widened stream). Runs on CUDA (bench_training's stack, bf16) or,
with ``--cpu`` and small sizes, on the CPU.

    PYTHONPATH=. python benchmarks/saved_tensors.py [--d 4096] [--seq 2048] [--batch 4] [--cpu]
                                                    [--options fuse=True recompute=auto ...]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mhc_compile  # noqa: E402
import mhc_compile.passes.recompute as recompute_pass  # noqa: E402
from benchmarks.bench_training import Stack  # noqa: E402


def _value(v: str):
    return int(v) if v.isdigit() else {"True": True, "False": False}.get(v, v)


def saved_by_shape(fn, x) -> collections.Counter:
    shapes: collections.Counter = collections.Counter()

    def pack(t):
        shapes[(tuple(t.shape), str(t.dtype).removeprefix("torch."))] += 1
        return t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x)
    out.float().sum().backward()
    return shapes


def describe(shapes: collections.Counter, d: int, tokens: int, elem: int) -> list[str]:
    unit = tokens * d * elem

    def nbytes(key) -> int:
        shape, dtype = key
        return math.prod(shape) * getattr(torch, dtype).itemsize

    lines = [f"  {count:3d} x {str(list(key[0])):>24} {key[1]:9s} {nbytes(key) / unit:8.3f} units each"
             for key, count in sorted(shapes.items(), key=lambda kv: -kv[1] * nbytes(kv[0]))]
    total = sum(count * nbytes(key) for key, count in shapes.items())
    return [f"  saved: {total / unit:.2f} units (unit = T x C x {elem} B)"] + lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--options", nargs="*", default=[], help="backend options as k=v, one run each besides the default")
    args = ap.parse_args()
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    blocks: list = []
    apply = recompute_pass.apply

    def recording_apply(*a, **k):
        out = apply(*a, **k)
        blocks.append([len(b) for b in out])
        return out

    recompute_pass.apply = recording_apply
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d, device=device, dtype=dtype, requires_grad=True)
    tokens, elem = args.batch * args.seq, x.element_size()
    lines = [f"# saved for backward: {args.layers} layers, d = {args.d}, {args.batch} x {args.seq} tokens, "
             f"{dtype}, {device}; torch {torch.__version__}"]
    residual = torch.compile(Stack(args.d, args.layers).to(device, dtype))
    lines.append("== residual (Inductor)")
    lines += describe(saved_by_shape(residual, x), args.d, tokens, elem)
    for opts in [{}] + [dict(kv.split("=", 1) for kv in spec.split(",")) for spec in args.options]:
        opts = {k: _value(v) for k, v in opts.items()}
        torch._dynamo.reset()
        blocks.clear()
        m = Stack(args.d, args.layers).to(device, dtype)
        mhc_compile.prepare(m, x.detach(), n=4)
        fn = torch.compile(m, backend="mhc", options={"n": 4, **opts})
        shapes = saved_by_shape(fn, x)
        lines.append(f"== backend=mhc {opts or ''}: recompute blocks {blocks}")
        lines += describe(shapes, args.d, tokens, elem)
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"saved_tensors_{args.d}.txt"), "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
