"""``mhc-compile`` / ``python -m mhc_compile``: the command line."""

from __future__ import annotations

import argparse
import sys
import warnings


def _train(args: argparse.Namespace) -> int:
    from mhc_compile.demo import summarize, train_compare

    torch_threads(args.threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32.*")
        modes = ("residual", "hc", "mhc") if args.compare else ("residual", "mhc")
        out = args.out or ("mhc_train_out" if args.compare else None)
        results = train_compare(steps=args.steps, n=args.n, d=args.d, layers=args.layers, batch=args.batch,
                                seq=args.seq, lr=args.lr, inner_backend=args.inner_backend, seed=args.seed,
                                log_every=args.log_every, modes=modes, out_dir=out, device=args.device)
    print()
    print(summarize(results))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json
    import os

    from mhc_compile.explain import explain, region_svg
    from mhc_compile.presets import load

    model, inputs = load(args.model)
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    report = explain(model, *inputs, n=args.n, mode=args.mode)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(report.summary() + "\n")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"sites": [vars(s) for s in report.sites], "graph_breaks": report.graph_breaks,
                   "unconverted": report.unconverted, "warnings": report.warnings,
                   "recompute_blocks": report.recompute_blocks}, f, indent=1, default=str)
    for i, (before, after) in enumerate(zip(report.graphs_before, report.graphs_after)):
        for name, text in ((f"graph_{i}_before.py", before), (f"graph_{i}_after.py", after)):
            with open(os.path.join(args.out, name), "w") as f:
                f.write(text)
    for i, gm in enumerate(report.graph_modules):
        if gm is not None:
            with open(os.path.join(args.out, f"graph_{i}_mhc.svg"), "w") as f:
                f.write(region_svg(gm))
    print(f"wrote the report and graphs to {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os
    import runpy

    import torch

    if not torch.cuda.is_available():
        print("mhc-compile bench: no CUDA device here. The benchmarks measure GPU kernels and training steps; "
              "run them on a machine with an NVIDIA GPU (see benchmarks/).")
        return 2
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", args.which + ".py")
    if not os.path.exists(script):
        print(f"mhc-compile bench: {script} not found (the benchmarks ship with the source tree)")
        return 2
    argv = sys.argv
    sys.argv = [script, *args.script_args]  # the script parses its own arguments, not this command's
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:  # the scripts end with sys.exit(main())
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhc-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a small byte-level GPT on the stdlib's sources: plain residual vs backend='mhc'")
    train.add_argument("--steps", type=int, default=60)
    train.add_argument("--n", type=int, default=4, help="number of residual streams")
    train.add_argument("--d", type=int, default=64, help="model width")
    train.add_argument("--layers", type=int, default=4)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--seq", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    train.add_argument("--inner-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                       help="what compiles the rest of the graph (inductor: the product; aot_eager: fast to start)")
    train.add_argument("--compare", action="store_true",
                       help="train plain residual, hc and mhc side by side; write loss curves and gain plots")
    train.add_argument("--out", default=None, help="output folder for --compare (default mhc_train_out)")
    train.set_defaults(func=_train)

    inspect = sub.add_parser("inspect", help="report and pictures of what the backend does to a model")
    inspect.add_argument("model", help="a preset (gpt2, llama, bert, vit, gpt_neox, tinygpt) or pkg.module:factory")
    inspect.add_argument("--n", type=int, default=4)
    inspect.add_argument("--mode", default="mhc", choices=["mhc", "hc", "residual"])
    inspect.add_argument("--out", default="mhc_inspect", help="output folder")
    inspect.set_defaults(func=_inspect)

    bench = sub.add_parser("bench", help="GPU benchmarks (needs CUDA)")
    bench.add_argument("which", nargs="?", default="bench_kernels", help="benchmarks/<which>.py")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments, e.g. --stages")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
