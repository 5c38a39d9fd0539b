"""Run tasks against a model and collect metrics in the harness's definitions.

Multiple choice: each choice is scored as the continuation `delimiter + choice` of the context
(or, for multiple-input tasks, the shared continuation after each candidate context); ``acc`` takes
the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood per character of the
choice and ``acc_bytes`` per UTF-8 byte (the harness's two length normalisations; its ``acc_norm``
counts characters, which equals bytes on ASCII text). LAMBADA-style tasks: ``acc`` is the fraction
of targets produced exactly by greedy decoding, ``perplexity`` exp(-mean log-likelihood of the
target). Rolling (perplexity) tasks: ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``.
``*_stderr`` is the standard error of the mean over documents, as the harness reports it. A group
(``blimp``, ``cbt``) is the unweighted mean of its tasks, as the harness aggregates BLiMP.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices import check_device
from ..models import load_model
from ..version import __version__
from .perplexity import validation_perplexity
from .results import provenance, utc_now
from .scoring import LMScorer
from .tasks import Doc, Task, check_limit, get_task, load_records, local_file


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _stderr(hits: list[float]) -> float | None:
    n = len(hits)
    if n < 2:
        return None
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def _mean_metrics(hits: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, values in hits.items():
        out[metric] = sum(values) / len(values)
        if metric in ("acc", "acc_norm"):
            out[f"{metric}_stderr"] = _stderr(values)
    return out


def score_task(scorer: LMScorer, task: Task, docs: list[Doc]) -> dict[str, Any]:
    """The task's metrics over `docs` (see the module docstring)."""
    if task.kind == "rolling":
        texts = [d.choices[0] for d in docs]
        lls = scorer.loglikelihood_rolling(texts, desc=task.name)
        words = sum(len(re.split(r"\s+", t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        total = sum(lls)
        return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / n_bytes),
                "bits_per_byte": -total / n_bytes / math.log(2), "n": len(docs)}
    requests = [r for d in docs for r in task.requests(d)]
    results = iter(scorer.loglikelihood(requests, desc=task.name))
    if task.kind == "greedy_word":
        scored = [next(results) for _ in docs]
        out = _mean_metrics({"acc": [float(g) for _, g in scored]})
        out["perplexity"] = math.exp(-sum(lp for lp, _ in scored) / len(scored))
        return {**out, "n": len(docs)}
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for d in docs:
        lls = [next(results)[0] for _ in d.choices]
        hits["acc"].append(float(_argmax(lls) == d.gold))
        chars = [ll / max(1, len(c)) for ll, c in zip(lls, d.choices)]
        hits["acc_norm"].append(float(_argmax(chars) == d.gold))
        n_bytes = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, d.choices)]
        hits["acc_bytes"].append(float(_argmax(n_bytes) == d.gold))
    return {**_mean_metrics(hits), "n": len(docs)}


