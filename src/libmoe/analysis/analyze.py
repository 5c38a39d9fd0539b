"""`libmoe analyze`: every routing diagnostic of one run (metrics.json, figures, report.html), and
the overlay of several runs' analyses. What a run is and how it is analysed is its kind's
(`libmoe.analysis.kinds`): the language-model kind is built in, other families register theirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices import check_device
from ..eval import check_evaluation, get_task
from ..eval.tasks import local_file
from ..moe.trace import TRACE_TENSORS, check_one_run, list_traces
from .kinds import AnalysisOptions, find_run_kind
from .lm import LM_RUN_KIND

__all__ = ["analyze_run", "check_analysis"]


def check_analysis(run: str | Path, out: str | Path | None, tasks: list[str] = (), data_dir=None,
                   limit: int | None = None, batch_size: int = 16, device: str = "cpu",
                   val_tokens: int | str = "run") -> str:
    """Refuse, before anything loads, what `analyze_run` would fail on: a missing run, an output
    path that is a file, unknown tasks or missing task files, a non-positive --limit or
    --batch-size, a bad --val-tokens, a device this machine lacks, or traces of different runs.
    Returns the checked device."""
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
    figures and report.html, as its kind does (`libmoe.analysis.kinds`). Returns the metrics dict."""
    device = check_analysis(run, out, tasks, data_dir, limit, batch_size, device, val_tokens)
    kind = find_run_kind(run, default=LM_RUN_KIND)
    options = AnalysisOptions(tuple(tasks), data_dir, limit, batch_size, device, interventions, val_tokens,
                              init_std, figures, log)
    return kind.analyze(Path(run), Path(out) if out is not None else None, options)
