"""`libmoe bench`: the paper's fair comparison of MoE algorithms as one command.

    from libmoe.bench import run_bench
    results = run_bench("bench/default", preset="default", data_dir="../shared/data/eval")

For each algorithm and seed, one run directory ``OUT/runs/<algorithm>-s<seed>`` is trained from the
same resolved config (the bench preset's training preset and overrides; only `model.algorithm`
and `train.seed` differ), so every algorithm sees the same data order, token budget, schedule and
evaluation windows. How the runs start is the regime's (`regimes`: from a random init, or
upcycled from one dense source run that trains first); a regime plans the runs as stages, each
stage running after the one before. Each run is then evaluated (validation perplexity on the
held-out split plus every zero-shot task whose data is available) and timed for inference, and
`bench_run.json` records its row. The analysis compares the routing of all runs (seed 0) into
``OUT/analysis``; the tables (`results.json`, `results.md`, `results.csv`), the regime
comparison (`compare`) and ``OUT/report.html`` come last.

Robustness (docs/bench.md, "Guarantees"): everything knowable from the arguments is checked
before any work (every run's config and model options; an `--out` holding files the bench did not
write; a run in `--out` made with another config, unless `--overwrite`). A run whose
`bench_run.json` says it finished with the same config is skipped; an interrupted one resumes from
its newest checkpoint (`train(..., resume="auto")`); a run that fails is recorded with its error and
the others go on. SIGTERM or SIGINT stops the study: the running runs checkpoint, finished runs are
kept untouched, no table is written, and `Interrupted` says that rerunning resumes.

Launchers: in this process (`--jobs 1`), in J worker processes (`--jobs J`, torch threads split
between them), each training under `torchrun` with N processes (`--launcher torchrun --nproc N`),
or as Slurm jobs through submitit (`--launcher slurm`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Interrupted
from ..files import read_json, write_json, write_text
from .outputs import plain_json
from .presets import PAPER_ALGORITHMS, BenchPreset, load_bench_preset
from .safety import RUN_FILE, check_spec, saved_row, signals_ignored, stale_runs, stop_on_signals

VAL_WINDOWS_FILE = "val_windows.json"  # RUN/eval/: each validation window's loss (the findings' bootstrap)
LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass
class RunSpec:
    """One training + evaluation of the study (picklable: it travels to worker processes)."""

    name: str
    algorithm: str
    seed: int
    run_dir: str
    config: dict[str, Any]
    tasks: list[str] = field(default_factory=list)
    limits: dict[str, int | None] = field(default_factory=dict)
    data_dir: str | None = None
    val_tokens: int | str = "run"
    launcher: str = "local"
    nproc: int = 1
    threads: int | None = None
    log_file: str | None = None  # worker processes write their output here
    analysis: bool = True  # analyse the run's routing where it ran (RUN/analysis)
    interventions: bool | list[str] = True  # True, False or the studies: droptop, temperature
    regime: str = "pretrain"  # libmoe.bench.regimes: its `prepare` runs before training
    role: str = "row"  # "row": a row of the tables; "source": a run the rows start from;
    # "study": a run of an extra study (libmoe.bench.studies)
    evaluate: bool = True  # evaluate and time the trained model (a study's run needs neither)
    needs: list[str] = field(default_factory=list)  # runs of earlier stages this one starts from
    prepare: dict[str, Any] = field(default_factory=dict)  # the regime's, e.g. what to upcycle

    @property
    def config_hash(self) -> str:
        payload = self.config if not self.prepare else {"config": self.config, "prepare": self.prepare}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def available_tasks(tasks: list[str], data_dir: str | Path | None) -> tuple[list[str], dict[str, str]]:
    """(tasks whose data is here, {task: why not} for the others). Without `data_dir` a task would
    read the Hub; the bench does not download behind the user's back, so it is skipped."""
    from ..eval.tasks import get_task, local_file

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
                regime: str | None = None, studies: list[str] | None = None) -> list[list[RunSpec]]:
    """The runs of the study as the regime's stages (the last: one run per algorithm and seed,
    the table's rows, then the runs of the extra studies, role "study"), each row's config
    identical but for model.algorithm and train.seed (and, when upcycled, the model the run
    starts from). `studies` defaults to the preset's (libmoe.bench.studies)."""
    from ..moe.layer import check_algorithm
    from .regimes import PlanContext, get_regime
    from .studies import interventions_of, plan_init_std, preset_studies

    for algorithm in algorithms:
        check_algorithm(algorithm)  # a typo fails here, before hours of training
    name = regime or preset.regime
    source = [o.removeprefix("source.") for o in overrides if o.startswith("source.")]
    common = preset.override_list() + ([f"data.source={data}"] if data else [])
    common += [o for o in overrides if not o.startswith("source.")]
    limits = {t: preset.task_limits.get(t, preset.limit) for t in tasks}
    studies = preset_studies(preset) if studies is None else studies
    ctx = PlanContext(Path(out), preset, name, list(algorithms), seeds, common, list(tasks), limits,
                      None if data_dir is None else str(data_dir), launcher, nproc, threads, analysis,
                      source, interventions_of(studies))
    stages = get_regime(name).plan(ctx)
    if "init-std" in studies:
        stages[-1] = stages[-1] + plan_init_std(ctx, stages[-1][0].config["train"]["max_steps"])
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
    """The saved row of a run that finished with this spec's config and evaluation, else None."""
    row = saved_row(spec.run_dir)
    if row is None:
        return None
    same = row.get("config_hash") == spec.config_hash and row.get("tasks") == spec.tasks
    return row if row.get("status") == "ok" and same else None