def evaluate_tasks(scorer: LMScorer, names: list[str], data_dir=None, limit: int | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """{task: metrics} for each task name or task YAML path (records: the first `limit` of each
    task, as the harness's --limit). A group adds its tasks' entries and its own mean."""
    tasks = [get_task(n) for n in names]  # unknown names fail before any work
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task.group:
            parts = evaluate_tasks(scorer, task.group, data_dir, limit, log)
            out.update(parts)
            shared = [m for m in ("acc", "acc_norm", "acc_bytes") if all(m in p for p in parts.values())]
            out[task.name] = {m: sum(p[m] for p in parts.values()) / len(parts) for m in shared}
            out[task.name].update(n=sum(p["n"] for p in parts.values()), subtasks=len(parts))
            continue
        start = time.perf_counter()
        docs = task_docs(task, data_dir, limit)
        if not docs:
            raise ValueError(f"task {task.name!r} has no records.")
        out[task.name] = score_task(scorer, task, docs)
        if log:
            log(f"{task.name}: {len(docs)} documents in {time.perf_counter() - start:.1f} s")
    return out


def task_docs(task: Task, data_dir=None, limit: int | None = None) -> list[Doc]:
    """The task's first `limit` documents; a record without the task's fields is a ValueError
    naming the task and its file."""
    records = load_records(task, data_dir, limit)
    try:
        return [task.to_doc(r) for r in records]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        where = local_file(task, data_dir) or f"the Hub dataset {task.hub[0]}"
        raise ValueError(f"task {task.name!r}: a record of {where} lacks the task's fields "
                         f"({type(err).__name__}: {err}); give the task's own data (the Hub "
                         "dataset's schema).") from None


def evaluate_model(model: str | Path, tasks: list[str], data_dir: str | Path | None = None,
                   limit: int | None = None, batch_size: int = 16, device: str = "cpu",
                   val_tokens: int | str = "run", log: Callable[[str], None] | None = None,
                   per_window: bool = False) -> dict[str, Any]:
    """`libmoe eval`: {"results": {task: metrics}, "config": {...}} for a run, checkpoint or
    transformers model directory. Task names may be task YAML paths; ``val_ppl`` is the run's own
    validation split (with `per_window`, each window's loss too: validation_perplexity). Task
    names, local data files, `limit`, `batch_size`, `val_tokens` and `device` are checked before
    the model loads. The payload's "evaluated" gives each task's time, libmoe version and model
    checkpoint (see `libmoe.eval.results`)."""
    check_evaluation(tasks, limit, batch_size, val_tokens)
    device = check_device(device)
    names = [t for t in tasks if t != "val_ppl"]
    pending = [get_task(name) for name in names]
    while pending:  # names and local files are checked before the model loads
        task = pending.pop()
        if task.group:
            pending += [get_task(member) for member in task.group]
        elif local_file(task, data_dir) is not None:  # a damaged local file fails before the model loads
            task_docs(task, data_dir, limit)
    loaded = load_model(model, device=device)
    if log:
        log(f"model: {loaded.checkpoint}" + (f" (step {loaded.step})" if loaded.step is not None else ""))
    scorer = LMScorer(loaded.model, loaded.tokenizer, batch_size=batch_size)
    results: dict[str, dict[str, Any]] = {}
    if "val_ppl" in tasks:  # first: it needs the run's data, which may be missing here
        start = time.perf_counter()
        results["val_ppl"] = validation_perplexity(loaded, val_tokens, batch_size=batch_size, log=log,
                                                   per_window=per_window)
        if log:
            log(f"val_ppl: {results['val_ppl']['tokens']:,} tokens in {time.perf_counter() - start:.1f} s")
    results.update(evaluate_tasks(scorer, names, data_dir, limit, log))
    config = {"model": str(model), "checkpoint": str(loaded.checkpoint), "step": loaded.step,
              "tasks": list(tasks), "limit": limit, "data_dir": None if data_dir is None else str(data_dir),
              "batch_size": batch_size, "val_tokens": val_tokens, "libmoe_version": __version__}
    done = utc_now()
    return {"results": results, "evaluated": {t: provenance(config, t, done) for t in results},
            "config": config}


def check_evaluation(tasks: list[str] | None, limit: int | None = None, batch_size: int = 16,
                     val_tokens: int | str = "run") -> None:
    """Refuse (ValueError, one line) what evaluation would fail on or misreport: no tasks (when
    `tasks` is not None), a non-positive --limit or --batch-size, a --val-tokens other than run,
    all or a positive count."""
    if tasks is not None and not tasks:
        raise ValueError("no tasks given; name at least one (e.g. --tasks piqa,val_ppl).")
    check_limit(limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: give a positive number of sequences per batch.")
    if not (val_tokens in ("run", "all") or (isinstance(val_tokens, int) and not isinstance(val_tokens, bool)
                                             and val_tokens > 0)):
        raise ValueError(f"--val-tokens {val_tokens!r}: give 'run', 'all' or a positive number of tokens.")


__all__ = ["check_evaluation", "evaluate_model", "evaluate_tasks", "score_task",
           "task_docs"]
