"""`libmoe bench`: the paper's fair comparison of MoE algorithms as one command, in any regime.

    from libmoe.bench import run_bench
    results = run_bench("bench/default", preset="default", data_dir="../shared/data/eval")

For each algorithm and seed, one run directory ``OUT/runs/<algorithm>-s<seed>`` is trained the same
way but for the algorithm and the seed, so every algorithm sees the same data order, token budget,
schedule and evaluation. How the runs start and what they are is the regime's
(`libmoe.bench.regimes`: from a random init, upcycled from one dense source run, or a VLM's VIT
from one PFT checkpoint); a regime plans the runs as stages, each stage running after the one
before. Each run is trained, evaluated and timed where it runs (`runner.run_one`), and
`bench_run.json` records its row. The regime then lays out results.json, the tables and
``OUT/report.html``; the paper's findings are checked on the output (`libmoe.findings`).

`run_bench` in four named steps: `plan_study` (every check knowable from the arguments, before any
work: the runs' configs and models, an `--out` holding files the bench did not write, a run in
`--out` made with another config unless `--overwrite`), `prepare_out` (the data every run reads,
built once; the old study's runs removed with --overwrite; the output's manifest), `run_stages`
(stage after stage through the launchers; a run whose source failed fails without trying) and
`finish_study` (results, findings, tables, report). A finished run is skipped, an interrupted one
resumes from its newest checkpoint, a failed one is a row with its error and the others go on.
SIGTERM or SIGINT stop the study: finished runs are kept, no table is written, and `Interrupted`
says that rerunning resumes. Launchers: in this process (`--jobs 1`), in J worker processes
(`--jobs J`), each training under `torchrun` with N processes (`--launcher torchrun --nproc N`), or
as Slurm jobs through submitit (`--launcher slurm`). On a GPU node `--jobs` defaults to the
visible GPUs (divided by the GPUs one job takes) and each job gets its own
(`libmoe.bench.placement`); a study over several nodes runs this same call on every node with its
`node_rank` (a `Rendezvous`): node 0 runs the study, the others only join each run's training.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..environment import comparison_lines, environment_summary
from ..errors import Interrupted
from ..findings import read_bench_results
from .compare import compare_outputs, regime_comparison
from .launchers import NODES_DIR, Node0Heartbeat, Progress, duration, publish_decision, run_all
from .outputs import (
    check_out_dir,
    environment_info,
    machine_info,
    remove_outputs,
    remove_run,
    start_manifest,
)
from .placement import Rendezvous, default_jobs, gpu_slots, gpus_per_job, visible_gpus
from .presets import PAPER_ALGORITHMS, BenchPreset, load_bench_preset, resolve_seeds
from .regimes import Regime, get_regime
from .runner import available_tasks, blocked_row, finished_row, plan_stages
from .safety import signals_ignored, stop_on_signals
from .spec import RunSpec
from .studies import parse_studies, preset_studies
from .verdicts import check_study_findings

LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass
class Study:
    """One bench study: what was asked, the planned stages, and the rows of the runs so far."""

    out: Path
    preset: str  # the bench preset's name
    bench_preset: BenchPreset
    regime: Regime
    algorithms: list[str]
    seeds: int
    stages: list[list[RunSpec]]
    tasks: list[str]
    skipped_tasks: dict[str, str]
    studies: list[str]
    jobs: int
    launcher: str
    nproc: int
    slurm: dict[str, Any] | None
    analysis: bool
    compare: str | Path | None
    log: Callable[[str], None]
    start: float = 0.0
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # {run name: its row}
    gpus: list[str] | None = None  # one CUDA_VISIBLE_DEVICES value per concurrent job (None: CPU)
    rendezvous: Rendezvous = field(default_factory=Rendezvous)
    environment: dict[str, Any] | None = None  # results.json's "environment", made once at the end

    @property
    def every(self) -> list[RunSpec]:
        return [s for stage in self.stages for s in stage]

    @property
    def row_specs(self) -> list[RunSpec]:
        """The table's runs (the last stage's rows)."""
        return [s for s in self.stages[-1] if s.role == "row"]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [self.done[s.name] for s in self.row_specs]

    @property
    def support(self) -> list[dict[str, Any]]:
        """The rows of the stages before the table's (e.g. the dense source)."""
        return [self.done[s.name] for stage in self.stages[:-1] for s in stage]

    @property
    def study_rows(self) -> list[dict[str, Any]]:
        """The rows of the extra studies' runs (libmoe.bench.studies)."""
        return [self.done[s.name] for s in self.stages[-1] if s.role == "study"]

    def shared_results(self) -> dict[str, Any]:
        """The keys of results.json every regime has (`finish_study` adds them to the regime's):
        what was asked, the table's runs (rows without their tracebacks), the failed runs of every
        stage, the machine and the environment (what decides the numbers across machines)."""
        rows = self.rows
        return {"preset": self.preset, "description": self.bench_preset.description,
                "regime": self.regime.name, "algorithms": self.algorithms, "seeds": self.seeds,
                "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in rows],
                "n_runs": len(self.every),
                "failed": [{"name": r["name"], "error": r.get("error")}
                           for r in [*self.support, *rows, *self.study_rows] if r.get("status") != "ok"],
                "machine": machine_info(), "environment": self.environment_record()}

    def environment_record(self) -> dict[str, Any]:
        """results.json's "environment" (`outputs.environment_info`), made on first use: the data
        of the table's runs, the threads they trained with, this machine."""
        if self.environment is None:
            specs = self.row_specs
            done = [self.done.get(s.name) or {} for s in specs]
            runs = [row["run"] for row in done if row.get("status") == "ok" and row.get("run")]
            try:
                self.environment = environment_info(specs[0].config if specs else None, runs,
                                                    job_threads(self))
            except Exception as err:  # noqa: BLE001  a description of the machine must never cost the tables
                self.environment = {"error": f"{type(err).__name__}: {err}"}
        return self.environment


