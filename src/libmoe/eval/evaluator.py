"""Run tasks against a model and collect metrics in the harness's definitions.

Multiple choice: each choice is scored as the continuation `delimiter + choice` of the context;
``acc`` takes the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood per
character of the choice (the harness's length normalisation). LAMBADA-style tasks: ``acc`` is the
fraction of last words produced exactly by greedy decoding, ``perplexity`` exp(-mean log-likelihood
of the last word).
"""

from __future__ import annotations

import math
from typing import Any

from .scoring import LMScorer
from .tasks import Doc, Task, get_task, load_records


def score_task(scorer: LMScorer, task: Task, docs: list[Doc]) -> dict[str, Any]:
    if task.kind == "greedy_word":
        results = scorer.loglikelihood([(d.context, task.delimiter + d.choices[0]) for d in docs])
        mean_ll = sum(lp for lp, _ in results) / len(results)
        return {"acc": sum(g for _, g in results) / len(results),
                "perplexity": math.exp(-mean_ll), "n": len(docs)}
    requests = [(d.context, task.delimiter + c) for d in docs for c in d.choices]
    scores = iter(scorer.loglikelihood(requests))
    acc = acc_norm = 0
    for d in docs:
        lls = [next(scores)[0] for _ in d.choices]
        acc += max(range(len(lls)), key=lls.__getitem__) == d.gold
        normed = [ll / max(1, len(c)) for ll, c in zip(lls, d.choices)]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == d.gold
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs), "n": len(docs)}


def evaluate_tasks(scorer: LMScorer, names: list[str], data_dir=None,
                   limit: int | None = None) -> dict[str, dict[str, Any]]:
    """{task: metrics} for each task name (records: the first `limit`, as the harness does)."""
    tasks = [get_task(n) for n in names]  # unknown names fail before any work
    out = {}
    for task in tasks:
        if task.group:
            parts = evaluate_tasks(scorer, task.group, data_dir, limit)
            out.update(parts)
            out[task.name] = {"acc": sum(p["acc"] for p in parts.values()) / len(parts),
                              "n": sum(p["n"] for p in parts.values()), "subtasks": len(parts)}
            continue
        docs = [task.to_doc(r) for r in load_records(task, data_dir, limit)]
        if not docs:
            raise ValueError(f"task {task.name!r} has no records.")
        out[task.name] = score_task(scorer, task, docs)
    return out


def validation_perplexity(loaded, max_tokens: int | None = None, batch_size: int = 16) -> dict:
    """The run's own held-out split (its data config, cached): {"loss", "ppl", "tokens"}."""
    from ..data.packed import validation_windows
    from ..train.config import config_from_dict
    from ..train.distributed import DistInfo
    from ..train.trainer import evaluate, prepare_run_data

    cfg = config_from_dict(loaded.config)
    data = prepare_run_data(cfg, log=lambda _: None)
    windows = validation_windows(data.val, cfg.seq_len, max_tokens)
    device = next(loaded.model.parameters()).device
    loss = evaluate(loaded.model, windows, batch_size, DistInfo(device=device), _no_autocast)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(windows.shape[0]) * cfg.seq_len}


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of {task: metrics}."""
    columns = ["acc", "acc_norm", "perplexity", "ppl", "n"]
    used = [c for c in columns if any(c in m for m in results.values())]
    lines = ["| task | " + " | ".join(used) + " |", "|---|" + "---|" * len(used)]
    for task, metrics in results.items():
        cells = []
        for c in used:
            v = metrics.get(c)
            cells.append("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
