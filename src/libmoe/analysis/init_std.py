"""The router-initialisation study (paper Fig. 11): train one algorithm with several router init
stds sigma_r for N steps and compare the balance-loss curves, the early ones above all."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import CorruptFileError, read_json_object, write_json
from ..train import resolve_config, train
from .runs import write_figures_and_report

INIT_STD_FILE = "init_std.json"
DEFAULT_STDS = (0.02, 0.04, 0.06)


def _curve(run: Path) -> dict[str, list[float]]:
    steps, balance = [], []
    lines = (run / "metrics.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line torn by an interrupted write: the steps before it count
                break
            raise CorruptFileError(run / "metrics.jsonl", f"line {i + 1} is not JSON",
                                   f"rerun the study without {run}") from None
        if "aux_balance" in row:
            steps.append(int(row["step"]))
            balance.append(float(row["aux_balance"]))
    return {"step": steps, "balance": balance}


def summarise_init_std(runs: dict[float, Path], early_steps: int, meta: dict[str, Any]) -> dict[str, Any]:
    """init_std.json's content from finished runs {std: run directory}."""
    curves, early, final_ppl = {}, {}, {}
    for std, run in runs.items():
        key = f"{std:g}"
        curves[key] = _curve(run)
        window = [b for s, b in zip(curves[key]["step"], curves[key]["balance"]) if s <= early_steps]
        early[key] = sum(window) / len(window) if window else None
        summary = run / "train_summary.json"
        final_ppl[key] = read_json_object(summary).get("val_ppl") if summary.is_file() else None
    return dict(meta, stds=[float(s) for s in runs], early_steps=early_steps, curves=curves,
                early_balance=early, final_val_ppl=final_ppl,
                runs={f"{s:g}": str(r) for s, r in runs.items()})


def init_std_study(
    out: str | Path,
    stds: tuple[float, ...] = DEFAULT_STDS,
    steps: int = 200,
    preset: str = "micro",
    algorithm: str = "smoe",
    data: str | None = None,
    early_steps: int | None = None,
    overrides: list[str] = (),
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train `algorithm` once per router init std (same seed, data order and config otherwise)
    into OUT/std_<s>, then write OUT/init_std.json and its figure. Finished runs are reused.
    `early_steps` (default a quarter of the steps) is the window of the early-balance summary."""
    say = log or print
    if not stds:
        raise ValueError("give at least one router init std.")
    for s in stds:
        if not s > 0:
            raise ValueError(f"router init std {s} must be positive.")
    if steps < 1:
        raise ValueError(f"steps {steps} must be at least 1.")
    out = Path(out)
    early = early_steps or max(1, steps // 4)
    configs = {}
    for std in stds:  # every config resolved (an unknown override key refused) before any training
        flags = {"model": {"algorithm": algorithm, "moe_options": {"router_init_std": float(std)}},
                 "train": {"max_steps": steps, "log_every": 1, "checkpoint_every": steps,
                           "eval_every": steps}}
        if data:
            flags["data"] = {"source": data}
        configs[std] = resolve_config([flags], list(overrides), preset=preset)
    runs: dict[float, Path] = {}
    for i, std in enumerate(stds):
        run, cfg = out / f"std_{std:g}", configs[std]
        say(f"[{i + 1}/{len(stds)}] {algorithm} with router init std {std:g}: {steps} steps -> {run}")
        if (run / "train_summary.json").is_file():
            say("  finished before; reusing it")
        else:
            train(cfg, run, resume="auto", progress=False)
        runs[float(std)] = run
    result = summarise_init_std(runs, early, {"algorithm": algorithm, "preset": preset, "steps": steps})
    write_json(out / INIT_STD_FILE, result, indent=1)
    write_figures_and_report(out, {}, init_std=result, title=f"Router initialisation study ({algorithm})")
    for key, value in result["early_balance"].items():
        ppl = result["final_val_ppl"][key]
        shown = "-" if value is None else f"{value:.4f}"
        say(f"  sigma_r {key}: mean balance loss over the first {early} steps {shown}, "
            f"final val_ppl {'-' if ppl is None else f'{ppl:.2f}'}")
    return result
