"""`libmoe analyze`: every routing diagnostic of one run (metrics.json, figures, report.html), and
the overlay of several runs' analyses."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..eval.evaluator import run_data_available
from ..files import read_json_object, write_json
from . import metrics as M
from .interventions import intervention_plan, intervention_study, write_units
from .trace import TRACE_TENSORS, RoutingRecorder, Trace, check_one_run, list_traces, trace_meta

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


def run_traces(run: str | Path) -> list[Trace]:
    """The routing traces a run (or a checkpoint directory) holds, in step order; traces of
    different runs in one directory are refused (`check_one_run`)."""
    run = Path(run)
    if (run / TRACE_TENSORS).is_file():
        return [Trace.load(run)]
    found = list_traces(run)
    check_one_run(found, run)
    return [Trace.load(path) for _, path in found]


def check_analysis(run: str | Path, out: str | Path | None, tasks: list[str] = (), data_dir=None,
                   limit: int | None = None, batch_size: int = 16, device: str = "cpu",
                   val_tokens: int | str = "run") -> str:
    """Refuse, before anything loads, what `analyze_run` would fail on: a missing run, an output
    path that is a file, unknown tasks or missing task files, a non-positive --limit or
    --batch-size, a bad --val-tokens, a device this machine lacks, or traces of different runs.
    Returns the checked device."""
    from ..devices import check_device
    from ..eval.evaluator import check_evaluation
    from ..eval.tasks import get_task, local_file

    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{str(run)!r} does not exist; give a run directory (libmoe train --out).")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory for metrics.json, figures and "
                         "report.html.")
    check_evaluation(None, limit, batch_size, val_tokens)
    pending = [get_task(name) for name in tasks]  # unknown names fail here, with a near match
    while pending:
        task = pending.pop()
        if task.group:
            pending += [get_task(member) for member in task.group]
        else:
            local_file(task, data_dir)
    device = check_device(device)
    if not (run / TRACE_TENSORS).is_file():
        check_one_run(list_traces(run), run)
    return device


def record_probe_trace(loaded, log: Callable[[str], None]) -> Trace:
    """A trace of the run's probe set (the tokens training traces) for a model without traces."""
    from ..data.packed import probe_set
    from ..train.config import config_from_dict
    from ..train.trainer import prepare_run_data

    cfg = config_from_dict(loaded.config)
    data = prepare_run_data(cfg, log=log)
    tokens, domain = probe_set(data.val, data.val_domain, cfg.data.probe_tokens, cfg.seq_len)
    with RoutingRecorder(loaded.model, labels=list(data.domains)) as rec:
        rec.record(tokens, labels=domain)
    return rec.trace(step=loaded.step)


def record_task_trace(loaded, tasks: list[str], data_dir=None, limit: int | None = None,
                      batch_size: int = 16, log: Callable[[str], None] | None = None) -> Trace:
    """A trace labelled by task: each document's gold request (context and continuation; for
    multiple-input tasks the gold context), tokenised as scored."""
    from ..eval.scoring import LMScorer
    from ..eval.tasks import get_task, load_records

    scorer = LMScorer(loaded.model, loaded.tokenizer, batch_size=batch_size)
    names = []
    for name in tasks:  # a group (blimp, cbt) is recorded as its members
        task = get_task(name)
        names += list(task.group) if task.group else [name]
    with RoutingRecorder(loaded.model, labels=[get_task(n).name for n in names]) as rec:
        for i, name in enumerate(names):
            task = get_task(name)
            rows = []
            for record in load_records(task, data_dir, limit):
                doc = task.to_doc(record)
                context, continuation = task.requests(doc)[doc.gold]
                ctx, cont = scorer.encode_pair(context, continuation)
                rows.append((ctx + cont)[-scorer.max_length:])
            rows.sort(key=len, reverse=True)
            for s in range(0, len(rows), batch_size):
                batch = rows[s : s + batch_size]
                tokens = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
                mask = torch.zeros_like(tokens, dtype=torch.bool)
                for b, row in enumerate(batch):
                    tokens[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), True
                rec.record(tokens, labels=i, mask=mask, batch_size=len(batch))
            if log and len(names) <= 20:  # a group's dozens of members would flood the log
                log(f"  {task.name}: {len(rows)} documents, {sum(map(len, rows)):,} tokens")
    return rec.trace(step=loaded.step, label_kind="task")


