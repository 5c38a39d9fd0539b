"""The built-in run kind: a language model (`libmoe train`, `libmoe upcycle`, a Hub model). Its
probe set is the run's held-out probe tokens (labelled by domain), or evaluation tasks' gold
requests with --tasks (labelled by task); its interventions measure validation perplexity and the
tasks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data.packed import probe_set
from ..eval import LMScorer, get_task, load_records, run_data_available, validation_perplexity
from ..files import write_json
from ..models import config_from_dict, load_model, prepare_run_data
from ..moe import MoELayer
from ..moe.trace import RoutingRecorder, Trace
from . import metrics as M
from .interventions import intervention_plan, intervention_study, write_units
from .kinds import DEFAULT_KIND, AnalysisOptions, RunKind, declared_kind
from .runs import METRICS_FILE, display_name, run_traces, training_dynamics, write_figures_and_report


def record_probe_trace(loaded, log: Callable[[str], None]) -> Trace:
    """A trace of the run's probe set (the tokens training traces) for a model without traces."""
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


def analyze_lm_run(run: Path, out: Path | None, options: AnalysisOptions) -> dict[str, Any]:
    """Analyse a language-model run (or checkpoint) into `out` (default RUN/analysis): metrics.json,
    the figures and report.html. Returns the metrics dict."""
    say = options.log or (lambda _: None)
    run = Path(run)
    out = Path(out) if out is not None else run / "analysis"
    start = time.perf_counter()
    loaded = load_model(run, device=options.device)
    traces = run_traces(run)
    result: dict[str, Any] = {"run": run.resolve().name, "path": str(run.resolve()), "step": loaded.step,
                              "algorithm": (loaded.config.get("model") or {}).get("algorithm"),
                              "skipped": {}}
    if not any(isinstance(m, MoELayer) for m in loaded.model.modules()):
        dense_analysis(result, loaded, options)
    else:
        traces, task_trace = final_traces(run, out, loaded, traces, result, options, say)
        routing_analysis(result, loaded, traces, task_trace, say)
        intervention_analysis(result, out, loaded, options, say)
    if options.init_std is not None:
        result["init_std"] = options.init_std
    write_json(out / METRICS_FILE, result, indent=1)
    if options.figures:
        write_figures_and_report(out, {display_name(result): result}, options.init_std)
    say(f"analysis of {run} in {time.perf_counter() - start:.1f} s -> {out}")
    return result


def dense_analysis(result: dict[str, Any], loaded, options: AnalysisOptions) -> None:
    """A dense model has no routing: only its validation perplexity, when its data is here."""
    result["skipped"]["routing"] = "dense model: no router, so no routing to analyse"
    if options.interventions and loaded.config and run_data_available(loaded.config):
        result["val_ppl"] = validation_perplexity(loaded, options.val_tokens, options.batch_size)["ppl"]


def final_traces(run: Path, out: Path, loaded, traces: list[Trace], result: dict[str, Any],
                 options: AnalysisOptions, say: Callable[[str], None]) -> tuple[list[Trace], Trace | None]:
    """(the traces to analyse, ending with one of the final model; the task trace with --tasks).
    The final model's trace is the run's, else recorded on the probe set, else (a model from
    elsewhere, no probe data here) its trace on the tasks."""
    task_trace = None
    if options.tasks:
        say(f"recording routing on tasks: {', '.join(options.tasks)}")
        task_trace = record_task_trace(loaded, list(options.tasks), options.data_dir, options.limit,
                                       options.batch_size, say)
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
    return traces, task_trace


def routing_analysis(result: dict[str, Any], loaded, traces: list[Trace], task_trace: Trace | None,
                     say: Callable[[str], None]) -> None:
    """The routing metrics of the final trace, the dynamics over all traces, expert similarity and,
    with --tasks, allocation and weight entropy by task."""
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


def intervention_analysis(result: dict[str, Any], out: Path, loaded, options: AnalysisOptions,
                  say: Callable[[str], None]) -> None:
    """DropTop and router temperature measured on the validation split (when here) and the tasks;
    the per-window losses go to OUT/intervention_units.json."""
    droptop, temperatures = intervention_plan(options.interventions)
    if not (droptop or temperatures):
        result["skipped"]["interventions"] = "turned off (--no-interventions)"
        return
    use_val = bool(loaded.config) and run_data_available(loaded.config)
    if not use_val:
        result["skipped"]["val_ppl"] = "the run's validation data is not here"
    if not (use_val or options.tasks):
        result["skipped"]["interventions"] = "no validation data and no --tasks to measure"
        return
    say("interventions (DropTop, router temperature):")
    per_unit: dict[str, dict[str, list[float]]] = {}
    result.update(intervention_study(loaded, list(options.tasks), options.data_dir, options.limit,
                                     options.batch_size, options.val_tokens, droptop, temperatures,
                                     val_ppl=use_val, log=say, per_unit=per_unit))
    if use_val:
        result["val_ppl"] = result["droptop"]["baseline"]["val_ppl"]
        seq_len = config_from_dict(loaded.config).seq_len
        write_units(out, per_unit, "validation window", tokens_per_window=seq_len)


def is_language_model_run(path: Path) -> bool:
    """Whether `path` declares no other kind (a language-model run's config.yaml has no `kind`)."""
    return declared_kind(path) in (None, DEFAULT_KIND)


LM_RUN_KIND = RunKind(DEFAULT_KIND, is_language_model_run, analyze_lm_run,
                      "language models: libmoe train and upcycle runs, Hub models")
