"""Small synthetic bench outputs for the findings tests: each writes only the files its check
reads (results.json, a run's val_windows.json, analysis/metrics.json, intervention_units.json,
routing traces, the init-std study), with effects whose verdict is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from libmoe.moe.trace import Trace

MOE = ["smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe"]


def write_results(out: Path, runs: list[dict], regime: str = "pretrain", studies=("droptop", "temperature"),
                  **extra) -> Path:
    """OUT/results.json with `runs` ({name, algorithm, seed, ppl}); each run dir is OUT/runs/NAME."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for r in runs:
        run = out / "runs" / r["name"]
        run.mkdir(parents=True, exist_ok=True)
        entries.append({"status": "ok", "run": str(run), **r})
    algorithms = list(dict.fromkeys(r["algorithm"] for r in runs))
    results = {"regime": regime, "algorithms": algorithms, "seeds": max(r["seed"] for r in runs) + 1,
               "runs": entries, "studies": {"run": list(studies)}, **extra}
    (out / "results.json").write_text(json.dumps(results))
    return out


def run(name: str, algorithm: str, seed: int = 0, ppl: float | None = None) -> dict:
    return {"name": name, "algorithm": algorithm, "seed": seed, "ppl": ppl}


def write_val_windows(run_dir: Path, nll: torch.Tensor) -> None:
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "val_windows.json").write_text(json.dumps(
        {"tokens_per_window": 16, "ppl": math.exp(float(nll.mean())), "window_nll": nll.tolist()}))


def write_interventions(run_dir: Path, units: dict[str, torch.Tensor], metric: str = "val_nll") -> None:
    """analysis/metrics.json (droptop + temperature sections, flat metrics from the units' means)
    and analysis/intervention_units.json, from {measurement: per-unit values}."""
    flat_key = "val_ppl" if metric == "val_nll" else "synth_mme/acc"

    def flat(name):
        mean = float(units[name].mean())
        return {flat_key: math.exp(mean) if metric == "val_nll" else mean}

    base = flat("unperturbed")
    metrics = {"droptop": {"baseline": base, "runs": [{"name": n, "metrics": flat(n)} for n in
                                                      ("DropTop1", "DropTop1&2") if n in units]},
               "temperature": {"baseline": base, "runs": [{"name": n, "metrics": flat(n)} for n in
                                                          ("tau=0.1", "tau=10") if n in units]}}
    (run_dir / "analysis").mkdir(parents=True, exist_ok=True)
    (run_dir / "analysis" / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "analysis" / "intervention_units.json").write_text(json.dumps(
        {"unit": "validation window", "runs": {k: {metric: v.tolist()} for k, v in units.items()}}))


def make_trace(topk_idx: list[torch.Tensor], topk_weight: list[torch.Tensor], seq_len: int, step: int,
               n_slots: int, label: torch.Tensor | None = None, labels: list[str] | None = None) -> Trace:
    n = topk_idx[0].shape[0]
    probs = [torch.full((n, n_slots), 1.0 / n_slots) for _ in topk_idx]
    position = torch.arange(n) % seq_len
    label = torch.zeros(n, dtype=torch.long) if label is None else label
    return Trace(topk_idx=topk_idx, topk_weight=topk_weight, probs=probs, tokens=torch.arange(n) % 50,
                 position=position, label=label, labels=labels or ["all"], meta={"step": step})


def save_traces(run_dir: Path, traces: list[Trace]) -> None:
    for t in traces:
        t.save(run_dir / "checkpoints" / f"step_{t.step}")


def random_topk(n: int, n_slots: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n_slots, generator=g)[:k] for _ in range(n)])


def drifting_traces(n_seq: int, seq_len: int, change: list[float], n_layers: int = 2, n_slots: int = 8,
                    k: int = 2, seed: int = 0) -> list[Trace]:
    """Traces at steps 10, 20, ... where between consecutive ones a share `change[i]` of the tokens
    draw a new top-k set (so the change rate of interval i is about change[i] x (1 - k/R overlap))."""
    g = torch.Generator().manual_seed(seed)
    n = n_seq * seq_len
    idx = [random_topk(n, n_slots, k, g) for _ in range(n_layers)]
    w = [torch.full((n, k), 1.0 / k) for _ in range(n_layers)]
    traces = [make_trace([i.clone() for i in idx], w, seq_len, 10, n_slots)]
    for step, p in enumerate(change, 2):
        for l in range(n_layers):
            redraw = torch.rand(n, generator=g) < p
            fresh = random_topk(n, n_slots, k, g)
            idx[l] = torch.where(redraw[:, None], fresh, idx[l])
        traces.append(make_trace([i.clone() for i in idx], w, seq_len, 10 * step, n_slots))
    return traces


def margin_trace(n_seq: int, seq_len: int, margins: list[float], noise: float, n_slots: int = 8,
                 seed: int = 0, step: int = 100) -> Trace:
    """A trace whose layer l has top-2 weights with mean margin margins[l] (+ uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    n = n_seq * seq_len
    idx, weights = [], []
    for m in margins:
        idx.append(random_topk(n, n_slots, 2, g))
        d = (m + noise * (2 * torch.rand(n, generator=g) - 1)).clamp(0, 0.98)
        weights.append(torch.stack([(1 + d) / 2, (1 - d) / 2], 1))
    return make_trace(idx, weights, seq_len, step, n_slots)


def specialised_trace(n_labels: int, seqs_per_label: int, seq_len: int, concentrated: list[bool],
                      weight_peak: float, n_slots: int = 8, n_layers: int = 2, seed: int = 0) -> Trace:
    """A trace labelled by `n_labels` labels: a label marked `concentrated` sends its tokens to two
    experts only (low allocation entropy), the others spread over all; every token's top-2 weights
    are (weight_peak, 1 - weight_peak) (0.5: even, the highest weight entropy)."""
    g = torch.Generator().manual_seed(seed)
    n = n_labels * seqs_per_label * seq_len
    label = torch.arange(n) // (seqs_per_label * seq_len)
    idx, weights = [], []
    for _ in range(n_layers):
        picks = random_topk(n, n_slots, 2, g)
        for lab in range(n_labels):
            if concentrated[lab]:
                rows = label == lab
                base = torch.tensor([(2 * lab) % n_slots, (2 * lab + 1) % n_slots])
                flip = torch.rand(int(rows.sum()), generator=g) < 0.5
                picks[rows] = torch.where(flip[:, None], base.flip(0), base)
        idx.append(picks)
        weights.append(torch.tensor([weight_peak, 1 - weight_peak]).expand(n, 2).clone())
    return make_trace(idx, weights, seq_len, 100, n_slots, label, [f"d{i}" for i in range(n_labels)])


def write_init_std(out: Path, early: dict[float, list[float]], early_steps: int) -> None:
    """OUT/studies/init_std/init_std.json with one balance value per step for each std."""
    path = out / "studies" / "init_std" / "init_std.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    curves = {f"{s:g}": {"step": list(range(1, len(v) + 1)), "balance": list(v)} for s, v in early.items()}
    path.write_text(json.dumps({"algorithm": "smoe", "stds": list(early), "early_steps": early_steps,
                                "curves": curves,
                                "early_balance": {k: sum(c["balance"][:early_steps]) / early_steps
                                                  for k, c in curves.items()}}))