def _write_row(run: Path, row: dict[str, Any]) -> None:
    write_json(run / RUN_FILE, plain_json(row), indent=1)


def run_one(spec: RunSpec, progress: bool | None = False) -> dict[str, Any]:
    """Train (or resume), evaluate and time one run; returns its row (also RUN/bench_run.json).
    Never raises for a failure of the run itself: the row then holds "status": "failed" and the
    error, so the study goes on."""
    done = finished_row(spec)
    if done is not None:
        return dict(done, skipped=True)
    run = Path(spec.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"name": spec.name, "algorithm": spec.algorithm, "seed": spec.seed,
                           "run": str(run), "config_hash": spec.config_hash, "tasks": spec.tasks}
    redirect = contextlib.ExitStack()
    if spec.log_file:
        stream = redirect.enter_context(open(spec.log_file, "a", buffering=1))  # noqa: SIM115
        redirect.enter_context(contextlib.redirect_stdout(stream))
        redirect.enter_context(contextlib.redirect_stderr(stream))
    with redirect:
        try:
            if spec.threads:
                import torch

                torch.set_num_threads(spec.threads)
            _check_same_config(spec)
            from .regimes import get_regime

            get_regime(spec.regime).prepare(spec, row)
            summary = _train(spec, progress)
            if summary.get("stopped_early"):
                raise RuntimeError(f"training stopped at step {summary['step']} of {summary['max_steps']}")
            if not spec.evaluate:
                row.update(status="ok", step=summary["step"], train_time_s=summary["train_time_s"],
                           train_val_ppl=summary.get("val_ppl"))
                _write_row(run, row)
                return row
            results = _evaluate(spec)
            train_cfg = spec.config["train"]
            seq_len = train_cfg.get("seq_len") or spec.config["model"]["max_seq_len"]
            tokens = summary["step"] * train_cfg["batch_size"] * seq_len
            row.update(tokens_per_s=tokens / summary["train_time_s"] if summary["train_time_s"] else None)
            row.update(status="ok", step=summary["step"], train_time_s=summary["train_time_s"],
                       peak_mem_mb=summary["peak_mem_mb"], params_total=summary["params_total"],
                       params_active=summary["params_active"], train_val_ppl=summary.get("val_ppl"),
                       ppl=(results.get("val_ppl") or {}).get("ppl"), results=results,
                       latency_ms=inference_latency(run, spec.config))
            if spec.analysis:
                _analyse(spec, row)
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


def _analyse_run(run_dir: str | Path, interventions: bool | list[str],
                 val_tokens: int | str) -> dict[str, Any]:
    """RUN/analysis/metrics.json of one run (routing metrics and interventions; the interventions'
    five evaluations use training's windows when the table uses the whole split)."""
    from ..analysis.analyze import analyze_run

    return analyze_run(run_dir, interventions=interventions, figures=False,
                       val_tokens="run" if val_tokens == "all" else val_tokens)


def _analyse(spec: RunSpec, row: dict[str, Any]) -> None:
    """Analyse the run here, where it trained, so that parallel jobs and Slurm jobs analyse in
    parallel too; a failure is noted, not fatal."""
    from ..analysis.analyze import load_analysis

    if load_analysis(spec.run_dir) is not None:
        return
    try:
        _analyse_run(spec.run_dir, spec.interventions, spec.val_tokens)
    except Exception as err:  # noqa: BLE001  the scores stand without the routing analysis
        row["analysis_error"] = f"{type(err).__name__}: {err}"
        print(f"bench: analysis of {spec.name} failed: {row['analysis_error']}", file=sys.stderr)


