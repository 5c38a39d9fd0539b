"""Command-line entry point: `libmoe <command>`. Thin: parses arguments, calls library functions."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_algorithms(args: argparse.Namespace) -> None:
    from .moe import REGISTRY

    width = max(map(len, REGISTRY))
    for name, spec in REGISTRY.items():
        print(f"{name:<{width}}  {spec.description}")


def _cmd_bench(args: argparse.Namespace) -> None:
    """Placeholder for the full benchmark: a few training steps of one MoE layer per algorithm."""
    from .moe.smoke import smoke_train

    algorithms = args.algorithms.split(",") if args.algorithms else None
    print("libmoe bench (placeholder until the full benchmark lands): "
          f"{args.steps} training steps of one MoE layer per algorithm on a toy regression task")
    print(f"{'algorithm':<18}{'loss start':>12}{'loss end':>12}{'ms/step':>10}")
    start = time.perf_counter()
    for row in smoke_train(algorithms, steps=args.steps, seed=args.seed):
        print(f"{row['algorithm']:<18}{row['loss_start']:>12.4f}{row['loss_end']:>12.4f}"
              f"{row['ms_per_step']:>10.1f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("algorithms", help="list the registered MoE algorithms")
    p.set_defaults(func=_cmd_algorithms)
    p = sub.add_parser("bench", help="compare MoE algorithms (placeholder: tiny training steps)")
    p.add_argument("--algorithms", default=None, help="comma-separated names (default: all)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"libmoe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
