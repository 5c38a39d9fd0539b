"""Result tables: one model's metrics, and the paper's comparison of several models.

`comparison_rows` builds the layout of the paper's Table 2: validation perplexity, one score per
task (in %), AVG (the mean of the task scores) and AVG rank (the mean over tasks of each model's
rank, 1 = best, ties sharing the mean of their ranks). Perplexity is shown but enters neither AVG
nor the rank, as in the paper (its AVG ranks are reproduced from its own scores in the tests).
Groups replace their members (``blimp`` for the 67 ``blimp_*``, ``cbt`` for ``cbt_cn``/``cbt_ne``).
Result files are `libmoe eval`'s JSON or lm-evaluation-harness's (``"acc,none"`` keys).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..files import read_json
from .tasks import TASKS

# The paper's column order, then the other built-in tasks; anything else follows alphabetically.
PAPER_ORDER = ["lambada_openai", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "race",
               "social_i_qa", "commonsense_qa"]
ORDER = PAPER_ORDER + ["arc_challenge", "winogrande", "boolq", "openbookqa"]
# Each task's column heading in the comparison tables (the paper's spelling).
LABELS = {"lambada_openai": "LAMBADA", "blimp": "BLiMP", "cbt": "CBT", "hellaswag": "HellaSwag",
          "piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "race": "RACE",
          "social_i_qa": "SIQA", "commonsense_qa": "CommonsenseQA", "winogrande": "WinoGrande",
          "boolq": "BoolQ", "openbookqa": "OpenBookQA"}
# The harness calls Social IQa "social_iqa".
HARNESS_NAMES = {"social_iqa": "social_i_qa"}


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of one model's {task: metrics} (subtasks of a group left out)."""
    members = {m for t in results if t in TASKS and TASKS[t].group for m in TASKS[t].group}
    shown = {t: m for t, m in results.items() if t not in members}
    columns = ["acc", "acc_norm", "perplexity", "ppl", "word_perplexity", "bits_per_byte", "n"]
    used = [c for c in columns if any(c in m for m in shown.values())]
    lines = ["| task | " + " | ".join(used) + " |", "|---|" + "---|" * len(used)]
    for task, metrics in shown.items():
        cells = []
        for c in used:
            v = metrics.get(c)
            cells.append("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_results(path: str | Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(model name, {task: metrics}) from a `libmoe eval` or lm-evaluation-harness results file.
    The name is the evaluated model's directory name (for MODEL/eval/results.json: MODEL's)."""
    path = Path(path)
    if path.is_dir() and (path / "eval" / "results.json").is_file():
        path = path / "eval" / "results.json"  # a model directory: its `libmoe eval` results
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {str(path)!r}; give the results.json of "
                                "`libmoe eval` (MODEL/eval/results.json) or of lm_eval.")
    data = read_json(path, "give the file `libmoe eval` or lm_eval wrote (evaluate the model again)")
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{str(path)!r} has no \"results\" mapping: it is not the JSON that "
                         "`libmoe eval` or lm_eval writes.")
    results = {}
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            raise ValueError(f"{str(path)!r}: the results of {task!r} are not a mapping of metrics: it "
                             "is not the JSON that `libmoe eval` or lm_eval writes.")
        clean = {}
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if flt in ("", "none"):
                clean[metric] = value
        results[HARNESS_NAMES.get(task, task)] = clean
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    model = config.get("model")
    if isinstance(model, str) and model not in ("libmoe", "hf") and model:
        name = Path(model).name
    elif "pretrained=" in str(config.get("model_args", "")):
        name = Path(str(config["model_args"]).split("pretrained=")[1].split(",")[0]).name
    else:
        name = path.parent.parent.name if path.parent.name == "eval" else path.stem
    return name, results


def _score(metrics: dict[str, Any], metric: str) -> float | None:
    value = metrics.get(metric, metrics.get("acc"))
    return None if value is None else 100.0 * float(value)


def _ranks(values: list[float | None]) -> list[float | None]:
    """Rank 1 = highest; ties share the mean of their ranks; None stays unranked."""
    present = sorted((v for v in values if v is not None), reverse=True)
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        first = present.index(v) + 1
        out.append(first + (present.count(v) - 1) / 2)
    return out


def comparison_rows(models: dict[str, dict[str, dict[str, Any]]], metric: str = "acc",
                    tasks: list[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(task columns, rows) of the comparison table; each row has "model", "ppl", one score per
    task (in %, `metric` where a task has it, else acc), "avg" and "avg_rank" (None where the
    model lacks a task's score)."""
    if tasks is None:
        present = {t for r in models.values() for t in r if t != "val_ppl"}
        members = {m for t in present if t in TASKS and TASKS[t].group for m in TASKS[t].group}
        present -= members
        tasks = [t for t in ORDER if t in present] + sorted(present - set(ORDER))
    rows = []
    for name, results in models.items():
        row: dict[str, Any] = {"model": name, "ppl": (results.get("val_ppl") or {}).get("ppl")}
        for t in tasks:
            row[t] = _score(results[t], metric) if t in results else None
        rows.append(row)
    ranks = {t: _ranks([r[t] for r in rows]) for t in tasks}
    for i, row in enumerate(rows):
        scores = [row[t] for t in tasks]
        complete = bool(tasks) and all(s is not None for s in scores)
        row["avg"] = sum(scores) / len(scores) if complete else None
        row["avg_rank"] = sum(ranks[t][i] for t in tasks) / len(tasks) if complete else None
    return tasks, rows


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def comparison_markdown(tasks: list[str], rows: list[dict[str, Any]]) -> str:
    """The comparison rows (comparison_rows) as a Markdown table: model, PPL, tasks, AVG, AVG rank."""
    has_ppl = any(r["ppl"] is not None for r in rows)
    head = ["Model"] + (["PPL ↓"] if has_ppl else []) + [LABELS.get(t, t) for t in tasks]
    head += ["AVG ↑", "AVG Rank ↓"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["model"]] + ([_fmt(r["ppl"])] if has_ppl else [])
        cells += [_fmt(r[t], suffix="%") for t in tasks]
        cells += [_fmt(r["avg"], suffix="%"), _fmt(r["avg_rank"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_csv(tasks: list[str], rows: list[dict[str, Any]]) -> str:
    """The comparison rows (comparison_rows) as CSV text: model, ppl, tasks, avg, avg_rank."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "ppl", *tasks, "avg", "avg_rank"])
    for r in rows:
        writer.writerow([r["model"]] + ["" if r[k] is None else round(r[k], 4)
                                        for k in ["ppl", *tasks, "avg", "avg_rank"]])
    return buffer.getvalue()
