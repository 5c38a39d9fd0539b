"""The pieces every run kind's analysis shares: a run's routing traces, the training dynamics over
them, and the files an analysis writes (RUN/analysis/{metrics.json, figures/, report.html}) and
reads back (a cached analysis, several runs' names in one comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import read_json_object
from ..moe.trace import TRACE_TENSORS, Trace, check_one_run, list_traces, trace_meta
from . import metrics as M
from .plots import plot_all
from .report import write_report

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


def display_name(result: dict[str, Any]) -> str:
    """A run's name in figures and tables: its algorithm, else its directory's name."""
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
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_all(runs, fig_dir, init_std=init_std)
    return write_report(out / REPORT_FILE, runs, figures, fig_dir, title=title, notes=notes)
