"""`libmoe eval`'s results file: per-task results that accumulate across evaluations.

MODEL/eval/results.json (or `--out`) holds

    {"results":   {task: metrics, ...},          # every task evaluated so far (read_results reads it)
     "evaluated": {task: {"time": "2026-12-07T01:02:03Z", "libmoe_version": "0.1.0",
                          "step": 300, "checkpoint": "runs/x/checkpoints/step_300", "model": "runs/x",
                          "limit": null, "data_dir": null, "batch_size": 16}, ...},
     "config":    {...}}                         # the latest evaluation's settings, as before

A later evaluation of other tasks keeps the earlier ones; evaluating a task again replaces its
entry (a group such as blimp replaces its members too). The file is written atomically; a file
there that is damaged or that libmoe did not write is refused before any evaluation, never
replaced.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import CorruptFileError, read_json_object, write_json
from ..version import __version__

RESULTS_FILE = "results.json"


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second (e.g. 2026-12-07T01:02:03Z)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def results_path(out: str | Path | None, model: str | Path) -> Path:
    """Where `libmoe eval` writes: `out` (a directory, existing or ending in "/", means
    OUT/results.json), or MODEL/eval/results.json. Refuses a path that cannot be written (a file
    where a directory is needed) before any evaluation."""
    if out is None:
        path = Path(model) / "eval" / RESULTS_FILE
    else:
        text = str(out)
        path = Path(out)
        if path.is_dir() or text.endswith(("/", "\\")):
            path = path / RESULTS_FILE
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a "
                                 "directory; give another --out.")
            break
    return path


def read_existing(path: str | Path) -> dict[str, Any] | None:
    """The libmoe eval results already at `path` (None when there is no file). A damaged file or
    one libmoe eval did not write is refused, so it is never silently replaced."""
    path = Path(path)
    if not path.exists():
        return None
    fix = "move it away or pass --out NEW.json, so that nothing is lost"
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; give a results file (--out FILE.json).")
    data = read_json_object(path, fix)
    results = data.get("results")
    ours = isinstance(data.get("evaluated"), dict) or "libmoe_version" in (data.get("config") or {})
    if not isinstance(results, dict) or not ours:
        raise ValueError(f"{str(path)!r} was not written by `libmoe eval` (no libmoe \"results\" and "
                         f"\"config\"); {fix}.")
    if not all(isinstance(v, dict) for v in results.values()):
        raise CorruptFileError(path, "a task's results are not an object", fix)
    return data


def provenance(config: dict[str, Any], task: str, time: str | None = None) -> dict[str, Any]:
    """Task `task`'s "evaluated" entry from its evaluation's config: when, which libmoe, which
    model checkpoint, and the settings that shaped its numbers."""
    keys = ["step", "checkpoint", "model", "batch_size"]
    keys += ["val_tokens"] if task == "val_ppl" else ["limit", "data_dir"]
    entry = {"time": time or utc_now(), "libmoe_version": config.get("libmoe_version") or __version__}
    entry.update({k: config.get(k) for k in keys})
    return entry


def merge_results(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(`old` with `new`'s tasks added or replaced, the names of the tasks kept from `old`).
    A legacy `old` (no "evaluated") gets entries from its own config for the tasks it keeps."""
    if not old:
        return new, []
    evaluated = dict(old.get("evaluated") or {})
    results = {t: m for t, m in old["results"].items() if t not in new["results"]}
    kept = list(results)
    for task in kept:
        if task not in evaluated:  # written before results carried their time: that is unknown
            evaluated[task] = dict(provenance(old.get("config") or {}, task), time=None)
    results.update(new["results"])
    evaluated = {t: e for t, e in evaluated.items() if t in kept}
    evaluated.update(new.get("evaluated") or {})
    merged = dict(old, results=results, evaluated=evaluated, config=new["config"])
    return merged, kept


def write_results(path: str | Path, payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Merge `payload` (evaluate_model's) into the results at `path` and write it atomically;
    returns (what was written, the tasks kept from earlier evaluations). Call `read_existing`
    before evaluating, so that a file that would be refused is refused before the work."""
    merged, kept = merge_results(read_existing(path), payload)
    write_json(path, merged)
    return merged, kept
