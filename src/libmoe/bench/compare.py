"""Comparing two bench outputs: the regime comparison and the environment comparison.

The environment comparison (`compare_outputs`; results.json's `environment_comparison`): where
two outputs' environment records (`libmoe.environment`: data hashes, software, machine, threads,
float settings) and configs differ, and what that means for comparing their numbers
(`--compare` of `libmoe bench` and of `libmoe findings`).

The regime comparison (the paper's Section 5a/5e): how stable each algorithm's routing is when
it is pretrained from scratch and when it is upcycled from a dense model.

The measure is the expert change rate (the share of probe tokens whose top-k experts differ
between consecutive checkpoints, mean over MoE layers; `libmoe.analysis.metrics`), averaged over
a run's checkpoint pairs, then over seeds. The paper's claim is relative ("SharedE-V2/V3 change
rates are lower relative to the other algorithms in the upcycling regime than in pretraining"), so
each algorithm's rate is also divided by the mean rate of the other MoE algorithms of the same
bench: below 1, its routing is stabler than the others'. Relative rates cancel what the regimes
do to every algorithm alike (a different learning rate, checkpoint spacing or model).

`regime_comparison(results, out, other)` gives the numbers for results.json (key
`regime_comparison`) and draws OUT/analysis/figures/regime_comparison.png; without `other`, this
bench's rates alone.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..analysis import FigureInfo
from ..environment import compare_environments
from ..files import read_json_object
from .outputs import write_output_json
from .plots import save_figure

FIGURE = FigureInfo(
    "regime_comparison.png", "Routing stability by regime (expert change rate)",
    "Left: the expert change rate of each MoE algorithm (share of probe tokens whose top-k experts "
    "differ between consecutive checkpoints, mean over MoE layers and checkpoint pairs; error bars: "
    "std over seeds), one bar per regime. Right: the same divided by the mean rate of the other "
    "algorithms of that bench (1 = as stable as the others, below 1 = stabler). The paper finds "
    "SharedE-V2/V3 relatively stabler when upcycled than when pretrained (Section 5a); absolute "
    "rates of two benches also differ by their checkpoint spacing and learning rates, the relative "
    "ones much less.")
METRIC = ("expert change rate (top-k set) between consecutive checkpoints, mean over MoE layers and "
          "checkpoint pairs, then over seeds; relative = rate / mean rate of the other algorithms")
SHARED = ("sharede_v2", "sharede_v3")


def compare_outputs(results: dict[str, Any], other: str | Path) -> dict[str, Any]:
    """results.json's "environment_comparison": where this output's environment record and config
    differ from those of the bench output `other`, with a one-sentence summary of what that means
    for their numbers (`libmoe.environment.compare_environments`; "unknown" when either output
    predates the record)."""
    saved = read_json_object(Path(other) / "results.json", "give --compare a finished libmoe bench output")
    comparison = compare_environments(results.get("environment"), saved.get("environment"), str(other),
                                      configs=(results.get("config"), saved.get("config")))
    perplexity = _perplexities(results, saved)
    if perplexity:
        comparison["perplexity"] = perplexity
        comparison["summary"] += " " + _perplexity_sentence(perplexity)
    return comparison


def _perplexities(results: dict[str, Any], saved: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{algorithm: {"this", "other", "relative"}}: the validation perplexity of each algorithm that
    both outputs have one for (a VLM bench has none)."""
    def ppl(res: dict[str, Any]) -> dict[str, float]:
        return {r["algorithm"]: float(r["ppl"]) for r in res.get("rows") or []
                if isinstance(r, dict) and isinstance(r.get("ppl"), (int, float)) and r.get("algorithm")}

    this, other = ppl(results), ppl(saved)
    return {a: {"this": this[a], "other": other[a], "relative": this[a] / other[a] - 1 if other[a] else None}
            for a in this if a in other}


def _perplexity_sentence(perplexity: dict[str, dict[str, float]]) -> str:
    differ = {a: p for a, p in perplexity.items() if p["this"] != p["other"]}
    if not differ:
        return f"Validation perplexity: identical for all {len(perplexity)} algorithm(s) both have."
    worst, p = max(differ.items(), key=lambda kv: abs(kv[1]["relative"] or 0.0))
    change = f" ({100 * p['relative']:+.3g}%)" if p["relative"] is not None else ""
    return (f"Validation perplexity differs for {len(differ)} of {len(perplexity)} algorithm(s), most for "
            f"{worst}: {p['this']:.4f} vs {p['other']:.4f}{change}.")