def _check_same_config(spec: RunSpec) -> None:
    """Refuse to resume a run directory that holds another study's run (run_bench refuses this
    up front; this guards `run_one` called on its own)."""
    stale = stale_runs([spec])
    if stale:
        raise ValueError(f"{spec.run_dir} holds a run with another config ({'; '.join(stale[0][1][:4])}); "
                         "give a new --out or pass --overwrite.")


def _train(spec: RunSpec, progress: bool | None) -> dict[str, Any]:
    from ..train import train
    from ..train.config import config_from_dict

    run = Path(spec.run_dir)
    if spec.launcher == "torchrun" and spec.nproc > 1:
        import yaml

        from ..train.checkpoint import latest_checkpoint

        config_file = run / "bench_config.yaml"
        write_text(config_file, yaml.safe_dump(spec.config, sort_keys=False))
        # resume a run with a checkpoint; restart one that stopped before its first; else start
        again = ["--resume"] if latest_checkpoint(run) is not None else \
            ["--overwrite"] if (run / "config.yaml").is_file() else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={spec.nproc}", "-m", "libmoe", "train", str(config_file),
               "--out", str(run), *again]
        print("bench: " + " ".join(cmd), flush=True)
        _run_forwarding_signals(cmd, stdout=sys.stdout if spec.log_file is None else None)
        return read_json(run / "train_summary.json")
    return train(config_from_dict(spec.config), run, resume="auto", progress=progress)


def _run_forwarding_signals(cmd: list[str], stdout=None) -> None:
    """Run `cmd` (torchrun); when this process is interrupted, send the child SIGTERM (torchrun
    passes it to its workers, whose training checkpoints) and wait for it, then re-raise."""
    with subprocess.Popen(cmd, stdout=stdout) as proc:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            with signals_ignored():
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def _evaluate(spec: RunSpec) -> dict[str, Any]:
    """Validation perplexity and the zero-shot tasks (RUN/eval/results.json, reused while the
    run's step and the task list are unchanged)."""
    from ..eval.evaluator import evaluate_model

    run = Path(spec.run_dir)
    path = run / "eval" / "results.json"
    windows = run / "eval" / VAL_WINDOWS_FILE
    step = read_json(run / "train_summary.json")["step"]
    if path.is_file() and windows.is_file():
        try:
            saved = read_json(path)
        except ValueError:
            saved = {}
        config = saved.get("config", {}) if isinstance(saved, dict) else {}
        if config.get("step") == step and config.get("bench_tasks") == spec.tasks and "results" in saved:
            return saved["results"]
    payload = evaluate_model(run, ["val_ppl"], val_tokens=spec.val_tokens, per_window=True)
    val = payload["results"]["val_ppl"]
    path.parent.mkdir(parents=True, exist_ok=True)
    seq_len = spec.config["train"].get("seq_len") or spec.config["model"]["max_seq_len"]
    write_json(windows, {"step": step, "tokens_per_window": seq_len, "ppl": val["ppl"],
                         "window_nll": val.pop("window_nll")}, indent=None)
    by_limit: dict[int | None, list[str]] = {}
    for task in spec.tasks:
        by_limit.setdefault(spec.limits.get(task), []).append(task)
    for limit, names in by_limit.items():
        part = evaluate_model(run, names, spec.data_dir, limit)
        payload["results"].update(part["results"])
        payload.setdefault("evaluated", {}).update(part.get("evaluated") or {})
    payload["config"].update(bench_tasks=spec.tasks, limits=spec.limits, step=step)
    _write_eval(path, plain_json(payload))
    return payload["results"]


def _write_eval(path: Path, payload: dict[str, Any]) -> None:
    """RUN/eval/results.json as `libmoe eval` keeps it: merged per task with what is there (tasks
    evaluated earlier with `libmoe eval` stay). A file of an older bench, which `libmoe eval`
    does not recognise, is replaced (its tasks are in this payload again)."""
    from ..eval.results import write_results

    try:
        write_results(path, payload)
    except ValueError:
        try:
            old = read_json(path)
        except ValueError:
            old = None
        if not (isinstance(old, dict) and "bench_tasks" in (old.get("config") or {})):
            raise
        write_json(path, payload, indent=1)


