"""`libmoe bench`: the paper's fair comparison: train every algorithm, evaluate, analyse, tables."""

from __future__ import annotations

import argparse

from ..bench import BENCH_PRESETS, PAPER_ALGORITHMS, REGIMES, failure_line, markdown, run_bench, score_table
from ..errors import WorkFailed
from ..overrides import parse_override
from .common import add_plugin_option, log, split_list, takes_overrides


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="the paper's fair comparison of MoE algorithms: train, evaluate, analyse, tables",
        description="Train every algorithm (and seed) with one identical config, data order and token "
        "budget; evaluate validation perplexity and every zero-shot task whose data is available; "
        "analyse the routing across runs; write results.json/.md/.csv and report.html into --out. "
        "Finished runs are skipped and interrupted ones resume, so rerunning the command continues a "
        "study. --regime upcycle pretrains one dense model (OUT/source) and upcycles it into every "
        "algorithm before they train.",
    )
    p.add_argument("items", nargs="*", metavar="[section.key=value ...]",
                   help="run-config overrides applied to every run (e.g. train.max_steps=600)")
    p.add_argument("--preset", default=None, help=f"bench preset: {', '.join(BENCH_PRESETS)} "
                   "(default: the regime's, default or upcycle, each about 20 minutes on a 2-core CPU)")
    p.add_argument("--regime", default=None, choices=list(REGIMES), help="; ".join(
                   f"{n}: {r.description}" for n, r in REGIMES.items()) + " (default: the preset's)")
    p.add_argument("--compare", default=None, metavar="OTHER_BENCH_DIR",
                   help="another bench output (of the other regime): the report and results.json "
                   "set its expert change rates beside this bench's (regime_comparison)")
    p.add_argument("--algorithms", default=None,
                   help=f"comma-separated (default: {','.join(PAPER_ALGORITHMS)})")
    p.add_argument("--seeds", type=int, default=1, help="seeds per algorithm (0..N-1; default 1)")
    p.add_argument("--data", default=None, help="training corpus for every run (default: the "
                   "training preset's, the embedded corpus)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks (default: the "
                   "preset's, those whose data is in --data-dir)")
    p.add_argument("--data-dir", default=None, help="local task files (JSONL in the Hub schemas)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel worker processes (the "
                   "CPU threads are split between them; default: the preset's, 2 for default)")
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "slurm"],
                   help="local processes, each training under torchrun --nproc, or Slurm jobs "
                   "through submitit")
    p.add_argument("--nproc", type=int, default=1, help="processes per training run with "
                   "--launcher torchrun")
    p.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                   help="submitit parameter for --launcher slurm (slurm_partition=gpu, "
                   "timeout_min=600, gpus_per_node=1, ...; cluster=local runs the jobs here)")
    p.add_argument("--no-analysis", action="store_true", help="skip the routing analysis")
    p.add_argument("--studies", default=None, metavar="init-std,droptop,temperature",
                   help="the extra studies the paper-findings checks need: init-std (router init "
                   "stds, Fig. 11), droptop (Fig. 5), temperature (Table 7); all or none "
                   "(default: the preset's; the default preset runs all three)")
    p.add_argument("--out", default="bench", help="output directory (default: bench)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs in --out made with another config (and the old tables) "
                   "instead of refusing them; runs with this config are kept and skipped")
    add_plugin_option(p)
    takes_overrides(p)
    p.set_defaults(func=run)


def names(text: str | None) -> list[str] | None:
    """A comma-separated option: None when not given (or empty), else its names (maybe none)."""
    return split_list(text) if text else None


def run(args: argparse.Namespace) -> None:
    algorithms = names(args.algorithms)
    if args.algorithms is not None and not algorithms:  # "" or ",": not "all eight"
        raise ValueError(f"--algorithms {args.algorithms!r} names no algorithm; give comma-separated "
                         "names (e.g. dense,smoe) or leave it out for the paper's eight.")
    slurm = {}
    for item in args.slurm_option or []:
        slurm.update(parse_override(item))
    results = run_bench(args.out, preset=args.preset, algorithms=algorithms,
                        seeds=args.seeds, data=args.data, tasks=names(args.tasks),
                        data_dir=args.data_dir, jobs=args.jobs, launcher=args.launcher,
                        nproc=args.nproc, slurm=slurm, overrides=list(args.items),
                        analysis=not args.no_analysis, regime=args.regime, compare=args.compare,
                        studies=args.studies, log=log, overwrite=args.overwrite)
    print(markdown(score_table(results)))  # as the study's regime lays its scores out
    failed = failure_line(results, args.out)
    if failed:  # the tables are written; the exit code and the last line say what failed
        raise WorkFailed(failed)
