"""Inference-time routing interventions: DropTop-n and router temperature (ALGORITHMS.md 3),
each re-running an evaluation against the unperturbed model. `run_interventions` works on any
model whose MoE layers (`libmoe.moe.MoELayer` modules) it finds, given an evaluation function;
`intervention_study` is the language model's (validation perplexity and evaluation tasks)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..eval import LMScorer, evaluate_tasks, get_task, validation_perplexity
from ..files import write_json
from ..moe import MoELayer
from ..moe.routers import ExpertChoiceRouter

DROPTOP = ((1, "DropTop1"), (2, "DropTop1&2"))
TEMPERATURES = (0.1, 1.0, 10.0)
UNITS_FILE = "intervention_units.json"  # RUN/analysis/: per-unit metrics of each measurement


def _routers(model: nn.Module) -> list[nn.Module]:
    return [m.router for m in model.modules() if isinstance(m, MoELayer)]


@contextlib.contextmanager
def routing_intervention(model: nn.Module, drop_top: int = 0, temperature: float = 1.0) -> Iterator[None]:
    """Within the block every router of `model` skips its `drop_top` best slots (DropTop-n: ranks
    n+1..n+k, renormalised) and divides its logits by `temperature` (times its trained
    temperature, so 1 is the model as trained). Restored on exit."""
    routers = _routers(model)
    if not routers:
        raise ValueError("the model has no MoE router to intervene on (a dense model).")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be positive.")
    for r in routers:
        if drop_top and isinstance(r, ExpertChoiceRouter):
            raise ValueError("DropTop is not defined for expert_choice routing (experts choose tokens).")
        if drop_top + r.top_k > r.n_slots:
            raise ValueError(f"DropTop{drop_top} needs top_k + {drop_top} <= router slots; a router has "
                             f"top_k={r.top_k} and {r.n_slots} slots.")
    saved = [(r.drop_top, r.temperature) for r in routers]
    try:
        for r in routers:
            r.drop_top, r.temperature = drop_top, r.temperature * temperature
        yield
    finally:
        for r, (d, t) in zip(routers, saved):
            r.drop_top, r.temperature = d, t


STUDIES = ("droptop", "temperature")


def intervention_plan(interventions: bool | list[str] | tuple[str, ...]) -> tuple[tuple[int, ...],
                                                                                  tuple[float, ...]]:
    """(DropTop ns, temperatures) of `interventions`: True (both studies), False (neither) or
    the names of the studies to run ("droptop", "temperature")."""
    if isinstance(interventions, bool):
        names = set(STUDIES) if interventions else set()
    else:
        names = set(interventions)
        unknown = names - set(STUDIES)
        if unknown:
            raise ValueError(f"unknown intervention studies {sorted(unknown)}; valid: {', '.join(STUDIES)}.")
    return (tuple(n for n, _ in DROPTOP) if "droptop" in names else (),
            TEMPERATURES if "temperature" in names else ())


def write_units(out: str | Path, per_unit: dict[str, dict[str, list[float]]], unit: str,
                **meta: Any) -> Path:
    """OUT/intervention_units.json: each measurement's per-unit metrics (validation windows for a
    language model, questions for a VLM), the input of the findings' bootstrap."""
    return write_json(Path(out) / UNITS_FILE, {"unit": unit, **meta, "runs": per_unit}, indent=None)


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"val_ppl": ..., "TASK/METRIC": ...} of `evaluate_tasks`-style results (scores only)."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        if task == "val_ppl":
            out["val_ppl"] = float(metrics["ppl"])
            continue
        for key in ("acc", "acc_norm", "ppl", "word_perplexity"):
            if isinstance(metrics.get(key), (int, float)):
                out[f"{task}/{key}"] = float(metrics[key])
    return out


def intervention_study(
    loaded,
    tasks: list[str] = (),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    val_tokens: int | str = "run",
    droptop: tuple[int, ...] = (1, 2),
    temperatures: tuple[float, ...] = TEMPERATURES,
    val_ppl: bool = True,
    log: Callable[[str], None] | None = None,
    per_unit: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, Any]:
    """{"droptop": ..., "temperature": ...} as in metrics.json: the baseline metrics (`val_ppl`
    on the run's own validation split when asked, plus `tasks`), and for each perturbation its
    metrics and their delta (perturbed minus baseline). `per_unit`, when given, receives
    {measurement name: {"val_nll": each validation window's loss}} (the findings' bootstrap)."""
    say = log or (lambda _: None)
    shown_tasks = ["val_ppl"] + [get_task(t).name for t in tasks]  # a group's mean, not its members
    scorer = LMScorer(loaded.model, loaded.tokenizer, batch_size=batch_size)
    use_val = val_ppl and bool(loaded.config)

    def measure(name: str) -> dict[str, float]:
        start = time.perf_counter()
        results = {}
        if use_val:
            results["val_ppl"] = validation_perplexity(loaded, val_tokens, batch_size,
                                                       per_window=per_unit is not None)
            if per_unit is not None:
                per_unit[name] = {"val_nll": results["val_ppl"].pop("window_nll")}
        results.update(evaluate_tasks(scorer, list(tasks), data_dir, limit))
        flat = flat_metrics({k: results[k] for k in shown_tasks if k in results})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in flat.items())
        say(f"  {name}: {shown} ({time.perf_counter() - start:.1f} s)")
        return flat

    return run_interventions(loaded.model, measure, droptop, temperatures)


def run_interventions(model: nn.Module, measure: Callable[[str], dict[str, float]],
                      droptop: tuple[int, ...] = (1, 2),
                      temperatures: tuple[float, ...] = TEMPERATURES) -> dict[str, Any]:
    """{"droptop": ..., "temperature": ...}: `measure(name)` (flat metrics) unperturbed, under each
    DropTop-n and each router temperature, with every metric's delta from the unperturbed one."""

    def delta(metrics: dict[str, float]) -> dict[str, float]:
        return {k: metrics[k] - baseline[k] for k in metrics if k in baseline}

    baseline = measure("unperturbed")
    out: dict[str, Any] = {"droptop": {"baseline": baseline, "runs": []},
                           "temperature": {"baseline": baseline, "runs": []}}
    names = dict(DROPTOP)
    for n in droptop:
        name = names.get(n, f"DropTop{n}")
        with routing_intervention(model, drop_top=n):
            metrics = measure(name)
        out["droptop"]["runs"].append({"name": name, "drop_top": n, "metrics": metrics,
                                       "delta": delta(metrics)})
    for tau in temperatures:
        name = f"tau={tau:g}"
        if tau == 1.0:
            metrics = baseline
        else:
            with routing_intervention(model, temperature=tau):
                metrics = measure(name)
        out["temperature"]["runs"].append({"name": name, "tau": tau, "metrics": metrics,
                                           "delta": delta(metrics)})
    return out
