"""Planning a bench study and running one of its runs, for every regime.

`plan_stages` turns the arguments into the regime's stages of RunSpecs (libmoe.bench.regimes);
`run_one` trains (or resumes), evaluates and times one run in the process it is given to (the
launchers decide which: libmoe.bench.launchers) and saves its row as RUN/bench_run.json. A run
whose saved row says it finished the same run (`Regime.stamp`) is skipped; an interrupted one
resumes from its newest checkpoint; a run that fails is a row with its error and the others go on;
SIGTERM or SIGINT end it with a resumable row and `Interrupted`. The study around the runs is
`libmoe.bench.study` (`run_bench`).
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import Interrupted
from ..eval import get_task
from ..eval.tasks import local_file
from ..files import write_json
from ..moe import check_algorithm
from .outputs import plain_json
from .presets import BenchPreset
from .regimes import PlanContext, get_regime
from .safety import RUN_FILE, saved_row, signals_ignored
from .spec import RunSpec
from .studies import interventions_of, plan_init_std, preset_studies

__all__ = ["RunSpec", "available_tasks", "blocked_row", "finished_row", "plan_runs", "plan_stages",
           "run_one"]


def available_tasks(tasks: list[str], data_dir: str | Path | None) -> tuple[list[str], dict[str, str]]:
    """(tasks whose data is here, {task: why not} for the others). Without `data_dir` a task would
    read the Hub; the bench does not download behind the user's back, so it is skipped."""
    ok, skipped = [], {}
    for name in tasks:
        task = get_task(name)
        members = [get_task(m) for m in task.group] if task.group else [task]
        if data_dir is None and any(m.data_file is None for m in members):
            skipped[name] = "no --data-dir (local JSONL files in the Hub schema)"
            continue
        try:
            for m in members:
                local_file(m, data_dir)
        except FileNotFoundError as err:
            skipped[name] = str(err)
            continue
        ok.append(name)
    return ok, skipped


def plan_stages(out: str | Path, preset: BenchPreset, algorithms: list[str], seeds: int,
                data: str | None = None, overrides: list[str] = (), tasks: list[str] = (),
                data_dir: str | Path | None = None, launcher: str = "local", nproc: int = 1,
                threads: int | None = None, analysis: bool = True,
                regime: str | None = None, studies: list[str] | None = None,
                jobs: int = 1) -> list[list[RunSpec]]:
    """The runs of the study as the regime's stages (the last: one run per algorithm and seed,
    the table's rows, then the runs of the extra studies, role "study"), each row's config
    identical but for model.algorithm and train.seed (and, when upcycled, the model the run
    starts from). `studies` defaults to the preset's (libmoe.bench.studies)."""
    for algorithm in [*algorithms, *preset.algorithm_options]:
        check_algorithm(algorithm)  # a typo fails here, before hours of training
    name = regime or preset.regime
    source = [o.removeprefix("source.") for o in overrides if o.startswith("source.")]
    common = preset.override_list() + ([f"data.source={data}"] if data else [])
    common += [o for o in overrides if not o.startswith("source.")]
    limits = {t: preset.task_limits.get(t, preset.limit) for t in tasks}
    studies = preset_studies(preset) if studies is None else studies
    run_fields = dict(tasks=list(tasks), limits=limits, data_dir=None if data_dir is None else str(data_dir),
                      val_tokens=preset.val_tokens, launcher=launcher, nproc=nproc, threads=threads,
                      analysis=analysis, interventions=interventions_of(studies), regime=name)
    user = [o for o in overrides if not o.startswith("source.")]
    ctx = PlanContext(Path(out), preset, list(algorithms), seeds, common, run_fields, source, jobs, user)
    the_regime = get_regime(name)
    stages = the_regime.plan(ctx)
    if "init-std" in studies and "init-std" in the_regime.studies:
        stages[-1] = stages[-1] + plan_init_std(ctx, stages[-1][0].max_steps)  # the rows' budget
    return stages


