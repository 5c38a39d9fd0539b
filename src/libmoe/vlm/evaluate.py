"""VLM evaluation on the synthetic held-out splits.

- `synth_mme` (MME's protocol): every test image has a yes and a no question. The model answers
  the one of "Yes" / "No" with the higher log-likelihood after the prompt (deterministic; no
  sampling, no string parsing). `acc` is per question, `acc_plus` per image (both of its questions
  right), each per category too; chance is 0.5 and 0.25. `score` is MME's sum over categories of
  100 * (acc + acc+) (chance 75 per category).
- `synth_open`: greedy decoding of a short answer, exact match after lowercasing and stripping
  punctuation (chance depends on the category's answer set).

    libmoe vlm eval RUN --tasks synth_mme,synth_open --out results.json
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..files import write_json
from ..overrides import did_you_mean
from .data import cached_image, load_mme, load_open
from .saving import load_vlm
from .stages import load_stage_config, resolve_data
from .text import answer_ids, pad_right, prompt_ids

VLM_TASKS = ("synth_mme", "synth_open")
TASK_FILES = {"synth_mme": "mme.json", "synth_open": "open.json"}


def _batches(items: list, size: int):
    for s in range(0, len(items), size):
        yield items[s : s + size]


@torch.no_grad()
def answer_logprobs(model, tokenizer, template: str, rows: list[dict], answers: list[str],
                    batch_size: int = 32) -> torch.Tensor:
    """[len(rows), len(answers)] summed log-probabilities of each answer after each row's prompt."""
    device = next(model.parameters()).device
    n_img = model.n_image_tokens
    ans = [answer_ids(tokenizer, a, template) for a in answers]
    out = torch.zeros(len(rows), len(answers))
    pad = tokenizer.pad_token_id
    for start, chunk in zip(range(0, len(rows), batch_size), _batches(rows, batch_size)):
        prompts = [prompt_ids(tokenizer, r["question"], template, n_img) for r in chunk]
        pixels = torch.stack([cached_image(r["image"], model.pixel_size) for r in chunk]).to(device)
        for j, a in enumerate(ans):
            ids, mask = pad_right([p + a for p in prompts], pad)
            logits = model(ids.to(device), pixels, mask.to(device)).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            for b, p in enumerate(prompts):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(a), device=device)
                out[start + b, j] = logp[b, pos, torch.tensor(a, device=device)].sum().cpu()
    return out