def inference_latency(run: str | Path, config: dict[str, Any], repeats: int = 10) -> float:
    """Median milliseconds of one forward pass over one sequence of train.seq_len tokens (batch
    1, no gradient), after two warm-up passes."""
    import torch

    from ..models import load_model

    loaded = load_model(run)
    model = loaded.model
    seq_len = (config.get("train") or {}).get("seq_len") or config["model"]["max_seq_len"]
    vocab = config["model"]["vocab_size"]
    tokens = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    return median_forward_ms(lambda: model(tokens), device, repeats)


def median_forward_ms(forward: Callable[[], Any], device, repeats: int = 10) -> float:
    """Median milliseconds of `forward()` (no gradient) over `repeats` calls after two warm-ups."""
    import torch

    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            forward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# ----------------------------------------------------------------------------- the study


def analyse_runs(rows: list[dict[str, Any]], out: Path, interventions: bool | list[str],
                 val_tokens: int | str, log: Callable[[str], None],
                 init_std: dict[str, Any] | None = None) -> tuple[dict[str, dict], list]:
    """Routing analysis of each algorithm's first successful run (RUN/analysis, reused while
    current), then the cross-algorithm figures in OUT/analysis. Returns ({algorithm: metrics},
    figures)."""
    from ..analysis.analyze import load_analysis
    from ..analysis.plots import plot_all

    results: dict[str, dict] = {}
    for row in rows:
        if row.get("status") != "ok" or row["algorithm"] in results:
            continue
        cached = load_analysis(row["run"])  # normally written by the run itself (_analyse); else
        # e.g. a run finished by an earlier bench without analysis
        if cached is not None:
            results[row["algorithm"]] = cached
            continue
        log(f"bench: analysing {row['name']}")
        try:
            results[row["algorithm"]] = _analyse_run(row["run"], interventions, val_tokens)
        except Exception as err:  # noqa: BLE001  the tables still come out
            log(f"bench: analysis of {row['name']} failed: {type(err).__name__}: {err}")
    fig_dir = out / "analysis" / "figures"
    figures = plot_all(results, fig_dir, init_std=init_std) if results or init_std else []
    write_json(out / "analysis" / "metrics.json", plain_json(results), indent=1)
    return results, figures