def record_comparison(bench_dir: str | Path, other: str | Path) -> dict[str, Any]:
    """Compare the bench output `bench_dir` with `other` (`compare_outputs`) and keep the result as
    its results.json's "environment_comparison" (written atomically, the manifest updated); the
    tables and report show it when next written (`libmoe findings --compare` rewrites them at
    once). Returns the comparison."""
    out = Path(bench_dir)
    results = read_json_object(out / "results.json", "give a finished libmoe bench output")
    results["environment_comparison"] = compare_outputs(results, other)
    write_output_json(out, "results.json", results)
    return results["environment_comparison"]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def run_change_rate(run_dir: str | Path) -> float | None:
    """Mean expert change rate of one run's analysis (RUN/analysis/metrics.json), None without."""
    path = Path(run_dir) / "analysis" / "metrics.json"
    if not path.is_file():
        return None
    entries = json.loads(path.read_text()).get("expert_change_rate") or []
    return _mean([e["mean"] for e in entries if isinstance(e.get("mean"), (int, float))])


def _run_dir(bench: Path, run: dict[str, Any]) -> Path:
    """A run of a bench output, found beside its results.json (the output may have moved)."""
    here = bench / "runs" / str(run.get("name"))
    return here if here.is_dir() else Path(str(run.get("run")))


def change_rates(results: dict[str, Any], bench: str | Path) -> dict[str, dict[str, Any]]:
    """{algorithm: {"mean", "std", "seeds", "per_seed"}} over the bench's finished MoE runs that
    have a change rate (dense has no router and is left out)."""
    bench = Path(bench)
    per: dict[str, dict[int, float]] = {}
    for run in results.get("runs") or []:
        if run.get("status") != "ok" or run.get("algorithm") == "dense":
            continue
        rate = run_change_rate(_run_dir(bench, run))
        if rate is not None:
            per.setdefault(run["algorithm"], {})[int(run.get("seed", 0))] = rate
    if not per:  # an output whose runs are gone: the cross-run analysis (seed 0) may remain
        path = bench / "analysis" / "metrics.json"
        analysed = json.loads(path.read_text()) if path.is_file() else {}
        for algorithm, metrics in analysed.items():
            entries = (metrics or {}).get("expert_change_rate") or []
            rate = _mean([e["mean"] for e in entries if isinstance(e.get("mean"), (int, float))])
            if rate is not None and algorithm != "dense":
                per[algorithm] = {0: rate}
    out = {}
    for algorithm, seeds in per.items():
        values = [seeds[s] for s in sorted(seeds)]
        out[algorithm] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else None,
                          "seeds": len(values), "per_seed": {str(s): seeds[s] for s in sorted(seeds)}}
    return out


def relative_rates(rates: dict[str, float]) -> dict[str, float | None]:
    """Each algorithm's rate divided by the mean rate of the others (None without others)."""
    out = {}
    for algorithm, rate in rates.items():
        others = [r for a, r in rates.items() if a != algorithm]
        base = _mean(others)
        out[algorithm] = rate / base if base else None
    return out


def _entry(results: dict[str, Any], bench: Path) -> dict[str, Any]:
    rates = change_rates(results, bench)
    train = (results.get("config") or {}).get("train") or {}
    return {
        "regime": results.get("regime", "pretrain"), "bench": str(bench), "preset": results.get("preset"),
        "steps": train.get("max_steps"), "checkpoint_every": train.get("checkpoint_every"),
        "change_rate": {a: r["mean"] for a, r in rates.items()},
        "change_rate_std": {a: r["std"] for a, r in rates.items()},
        "seeds": {a: r["seeds"] for a, r in rates.items()},
        "relative": relative_rates({a: r["mean"] for a, r in rates.items()}),
    }