def job_threads(study: Study) -> list[int] | None:
    """The torch threads the table's runs trained with: what their rows record, else what the
    launcher gives them (in this process: this process's; in `--jobs J` worker processes: the
    cores divided between the jobs); None where the runs trained elsewhere (torchrun, Slurm)."""
    recorded = [r["threads"] for r in study.rows if isinstance(r.get("threads"), int)]
    if recorded:
        return sorted(set(recorded))
    if study.launcher != "local":
        return None
    specs = study.row_specs
    shared = max(1, (os.cpu_count() or 1) // max(1, min(study.jobs, len(specs))))  # as launchers' pool
    default = torch.get_num_threads() if study.jobs <= 1 else shared
    return sorted({s.threads or default for s in specs}) or None


def run_bench(
    out: str | Path,
    preset: str | BenchPreset | None = None,
    algorithms: list[str] | None = None,
    seeds: int | None = None,
    data: str | None = None,
    tasks: list[str] | None = None,
    data_dir: str | Path | None = None,
    jobs: int | None = None,
    launcher: str = "local",
    nproc: int = 1,
    slurm: dict[str, Any] | None = None,
    overrides: list[str] = (),
    analysis: bool = True,
    regime: str | None = None,
    compare: str | Path | None = None,
    studies: str | list[str] | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    rendezvous: Rendezvous | None = None,
    visible: list[str] | None = None,
) -> dict[str, Any]:
    """The whole study into `out`; returns results.json's content (see the module docstring).
    `preset` (a name, or a BenchPreset used as it is) defaults to the regime's default preset
    ("default" for pretrain, "upcycle" for upcycle, "vlm" for vlm), `regime` to the preset's;
    `compare` names another bench output (of another regime) whose expert change rates the regime
    comparison sets beside this one's;
    `studies` (default: the preset's) the extra studies the findings need (libmoe.bench.studies:
    init-std, droptop, temperature). results.json's "findings" are the paper's claims checked on
    this output (libmoe.findings). `overwrite` replaces the runs in `out` made with another
    config (and the old tables) instead of refusing them. Failed runs are rows with their error
    (`failure_line` sums them up); SIGTERM/SIGINT raise `Interrupted` (finished runs kept).
    `rendezvous`: torchrun over several nodes (this node's rank among them; a node other than
    node 0 only joins each run's training and returns {"node_rank", "runs"}); `visible`: the GPUs
    to place jobs on (default: `placement.visible_gpus()`)."""
    study, stale = plan_study(out, preset, algorithms, seeds, data, tasks, data_dir, jobs, launcher, nproc,
                              slurm, list(overrides), analysis, regime, compare, studies, log,
                              rendezvous, visible)
    if stale and not overwrite:
        first, diff = stale[0]
        more = f"; {len(stale) - 1} more run(s) differ too" if len(stale) > 1 else ""
        raise ValueError(f"--out {str(study.out)!r} holds run {first.name} made with another config "
                         f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}){more}; give a new "
                         "--out, or pass --overwrite to replace the old study.")
    log_plan(study)
    if study.rendezvous.node_rank > 0:
        return follow_study(study)
    with stop_on_signals():
        try:
            study.start = time.perf_counter()
            with node0_heartbeat(study):
                prepare_out(study, [s for s, _ in stale])
                run_stages(study)
            return finish_study(study)
        except (Interrupted, KeyboardInterrupt):
            with signals_ignored():
                kept = sum(finished_row(s) is not None for s in study.every)
            raise Interrupted(
                f"bench interrupted: {kept} of {len(study.every)} run(s) finished and are kept in "
                f"{study.out}; rerun the same command to resume (finished runs are skipped, an "
                "interrupted run continues from its checkpoint).") from None


