"""`libmoe analyze`: routing analysis of a run; `libmoe analyze init-std`: the router
initialisation study (parsed as the command analyze-init-std)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..analysis import (
    analyze_run,
    check_analysis,
    init_std_study,
    load_analysis,
    unique_names,
    write_figures_and_report,
)
from ..files import read_json_object
from .common import add_plugin_option, log, takes_overrides, val_tokens


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="routing analysis of a run: metrics.json, figures, report.html",
        description="Routing diagnostics of a trained run (paper Section 5): expert change rate and "
        "router saturation over its checkpoints' traces, allocation and weight entropies (by domain, "
        "and by task with --tasks), router margin, co-activation, expert similarity, load, layer "
        "overlap, and the DropTop and temperature interventions. `libmoe analyze init-std` runs the "
        "router-initialisation study instead.",
    )
    p.add_argument("run", help="a run directory (its checkpoints' traces) or a checkpoint directory")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                   help="more runs to overlay in the figures (their own RUN/analysis is reused when "
                   "current)")
    p.add_argument("--tasks", default=None, help="comma-separated evaluation tasks: routing by task "
                   "(eae_by_task, ewa_by_task) and the interventions' task metrics")
    p.add_argument("--data-dir", default=None, help="local task files (as libmoe eval)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (N >= 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.add_argument("--val-tokens", default="run", help="validation tokens of the interventions' "
                   "val_ppl: 'run' (as training evaluates), 'all' or a count")
    p.add_argument("--no-interventions", action="store_true", help="skip DropTop and temperature")
    p.add_argument("--init-std", default=None, metavar="DIR",
                   help="include an init-std study's results (DIR/init_std.json) in the report")
    p.add_argument("--recompute", action="store_true", help="re-analyse --compare runs")
    p.add_argument("--out", default=None, help="output directory (default RUN/analysis)")
    add_plugin_option(p)
    p.set_defaults(func=run)


def add_init_std_parser(sub) -> None:
    p = sub.add_parser(
        "analyze-init-std", help="router initialisation study (as `libmoe analyze init-std`)",
        description="Train one algorithm (default smoe) with each router init std for N steps and "
        "compare their balance-loss curves (paper Fig. 11). Writes OUT/init_std.json, OUT/figures "
        "and OUT/report.html; runs already finished in OUT are reused.",
    )
    p.add_argument("items", nargs="*", metavar="[section.key=value ...]")
    p.add_argument("--stds", default="0.02,0.04,0.06", help="comma-separated router init stds")
    p.add_argument("--steps", type=int, default=200, help="training steps per std")
    p.add_argument("--early-steps", type=int, default=None,
                   help="window of the early balance-loss summary (default steps / 4)")
    p.add_argument("--preset", default="micro")
    p.add_argument("--algorithm", default="smoe")
    p.add_argument("--data", default=None, help="training data (as libmoe train --data)")
    p.add_argument("--out", required=True, help="study directory")
    add_plugin_option(p)
    takes_overrides(p)
    p.set_defaults(func=run_init_std)


def read_init_std(path_text: str) -> dict:
    """--init-std DIR (or its init_std.json): the study's results."""
    path = Path(path_text)
    path = path / "init_std.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--init-std {path_text}: no init_std.json there; run "
                                "`libmoe analyze init-std --out DIR` first.")
    return read_json_object(path, "run `libmoe analyze init-std --out DIR` again")


def run(args: argparse.Namespace) -> None:
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    tokens = val_tokens(args.val_tokens)
    out = Path(args.out) if args.out else Path(args.run) / "analysis"
    for run_dir in [args.run, *args.compare]:  # every run checked before any is analysed
        check_analysis(run_dir, out if run_dir == args.run else None, tasks, args.data_dir, args.limit,
                       args.batch_size, args.device, tokens)
    init_std = read_init_std(args.init_std) if args.init_std else None

    def analyse(run_dir, out, figures):
        return analyze_run(run_dir, out, tasks, args.data_dir, args.limit, args.batch_size, args.device,
                           not args.no_interventions, tokens, init_std, figures=figures, log=log)

    primary = analyse(args.run, out, figures=not args.compare)
    if not args.compare:
        print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
        return
    results = [primary]
    for run_dir in args.compare:
        cached = None if args.recompute else load_analysis(run_dir)
        if cached is not None:
            log(f"{run_dir}: using {Path(run_dir) / 'analysis' / 'metrics.json'} (--recompute redoes it)")
            results.append(cached)
        else:
            log(f"analysing {run_dir}")
            results.append(analyse(run_dir, None, figures=True))
    report = write_figures_and_report(out, unique_names(results), init_std,
                                      title="libmoe routing analysis: " + ", ".join(
                                          str(r.get("algorithm")) for r in results))
    print(f"wrote {out / 'metrics.json'} and the comparison {report}")


def run_init_std(args: argparse.Namespace) -> None:
    try:
        stds = tuple(float(s) for s in args.stds.split(",") if s.strip())
    except ValueError:
        stds = ()
    if not stds or not all(math.isfinite(s) and s >= 0 for s in stds):
        raise ValueError(f"--stds {args.stds!r}: give comma-separated non-negative router init stds, e.g. "
                         "0.02,0.04,0.06.")
    if args.early_steps is not None and args.early_steps < 1:
        raise ValueError(f"--early-steps {args.early_steps}: give a positive number of steps.")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a directory for the study.")
    init_std_study(args.out, stds, args.steps, args.preset, args.algorithm, args.data,
                   args.early_steps, list(args.items), log=log)
    print(f"wrote {args.out}/init_std.json and {args.out}/report.html")