def run_bench(
    out: str | Path,
    preset: str | None = None,
    algorithms: list[str] | None = None,
    seeds: int = 1,
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
) -> dict[str, Any]:
    """The whole study into `out`; returns results.json's content (see the module docstring).
    `preset` defaults to the regime's default preset ("default" for pretrain, "upcycle" for
    upcycle), `regime` to the preset's; `compare` names another bench output (of the other
    regime) whose expert change rates the regime comparison sets beside this one's; `studies`
    (default: the preset's) the extra studies the findings need (libmoe.bench.studies:
    init-std, droptop, temperature). results.json's "findings" are the paper's claims checked on
    this output (libmoe.findings). `overwrite` replaces the runs in `out` made with another
    config (and the old tables) instead of refusing them. Failed runs are rows with their error
    (`failure_line` sums them up); SIGTERM/SIGINT raise `Interrupted` (finished runs kept)."""
    from .outputs import check_out_dir
    from .regimes import get_regime
    from .studies import parse_studies, preset_studies

    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}.")
    if regime is not None:
        get_regime(regime)  # an unknown name fails before anything else
    preset = preset or get_regime(regime or "pretrain").default_preset
    spec = load_bench_preset(preset)
    regime_name = regime or spec.regime
    the_regime = get_regime(regime_name)
    if algorithms is not None and not list(algorithms):
        raise ValueError("--algorithms names no algorithm; give comma-separated names (e.g. dense,smoe) "
                         "or leave it out for the paper's eight.")
    check_out_dir(out)
    if getattr(the_regime, "standalone", False):  # the vlm regime: its own pipeline, same outputs
        if spec.regime != regime_name:
            raise ValueError(f"--regime {regime_name} needs a {regime_name} bench preset (e.g. --preset "
                             f"{the_regime.default_preset}); {preset} is a {spec.regime} preset.")
        if launcher != "local" or data is not None or tasks or data_dir is not None:
            raise ValueError(f"the {regime_name} regime evaluates its own held-out split; --launcher, "
                             "--data, --tasks and --data-dir are for the language-model regimes.")
        chosen = parse_studies(studies)
        with stop_on_signals():
            try:
                return the_regime.run(out, spec, algorithms, seeds, jobs, compare, list(overrides), analysis,
                                      log, studies=preset_studies(spec) if chosen is None else chosen,
                                      overwrite=overwrite)
            except (Interrupted, KeyboardInterrupt):
                raise Interrupted(f"bench interrupted: the finished runs are kept in {out}; rerun the same "
                                  "command to resume (finished runs are skipped, stages continue from "
                                  "their checkpoints).") from None
    if jobs is None:
        jobs = spec.jobs if launcher == "local" else 1
    if seeds < 1 or jobs < 1 or nproc < 1:
        raise ValueError("--seeds, --jobs and --nproc must be at least 1.")
    algorithms = list(PAPER_ALGORITHMS if algorithms is None else algorithms)
    if len(set(algorithms)) != len(algorithms):
        raise ValueError(f"--algorithms lists an algorithm twice: {','.join(algorithms)}.")
    if compare is not None and not (Path(compare) / "results.json").is_file():
        raise FileNotFoundError(f"--compare {compare}: no results.json there; give a libmoe bench output.")
    wanted = spec.tasks if tasks is None else tasks
    task_names, skipped_tasks = available_tasks(wanted, data_dir)
    if tasks is not None and skipped_tasks:  # asked for by name: say so rather than drop them
        raise FileNotFoundError("; ".join(f"{t}: {why}" for t, why in skipped_tasks.items()))
    chosen = parse_studies(studies)
    chosen = preset_studies(spec) if chosen is None else chosen
    out = Path(out)
    stages = plan_stages(out, spec, algorithms, seeds, data, list(overrides), task_names, data_dir,
                         launcher, nproc, analysis=analysis, regime=regime_name, studies=chosen)
    every = [s for stage in stages for s in stage]
    for s in every:  # e.g. model.top_k=9 with 8 experts: refused now, not after data preparation
        check_spec(s)
    stale = stale_runs(every)
    if stale and not overwrite:
        first, diff = stale[0]
        more = f"; {len(stale) - 1} more run(s) differ too" if len(stale) > 1 else ""
        raise ValueError(f"--out {str(out)!r} holds run {first.name} made with another config "
                         f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}){more}; give a new "
                         "--out, or pass --overwrite to replace the old study.")
    specs = [s for s in stages[-1] if s.role == "row"]
    study_specs = [s for s in stages[-1] if s.role == "study"]
    budget = specs[0].config["train"]
    support = f" after {len(every) - len(specs) - len(study_specs)} source run(s)" if \
        len(every) > len(specs) + len(study_specs) else ""
    extra = f" + {len(study_specs)} study run(s)" if study_specs else ""
    log(f"bench: preset {preset} ({spec.description}); regime {regime_name}; {len(algorithms)} algorithm(s) "
        f"x {seeds} seed(s) = {len(specs)} runs of {budget['max_steps']} steps x {budget['batch_size']} "
        f"sequences{support}{extra}; studies: {', '.join(chosen) or 'none'}; tasks: "
        f"{', '.join(task_names) or 'none'}"
        + (f" (skipped: {', '.join(skipped_tasks)})" if skipped_tasks else "") + f" -> {out}")
    with stop_on_signals():
        try:
            start = time.perf_counter()
            if any(finished_row(s) is None for s in every):  # every run reads the same data: build it
                from ..train.config import config_from_dict  # once, before --out is touched (a bad
                from ..train.trainer import prepare_run_data  # data source writes nothing there)

                prepare_run_data(config_from_dict(every[0].config), log=log)
            out.mkdir(parents=True, exist_ok=True)
            if stale:
                from .outputs import remove_outputs, remove_run

                for s, _ in stale:
                    remove_run(s.run_dir)
                remove_outputs(out)
                log(f"bench: --overwrite: removed {len(stale)} run(s) made with another config "
                    f"({', '.join(s.name for s, _ in stale)}) and the old tables")
            from .outputs import start_manifest

            start_manifest(out)
            return _run_study(out, preset, spec, regime_name, algorithms, seeds, stages, task_names,
                              skipped_tasks, chosen, jobs, launcher, nproc, slurm, analysis, compare, log,
                              start)
        except (Interrupted, KeyboardInterrupt):
            with signals_ignored():
                kept = sum(finished_row(s) is not None for s in every)
            raise Interrupted(
                f"bench interrupted: {kept} of {len(every)} run(s) finished and are kept in {out}; "
                "rerun the same command to resume (finished runs are skipped, an interrupted run "
                "continues from its checkpoint).") from None


