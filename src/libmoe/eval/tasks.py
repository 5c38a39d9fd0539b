"""Zero-shot tasks in lm-evaluation-harness's formats, registered by name.

A task turns each record of its dataset (Hub schema) into a `Doc`: a context, the candidate
continuations and the gold index (multiple choice), or a context and one target (LAMBADA-style
greedy word prediction). Prompts, target delimiter (" ") and preprocessing follow the harness's
task of the same name. Records come from local JSON Lines, ``DIR/<task>.<split>.jsonl`` (the layout of
``../shared/data/eval``), or from the Hub through `datasets` when no directory is given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    context: str
    choices: list[str]  # continuations without the leading delimiter
    gold: int = 0


@dataclass
class Task:
    name: str
    hub: tuple[str, str | None]  # (dataset, config)
    split: str
    kind: str  # "multiple_choice" or "greedy_word"
    to_doc: Callable[[dict[str, Any]], Doc]
    delimiter: str = " "


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict[str, Any]) -> Doc:
    # The harness builds ctx_a + " " + ctx_b.capitalize(); local files may carry only `ctx`.
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    return Doc(_hellaswag_preprocess(r["activity_label"] + ": " + ctx),
               [_hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))


def _arc(r: dict[str, Any]) -> Doc:
    return Doc(f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]),
               list(r["choices"]["label"]).index(r["answerKey"]))


def _lambada(r: dict[str, Any]) -> Doc:
    context, word = r["text"].rsplit(" ", 1)
    return Doc(context, [word], 0)


register_task(Task("piqa", ("piqa", None), "validation", "multiple_choice",
                   lambda r: Doc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]],
                                 int(r["label"]))))
register_task(Task("hellaswag", ("hellaswag", None), "validation", "multiple_choice", _hellaswag))
register_task(Task("arc_easy", ("allenai/ai2_arc", "ARC-Easy"), "test", "multiple_choice", _arc))
register_task(Task("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge"), "test", "multiple_choice",
                   _arc))
register_task(Task("lambada_openai", ("EleutherAI/lambada_openai", "default"), "test",
                   "greedy_word", _lambada))


def get_task(name: str) -> Task:
    if name not in TASKS:
        from ..moe.options import did_you_mean

        raise ValueError(f"unknown task {name!r}.{did_you_mean(name, TASKS)} Known tasks: "
                         f"{', '.join(sorted(TASKS))}.")
    return TASKS[name]


def load_records(task: Task, data_dir: str | Path | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of the task's split, from DIR/<task>.<split>.jsonl or the Hub."""
    if data_dir is not None:
        path = Path(data_dir) / f"{task.name}.{task.split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"task {task.name!r} needs {path} (JSON Lines in the schema of the Hub dataset "
                f"{task.hub[0]}{f' (config {task.hub[1]})' if task.hub[1] else ''}, split "
                f"{task.split})."
            )
        records = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    records.append(json.loads(line))
                    if limit is not None and len(records) >= limit:
                        break
        return records
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"task {task.name!r} without --data-dir reads the Hub through `datasets`: "
                         "pip install 'libmoe[hub]', or give --data-dir.") from err
    try:
        ds = datasets.load_dataset(task.hub[0], task.hub[1], split=task.split)
    except OSError as err:
        raise FileNotFoundError(f"task {task.name!r}: the Hub dataset {task.hub[0]!r} could not be "
                                f"read ({type(err).__name__}); give --data-dir with local files.") from err
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds[i] for i in range(n)]