def plan_study(out: str | Path, preset: str | BenchPreset | None, algorithms: list[str] | None,
               seeds: int | None, data: str | None, tasks: list[str] | None,
               data_dir: str | Path | None, jobs: int | None,
               launcher: str, nproc: int, slurm: dict[str, Any] | None, overrides: list[str],
               analysis: bool, regime: str | None, compare: str | Path | None,
               studies: str | list[str] | None,
               log: Callable[[str], None], rendezvous: Rendezvous | None = None,
               visible: list[str] | None = None) -> tuple[Study, list[tuple[RunSpec, list[str]]]]:
    """Check every argument and plan the study, before any work (nothing is written); returns it
    with the runs in `out` made with another config (each with its differences)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}.")
    if regime is not None:
        get_regime(regime)  # an unknown name fails before anything else
    preset = preset or get_regime(regime or "pretrain").default_preset
    spec = preset if isinstance(preset, BenchPreset) else load_bench_preset(preset)
    seeds = resolve_seeds(spec, seeds)  # --seeds, else the preset's (claims: 3)
    the_regime = get_regime(regime or spec.regime)
    if algorithms is not None and not list(algorithms):
        raise ValueError("--algorithms names no algorithm; give comma-separated names (e.g. dense,smoe) "
                         "or leave it out for the paper's eight.")
    check_out_dir(out)
    the_regime.check_request(spec, launcher, data, tasks, data_dir)
    rendezvous = rendezvous or Rendezvous()
    rendezvous.check(launcher)
    if rendezvous.nnodes > 1 and launcher == "local":
        raise ValueError(f"--nnodes {rendezvous.nnodes} trains each run over several nodes: give "
                         "--launcher torchrun (or slurm).")
    gpus = [] if launcher == "slurm" else visible_gpus() if visible is None else list(visible)
    per_job = gpus_per_job(launcher, nproc)
    if jobs is None:  # every visible GPU busy; on a CPU the preset's (local) or one (torchrun)
        jobs = default_jobs(gpus, per_job, spec.jobs if launcher == "local" else 1)
    if seeds < 1 or jobs < 1 or nproc < 1:
        raise ValueError("--seeds, --jobs and --nproc must be at least 1.")
    slots = gpu_slots(gpus, jobs, per_job)  # refuses more GPUs than are visible, before any work
    algorithms = list(PAPER_ALGORITHMS if algorithms is None else algorithms)
    if len(set(algorithms)) != len(algorithms):
        raise ValueError(f"--algorithms lists an algorithm twice: {','.join(algorithms)}.")
    if compare is not None:  # read now: a damaged or foreign output fails before any work
        if not (Path(compare) / "results.json").is_file():
            raise FileNotFoundError(f"--compare {compare}: no results.json there; give a libmoe bench "
                                    "output.")
        read_bench_results(Path(compare) / "results.json")
    task_names, skipped_tasks = available_tasks(spec.tasks if tasks is None else tasks, data_dir)
    if tasks is not None and skipped_tasks:  # asked for by name: say so rather than drop them
        raise FileNotFoundError("; ".join(f"{t}: {why}" for t, why in skipped_tasks.items()))
    chosen = parse_studies(studies)
    chosen = [s for s in (preset_studies(spec) if chosen is None else chosen) if s in the_regime.studies]
    out = Path(out)
    stages = plan_stages(out, spec, algorithms, seeds, data, overrides, task_names, data_dir, launcher, nproc,
                         analysis=analysis, regime=the_regime.name, studies=chosen, jobs=jobs)
    study = Study(out, spec.name, spec, the_regime, algorithms, seeds, stages, task_names, skipped_tasks,
                  chosen, jobs, launcher, nproc, slurm, analysis, compare, log, gpus=slots,
                  rendezvous=rendezvous)
    if launcher != "local":  # each run's rendezvous: its own id and port (its place in the study)
        for offset, s in enumerate(study.every):
            s.torchrun = {**rendezvous.as_dict(), "offset": offset}
            if multi_node_torchrun(study):  # node 0 publishes its decision on each run in the shared out
                s.torchrun["nodes_dir"] = str(out / NODES_DIR)
    for s in study.every:  # e.g. model.top_k=9 with 8 experts: refused now, not after data preparation
        get_regime(s.regime).check_spec(s)
    return study, the_regime.stale_runs(study.every)


def log_plan(study: Study) -> None:
    """One line: the preset, the regime, the runs and their budget, the studies and the tasks."""
    specs, every = study.row_specs, study.every
    n_study = len(study.stages[-1]) - len(specs)
    n_support = len(every) - len(specs) - n_study
    budget = specs[0].config.get("train") or {}
    steps = f" of {specs[0].max_steps if specs[0].max_steps is not None else '?'} steps" + (
        f" x {budget['batch_size']} sequences" if "batch_size" in budget else "")
    support = f" after {n_support} source run(s)" if n_support else ""
    extra = f" + {n_study} study run(s)" if n_study else ""
    skipped = f" (skipped: {', '.join(study.skipped_tasks)})" if study.skipped_tasks else ""
    study.log(f"bench: preset {study.preset} ({study.bench_preset.description}); regime {study.regime.name}; "
              f"{len(study.algorithms)} algorithm(s) x {study.seeds} seed(s) = {len(specs)} runs{steps}"
              f"{support}{extra}; studies: {', '.join(study.studies) or 'none'}; tasks: "
              f"{', '.join(study.tasks) or 'none'}{skipped} -> {study.out}")


def prepare_out(study: Study, stale: list[RunSpec]) -> None:
    """Build the data every run reads (once, before `out` is touched: a bad data source writes
    nothing there), remove the runs made with another config and the old tables (--overwrite),
    and mark `out` as a bench output."""
    if any(finished_row(s) is None for s in study.every):
        study.regime.prepare_data(study.every, study.log)
    study.out.mkdir(parents=True, exist_ok=True)
    if stale:
        for s in stale:
            remove_run(s.run_dir)
        remove_outputs(study.out)
        study.log(f"bench: --overwrite: removed {len(stale)} run(s) made with another config "
                  f"({', '.join(s.name for s in stale)}) and the old tables")
    start_manifest(study.out)


def run_stages(study: Study) -> None:
    """Every stage's runs through the launcher, stage after stage, into `study.done`; a run whose
    source failed fails without trying."""
    progress = Progress(study.every, study.log)
    for stage in study.stages:
        ready = []
        for s in stage:
            bad = [study.done[n] for n in s.needs if study.done.get(n, {}).get("status") != "ok"]
            if bad:
                study.done[s.name] = blocked_row(s, bad[0])
                publish_decision(s, "skip", study.done[s.name]["error"])
                progress.finished(s, study.done[s.name])
            else:
                ready.append(s)
        rows = run_all(ready, study.jobs, study.launcher, study.slurm, study.out / "slurm", study.log,
                       progress, gpus=study.gpus, node_rank=study.rendezvous.node_rank)
        study.done.update({r["name"]: r for r in rows})


def multi_node_torchrun(study: Study) -> bool:
    """Whether the study trains each run with torchrun over several nodes started one by one
    (node 0 then publishes its decisions in the shared --out; a Slurm job places its own nodes)."""
    return study.launcher == "torchrun" and study.rendezvous.nnodes > 1


def node0_heartbeat(study: Study) -> contextlib.AbstractContextManager:
    """Node 0 of a multi-node torchrun study: its heartbeat and session in OUT/.nodes for the
    length of the call (`launchers.Node0Heartbeat`; it creates --out before the data is
    prepared, so that the other nodes see node 0 running while it prepares); else nothing."""
    if multi_node_torchrun(study) and study.rendezvous.node_rank == 0:
        return Node0Heartbeat(study.out / NODES_DIR, study.every)
    return contextlib.nullcontext()


def follow_study(study: Study) -> dict[str, Any]:
    """A node other than node 0: join each run's torchrun training, stage after stage, in the
    study's order (node 0 prepares the data, evaluates and writes every file); its rows."""
    with stop_on_signals():
        study.log(f"bench: node {study.rendezvous.node_rank} of {study.rendezvous.nnodes}: joining the "
                  f"training of {len(study.every)} run(s) at {study.rendezvous.endpoint}, as node 0 "
                  f"decides them in {study.out / NODES_DIR} (--out must be shared by every node)")
        progress = Progress(study.every, study.log)
        rows = []
        for stage in study.stages:
            rows += run_all(stage, study.jobs, study.launcher, study.slurm, study.out / "slurm", study.log,
                            progress, gpus=study.gpus, node_rank=study.rendezvous.node_rank)
    return {"node_rank": study.rendezvous.node_rank, "runs": rows}


