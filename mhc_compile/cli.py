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
        results = train_compare(steps=args.steps, n=args.n, d=args.d, layers=args.layers, batch=args.batch,
                                seq=args.seq, lr=args.lr, inner_backend=args.inner_backend, seed=args.seed,
                                log_every=args.log_every)
    print()
    print(summarize(results))
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
    train.add_argument("--inner-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                       help="what compiles the rest of the graph (inductor: the product; aot_eager: fast to start)")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
