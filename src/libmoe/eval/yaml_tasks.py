"""User-defined tasks from YAML, without code, in the harness's own task format.

A task file names a JSON Lines file and says, with Jinja2 templates over each record's fields,
how to build the context, the choices and the gold answer::

    task: capitals                      # its name in the results (default: the file's stem)
    data: capitals.jsonl                # JSON Lines, relative to this file (or an absolute path)
    output_type: multiple_choice        # or loglikelihood (greedy target), loglikelihood_rolling
    doc_to_text: "Q: What is the capital of {{country}}?\\nA:"
    doc_to_choice: "{{options}}"        # a field, a template that renders a list, or a YAML list
    doc_to_target: "{{answer}}"         # a field, a template (an index or the gold choice), or an int
    target_delimiter: " "               # between context and continuation (default " ")

The keys and their meaning are those of lm-evaluation-harness's YAML tasks (a field name gives
the field; a template renders with StrictUndefined; a rendered list is read with
`ast.literal_eval`; a `doc_to_text` that gives an index makes the choices contexts sharing the
`doc_to_target` continuation, as for WinoGrande). The harness's form
of the data source, ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``, is read too,
so one file can run in both ``libmoe eval --tasks FILE`` and ``lm_eval --include_path DIR``.
Python hooks (``!function``, ``process_docs``), filters, descriptions and few-shot settings are
not supported and say so.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .registry import TASKS, Doc, Task

KINDS = {"multiple_choice": "multiple_choice", "loglikelihood": "greedy_word",
         "loglikelihood_rolling": "rolling"}
USED = {"task", "data", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter",
        "output_type", "num_fewshot", "dataset_path", "dataset_kwargs", "validation_split", "test_split"}
# Harness keys that do not change zero-shot scoring (documentation, decontamination, metrics).
IGNORED = {"tag", "metadata", "metric_list", "should_decontaminate", "doc_to_decontamination_query",
           "training_split", "fewshot_split", "dataset_name"}
KNOWN = USED | IGNORED


def _environment():
    # As the harness's: undefined fields are errors, trailing newlines kept, a regex filter.
    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s,
                                                                             count=count)
    return env


class _Templates:
    """The harness's doc_to_text / doc_to_choice / doc_to_target semantics over one record."""

    def __init__(self, spec: dict[str, Any], where: str):
        self.spec, self.where = spec, where
        self.env = _environment()

    def _render(self, template: str, record: dict[str, Any]) -> str:
        try:
            return self.env.from_string(template).render(**record)
        except jinja2.TemplateError as err:
            raise ValueError(f"{self.where}: template {template!r} failed on a record with fields "
                             f"{sorted(record)}: {err}") from err

    def text(self, record: dict[str, Any]) -> str | int:
        value = self.spec.get("doc_to_text", "")
        if not isinstance(value, str):  # an int: a fixed index
            return value
        if value in record:
            return record[value]
        rendered = self._render(value, record)
        return ast.literal_eval(rendered) if rendered.isdigit() and self.has_choices else rendered

    @property
    def has_choices(self) -> bool:
        return self.spec.get("doc_to_choice") is not None

    def choices(self, record: dict[str, Any]) -> list[str]:
        value = self.spec["doc_to_choice"]
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, dict):
            return [str(v) for v in value.values()]
        if value in record:
            return list(record[value])
        rendered = self._render(value, record)
        try:
            parsed = ast.literal_eval(rendered)
        except (SyntaxError, ValueError) as err:
            raise ValueError(f"{self.where}: doc_to_choice rendered {rendered[:80]!r}, which is not "
                             "a list literal.") from err
        return [str(v) for v in parsed]

    def target(self, record: dict[str, Any]) -> Any:
        value = self.spec.get("doc_to_target")
        if value is None:
            raise ValueError(f"{self.where}: doc_to_target is required.")
        if not isinstance(value, str):  # an int or a list, as given
            return value
        if value in record:
            return record[value]
        rendered = self._render(value, record)
        if rendered.isdigit() and self.has_choices:
            return ast.literal_eval(rendered)
        if len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
            try:
                return ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                return rendered
        return rendered


