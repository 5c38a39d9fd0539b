"""Figures from synthetic metrics.json dicts: written when the data exists, skipped when not."""

import random

import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from libmoe.analysis import plots  # noqa: E402

LABELS = ["news", "fiction", "science", "law"]
ALL_FIGURES = ["change_rate.png", "saturation.png", "eae_by_label.png", "ewa_by_layer.png",
               "margin_by_depth.png", "coactivation.png", "similarity.png", "load.png",
               "droptop.png", "temperature.png", "init_std.png"]


def routed(algorithm, seed, n_layers=3, steps=(100, 200, 300), n_experts=8, labels=LABELS):
    """A metrics.json dict of a routed run with every analysis present."""
    rng = random.Random(seed)
    layers = [str(i) for i in range(n_layers)]

    def per_layer(lo, hi):
        return {k: rng.uniform(lo, hi) for k in layers}

    def by_label(lo, hi):
        return {k: {lab: rng.uniform(lo, hi) for lab in labels} for k in layers}

    def coact(step):
        ids = rng.sample(range(n_experts), 6)
        matrix = [[0.0 if i == j else rng.random() for j in range(6)] for i in range(6)]
        return {"step": step, "by_layer": {k: {"experts": ids, "matrix": matrix, "mean": 0.2, "max": 0.9}
                                           for k in layers}}

    def load():
        raw = [rng.random() for _ in range(n_experts)]
        return {"fraction": [r / sum(raw) for r in raw], "jain": rng.uniform(0.7, 1), "dead": 1,
                "dead_fraction": 1 / n_experts}

    def intervention(names, field, values):
        return {"baseline": {"val_ppl": 80.0, "piqa/acc": 0.55},
                "runs": [{"name": n, field: v, "metrics": {},
                          "delta": {"val_ppl": rng.uniform(1, 40), "piqa/acc": -rng.uniform(0, 0.05)}}
                         for n, v in zip(names, values)]}

    return {
        "run": f"tiny-{algorithm}", "algorithm": algorithm, "step": steps[-1], "n_experts": n_experts,
        "top_k": 2, "n_slots": [n_experts] * n_layers, "layers": list(range(n_layers)), "labels": labels,
        "eae": per_layer(0.8, 1), "eae_by_domain": by_label(0.8, 1), "ewa": per_layer(0.6, 0.9),
        "ewa_by_domain": by_label(0.6, 0.9), "router_margin": per_layer(0.05, 0.3),
        "expert_change_rate": [{"from": a, "to": b, "mean": rng.random(), "top1_mean": rng.random(),
                                "by_layer": per_layer(0, 1), "top1_by_layer": per_layer(0, 1)}
                               for a, b in zip(steps, steps[1:])],
        "router_saturation": [{"step": s, "top1": rng.random(), "topk": rng.random()} for s in steps],
        "coactivation": [coact(steps[0]), coact(steps[-1])],
        "expert_similarity": per_layer(0, 0.1),
        "load": {k: load() for k in layers},
        "droptop": intervention(["DropTop1", "DropTop1&2"], "drop_top", [1, 2]),
        "temperature": intervention(["tau=0.1", "tau=1", "tau=10"], "tau", [0.1, 1.0, 10.0]),
    }


def dense():
    """A dense run: no routing, so every routing field is empty or null."""
    return {"run": "tiny-dense", "algorithm": "dense", "step": 300, "n_experts": None, "top_k": None,
            "labels": LABELS, "eae": {}, "eae_by_domain": {}, "ewa": {}, "ewa_by_domain": {},
            "router_margin": {}, "expert_change_rate": [], "router_saturation": [], "coactivation": [],
            "expert_similarity": {}, "load": {}, "layer_overlap": {}, "droptop": {}, "temperature": {},
            "skipped": {"droptop": "dense model: no router"}}


def init_std():
    stds = ["0.02", "0.04", "0.06"]
    steps = list(range(10, 210, 10))
    return {"algorithm": "smoe", "stds": [float(s) for s in stds], "early_steps": 50,
            "curves": {s: {"step": steps, "balance": [1 + float(s) * 5 / (1 + t / 50) for t in steps]}
                       for s in stds},
            "early_balance": {s: 1 + float(s) for s in stds}}


def assert_image(path):
    """path is a readable PNG of plausible size with more than one colour."""
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert img[..., :3].std() > 0.01


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    runs = {"smoe": routed("smoe", 0), "xmoe": routed("xmoe", 1), "dense": dense()}
    return out, plots.plot_all(runs, out, init_std=init_std())


def test_plot_all_writes_every_figure_in_reading_order(full):
    out, infos = full
    assert [i.name for i in infos] == ALL_FIGURES
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_FIGURES)
    for info in infos:
        assert_image(out / info.name)
        assert info.title and info.caption.endswith(".")


def test_figures_without_data_are_skipped(tmp_path):
    runs = {"smoe": routed("smoe", 0), "top1": routed("switch", 2)}
    for m in runs.values():
        del m["droptop"], m["temperature"]
    runs["top1"]["router_margin"] = {"0": None, "1": None, "2": None}  # top-1 routing: undefined
    names = [i.name for i in plots.plot_all(runs, tmp_path)]
    assert "droptop.png" not in names and "temperature.png" not in names and "init_std.png" not in names
    assert not (tmp_path / "droptop.png").exists()
    assert "margin_by_depth.png" in names  # still drawn for smoe
    assert plots.plot_margin_by_depth({"top1": runs["top1"]}, tmp_path / "m.png") is False
    assert not (tmp_path / "m.png").exists()


def test_dense_only_writes_nothing(tmp_path):
    assert plots.plot_all({"dense": dense()}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    assert plots.plot_all({}, tmp_path, init_std={}) == []


def test_partial_nulls_and_single_checkpoint(tmp_path):
    m = routed("smoe", 3, steps=(300,))
    m["eae"]["1"] = None
    m["eae_by_domain"]["0"]["news"] = None
    m["coactivation"] = m["coactivation"][-1:]
    assert m["expert_change_rate"] == []
    assert plots.plot_change_rate({"smoe": m}, tmp_path / "c.png") is False
    assert plots.plot_coactivation({"smoe": m}, tmp_path / "co.png")
    assert plots.plot_eae_by_label({"smoe": m}, tmp_path / "e.png")
    assert plots.plot_ewa_by_layer({"smoe": m}, tmp_path / "w.png")  # one run: layer x label heatmap
    for name in ("co.png", "e.png", "w.png"):
        assert_image(tmp_path / name)


def test_many_runs_capped_and_many_labels(tmp_path):
    labels = [f"domain_{i:02d}" for i in range(22)]
    runs = {f"algo{i}": routed(f"algo{i}", i, labels=labels) for i in range(9)}
    assert plots.plot_coactivation(runs, tmp_path / "nine.png")
    assert plots.plot_coactivation(dict(list(runs.items())[:8]), tmp_path / "eight.png")
    assert imread(tmp_path / "nine.png").shape == imread(tmp_path / "eight.png").shape
    assert plots.plot_eae_by_label(runs, tmp_path / "eae.png")
    assert imread(tmp_path / "eae.png").shape[1] > 1200  # widened for 22 labels x 9 runs


def test_colours_follow_run_order():
    cols = plots.colors({"b": {}, "a": {}, "c": {}})
    assert list(cols) == ["b", "a", "c"] and len(set(cols.values())) == 3
    assert plots.colors({"b": {}})["b"] == cols["b"]
