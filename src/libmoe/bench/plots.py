"""The bench's own figure: validation perplexity over training for every algorithm (from the
runs' metrics.jsonl, seed 0) beside the final held-out perplexity (mean and std over seeds)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..analysis import FigureInfo
from ..files import write_bytes

SCORES = FigureInfo(
    "bench_ppl.png", "Validation perplexity by algorithm",
    "Left: perplexity on the training run's evaluation windows at each evaluation step (seed 0); "
    "right: final perplexity on the held-out split used in the table (mean over seeds, with the "
    "standard deviation as an error bar when there are several). Lower is better; the dense "
    "baseline is grey. In the upcycling regime the dotted curve is the dense source's own "
    "training (negative steps) and each run's curve starts at step 0 from the model it was "
    "upcycled into.")


def _curve(run_dir: str | Path) -> tuple[list[int], list[float]]:
    steps, ppl = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "val_ppl" in row:
                steps.append(row["step"])
                ppl.append(row["val_ppl"])
    return steps, ppl


def plot_scores(results: dict[str, Any], path: str | Path) -> FigureInfo | None:
    """Write the figure to `path`; None when no run finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("ppl") is not None]
    if not rows:
        return None
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # grey is dense's
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for i, row in enumerate(rows):
        colour = "0.5" if row["algorithm"] == "dense" else palette[i % len(palette)]
        run = next((r for r in results["runs"] if r["algorithm"] == row["algorithm"]
                    and r.get("status") == "ok"), None)
        if run is not None:
            steps, ppl = _curve(run["run"])
            if run.get("init_ppl") is not None:  # upcycled: the model it started from, at step 0
                steps, ppl = [0, *steps], [run["init_ppl"], *ppl]
            left.plot(steps, ppl, marker="o", ms=3, color=colour, label=row["algorithm"],
                      lw=2.2 if row["algorithm"] == "dense" else 1.4)
        right.bar(i, row["ppl"], yerr=row.get("ppl_std"), color=colour, capsize=3)
    source = results.get("source") or {}
    if source.get("status") == "ok" and source.get("step"):  # the dense source, before step 0
        steps, ppl = _curve(source["run"])
        left.plot([x - source["step"] for x in steps], ppl, ls=":", marker=".", color="0.3",
                  label="dense source (steps before 0)")
        left.axvline(0, color="0.6", lw=0.8)
    left.set_yscale("log")
    left.set_xlabel("training step")
    left.set_ylabel("validation perplexity (log scale)")
    left.legend(fontsize=8, ncol=2)
    left.grid(alpha=0.3)
    names = [r["algorithm"] for r in rows]
    right.set_xticks(range(len(rows)), names, rotation=40, ha="right", fontsize=8)
    low = min(r["ppl"] for r in rows)
    high = max(r["ppl"] for r in rows)
    spread = high - low + 1e-9
    right.set_ylim(low - 0.6 * spread - 0.02 * low, high + 0.3 * spread + 0.02 * high)
    right.set_ylabel("final held-out perplexity")
    right.grid(axis="y", alpha=0.3)
    for i, row in enumerate(rows):
        right.text(i, row["ppl"], f"{row['ppl']:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"libmoe bench ({results['preset']}, {results.get('regime', 'pretrain')} regime): "
                 "validation perplexity")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return SCORES


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (a stopped bench never leaves half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    return write_bytes(path, buffer.getvalue())
