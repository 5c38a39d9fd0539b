"""What a task is (`Task`, the `Doc` each record becomes) and the registry of tasks by name
(`TASKS`, `register_task`); the paper's tasks register themselves in `libmoe.eval.tasks`,
user-defined ones come from YAML files (`libmoe.eval.yaml_tasks`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    """One task example: a context, its choices and the index of the right one."""

    context: str
    choices: list[str]  # continuations without the leading delimiter (or contexts, see below)
    gold: int = 0
    # Set for multiple-input tasks: `choices` are then alternative contexts, each followed by
    # this one continuation (the harness's doc_to_text returning an index, e.g. WinoGrande).
    continuation: str | None = None


@dataclass
class Task:
    """A zero-shot task: where its data is, how a record becomes a Doc, and how it is scored (kind)."""

    name: str
    hub: tuple[str, str | None]  # (dataset, config)
    split: str
    kind: str  # "multiple_choice", "greedy_word", "rolling" or "group"
    to_doc: Callable[[dict[str, Any]], Doc] | None  # None for groups
    delimiter: str = " "
    group: list[str] | None = None  # a group task: the mean of these tasks' metrics
    local_path: str | None = None  # under --data-dir; default "<name>.<split>.jsonl"
    data_file: Path | None = None  # a fixed file (user-defined YAML tasks), whatever --data-dir

    def requests(self, doc: Doc) -> list[tuple[str, str]]:
        """The (context, continuation) log-likelihood requests of one document, one per choice."""
        if doc.continuation is not None:
            return [(c, self.delimiter + doc.continuation) for c in doc.choices]
        return [(doc.context, self.delimiter + c) for c in doc.choices]


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to TASKS under its name (replacing one of the same name); returns it."""
    TASKS[task.name] = task
    return task
