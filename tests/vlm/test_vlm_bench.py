"""`libmoe bench --regime vlm` end to end on the vlm-micro preset (cpu-smoke VLM, a few steps)."""

import json

import pytest

from libmoe.bench import run_vlm_bench
from libmoe.bench.presets import load_bench_preset
from libmoe.bench.regimes.vlm import aggregate_rows


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-bench")
    with pytest.MonkeyPatch.context() as mp:  # the synthetic dataset's cache, not ~/.cache
        mp.setenv("LIBMOE_CACHE", str(root / "cache"))
        results = run_vlm_bench(root / "out", load_bench_preset("vlm-micro"),
                                algorithms=["dense", "smoe", "sharede_v2"], log=lambda m: None)
    return root / "out", results


def test_vlm_bench_outputs(bench):
    out, results = bench
    assert results["regime"] == "vlm" and not results["failed"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    rows = {r["algorithm"]: r for r in results["rows"]}
    assert set(rows) == {"dense", "smoe", "sharede_v2"}
    subtasks = rows["smoe"]["subtasks"]
    assert len(subtasks) == 8  # one column per synthetic subtask (Table 1 layout)
    for r in rows.values():
        assert 0 <= r["mme_acc"] <= 100 and r["avg"] is not None and r["avg_rank"] is not None
        assert r["params_active"] <= r["params_total"]
    assert rows["smoe"]["params_active"] < rows["smoe"]["params_total"]  # 2 of 4 experts per token
    assert rows["dense"]["params_active"] == rows["dense"]["params_total"]
    md = (out / "results.md").read_text()
    assert "Table 1 layout" in md and "AVG Rank" in md and all(s in md for s in subtasks)
    html = (out / "report.html").read_text()
    assert "Scores (paper Table 1 layout)" in html and "Routing by subtask" in html
    assert "## Environment" in md and "<h2>Environment</h2>" in html  # what decides numbers across machines
    assert (out / "analysis" / "figures" / "vlm_subtask_routing.png").is_file()
    comparison = results["regime_comparison"]
    assert set(comparison["regimes"][0]["change_rate"]) == {"smoe", "sharede_v2"}
    found = {f["id"]: f for f in json.loads((out / "results.json").read_text())["findings"]}
    assert found["a_moe_beats_dense"]["verdict"] == "not_applicable"  # scored by accuracy
    assert found["c_init_std_balance"]["verdict"] == "not_applicable"  # a pretraining study
    for claim in ("b_change_rate_falls", "d_margin_grows_with_depth", "e_droptop_hurts", "f_temperature"):
        assert found[claim]["measured"].get("parts"), claim  # measured on the VIT runs' traces / questions
    assert "questions (paired)" in found["e_droptop_hurts"]["why"]
    assert "Paper findings" in md and 'id="findings"' in html


def test_vlm_bench_runs_share_one_source(bench):
    out, results = bench
    for run in results["runs"]:
        cfg = (out / "runs" / run["name"] / "config.yaml").read_text()
        assert str(out / "source" / "pft") in cfg  # every row starts from the same PFT checkpoint
    vit = (out / "runs" / "smoe-s0" / "checkpoints")
    assert sorted(p.name for p in vit.iterdir()) == [f"step_{i}" for i in range(1, 6)]  # 20..100%


def test_vlm_bench_resumes_finished(bench, monkeypatch):
    out, results = bench
    monkeypatch.setenv("LIBMOE_CACHE", str(out.parent / "cache"))  # the fixture's dataset
    final = out / "runs" / "smoe-s0" / "checkpoints" / "step_5" / "model.safetensors"
    mtime = final.stat().st_mtime
    preset = load_bench_preset("vlm-micro")
    again = run_vlm_bench(out, preset, algorithms=["smoe"], log=lambda m: None)
    assert final.stat().st_mtime == mtime  # finished: not trained again
    before = {r["algorithm"]: r for r in results["rows"]}["smoe"]["mme_acc"]
    assert again["rows"][0]["mme_acc"] == pytest.approx(before)


def test_aggregate_rows_ranks_and_seeds():
    def run(alg, seed, a, b):
        by_category = {"colour": {"acc": a}, "texture": {"acc": b}}
        return {"status": "ok", "algorithm": alg, "seed": seed,
                "results": {"synth_mme": {"acc": (a + b) / 2, "acc_plus": 0.5, "by_category": by_category}}}

    rows = aggregate_rows([run("x", 0, 0.8, 0.6), run("x", 1, 0.6, 0.6), run("y", 0, 0.5, 0.9)])
    x, y = rows
    assert x["colour"] == pytest.approx(70.0) and x["colour_std"] == pytest.approx(14.142, abs=1e-3)
    assert y["texture"] == pytest.approx(90.0) and y["avg"] == pytest.approx(70.0)
    assert x["avg_rank"] == pytest.approx(1.5) and y["avg_rank"] == pytest.approx(1.5)  # 1st and 2nd each
