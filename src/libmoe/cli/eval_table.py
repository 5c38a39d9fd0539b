"""`libmoe eval-table`: the paper's comparison table of several models' results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..eval.results import results_path
from ..eval.table import comparison_csv, comparison_markdown, comparison_rows, read_results
from ..files import write_text


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval-table", help="the paper's comparison table (scores, AVG, AVG rank) of several models",
        description="Build the paper-style comparison table (Table 2: PPL, per-task scores in %%, "
        "AVG, AVG rank) from `libmoe eval` or lm_eval results files. Prints Markdown (or CSV).",
    )
    p.add_argument("results", nargs="+", help="results JSON files, one per model")
    p.add_argument("--names", default=None, help="comma-separated model names (default: each "
                   "model's directory name)")
    p.add_argument("--tasks", default=None, help="columns, comma-separated (default: every task "
                   "present, in the paper's order)")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm", "acc_bytes"],
                   help="score per task where the task has it (else acc); default acc, as the paper")
    p.add_argument("--format", default="md", choices=["md", "csv"], help="what to print")
    p.add_argument("--out", default=None, help="also write OUT.md and OUT.csv")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    models: dict = {}
    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.results):
        raise ValueError(f"--names gives {len(names)} names for {len(args.results)} result files.")
    if args.out:
        results_path(Path(args.out).with_suffix(".md"), ".")  # a file in the way is refused now
    for i, path in enumerate(args.results):
        name, results = read_results(path)
        name = names[i] if names else name
        base, k = name, 2
        while name in models:  # two runs with the same directory name
            name, k = f"{base}-{k}", k + 1
        models[name] = results
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    columns, rows = comparison_rows(models, metric=args.metric, tasks=tasks)
    markdown, table_csv = comparison_markdown(columns, rows), comparison_csv(columns, rows)
    print(table_csv if args.format == "csv" else markdown, end="\n" if args.format == "md" else "")
    if args.out:
        out = Path(args.out)
        write_text(out.with_suffix(".md"), markdown + "\n")
        write_text(out.with_suffix(".csv"), table_csv)
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}", file=sys.stderr)
