"""Figures of the routing analysis (LibMoE paper, Section 5 and Appendices C-D).

Every `plot_xxx(runs, path)` takes `{display name: metrics.json dict}` (see docs/analysis.md),
draws one run per colour and returns False without writing when no run has the data.
Figures are built on `matplotlib.figure.Figure` (no pyplot state), so they work headless.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Runs = dict[str, dict]
MAX_PANELS = 8  # runs shown in the one-panel-per-run figures (co-activation, load)
MAX_METRICS = 9  # panels of the intervention figures (val_ppl and task metrics, in order)
DPI = 130
MAX_WIDTH = 10.0  # inches; wider figures shrink too much in the HTML report


@dataclass
class FigureInfo:
    """One written figure: file name in the output folder, title and how to read it."""

    name: str
    title: str
    caption: str


# --------------------------------------------------------------------------- data helpers


def _num(x: Any) -> float | None:
    """x as a finite float, or None for null / missing / NaN values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _layer_keys(d: dict | None) -> list[str]:
    """Layer keys ("0", "1", ...) in numeric order."""
    return sorted(d or {}, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))


def _by_layer(d: dict | None) -> tuple[list[int], list[float]]:
    """A layer -> value dict as (layers, values), nulls dropped."""
    pairs = [(int(k), _num(d[k])) for k in _layer_keys(d) if str(k).isdigit()]
    pairs = [(k, v) for k, v in pairs if v is not None]
    return [k for k, _ in pairs], [v for _, v in pairs]


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in map(_num, values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _label_means(by_layer: dict | None) -> dict[str, float]:
    """layer -> label -> value, averaged over layers per label (label order of first appearance)."""
    labels: dict[str, list[Any]] = {}
    for layer in _layer_keys(by_layer):
        for label, v in (by_layer[layer] or {}).items():
            labels.setdefault(label, []).append(v)
    means = {label: _mean(vs) for label, vs in labels.items()}
    return {label: m for label, m in means.items() if m is not None}


def _last_layer(d: dict | None) -> str | None:
    keys = _layer_keys(d)
    return keys[-1] if keys else None


def _union(lists: list[list[str]]) -> list[str]:
    """Keys of several lists, in order of first appearance."""
    return list(dict.fromkeys(k for keys in lists for k in keys))


# --------------------------------------------------------------------------- drawing helpers


def colors(runs: Runs) -> dict[str, Any]:
    """One tab10 colour per run, in run order, so a run keeps its colour in every figure."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(runs)}


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | Path, **savefig: Any) -> Path:
    """Write `fig` as `path` (its format from the suffix) atomically: rendered in memory first, so
    an interrupted run never leaves a truncated figure in place of the previous one."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    return write_bytes(path, buffer.getvalue())


def _save(fig: Figure, path: str | Path) -> bool:
    save_figure(fig, path, dpi=DPI, bbox_inches="tight")
    fig.clear()
    return True


def _legend_outside(ax: Axes, handles: list | None = None, **kw: Any) -> None:
    """Legend right of the axes, so it never covers data."""
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False, **kw)