def plan_runs(out: str | Path, preset: BenchPreset, algorithms: list[str], seeds: int,
              data: str | None = None, overrides: list[str] = (), tasks: list[str] = (),
              data_dir: str | Path | None = None, launcher: str = "local", nproc: int = 1,
              threads: int | None = None, analysis: bool = True,
              regime: str | None = None, studies: list[str] | None = None) -> list[RunSpec]:
    """Every run of the study, stage after stage (see plan_stages)."""
    stages = plan_stages(out, preset, algorithms, seeds, data, overrides, tasks, data_dir, launcher,
                         nproc, threads, analysis, regime, studies)
    return [spec for stage in stages for spec in stage]


# ----------------------------------------------------------------------------- one run


def finished_row(spec: RunSpec) -> dict[str, Any] | None:
    """The saved row of a run that finished this very run (its regime's stamp), else None."""
    row = saved_row(spec.run_dir)
    if row is None or row.get("status") != "ok":
        return None
    stamp = get_regime(spec.regime).stamp(spec)
    return row if all(row.get(k) == v for k, v in stamp.items()) else None


def run_one(spec: RunSpec, progress: bool | None = False) -> dict[str, Any]:
    """Train (or resume), evaluate and time one run; returns its row (also RUN/bench_run.json).
    Never raises for a failure of the run itself: the row then holds "status": "failed" and the
    error, so the study goes on."""
    done = finished_row(spec)
    if done is not None:
        return dict(done, skipped=True)
    regime = get_regime(spec.regime)
    run = Path(spec.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"name": spec.name, "algorithm": spec.algorithm, "seed": spec.seed,
                           "run": str(run), **regime.stamp(spec)}
    with _output_to(spec.log_file):
        try:
            if spec.threads:
                torch.set_num_threads(spec.threads)
            row["threads"] = torch.get_num_threads()  # results.json's environment record reads it
            _check_same_config(spec)
            regime.prepare(spec, row)
            summary = _train(spec, progress)
            if summary.get("stopped_early"):
                raise RuntimeError(f"training stopped at step {summary['step']} of {summary['max_steps']}")
            regime.evaluate(spec, summary, row)
        except (Interrupted, KeyboardInterrupt) as err:  # SIGTERM/SIGINT: not a failure; resumable
            row.update(status="interrupted", error=f"{type(err).__name__}: {err}".rstrip(": "))
            with signals_ignored():
                _write_row(run, row)
            raise Interrupted(f"{spec.name} was interrupted; rerunning resumes it") from None
        except Exception as err:  # noqa: BLE001  one algorithm's failure must not stop the study
            row.update(status="failed", error=f"{type(err).__name__}: {err}",
                       traceback=traceback.format_exc(limit=8))
            print(f"bench: {spec.name} failed: {row['error']}", file=sys.stderr)
    _write_row(run, row)
    return row


def _train(spec: RunSpec, progress: bool | None) -> dict[str, Any]:
    """Train (or resume) the run as its regime does; its training summary."""
    return get_regime(spec.regime).train(spec, progress)


@contextlib.contextmanager
def _output_to(log_file: str | None) -> Iterator[None]:
    """stdout and stderr appended to `log_file` (a worker process's run), else left as they are."""
    if not log_file:
        yield
        return
    with open(log_file, "a", buffering=1) as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(stream):
        yield


def _check_same_config(spec: RunSpec) -> None:
    """Refuse to resume a run directory that holds another study's run (run_bench refuses this
    up front; this guards `run_one` called on its own)."""
    stale = get_regime(spec.regime).stale_runs([spec])
    if stale:
        raise ValueError(f"{spec.run_dir} holds a run with another config ({'; '.join(stale[0][1][:4])}); "
                         "give a new --out or pass --overwrite.")


def _write_row(run: Path, row: dict[str, Any]) -> None:
    write_json(run / RUN_FILE, plain_json(row), indent=1)


def blocked_row(spec: RunSpec, needed: dict[str, Any]) -> dict[str, Any]:
    """The row of a run not started because a run it starts from failed (not saved: the next
    call tries again)."""
    return {"name": spec.name, "algorithm": spec.algorithm, "seed": spec.seed, "run": spec.run_dir,
            "status": "failed", "error": f"not run: {needed['name']} failed ({needed.get('error')})"}