def _run_study(out: Path, preset: str, spec: BenchPreset, regime_name: str, algorithms: list[str],
               seeds: int, stages: list[list[RunSpec]], task_names: list[str],
               skipped_tasks: dict[str, str], chosen: list[str], jobs: int, launcher: str, nproc: int,
               slurm: dict[str, Any] | None, analysis: bool, compare: str | Path | None,
               log: Callable[[str], None], start: float) -> dict[str, Any]:
    """The work of `run_bench` once every check has passed."""
    from .compare import regime_comparison
    from .regimes import get_regime
    from .report import write_bench_report
    from .studies import interventions_of, summarise_studies
    from .tables import aggregate, write_tables

    the_regime = get_regime(regime_name)
    every = [s for stage in stages for s in stage]
    specs = [s for s in stages[-1] if s.role == "row"]
    study_specs = [s for s in stages[-1] if s.role == "study"]
    from .launchers import Progress, duration, run_all

    progress = Progress(every, log)
    done: dict[str, dict[str, Any]] = {}
    for stage in stages:
        ready, blocked = [], []
        for s in stage:
            bad = [done[n] for n in s.needs if done.get(n, {}).get("status") != "ok"]
            (blocked if bad else ready).append((s, bad))
        for s, bad in blocked:  # a run whose source failed fails without trying
            done[s.name] = _blocked_row(s, bad[0])
            progress.finished(s, done[s.name])
        rows = run_all([s for s, _ in ready], jobs, launcher, slurm, out / "slurm", log, progress)
        done.update({r["name"]: r for r in rows})
    rows = [done[s.name] for s in specs]
    support = [done[s.name] for stage in stages[:-1] for s in stage]  # e.g. the dense source
    study_rows = [done[s.name] for s in study_specs]
    study_results, init_std = summarise_studies(out, spec, study_rows)
    analysis_results, figures = ({}, [])
    if analysis and (any(r.get("status") == "ok" for r in rows) or init_std):
        analysis_results, figures = analyse_runs(rows, out, interventions_of(chosen), spec.val_tokens, log,
                                                 init_std=init_std)
    table = aggregate(rows, task_names)
    results = {
        "preset": preset, "description": spec.description, "regime": regime_name,
        "algorithms": algorithms, "seeds": seeds,
        "tasks": task_names, "skipped_tasks": skipped_tasks, "limits": specs[0].limits,
        "config": {k: v for k, v in specs[0].config.items()},
        "rows": table, "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in rows],
        "n_runs": len(every),
        "failed": [{"name": r["name"], "error": r.get("error")} for r in [*support, *rows, *study_rows]
                   if r.get("status") != "ok"],
        "studies": {"run": chosen, **study_results},
        "machine": _machine(), "launcher": {"launcher": launcher, "jobs": jobs, "nproc": nproc},
        **the_regime.summary(spec, support),
    }
    results["config"]["model"] = dict(results["config"]["model"], algorithm="(each)")
    results["config"]["train"] = dict(results["config"]["train"], seed="(each)")
    if results["config"].get("init"):
        results["config"]["init"] = "(each)"
    results["regime_comparison"] = regime_comparison(results, out, compare)
    results["elapsed_s"] = time.perf_counter() - start
    from .plots import plot_scores

    plot_scores(results, out / "analysis" / "figures" / "bench_ppl.png")  # a figure claim a links to
    results["findings"] = _findings(out, results, log)
    write_tables(out, results)
    write_bench_report(out, results, analysis_results, figures)
    ok = sum(r.get("status") == "ok" for r in rows)
    log(f"bench: {ok}/{len(rows)} runs ok in {duration(results['elapsed_s'])}; wrote {out / 'results.md'}, "
        f"{out / 'results.csv'}, {out / 'results.json'} and {out / 'report.html'}")
    return results


def _findings(out: Path, results: dict[str, Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The paper's claims checked on the finished study (libmoe.findings: `results` and the files
    under `out`), one line each."""
    from ..findings import check_findings

    findings = check_findings(out, results=results)
    for f in findings:
        verdict = f["verdict"].replace("_", " ")
        log(f"bench: finding {f['id']}: {verdict} ({f['measured'].get('summary', '')})")
    return findings


def _blocked_row(spec: RunSpec, needed: dict[str, Any]) -> dict[str, Any]:
    """The row of a run not started because a run it starts from failed (not saved: the next
    call tries again)."""
    return {"name": spec.name, "algorithm": spec.algorithm, "seed": spec.seed, "run": spec.run_dir,
            "status": "failed", "error": f"not run: {needed['name']} failed ({needed.get('error')})"}


def _machine() -> dict[str, Any]:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