def _guarded(study: Study, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None with one logged line when it fails: what only describes or compares the
    runs (the other output moved, a record of an older version) must never cost the tables."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        study.log(f"bench: {what} failed ({type(err).__name__}: {err}); the tables are written without it")
        return None


def finish_study(study: Study) -> dict[str, Any]:
    """results.json's content: the shared keys (`Study.shared_results`) and the regime's own, in
    the regime's `results_layout`, the regime comparison, the time and the paper's findings checked
    on it; then the regime's tables and report."""
    own, analysis, figures = study.regime.results(study)
    results = lay_out({**study.shared_results(), **own}, study.regime.results_layout)
    results["regime_comparison"] = _guarded(study, "the regime comparison", regime_comparison, results,
                                            study.out, study.compare)
    line = _guarded(study, "the environment line", environment_summary, results["environment"])
    study.log(f"bench: {line}")
    if study.compare is not None:
        results["environment_comparison"] = _guarded(study, "the environment comparison", compare_outputs,
                                                     results, study.compare)
        if results["environment_comparison"]:
            for line in comparison_lines(results["environment_comparison"]):
                study.log(f"bench: {line}")
    results["elapsed_s"] = time.perf_counter() - study.start
    results["findings"] = check_study_findings(study.out, results, study.log)
    before = _stats(study.out)
    study.regime.write_outputs(study.out, results, analysis, figures)
    after = _stats(study.out)
    written = [str(study.out / n) for n in WRITTEN_ORDER if after.get(n) and after[n] != before.get(n)]
    rows = study.rows
    ok = sum(r.get("status") == "ok" for r in rows)
    study.log(f"bench: {ok}/{len(rows)} runs ok in {duration(results['elapsed_s'])}; wrote "
              f"{_listing(written) or 'no table'}")
    return results


WRITTEN_ORDER = ("results.md", "results.csv", "results.json", "report.html")  # the log's order


def lay_out(results: dict[str, Any], layout: tuple[str, ...]) -> dict[str, Any]:
    """`results` with the keys named in `layout` first, in its order, then the others as they are."""
    return {**{k: results[k] for k in layout if k in results},
            **{k: v for k, v in results.items() if k not in layout}}


def _stats(out: Path) -> dict[str, tuple[int, int] | None]:
    """{output file: (inode, mtime in ns) or None}: what tells a file written since."""
    stats = {}
    for name in WRITTEN_ORDER:
        try:
            st = (out / name).stat()
            stats[name] = (st.st_ino, st.st_mtime_ns)
        except OSError:
            stats[name] = None
    return stats


def _listing(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}" if items else ""


def run_vlm_bench(out: str | Path, preset: BenchPreset, algorithms: list[str] | None = None,
                  seeds: int | None = None,
                  jobs: int | None = None, compare: str | Path | None = None, overrides: list[str] = (),
                  analysis: bool = True, log: Callable[[str], None] = print,
                  studies: list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """`run_bench` in the vlm regime with the bench preset given as a BenchPreset (regime vlm),
    used as it is (e.g. with its regime_options changed)."""
    return run_bench(out, preset=preset, algorithms=algorithms, seeds=seeds, jobs=jobs,
                     overrides=list(overrides), analysis=analysis, regime="vlm", compare=compare,
                     studies=studies, log=log, overwrite=overwrite)


def score_table(results: dict[str, Any]) -> list[list[str]]:
    """The scores of a bench's results (results.json's content) as its regime lays them out: a
    header row and rows of cells (see `libmoe.bench.tables.markdown`)."""
    return get_regime(results.get("regime") or "pretrain").score_table(results)