def score_mme(rows: list[dict], predictions: list[str]) -> dict[str, Any]:
    """MME's acc / acc+ / score, overall and per category, of `predictions` ("Yes"/"No" per row)."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    pairs: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for r, pred in zip(rows, predictions):
        ok = pred.strip().lower() == r["answer"].strip().lower()
        by_cat[r["category"]].append(ok)
        pairs[(r["category"], str(r.get("pair", r["image"])))].append(ok)
    categories = {}
    for cat in sorted(by_cat):
        images = [all(v) for (c, _), v in pairs.items() if c == cat]
        acc, acc_plus = sum(by_cat[cat]) / len(by_cat[cat]), sum(images) / len(images)
        categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
                           "n": len(by_cat[cat])}
    all_ok = [ok for v in by_cat.values() for ok in v]
    all_pairs = [all(v) for v in pairs.values()]
    return {"acc": sum(all_ok) / len(all_ok), "acc_plus": sum(all_pairs) / len(all_pairs),
            "score": sum(c["score"] for c in categories.values()), "n": len(all_ok),
            "chance": {"acc": 0.5, "acc_plus": 0.25, "score": 75.0 * len(categories)},
            "by_category": categories}


def _normalise(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


@torch.no_grad()
def greedy_answers(model, tokenizer, template: str, rows: list[dict], max_new_tokens: int = 4,
                   batch_size: int = 32) -> list[str]:
    """Greedy continuations (at most `max_new_tokens`, stopping at the end-of-answer token)."""
    device = next(model.parameters()).device
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")} - {None}
    answers = []
    for chunk in _batches(rows, batch_size):
        pixels = torch.stack([cached_image(r["image"], model.pixel_size) for r in chunk]).to(device)
        seqs = [prompt_ids(tokenizer, r["question"], template, model.n_image_tokens) for r in chunk]
        new = [[] for _ in chunk]
        for _ in range(max_new_tokens):
            ids, mask = pad_right(seqs, tokenizer.pad_token_id)
            logits = model(ids.to(device), pixels, mask.to(device)).logits
            for b, s in enumerate(seqs):
                if new[b] and new[b][-1] in stop:
                    continue
                tok = int(logits[b, len(s) - 1].argmax())
                new[b].append(tok)
                s.append(tok)
        answers += [tokenizer.decode([t for t in n if t not in stop], skip_special_tokens=True) for n in new]
    return answers


def score_open(rows: list[dict], predictions: list[str]) -> dict[str, Any]:
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for r, pred in zip(rows, predictions):
        by_cat[r["category"]].append(_normalise(pred) == _normalise(str(r["answer"])))
    all_ok = [ok for v in by_cat.values() for ok in v]
    return {"acc": sum(all_ok) / len(all_ok), "n": len(all_ok),
            "by_category": {c: {"acc": sum(v) / len(v), "n": len(v)} for c, v in sorted(by_cat.items())}}


def check_tasks(tasks: list[str]) -> list[str]:
    """`tasks` as a list when every one is a VLM task, else ValueError naming the nearest."""
    for t in tasks:
        if t not in VLM_TASKS:
            raise ValueError(f"unknown VLM task {t!r}.{did_you_mean(t, VLM_TASKS)} "
                             f"Valid: {', '.join(VLM_TASKS)}.")
    return list(tasks)


def evaluate_vlm(model, tokenizer, template: str, folder: str | Path, tasks: list[str] = ("synth_mme",),
                 subtasks: list[str] | None = None, limit: int | None = None, batch_size: int = 32,
                 log: Callable[[str], None] | None = None, per_question: bool = False) -> dict[str, Any]:
    """{task: metrics} on the held-out files of the dataset `folder`; `per_question` adds
    "correct", 1.0 or 0.0 per question in file order (the findings' bootstrap)."""
    folder = Path(folder)
    results = {}
    model.eval()
    for task in check_tasks(list(tasks)):
        path = folder / TASK_FILES[task]
        if not path.is_file():
            raise FileNotFoundError(f"{task}: {path} does not exist (write the dataset with "
                                    "`libmoe vlm data synth --out DIR`).")
        rows = (load_mme if task == "synth_mme" else load_open)(path)
        if subtasks:
            rows = [r for r in rows if r["category"] in set(subtasks)]
        if limit:
            rows = _limit_per_category(rows, limit, paired=task == "synth_mme")
        if task == "synth_mme":
            lp = answer_logprobs(model, tokenizer, template, rows, ["Yes", "No"], batch_size)
            preds = ["Yes" if a >= b else "No" for a, b in lp.tolist()]
            results[task] = score_mme(rows, preds)
        else:
            preds = greedy_answers(model, tokenizer, template, rows, batch_size=batch_size)
            results[task] = score_open(rows, preds)
        if per_question:
            results[task]["correct"] = [float(_normalise(p) == _normalise(str(r["answer"])))
                                        for r, p in zip(rows, preds)]
        if log:
            log(f"  {task}: acc {results[task]['acc']:.3f} ({results[task]['n']} questions)")
    return results


def _limit_per_category(rows: list[dict], limit: int, paired: bool) -> list[dict]:
    """The first `limit` questions of each category (whole yes/no pairs for MME)."""
    kept, count = [], defaultdict(int)
    for r in rows:
        if count[r["category"]] < limit or (paired and count[r["category"]] % 2 == 1):
            kept.append(r)
            count[r["category"]] += 1
    return kept


def evaluate_run(run: str | Path, tasks: list[str] = ("synth_mme",), data: str | Path | None = None,
                 out: str | Path | None = None, device: str = "cpu", limit: int | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """`libmoe vlm eval`: evaluate a VLM run (its newest checkpoint) or checkpoint; writes
    {"results": {...}} to `out` (default RUN/eval/results.json)."""
    model, tokenizer, meta = load_vlm(run, device=device)
    run = Path(run)
    cfg_dir = run if (run / "config.yaml").is_file() else run.parent.parent
    cfg = load_stage_config(cfg_dir) if (cfg_dir / "config.yaml").is_file() else {}
    folder = Path(data) if data is not None else resolve_data(cfg.get("data") or {"source": "synth"}, log)
    template = cfg.get("template", "simple")
    results = evaluate_vlm(model, tokenizer, template, folder, tasks,
                           subtasks=(cfg.get("data") or {}).get("subtasks"), limit=limit, log=log)
    payload = {"results": results, "run": str(run), "step": meta.get("step")}
    out = Path(out) if out is not None else cfg_dir / "eval" / "results.json"
    write_json(out, payload, indent=1)
    log(f"wrote {out}")
    return payload