def _run_and_style_handles(names: list[str], cols: dict, styles: dict[str, str]) -> list:
    """Legend proxies: one solid line per run colour, then one grey line per line style."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=cols[n], lw=2, label=n) for n in names]
    handles += [Line2D([], [], color="0.4", ls=ls, lw=1.5, label=lab) for lab, ls in styles.items()]
    return handles


def _layer_axis(ax: Axes, layers: list[int]) -> None:
    ax.set_xlabel("MoE layer")
    if layers:
        ax.set_xticks(sorted(set(layers)))


def _heatmap(ax: Axes, matrix: list[list[float]], rows: list[str], cols: list[str], **kw: Any):
    """imshow with row/column tick labels; returns the image for a colourbar."""
    data = np.array([[np.nan if _num(v) is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", **kw)
    ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 8 else 0, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    return im


# --------------------------------------------------------------------------- line figures


def _plot_steps(runs: Runs, path: str | Path, key: str, x_key: str, series: dict[str, tuple[str, str]],
                title: str, ylabel: str) -> bool:
    """Per-checkpoint metric vs step; `series` maps legend text -> (field, line style)."""
    cols = colors(runs)
    fig = _figure()
    ax = fig.add_subplot()
    drawn = []
    for name, m in runs.items():
        entries = [e for e in (m.get(key) or []) if _num(e.get(x_key)) is not None]
        for field, ls in series.values():
            pts = [(e[x_key], _num(e.get(field))) for e in entries]
            pts = sorted((x, y) for x, y in pts if y is not None)
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=cols[name])
                drawn.append(name)
    if not drawn:
        return False
    ax.set(title=title, xlabel="training step", ylabel=ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    styles = {label: ls for label, (_, ls) in series.items()}
    _legend_outside(ax, _run_and_style_handles(list(dict.fromkeys(drawn)), cols, styles))
    return _save(fig, path)


def plot_change_rate(runs: Runs, path: str | Path) -> bool:
    """Expert change rate between consecutive checkpoints vs the later step (paper Fig. 3)."""
    series = {"top-k set": ("mean", "-"), "top-1 expert": ("top1_mean", "--")}
    return _plot_steps(runs, path, "expert_change_rate", "to", series,
                       "Expert change rate", "fraction of tokens re-routed")


def plot_saturation(runs: Runs, path: str | Path) -> bool:
    """Router saturation (overlap with the final checkpoint's routing) vs step (paper Fig. 4)."""
    series = {"top-k": ("topk", "-"), "top-1": ("top1", "--")}
    return _plot_steps(runs, path, "router_saturation", "step", series,
                       "Router saturation", "overlap with final routing")


def _plot_layer_lines(ax: Axes, runs: Runs, key: str) -> list[str]:
    """One line per run of a layer -> value metric; returns the runs drawn."""
    cols = colors(runs)
    drawn, all_layers = [], []
    for name, m in runs.items():
        layers, values = _by_layer(m.get(key))
        if layers:
            ax.plot(layers, values, marker="o", color=cols[name], label=name)
            drawn.append(name)
            all_layers += layers
    _layer_axis(ax, all_layers)
    ax.grid(alpha=0.3)
    return drawn


def _plot_by_layer(runs: Runs, path: str | Path, key: str, title: str, ylabel: str) -> bool:
    fig = _figure()
    ax = fig.add_subplot()
    if not _plot_layer_lines(ax, runs, key):
        return False
    ax.set(title=title, ylabel=ylabel)
    _legend_outside(ax)
    return _save(fig, path)


def plot_margin_by_depth(runs: Runs, path: str | Path) -> bool:
    """Router margin (top-1 minus top-2 weight) per MoE layer (paper Fig. 8)."""
    return _plot_by_layer(runs, path, "router_margin", "Router margin by depth", "mean top-1 − top-2 weight")


def plot_similarity(runs: Runs, path: str | Path) -> bool:
    """Mean pairwise cosine similarity of expert weights per MoE layer."""
    return _plot_by_layer(runs, path, "expert_similarity", "Expert weight similarity",
                          "mean pairwise cosine")


# --------------------------------------------------------------------------- entropies


def _grouped_bars(ax: Axes, groups: list[str], bars: dict[str, dict[str, float]], colors_: dict,
                  **bar_kw: Any) -> None:
    """Bars grouped on x by `groups`; `bars` maps series name -> group -> value."""
    n = max(len(bars), 1)
    width = 0.8 / n
    for i, (series, values) in enumerate(bars.items()):
        xs = [g + (i - (n - 1) / 2) * width for g, group in enumerate(groups) if group in values]
        ys = [values[group] for group in groups if group in values]
        ax.bar(xs, ys, width=width, color=colors_[series], label=series, **bar_kw)
    if len(groups) > 24:  # e.g. BLiMP's 67 paradigms: vertical, smaller labels
        ax.set_xticks(range(len(groups)), groups, rotation=90, ha="center",
                      fontsize=max(4.5, 8 - len(groups) / 25))
    else:
        rotate = len(groups) > 6
        ax.set_xticks(range(len(groups)), groups, rotation=45 if rotate else 0,
                      ha="right" if rotate else "center", fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def _zoom(ax: Axes, values: list[float], lo: float = 0.0, hi: float = 1.0) -> None:
    """Zoom the y-axis on the spread of values (entropies sit close to 1), kept inside [lo, hi]."""
    if values:
        vmin, vmax = min(values), max(values)
        pad = max(0.15 * (vmax - vmin), 0.01)
        ax.set_ylim(max(lo, vmin - 2 * pad), min(hi, vmax + pad))


def plot_eae_by_label(runs: Runs, path: str | Path) -> bool:
    """Expert allocation entropy per label, averaged over layers, one bar per run (paper Fig. 6)."""
    panels = {}
    for key, what in (("eae_by_domain", "domain"), ("eae_by_task", "task")):
        bars = {name: _label_means(m.get(key)) for name, m in runs.items()}
        bars = {name: v for name, v in bars.items() if v}
        if bars:
            panels[what] = bars
    if not panels:
        return False
    n_labels = max(len(_union([list(v) for v in bars.values()])) for bars in panels.values())
    n_runs = max(len(bars) for bars in panels.values())
    fig = _figure(min(max(7.0, 0.12 * n_labels * n_runs + 2.5), MAX_WIDTH), 3.6 * len(panels))
    cols = colors(runs)
    for i, (what, bars) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        labels = _union([list(v) for v in bars.values()])
        _grouped_bars(ax, labels, bars, cols)
        _zoom(ax, [v for vals in bars.values() for v in vals.values()])
        ax.set(title=f"Expert allocation entropy by {what} (mean over layers)", ylabel="EAE")
        if i == 0:
            _legend_outside(ax)
    return _save(fig, path)


def plot_ewa_by_layer(runs: Runs, path: str | Path) -> bool:
    """Weight entropy per layer per run, and a heatmap of weight entropy by label (paper Fig. 7).

    The heatmap has one row per run (mean over layers); with a single run, one row per layer.
    """
    by_label = {name: m["ewa_by_domain"] for name, m in runs.items() if _label_means(m.get("ewa_by_domain"))}
    has_lines = any(_by_layer(m.get("ewa"))[0] for m in runs.values())
    if not has_lines and not by_label:
        return False
    labels = _union([list(_label_means(d)) for d in by_label.values()])
    fig = _figure(min(max(7.0, 0.3 * len(labels) + 3), MAX_WIDTH), 4.0 + 3.2 * bool(by_label))
    # Subfigures lay out independently, so the line legend does not push the colourbar aside.
    panels = list(fig.subfigures(2, 1, height_ratios=[4.0, 3.2])) if has_lines and by_label else [fig]
    if has_lines:
        ax = panels[0].add_subplot()
        _plot_layer_lines(ax, runs, "ewa")
        ax.set(title="Expert weight allocation entropy by layer", ylabel="EWA")
        _legend_outside(ax)
    if by_label:
        ax = panels[-1].add_subplot()
        if len(by_label) == 1:
            (name, d), = by_label.items()
            rows = [f"layer {k}" for k in _layer_keys(d)]
            matrix = [[(d[k] or {}).get(lab) for lab in labels] for k in _layer_keys(d)]
            ax.set_title(f"EWA by domain and layer: {name}")
        else:
            rows = list(by_label)
            matrix = [[_label_means(d).get(lab) for lab in labels] for d in by_label.values()]
            ax.set_title("EWA by domain (mean over layers)")
        im = _heatmap(ax, matrix, rows, labels, cmap="viridis")
        panels[-1].colorbar(im, ax=ax, label="EWA", shrink=0.9)
    return _save(fig, path)


# --------------------------------------------------------------------------- per-run panels


def _coactivation_entries(m: dict) -> list[dict]:
    """Earliest and final co-activation entries (one if they coincide)."""
    entries = [e for e in (m.get("coactivation") or []) if e.get("by_layer")]
    return entries[:1] + entries[-1:] if len(entries) > 1 else entries


def plot_coactivation(runs: Runs, path: str | Path) -> bool:
    """Co-activation heatmaps of the last MoE layer: earliest vs final checkpoint, one row per run."""
    shown = {n: e for n, m in runs.items() if (e := _coactivation_entries(m))}
    shown = dict(list(shown.items())[:MAX_PANELS])
    if not shown:
        return False
    fig = _figure(7.0, 3.0 * len(shown) + 0.4)
    axes = fig.subplots(len(shown), 2, squeeze=False)
    im = None
    for row, (name, entries) in zip(axes, shown.items()):
        # With a single traced checkpoint, the "early" column stays empty.
        for ax, entry in zip(row, [None] * (2 - len(entries)) + entries):
            if entry is None:
                ax.set_axis_off()
                continue
            layer = _last_layer(entry["by_layer"])
            block = entry["by_layer"][layer]
            ids = [str(e) for e in block.get("experts", [])]
            im = _heatmap(ax, block.get("matrix") or [[]], ids, ids, cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"{name}: step {entry.get('step')}, layer {layer}", fontsize=9)
            ax.set(xlabel="expert j", ylabel="expert i")
    fig.colorbar(im, ax=axes, label="P(j selected | i selected)", shrink=min(0.8, 2.4 / len(shown)))
    fig.suptitle("Expert co-activation (last MoE layer): earliest vs final checkpoint")
    return _save(fig, path)


def plot_load(runs: Runs, path: str | Path) -> bool:
    """Sorted per-expert selection fraction of the last MoE layer, one panel per run."""
    shown = {}
    for name, m in runs.items():
        layer = _last_layer(m.get("load"))
        if layer is not None and (m["load"][layer] or {}).get("fraction"):
            shown[name] = (layer, m["load"][layer])
    shown = dict(list(shown.items())[:MAX_PANELS])
    if not shown:
        return False
    ncols = 1 if len(shown) == 1 else 2
    nrows = math.ceil(len(shown) / ncols)
    fig = _figure(7.0 if ncols == 1 else 9.0, 2.8 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    cols = colors(runs)
    for ax, (name, (layer, load)) in zip(axes, shown.items()):
        frac = sorted((_num(v) or 0.0 for v in load["fraction"]), reverse=True)
        ax.bar(range(len(frac)), frac, width=0.85, color=cols[name])
        ax.axhline(1 / len(frac), ls="--", color="0.3", lw=1, label="uniform 1/R")
        jain, dead = _num(load.get("jain")), load.get("dead")
        stats = f"Jain {jain:.2f}" if jain is not None else "Jain –"
        ax.set_title(f"{name}, layer {layer}: {stats}, dead {dead if dead is not None else '–'}", fontsize=9)
        ax.set(xlabel="expert (sorted by load)", ylabel="selection fraction")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle("Expert load (last MoE layer)")
    return _save(fig, path)


# --------------------------------------------------------------------------- interventions


def _plot_intervention(runs: Runs, path: str | Path, key: str, title: str) -> bool:
    """Δmetric bars, one panel per metric: groups = runs, bars = interventions (shade / hatch)."""
    from matplotlib.patches import Patch

    deltas: dict[str, dict[str, dict[str, float]]] = {}  # intervention -> metric -> run -> delta
    for name, m in runs.items():
        for r in (m.get(key) or {}).get("runs") or []:
            if _num(r.get("tau")) == 1.0:  # the unperturbed model: every delta is 0
                continue
            for metric, v in (r.get("delta") or {}).items():
                if _num(v) is not None:
                    deltas.setdefault(str(r.get("name")), {}).setdefault(metric, {})[name] = _num(v)
    if not deltas:
        return False
    metrics = _union([list(d) for d in deltas.values()])[:MAX_METRICS]
    names = [n for n in runs if any(n in d.get(mt, {}) for d in deltas.values() for mt in metrics)]
    panel_w = min(max(3.2, 0.25 * len(names) * len(deltas) + 1.0), MAX_WIDTH)
    ncols = max(1, min(len(metrics), int(MAX_WIDTH // panel_w)))
    nrows = math.ceil(len(metrics) / ncols)
    fig = _figure(panel_w * ncols, 3.0 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cols = colors(runs)
    hatches, alphas = ["", "//", "xx", ".."], [0.5, 1.0, 0.8, 0.65]
    n, width = len(deltas), 0.8 / len(deltas)
    for ax, metric in zip(axes, metrics):
        for i, per_metric in enumerate(deltas.values()):
            vals = per_metric.get(metric, {})
            xs = [g + (i - (n - 1) / 2) * width for g, r in enumerate(names) if r in vals]
            ax.bar(xs, [vals[r] for r in names if r in vals], width=width, edgecolor="0.2", lw=0.5,
                   color=[cols[r] for r in names if r in vals], hatch=hatches[i % 4], alpha=alphas[i % 4])
        ax.axhline(0, color="0.2", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0,
                      ha="right" if len(names) > 3 else "center", fontsize=8)
        ax.set(title=metric, ylabel="Δ vs baseline")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_axis_off()
    handles = [Patch(facecolor="0.6", edgecolor="0.2", hatch=hatches[i % 4], alpha=alphas[i % 4], label=lab)
               for i, lab in enumerate(deltas)]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def plot_droptop(runs: Runs, path: str | Path) -> bool:
    """Change in each metric when the top-1 (and top-2) expert is dropped (paper Fig. 5)."""
    return _plot_intervention(runs, path, "droptop", "DropTop: metric change when top experts are dropped")


def plot_temperature(runs: Runs, path: str | Path) -> bool:
    """Change in each metric when router logits are divided by a temperature tau (paper Table 7)."""
    return _plot_intervention(runs, path, "temperature", "Router temperature: metric change vs tau = 1")


def plot_init_std(init_std: dict | None, path: str | Path) -> bool:
    """Balance loss vs step, one line per router init std, early window shaded (paper Fig. 11)."""
    import matplotlib

    curves = (init_std or {}).get("curves") or {}
    stds = sorted((s for s in curves if (curves[s] or {}).get("step")), key=float)
    if not stds:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    early = (init_std or {}).get("early_balance") or {}
    for i, s in enumerate(stds):
        pts = [(x, _num(y)) for x, y in zip(curves[s]["step"], curves[s].get("balance") or [])]
        pts = [(x, y) for x, y in pts if y is not None]
        label = f"std {s}" + (f" (early {e:.3f})" if (e := _num(early.get(s))) is not None else "")
        if pts:
            ax.plot(*zip(*pts), color=cmap(i / max(len(stds) - 1, 1) * 0.9), label=label)
    if (steps := _num((init_std or {}).get("early_steps"))) is not None:
        ax.axvspan(0, steps, color="0.85", alpha=0.6, lw=0, label=f"early window (≤ {steps:g} steps)")
    ax.set(title="Router initialisation: balance loss", xlabel="training step",
           ylabel="balance loss (sum over MoE layers, before α)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------- all figures

PlotFn = Callable[[Runs, "str | Path"], bool]

FIGURES: list[tuple[PlotFn, FigureInfo]] = [
    (plot_change_rate, FigureInfo(
        "change_rate.png", "Expert change rate",
        "Fraction of probe tokens whose experts differ between consecutive checkpoints, plotted at the later "
        "step (solid: top-k set, dashed: top-1 expert). Lower means routing has settled; the paper finds "
        "it falls over training (Fig. 3).")),
    (plot_saturation, FigureInfo(
        "saturation.png", "Router saturation",
        "Overlap of each checkpoint's expert selection with the final checkpoint's (solid: top-k, dashed: "
        "top-1). It reaches 1 at the final step; a curve that rises early means routing is decided early "
        "in training.")),
    (plot_eae_by_label, FigureInfo(
        "eae_by_label.png", "Expert allocation entropy by label",
        "Normalised entropy of how tokens of each domain (and task, if traced) spread over experts, "
        "averaged over MoE layers; the y-axis is zoomed on the spread. Lower means more label-specific "
        "experts; the paper finds XMoE and TC-MoE specialise most by label (Fig. 6).")),
    (plot_ewa_by_layer, FigureInfo(
        "ewa_by_layer.png", "Expert weight allocation entropy",
        "Top: normalised entropy of the router's combine weights per MoE layer; lower means confident, "
        "peaked weights (TC-MoE is lowest in the paper, Fig. 7). Bottom: the same by domain, one row per "
        "run averaged over layers (one row per layer when a single run has the data).")),
    (plot_margin_by_depth, FigureInfo(
        "margin_by_depth.png", "Router margin by depth",
        "Mean gap between the top-1 and top-2 normalised routing weights per MoE layer. Higher means more "
        "decisive routing; the paper finds the margin grows with depth (Fig. 8). Top-1 routers have none.")),
    (plot_coactivation, FigureInfo(
        "coactivation.png", "Expert co-activation",
        "For the last MoE layer, row i column j is the fraction of tokens routed to expert i that also go "
        "to expert j, over the most co-activated experts; left: earliest traced checkpoint, right: final. "
        "Bright off-diagonal cells mark expert pairs that work together.")),
    (plot_similarity, FigureInfo(
        "similarity.png", "Expert weight similarity",
        "Mean pairwise cosine similarity of the experts' flattened output weights per MoE layer (final "
        "checkpoint). Near 0 means diverse experts; higher means experts learned redundant functions.")),
    (plot_load, FigureInfo(
        "load.png", "Expert load",
        "Share of routing selections per expert in the last MoE layer, sorted; the dashed line is the "
        "uniform share 1/R. Jain's index is 1 for a perfectly balanced load; dead experts are never "
        "selected.")),
    (plot_droptop, FigureInfo(
        "droptop.png", "DropTop interventions",
        "Change from baseline when each token's top-1 expert (light bars) or top-1 and top-2 experts "
        "(hatched) are removed at inference. Perplexity rising or accuracy falling means the top experts "
        "matter; the paper finds DropTop1 hurts and DropTop1&2 hurts more (Fig. 5).")),
    (plot_temperature, FigureInfo(
        "temperature.png", "Router temperature",
        "Change from baseline when router logits are divided by tau at inference (shade and hatch mark "
        "tau). Flattening with tau = 10 hurts more than sharpening with tau = 0.1 in the paper (Table 7).")),
]

INIT_STD = FigureInfo(
    "init_std.png", "Router initialisation",
    "Load-balancing loss during training for each router initialisation std, the early window shaded; "
    "the legend gives each std's mean balance loss over that window. Lower is more balanced; the paper "
    "finds smaller init stds give lower early balance loss (Fig. 11).")


def plot_all(runs: Runs, out_dir: str | Path, init_std: dict | None = None) -> list[FigureInfo]:
    """Write every figure the data supports into out_dir; returns them in reading order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [info for fn, info in FIGURES if fn(runs, out / info.name)]
    if plot_init_std(init_std, out / INIT_STD.name):
        written.append(INIT_STD)
    return written