def training_dynamics(traces: list[Trace], coactivated: int = 16) -> dict[str, Any]:
    """Change rate between consecutive traces, saturation of each against the last, and
    co-activation at the first and the last."""
    final = traces[-1]
    ends = [traces[0], final] if len(traces) > 1 else [final]
    return {
        "expert_change_rate": [M.expert_change_rate(a, b) for a, b in zip(traces, traces[1:])],
        "router_saturation": [M.router_saturation(t, final) for t in traces],
        "coactivation": [
            {"step": t.step, "by_layer": {str(l): M.coactivation_summary(t.topk_idx[l], t.n_slots(l),
                                                                       coactivated)
                                          for l in range(t.n_layers)}}
            for t in ends
        ],
    }


def analyze_run(
    run: str | Path,
    out: str | Path | None = None,
    tasks: list[str] = (),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    interventions: bool | list[str] = True,
    val_tokens: int | str = "run",
    init_std: dict | None = None,
    figures: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Analyse one run (or checkpoint) into `out` (default RUN/analysis): metrics.json, the
    figures and report.html. Returns the metrics dict."""
    from ..models import load_model
    from ..moe import MoELayer
    from ..train.config import config_from_dict
    from ..vlm.analysis import analyze_vlm_run, is_vlm_run

    device = check_analysis(run, out, tasks, data_dir, limit, batch_size, device, val_tokens)
    if is_vlm_run(run):  # a `libmoe vlm train` run: routing of the vision layers on held-out images
        return analyze_vlm_run(run, out, device=device, interventions=interventions, limit=limit,
                               figures=figures, log=log)
    say = log or (lambda _: None)
    run = Path(run)
    out = Path(out) if out is not None else run / "analysis"
    start = time.perf_counter()
    loaded = load_model(run, device=device)
    traces = run_traces(run)
    routed = any(isinstance(m, MoELayer) for m in loaded.model.modules())
    result: dict[str, Any] = {"run": run.resolve().name, "path": str(run.resolve()), "step": loaded.step,
                              "algorithm": (loaded.config.get("model") or {}).get("algorithm"),
                              "skipped": {}}
    if not routed:
        result["skipped"]["routing"] = "dense model: no router, so no routing to analyse"
        if interventions and loaded.config and run_data_available(loaded.config):
            from ..eval.evaluator import validation_perplexity

            result["val_ppl"] = validation_perplexity(loaded, val_tokens, batch_size)["ppl"]
    else:
        task_trace = None
        if tasks:
            say(f"recording routing on tasks: {', '.join(tasks)}")
            task_trace = record_task_trace(loaded, list(tasks), data_dir, limit, batch_size, say)
            task_trace.save(out / "task_trace")
        if not traces or traces[-1].step != loaded.step:
            if loaded.config and run_data_available(loaded.config):
                say("recording a routing trace of the probe set (the final model has none)")
                traces.append(record_probe_trace(loaded, say))
            elif task_trace is not None:  # e.g. a model from elsewhere: its routing on the tasks
                say("no probe data for this model: analysing its routing on the tasks")
                traces = [task_trace]  # earlier traces cover other tokens
                result["skipped"]["training_dynamics"] = "no probe-set trace of the final model"
            else:
                raise FileNotFoundError(
                    f"{run} has no routing trace of its final model and no probe data here (run "
                    "from the directory it was trained in), or give --tasks to analyse its routing "
                    "on evaluation tasks.")
        final = traces[-1]
        say(f"{len(traces)} trace(s): steps {', '.join(str(t.step) for t in traces)}; "
            f"{final.n_tokens:,} tokens, {final.n_layers} MoE layers")
        result.update(algorithm=final.meta.get("algorithm") or result["algorithm"],
                      step=final.step, n_experts=final.meta.get("n_experts"),
                      top_k=final.meta.get("top_k"),
                      n_slots=[final.n_slots(l) for l in range(final.n_layers)],
                      layers=final.meta.get("layers"), n_tokens=final.n_tokens, labels=final.labels,
                      run_hash=next((t.meta["run_hash"] for t in traces if t.meta.get("run_hash")), None))
        result.update(M.trace_metrics(final))
        result.update(training_dynamics(traces))
        result["expert_similarity"] = M.expert_similarity(loaded.model)
        if task_trace is not None:
            result["eae_by_task"] = M.by_label(task_trace, M.eae)
            result["ewa_by_task"] = M.by_label(task_trace, M.ewa)
        droptop, temperatures = intervention_plan(interventions)
        if droptop or temperatures:
            use_val = bool(loaded.config) and run_data_available(loaded.config)
            if not use_val:
                result["skipped"]["val_ppl"] = "the run's validation data is not here"
            if use_val or tasks:
                say("interventions (DropTop, router temperature):")
                per_unit: dict[str, dict[str, list[float]]] = {}
                result.update(intervention_study(loaded, list(tasks), data_dir, limit, batch_size,
                                                 val_tokens, droptop, temperatures, val_ppl=use_val,
                                                 log=say, per_unit=per_unit))
                if use_val:
                    result["val_ppl"] = result["droptop"]["baseline"]["val_ppl"]
                    seq_len = config_from_dict(loaded.config).seq_len
                    write_units(out, per_unit, "validation window", tokens_per_window=seq_len)
            else:
                result["skipped"]["interventions"] = "no validation data and no --tasks to measure"
        else:
            result["skipped"]["interventions"] = "turned off (--no-interventions)"
    if init_std is not None:
        result["init_std"] = init_std
    write_json(out / METRICS_FILE, result, indent=1)
    if figures:
        write_figures_and_report(out, {display_name(result): result}, init_std)
    say(f"analysis of {run} in {time.perf_counter() - start:.1f} s -> {out}")
    return result


def display_name(result: dict[str, Any]) -> str:
    return str(result.get("algorithm") or result.get("run") or "run")


def unique_names(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{name: metrics} naming each run by its algorithm, or by its directory when two share one."""
    algos = [display_name(r) for r in results]
    out: dict[str, dict[str, Any]] = {}
    for r, algo in zip(results, algos):
        name = algo if algos.count(algo) == 1 else f"{algo} ({r.get('run')})"
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = r
    return out


def load_analysis(run: str | Path) -> dict[str, Any] | None:
    """RUN/analysis/metrics.json when it describes the run's newest trace, else None."""
    path = Path(run) / "analysis" / METRICS_FILE
    if not path.is_file():
        return None
    try:
        result = read_json_object(path)
    except ValueError:  # damaged: a cache, recomputed (and rewritten) by the caller
        return None
    traces = list_traces(run)
    if traces and traces[-1][0] != result.get("step"):
        return None  # the run trained further since
    try:
        current = trace_meta(traces[-1][1]).get("run_hash") if traces else None
    except ValueError:  # a damaged trace: the caller's analysis names it
        return None
    if current != result.get("run_hash"):
        return None  # written for another run in this directory (or before run_hash existed)
    return result


def write_figures_and_report(out: str | Path, runs: dict[str, dict[str, Any]],
                             init_std: dict | None = None, title: str = "libmoe routing analysis",
                             notes: list[str] | None = None) -> Path:
    """Write every applicable figure into OUT/figures and OUT/report.html; returns the report."""
    from .plots import plot_all
    from .report import write_report

    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_all(runs, fig_dir, init_std=init_std)
    return write_report(out / REPORT_FILE, runs, figures, fig_dir, title=title, notes=notes)
