"""One language-model run of a bench study, in the process that trains it: train (in this
process, or under torchrun with N processes), evaluate (validation perplexity on the held-out
split, each window's loss kept for the findings, plus every zero-shot task), time one forward pass
and analyse the routing where the run trained. The `pretrain` and `upcycle` regimes run their runs
with these (`libmoe.bench.regimes.pretrain`)."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from ..analysis import analyze_run, load_analysis
from ..eval import evaluate_model
from ..eval.results import write_results
from ..files import read_json, write_json, write_text
from ..models import config_from_dict, latest_checkpoint, load_model
from ..train import train
from .outputs import plain_json
from .placement import torchrun_command
from .safety import signals_ignored
from .spec import RunSpec

VAL_WINDOWS_FILE = "val_windows.json"  # RUN/eval/: each validation window's loss (the findings' bootstrap)


def distributed(spec: RunSpec) -> bool:
    """Whether the run trains under torchrun (several processes or nodes) rather than in the
    process that runs it: --launcher torchrun, or a Slurm job of several GPUs or nodes."""
    nnodes = int((spec.torchrun or {}).get("nnodes") or 1)
    return spec.launcher in ("torchrun", "slurm") and (spec.nproc > 1 or nnodes > 1)


def training_command(spec: RunSpec) -> list[str]:
    """The torchrun command that trains `spec` from RUN/bench_config.yaml (written here): one
    node standalone, several through the spec's rendezvous (libmoe.bench.placement)."""
    run = Path(spec.run_dir)
    config_file = run / "bench_config.yaml"
    write_text(config_file, yaml.safe_dump(spec.config, sort_keys=False))
    # resume a run with a checkpoint; restart one that stopped before its first; else start
    again = ["--resume"] if latest_checkpoint(run) is not None else \
        ["--overwrite"] if (run / "config.yaml").is_file() else []
    rdzv = spec.torchrun or {}
    entry = ["-m", "libmoe", "train", str(config_file), "--out", str(run), *again]
    return torchrun_command(spec.nproc, entry, rdzv, name=spec.name, offset=int(rdzv.get("offset") or 0))


def train_run(spec: RunSpec, progress: bool | None) -> dict[str, Any]:
    """Train (or resume) the run; its train_summary.json. Under torchrun (`distributed`) the run
    trains in a child `libmoe train` from RUN/bench_config.yaml."""
    run = Path(spec.run_dir)
    if distributed(spec):
        train_only(spec)
        return read_json(run / "train_summary.json")
    return train(config_from_dict(spec.config), run, resume="auto", progress=progress)


def train_only(spec: RunSpec) -> None:
    """This node's part of the run's torchrun training, nothing else: what a node other than
    node 0 does for each run (node 0 also prepares, evaluates and writes the row)."""
    cmd = training_command(spec)
    print("bench: " + " ".join(cmd), flush=True)
    run_forwarding_signals(cmd, stdout=sys.stdout if spec.log_file is None else None)


def run_forwarding_signals(cmd: list[str], stdout=None) -> None:
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


def evaluate_trained(spec: RunSpec, summary: dict[str, Any], row: dict[str, Any]) -> None:
    """The row of a trained run: its training numbers and, unless the spec says otherwise, its
    evaluation, inference latency and routing analysis."""
    run = Path(spec.run_dir)
    if not spec.evaluate:
        row.update(status="ok", step=summary["step"], train_time_s=summary["train_time_s"],
                   train_val_ppl=summary.get("val_ppl"))
        return
    results = evaluate_run(spec)
    train_cfg = spec.config["train"]
    seq_len = train_cfg.get("seq_len") or spec.config["model"]["max_seq_len"]
    tokens = summary["step"] * train_cfg["batch_size"] * seq_len
    row.update(tokens_per_s=tokens / summary["train_time_s"] if summary["train_time_s"] else None)
    row.update(throughput_from_metrics(run))
    row.update(status="ok", step=summary["step"], train_time_s=summary["train_time_s"],
               peak_mem_mb=summary["peak_mem_mb"], params_total=summary["params_total"],
               params_active=summary["params_active"], train_val_ppl=summary.get("val_ppl"),
               ppl=(results.get("val_ppl") or {}).get("ppl"), results=results,
               latency_ms=inference_latency(run, spec.config))
    if spec.analysis:
        analyse_in_place(spec, row)


def throughput_from_metrics(run: str | Path) -> dict[str, float | None]:
    """The training's own throughput figures from RUN/metrics.jsonl, where its rows have them:
    the mean MFU (a fraction) and step time (s) over the logged training rows, leaving out the
    first when there are more (warm-up and compilation); None for a figure no row has."""
    path = Path(run) / "metrics.jsonl"
    values: dict[str, list[float]] = {"mfu": [], "step_time_s": []}
    if path.is_file():
        with path.open() as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for key, seen in values.items():
                    if isinstance(entry, dict) and isinstance(entry.get(key), (int, float)):
                        seen.append(float(entry[key]))
    return {k: statistics.fmean(v[1:] if len(v) > 2 else v) if v else None for k, v in values.items()}


def evaluate_run(spec: RunSpec) -> dict[str, Any]:
    """Validation perplexity and the zero-shot tasks (RUN/eval/results.json, reused while the
    run's step and the task list are unchanged)."""
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


def analyse_run(run_dir: str | Path, interventions: bool | list[str],
                val_tokens: int | str) -> dict[str, Any]:
    """RUN/analysis/metrics.json of one run (routing metrics and interventions; the interventions'
    five evaluations use training's windows when the table uses the whole split)."""
    return analyze_run(run_dir, interventions=interventions, figures=False,
                       val_tokens="run" if val_tokens == "all" else val_tokens)


def analyse_in_place(spec: RunSpec, row: dict[str, Any]) -> None:
    """Analyse the run here, where it trained, so that parallel jobs and Slurm jobs analyse in
    parallel too; a failure is noted, not fatal."""
    if load_analysis(spec.run_dir) is not None:
        return
    try:
        analyse_run(spec.run_dir, spec.interventions, spec.val_tokens)
    except Exception as err:  # noqa: BLE001  the scores stand without the routing analysis
        row["analysis_error"] = f"{type(err).__name__}: {err}"
        print(f"bench: analysis of {spec.name} failed: {row['analysis_error']}", file=sys.stderr)