def _data_file(spec: dict[str, Any], base: Path, where: str) -> Path:
    if "data" in spec:
        path = Path(spec["data"])
    elif spec.get("dataset_path") == "json" and "data_files" in (spec.get("dataset_kwargs") or {}):
        files = spec["dataset_kwargs"]["data_files"]
        if isinstance(files, dict):
            split = spec.get("test_split") or spec.get("validation_split") or next(iter(files))
            if split not in files:
                raise ValueError(f"{where}: dataset_kwargs.data_files has no {split!r} split "
                                 f"(it has {', '.join(files)}).")
            files = files[split]
        if isinstance(files, list):
            if len(files) != 1:
                raise ValueError(f"{where}: give one JSON Lines file, not {len(files)}.")
            files = files[0]
        path = Path(files)
    else:
        raise ValueError(f"{where}: name the data with `data: FILE.jsonl` (or the harness's "
                         "`dataset_path: json` with `dataset_kwargs: {data_files: FILE}`).")
    return path if path.is_absolute() else base / path


def task_from_spec(spec: dict[str, Any], base: Path, where: str, default_name: str) -> Task:
    """A `Task` from a parsed YAML mapping (paths relative to `base`)."""
    unknown = sorted(set(spec) - KNOWN)
    if unknown:
        hooks = [k for k in unknown if k in ("process_docs", "process_results", "filter_list",
                                              "fewshot_config", "class")]
        why = (" Python hooks and filters are not supported in libmoe's YAML tasks." if hooks
               else "")
        raise ValueError(f"{where}: unsupported key(s) {', '.join(unknown)}.{why} Known keys: "
                         f"{', '.join(sorted(KNOWN))}.")
    if spec.get("num_fewshot"):
        raise ValueError(f"{where}: num_fewshot {spec['num_fewshot']} is not supported; libmoe "
                         "evaluates zero-shot.")
    output_type = spec.get("output_type", "multiple_choice")
    if output_type not in KINDS:
        raise ValueError(f"{where}: output_type {output_type!r} is not supported; use one of "
                         f"{', '.join(KINDS)}.")
    name = str(spec.get("task") or default_name)
    if name in TASKS:
        raise ValueError(f"{where}: task name {name!r} is a built-in task; choose another name.")
    kind = KINDS[output_type]
    templates = _Templates(spec, where)
    if kind == "multiple_choice" and not templates.has_choices:
        raise ValueError(f"{where}: a multiple_choice task needs doc_to_choice.")

    def to_doc(record: dict[str, Any]) -> Doc:
        if kind == "rolling":  # the text to score is doc_to_target, as in the harness
            return Doc("", [str(templates.target(record))])
        text = templates.text(record)
        if kind == "greedy_word":
            return Doc(str(text), [str(templates.target(record))])
        choices, target = templates.choices(record), templates.target(record)
        if isinstance(text, int):  # multiple input: the choices are the contexts
            return Doc("", choices, text, continuation=str(target))
        gold = target if isinstance(target, int) else choices.index(target) if target in choices \
            else None
        if gold is None or not 0 <= gold < len(choices):
            raise ValueError(f"{where}: the target {target!r} is neither a choice index nor one of "
                             f"the choices {choices}.")
        return Doc(text, choices, gold)

    # The harness puts target_delimiter only between a context and a choice; a loglikelihood
    # task's target is scored as written.
    delimiter = spec.get("target_delimiter", " ") if kind == "multiple_choice" else ""
    data = _data_file(spec, base, where)
    return Task(name, (str(data), None), "local", kind, to_doc, delimiter=delimiter, data_file=data)


def load_task_file(path: str | Path) -> Task:
    """The task a YAML file defines (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {str(path)!r}.")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError as err:
        raise ValueError(f"{path}: {err.problem} ({err.problem_mark}); Python hooks such as "
                         "!function are not supported in libmoe's YAML tasks.") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a task YAML file (not UTF-8 text).") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of task keys (task, data, doc_to_text, ...).")
    return task_from_spec(spec, path.parent, str(path), path.stem)
