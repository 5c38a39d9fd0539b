"""VLM routing figure: per-subtask allocation entropy (the paper's Fig. 6), weight entropy per task
group (Fig. 7) and router margin per MoE layer, vision layers then the connector (Fig. 8 right)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..analysis.plots import save_figure


def _layer_mean(by_layer: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """{label: mean over layers} of {layer: {label: value}}."""
    sums: dict[str, list[float]] = {}
    for values in by_layer.values():
        for label, v in values.items():
            if v is not None:
                sums.setdefault(label, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def plot_subtask_routing(runs: dict[str, dict[str, Any]], path: str | Path) -> bool:
    """Write the three-panel figure for the runs that have VLM routing metrics; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in runs.items() if v.get("eae_by_task") and v.get("router_margin")}
    if not runs:
        return False
    names = list(runs)
    labels = sorted({lab for m in runs.values() for lab in _layer_mean(m["eae_by_task"])})
    groups = sorted({g for m in runs.values() for g in _layer_mean(m.get("ewa_by_group") or {})})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [2.2, 1.2, 1.6]})
    width = 0.8 / len(names)
    cmap = plt.get_cmap("tab10")
    ax = axes[0]
    for i, name in enumerate(names):
        means = _layer_mean(runs[name]["eae_by_task"])
        ax.bar([x + i * width for x in range(len(labels))], [means.get(lab, 0.0) for lab in labels], width,
               label=name, color=cmap(i % 10))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    lows = [v for m in runs.values() for v in _layer_mean(m["eae_by_task"]).values()]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.02))
    ax.set_ylabel("allocation entropy (normalised)")
    ax.set_title("Expert allocation entropy per subtask (mean over layers)")
    ax = axes[1]
    if groups:
        for i, name in enumerate(names):
            means = _layer_mean(runs[name].get("ewa_by_group") or {})
            ax.bar([x + i * width for x in range(len(groups))], [means.get(g, 0.0) for g in groups], width,
                   label=name, color=cmap(i % 10))
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)
    ax.set_ylabel("weight entropy (normalised)")
    ax.set_title("Weight entropy per task group")
    ax = axes[2]
    for i, name in enumerate(names):
        m = runs[name]["router_margin"]
        layers = sorted(m, key=int)
        ax.plot(range(len(layers)), [m[l] if m[l] is not None else float("nan") for l in layers], "o-",
                label=name, color=cmap(i % 10))
    layer_names = next((m.get("layer_names") for m in runs.values() if m.get("layer_names")), None)
    if layer_names:
        ax.set_xticks(range(len(layer_names)), layer_names, rotation=30, ha="right")
    ax.set_ylabel("top-1 minus top-2 weight")
    ax.set_title("Router margin per MoE layer")
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=min(len(names), 8), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True
