"""`libmoe bench`: the paper's fair comparison: train every algorithm, evaluate, analyse, tables."""

from __future__ import annotations

import argparse

from ..bench import BENCH_PRESETS, PAPER_ALGORITHMS, REGIMES, failure_line, markdown, run_bench, score_table
from ..bench.placement import Rendezvous
from ..environment import comparison_lines, environment_summary
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
                   help="another bench output: the report and results.json set its expert change "
                   "rates beside this bench's (regime_comparison; a bench of the other regime), and "
                   "say where its environment differs from this one's (data hashes, Python, torch, "
                   "libmoe, CPU/GPU, threads, config: environment_comparison) and what that means for "
                   "comparing their numbers")
    p.add_argument("--algorithms", default=None,
                   help=f"comma-separated (default: {','.join(PAPER_ALGORITHMS)})")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per algorithm (0..N-1; default: the preset's, 1; 3 for claims)")
    p.add_argument("--data", default=None, help="training corpus for every run (default: the "
                   "training preset's, the embedded corpus)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks (default: the "
                   "preset's, those whose data is in --data-dir)")
    p.add_argument("--data-dir", default=None, help="local task files (JSONL in the Hub schemas)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, in parallel worker "
                   "processes. On a GPU machine: default the visible GPUs (CUDA_VISIBLE_DEVICES "
                   "respected) divided by the GPUs per job, and each worker gets its own GPU(s) as "
                   "its CUDA_VISIBLE_DEVICES; more jobs than the GPUs hold is refused. On a "
                   "CPU-only machine: default the preset's (2 for default; 1 with --launcher "
                   "torchrun) and the CPU threads are split between the workers")
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "slurm"],
                   help="local: each run trains in a worker process; torchrun: each run trains "
                   "under torchrun (--nproc-per-node processes, --nnodes nodes); slurm: each run is a "
                   "Slurm job through submitit (torchrun inside the job for several GPUs or nodes)")
    p.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, default=1,
                   help="processes (GPUs) per node of each training run with --launcher torchrun "
                   "or slurm (default 1: the run trains in its worker process)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes per training run (--launcher torchrun: "
                   "run this same command on every node with its --node-rank and one "
                   "--rdzv-endpoint; --launcher slurm: nodes per job). Default 1 (torchrun --standalone)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank with --nnodes > 1 under "
                   "--launcher torchrun: 0 runs the study (data, evaluation, tables), the others only "
                   "join each run's training")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST[:PORT]",
                   help="torchrun rendezvous with --nnodes > 1: node 0's address (port default 29400; "
                   "run i of the study meets at PORT+i, so parallel runs never share one)")
    p.add_argument("--rdzv-id", default="libmoe-bench", help="torchrun rendezvous id prefix (each run "
                   "adds its name); give each study running at once its own")
    p.add_argument("--rdzv-backend", default="c10d", help="torchrun rendezvous backend (default c10d)")
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
                        studies=args.studies, log=log, overwrite=args.overwrite,
                        rendezvous=Rendezvous(nnodes=args.nnodes, endpoint=args.rdzv_endpoint,
                                              rdzv_id=args.rdzv_id, backend=args.rdzv_backend,
                                              node_rank=args.node_rank))
    if "node_rank" in results:  # a node other than node 0: node 0 writes the tables
        failed = [r["name"] for r in results["runs"] if r.get("status") != "ok"]
        log(f"bench: node {results['node_rank']} done; the tables are node 0's ({args.out})")
        if failed:
            raise WorkFailed(f"this node's part of {len(failed)} run(s) failed: {', '.join(failed)}")
        return
    print(markdown(score_table(results)))  # as the study's regime lays its scores out
    # what the numbers depend on besides the config: the corpus (the embedded one is this Python's)
    print(f"\n{environment_summary(results.get('environment'))}")
    if results.get("environment_comparison"):
        print("\n".join(comparison_lines(results["environment_comparison"])))
    failed = failure_line(results, args.out)
    if failed:  # the tables are written; the exit code and the last line say what failed
        raise WorkFailed(failed)
