"""`libmoe analyze` on a VLM run: the routing of the vision MoE layers and the connector on held-out
images labelled by subtask, with the same metrics.json keys as a language-model run plus the
VLM views of the paper's Section 5:

- ``eae_by_task``: expert allocation entropy per subtask and layer (Fig. 6);
- ``ewa_by_group``: weight entropy per task group (perception, reading) and layer (Fig. 7);
- ``router_margin``: per MoE layer in depth order, vision layers then the connector (Fig. 8 right);
- ``expert_change_rate``: between consecutive VIT checkpoints (Fig. 3; 20/40/60/80/100%);
- ``droptop`` / ``temperature``: synth_mme accuracy with DropTop1, DropTop1&2 and tau 0.1 / 10 (Fig. 5).

The VLM's run kind (`VLM_RUN_KIND`, `libmoe.analysis.kinds`): `import libmoe.vlm` registers it, and
the ``libmoe.run_kinds`` entry point ``vlm = "libmoe.vlm.analysis:VLM_RUN_KIND"`` lets
`libmoe analyze` and `libmoe.analysis.analyze_run` find it without importing libmoe.vlm first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from ..analysis import (
    METRICS_FILE,
    AnalysisOptions,
    RunKind,
    display_name,
    intervention_plan,
    run_interventions,
    run_traces,
    training_dynamics,
    write_figures_and_report,
    write_units,
)
from ..analysis import metrics as M
from ..files import write_json
from ..moe.trace import Trace
from .data import probe_images
from .evaluate import evaluate_vlm
from .plots import plot_subtask_routing
from .saving import load_vlm
from .stages import load_stage_config, resolve_data
from .synth import SUBTASK_GROUPS
from .trace import record_vlm_trace


def is_vlm_run(path: str | Path) -> bool:
    """Whether `path` is a `libmoe vlm train` run or checkpoint (vlm.json, or config.yaml's kind)."""
    path = Path(path)
    if (path / "vlm.json").is_file():
        return True
    cfg = path / "config.yaml"
    return cfg.is_file() and (yaml.safe_load(cfg.read_text()) or {}).get("kind") == "vlm"


def _groups(names: list[str]) -> dict[str, str]:
    return {n: SUBTASK_GROUPS.get(n, "other") for n in names}


def group_trace(trace: Trace) -> Trace:
    """The trace relabelled by task group (perception, reading, ...)."""
    groups = _groups(trace.labels)
    names = sorted(set(groups.values()))
    mapping = torch.tensor([names.index(groups[n]) for n in trace.labels], dtype=torch.long)
    return replace(trace, label=mapping[trace.label], labels=names, meta=dict(trace.meta, label_kind="group"))


def _flat(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for task, m in results.items():
        out[f"{task}/acc"] = float(m["acc"])
        if "acc_plus" in m:
            out[f"{task}/acc_plus"] = float(m["acc_plus"])
    return out


def vlm_interventions(model, tokenizer, template: str, folder, tasks: list[str], subtasks=None,
                      limit: int | None = None, log: Callable[[str], None] | None = None,
                      interventions: bool | list[str] = True,
                      per_unit: dict[str, dict[str, list[float]]] | None = None) -> dict[str, Any]:
    """DropTop-n and router-temperature studies on the VLM evaluation (the analysis format);
    `per_unit` receives {measurement: {"TASK/correct": 1.0 or 0.0 per question}}."""
    say = log or (lambda _: None)

    def measure(name: str) -> dict[str, float]:
        start = time.perf_counter()
        results = evaluate_vlm(model, tokenizer, template, folder, tasks, subtasks, limit,
                               per_question=per_unit is not None)
        if per_unit is not None:
            per_unit[name] = {f"{t}/correct": m.pop("correct") for t, m in results.items()}
        flat = _flat(results)
        say(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in flat.items())
            + f" ({time.perf_counter() - start:.1f} s)")
        return flat

    return run_interventions(model, measure, *intervention_plan(interventions))


def analyze_vlm_run(run: str | Path, out: str | Path | None = None, device: str = "cpu",
                    interventions: bool | list[str] = True, limit: int | None = None, figures: bool = True,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Analyse a VLM run (see the module docstring) into `out` (default RUN/analysis)."""
    say = log or (lambda _: None)
    run = Path(run)
    out = Path(out) if out is not None else run / "analysis"
    start = time.perf_counter()
    model, tokenizer, meta = load_vlm(run, device=device)
    cfg = load_stage_config(run) if (run / "config.yaml").is_file() else {}
    folder = resolve_data(cfg.get("data") or {"source": "synth"}, say)
    subtasks = (cfg.get("data") or {}).get("subtasks")
    template = cfg.get("template", "simple")
    moe = model.spec.get("moe") or {}
    result: dict[str, Any] = {"run": run.resolve().name, "path": str(run.resolve()), "kind": "vlm",
                              "stage": meta.get("stage"), "step": meta.get("step"),
                              "algorithm": moe.get("algorithm", "dense"), "skipped": {}}
    if not model.moe_layers():
        result["skipped"]["routing"] = "dense model: no router, so no routing to analyse"
        scores = evaluate_vlm(model, tokenizer, template, folder, ["synth_mme"], subtasks, limit)
        result["scores"] = _flat(scores)
    else:
        traces = run_traces(run)
        if not traces or traces[-1].step != meta.get("step"):
            per_subtask = int((cfg.get("train") or {}).get("probe_per_subtask", 16))
            probe = probe_images(folder, model.pixel_size, per_subtask)
            if probe is None:
                raise FileNotFoundError(f"{run} has no routing trace and {folder} no held-out images.")
            say("recording a routing trace of the held-out images (the final model has none)")
            traces.append(record_vlm_trace(model, *probe, step=meta.get("step")))
        final = traces[-1]
        say(f"{len(traces)} trace(s): steps {', '.join(str(t.step) for t in traces)}; "
            f"{final.n_tokens:,} patches, {final.n_layers} MoE layers "
            f"({', '.join(final.meta.get('layer_names', []))})")
        result.update(n_experts=final.meta.get("n_experts"), top_k=final.meta.get("top_k"),
                      n_slots=[final.n_slots(l) for l in range(final.n_layers)],
                      layers=final.meta.get("layers"), layer_names=final.meta.get("layer_names"),
                      n_tokens=final.n_tokens, labels=final.labels)
        result.update(M.trace_metrics(final))
        result["eae_by_task"] = M.by_label(final, M.eae)
        result["ewa_by_task"] = M.by_label(final, M.ewa)
        grouped = group_trace(final)
        result["groups"] = _groups(final.labels)
        result["eae_by_group"] = M.by_label(grouped, M.eae)
        result["ewa_by_group"] = M.by_label(grouped, M.ewa)
        result.update(training_dynamics(traces))
        result["expert_similarity"] = M.expert_similarity(model)
        if any(intervention_plan(interventions)):
            say("interventions (DropTop, router temperature) on synth_mme:")
            per_unit: dict[str, dict[str, list[float]]] = {}
            result.update(vlm_interventions(model, tokenizer, template, folder, ["synth_mme"], subtasks,
                                            limit, say, interventions, per_unit))
            result["scores"] = result["droptop"]["baseline"]
            write_units(out, per_unit, "question")
        else:
            result["skipped"]["interventions"] = "turned off (--no-interventions)"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, result, indent=1)
    if figures:
        write_vlm_figures(out, {display_name(result): result})
    say(f"analysis of {run} in {time.perf_counter() - start:.1f} s -> {out}")
    return result


def write_vlm_figures(out: str | Path, runs: dict[str, dict[str, Any]]) -> Path:
    """The standard analysis figures and report plus the VLM subtask figure."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    extra = plot_subtask_routing(runs, out / "figures" / "vlm_subtask_routing.png")
    notes = ["Vision-language run: routing of the vision MoE layers and the connector on held-out images; "
             "labels are the synthetic subtasks."]
    if extra:
        notes.append("figures/vlm_subtask_routing.png: allocation entropy per subtask (Fig. 6), weight "
                     "entropy per task group (Fig. 7) and router margin per layer (Fig. 8 right).")
    return write_figures_and_report(out, runs, title="libmoe VLM routing analysis", notes=notes)


def analyze_vlm_kind(run: Path, out: Path | None, options: AnalysisOptions) -> dict[str, Any]:
    """`analyze_vlm_run` with `libmoe analyze`'s options (a VLM run takes no --tasks or --val-tokens)."""
    return analyze_vlm_run(run, out, device=options.device, interventions=options.interventions,
                           limit=options.limit, figures=options.figures, log=options.log)


VLM_RUN_KIND = RunKind("vlm", is_vlm_run, analyze_vlm_kind,
                       "libmoe vlm train runs: vision MoE layers on held-out images by subtask, MME scoring")