def regime_comparison(results: dict[str, Any], out: str | Path,
                      other: str | Path | None = None) -> dict[str, Any]:
    """The numbers of results.json's `regime_comparison` (see the module docstring); also draws
    the figure into OUT/analysis/figures when there is a rate to show."""
    out = Path(out)
    entries = [_entry(results, out)]
    if other is not None:
        other = Path(other)
        saved = read_json_object(other / "results.json", "give --compare a finished libmoe bench output")
        entries.append(_entry(saved, other))
    labels = [e["regime"] for e in entries]
    if len(set(labels)) < len(labels):  # two benches of one regime: tell them apart by folder
        labels = [f"{e['regime']} ({Path(e['bench']).name})" for e in entries]
    for entry, label in zip(entries, labels):
        entry["label"] = label
    algorithms = list(dict.fromkeys(a for e in entries for a in e["change_rate"]))
    comparison: dict[str, Any] = {"metric": METRIC, "algorithms": algorithms, "regimes": entries,
                                  "figure": None}
    if len(entries) == 2:
        a, b = entries
        comparison["relative_difference"] = {
            "of": [a["label"], b["label"]],
            "by_algorithm": {x: a["relative"][x] - b["relative"][x] for x in algorithms
                             if a["relative"].get(x) is not None and b["relative"].get(x) is not None},
        }
        up = next((e for e in entries if e["regime"] == "upcycle"), None)
        pre = next((e for e in entries if e["regime"] == "pretrain"), None)
        if up is not None and pre is not None:
            comparison["shared_relative"] = {
                x: {"upcycle": up["relative"].get(x), "pretrain": pre["relative"].get(x)}
                for x in SHARED if x in up["relative"] or x in pre["relative"]}
    if algorithms:
        path = out / "analysis" / "figures" / FIGURE.name
        plot_regime_comparison(comparison, path)
        comparison["figure"] = str(path.relative_to(out))
    return comparison


def plot_regime_comparison(comparison: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: change rate (left) and relative change rate (right) per algorithm, one bar
    per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms, entries = comparison["algorithms"], comparison["regimes"]
    n = len(entries)
    width = 0.8 / n
    palette = {"pretrain": "tab:blue", "upcycle": "tab:orange", "vlm": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in ((axes[0], "change_rate", "expert change rate"),
                           (axes[1], "relative", "relative to the other algorithms' mean")):
        for i, entry in enumerate(entries):
            xs, ys, errs = [], [], []
            for j, algorithm in enumerate(algorithms):
                value = entry[key].get(algorithm)
                if value is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(value)
                std = entry["change_rate_std"].get(algorithm) if key == "change_rate" else None
                errs.append(std or 0.0)
            colour = palette.get(entry["regime"], f"C{i + 3}")
            bars = ax.bar(xs, ys, width * 0.95, color=colour, label=entry["label"],
                          yerr=errs if any(errs) else None, capsize=2)
            for bar, y in zip(bars, ys):
                ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom",
                        fontsize=6.5)
        ax.set_xticks(range(len(algorithms)), algorithms, rotation=30, ha="right", fontsize=8)
        for tick, algorithm in zip(ax.get_xticklabels(), algorithms):
            if algorithm in SHARED:
                tick.set_fontweight("bold")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("share of tokens re-routed per checkpoint")
    axes[1].set_ylabel("rate / mean rate of the others")
    axes[1].axhline(1.0, color="0.3", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    names = " vs ".join(e["label"] for e in entries)
    fig.suptitle(f"Routing stability by regime: {names} (SharedE-V2/V3 in bold)", fontsize=11)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def comparison_table(comparison: dict[str, Any]) -> list[list[str]]:
    """Header and rows: per algorithm, each regime's change rate (± std over seeds) and relative
    rate."""
    entries = comparison["regimes"]
    head = ["Algorithm"]
    for e in entries:
        head += [f"Change rate ({e['label']})", f"Relative ({e['label']})"]
    body = []
    for algorithm in comparison["algorithms"]:
        row = [algorithm]
        for e in entries:
            rate, std, rel = (e["change_rate"].get(algorithm), e["change_rate_std"].get(algorithm),
                              e["relative"].get(algorithm))
            row.append("—" if rate is None else f"{rate:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
            row.append("—" if rel is None else f"{rel:.2f}")
        body.append(row)
    return [head, *body]
