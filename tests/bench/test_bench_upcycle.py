"""libmoe bench --regime upcycle: one dense source, upcycled into every algorithm, trained on
alike; resume; failures; the regime comparison (--compare)."""

import json

import pytest
import yaml

from conftest import SHAKESPEARE
from libmoe.bench import load_bench_preset, plan_stages, run_bench
from libmoe.bench import runner as bench_runner
from libmoe.bench.compare import regime_comparison, relative_rates
from libmoe.cli import main

EVAL = SHAKESPEARE.parent / "eval"
ALGORITHMS = ["dense", "smoe", "sharede_v2"]


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """The micro preset in the upcycling regime on dense + smoe + sharede_v2, two jobs at a time."""
    if not (EVAL / "piqa.validation.jsonl").is_file():
        pytest.skip("../shared/data/eval not present")
    out = tmp_path_factory.mktemp("bench") / "up"
    cache = tmp_path_factory.mktemp("bench-cache")
    results = run_bench(out, preset="micro", regime="upcycle", algorithms=ALGORITHMS, tasks=["piqa"],
                        data_dir=EVAL, jobs=2, overrides=[f"data.cache_dir={cache}"], log=lambda _: None)
    return out, results, cache


def test_upcycle_regime_end_to_end(upcycled):
    out, results, _ = upcycled
    assert results["regime"] == "upcycle" and results["preset"] == "micro"
    rows = {r["algorithm"]: r for r in results["rows"]}
    assert list(rows) == ALGORITHMS and results["tasks"] == ["piqa"]
    for r in rows.values():
        assert r["status"] == "ok" and 1 < r["ppl"] < 1000 and 0 <= r["piqa"] <= 100
        assert r["train_time_s"] > 0 and r["latency_ms"] > 0 and 1 <= r["avg_rank"] <= 3

    # One dense source, trained once, under OUT/source.
    source = results["source"]
    assert source["status"] == "ok" and source["run"] == str(out / "source" / "dense")
    final = out / "source" / "dense" / "checkpoints" / "step_30"
    src_summary = json.loads((out / "source" / "dense" / "train_summary.json").read_text())
    assert src_summary["algorithm"] == "dense" and src_summary["step"] == 30

    runs = {r["algorithm"]: r for r in results["runs"]}
    configs = {a: yaml.safe_load((out / "runs" / f"{a}-s0" / "config.yaml").read_text()) for a in ALGORITHMS}
    # The dense row continues the source itself; the others start from their upcycled copy of it.
    assert configs["dense"]["init"] == str(final)
    for a in ("smoe", "sharede_v2"):
        init = out / "upcycled" / f"{a}-s0"
        assert configs[a]["init"] == str(init) == runs[a]["init"]
        info = json.loads((init / "upcycle.json").read_text())
        assert info["source"] == str(final) and info["algorithm"] == a and info["exact_at_init"]
        assert runs[a]["upcycle"]["max_abs_logit_diff"] < 1e-4
    # Exact upcycling: every run starts where the source ended (validation perplexity on the
    # training evaluation windows, which is what the source logged last).
    for a in ALGORITHMS:
        assert runs[a]["init_ppl"] == pytest.approx(src_summary["val_ppl"], rel=1e-4)
    # Same data, data order and budget; the model section is each algorithm's upcycled one.
    for a in ("smoe", "sharede_v2"):
        assert configs[a]["data"] == configs["dense"]["data"]
        assert configs[a]["train"] == configs["dense"]["train"]
        assert configs[a]["optim"] == configs["dense"]["optim"]
    dense_width = configs["dense"]["model"]["top_k"] * configs["dense"]["model"]["expert_dim"]
    assert configs["smoe"]["model"]["n_experts"] == 8 and configs["smoe"]["model"]["top_k"] == 2
    assert configs["smoe"]["model"]["expert_dim"] == dense_width
    assert configs["sharede_v2"]["model"]["n_shared"] == 1
    assert configs["sharede_v2"]["model"]["moe_options"]["shared_scaling"] == 0.5
    assert rows["smoe"]["params_total"] > rows["dense"]["params_total"]

    # Outputs as in the pretraining regime, plus the regime's own.
    saved = json.loads((out / "results.json").read_text())
    assert saved["regime"] == "upcycle" and saved["source"]["status"] == "ok"
    assert saved["regime_options"]["n_experts"] == 8
    md = (out / "results.md").read_text()
    assert "Regime upcycle" in md and "dense source" in md and "| Algorithm | PPL ↓ | PIQA | AVG" in md
    report = (out / "report.html").read_text()
    assert "Regime upcycle" in report and "upcycled from its final checkpoint" in report
    assert "Routing stability by regime" in report
    assert (out / "analysis" / "figures" / "bench_ppl.png").is_file()
    assert (out / "runs" / "smoe-s0" / "analysis" / "metrics.json").is_file()
    comparison = saved["regime_comparison"]
    assert [e["regime"] for e in comparison["regimes"]] == ["upcycle"]
    assert set(comparison["algorithms"]) == {"smoe", "sharede_v2"}
    assert (out / comparison["figure"]).is_file()


def test_rerun_skips_the_source_and_the_finished_runs(upcycled):
    out, results, cache = upcycled
    summary = out / "source" / "dense" / "train_summary.json"
    before = summary.stat().st_mtime_ns
    messages = []
    again = run_bench(out, preset="micro", regime="upcycle", algorithms=ALGORITHMS, tasks=["piqa"],
                      data_dir=EVAL, overrides=[f"data.cache_dir={cache}"], analysis=False,
                      log=messages.append)
    assert sum("skipped (finished earlier)" in m for m in messages) == 4  # the source and 3 rows
    assert summary.stat().st_mtime_ns == before
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in results["rows"]]


def test_a_failed_source_fails_every_row_without_training(tmp_path, monkeypatch):
    def broken(spec, progress):
        if spec.role == "source":
            raise RuntimeError("source exploded")
        raise AssertionError("a row trained without its source")

    monkeypatch.setattr(bench_runner, "_train", broken)
    results = run_bench(tmp_path / "b", preset="micro", regime="upcycle", algorithms=["dense", "smoe"],
                        tasks=[], log=lambda _: None)
    assert results["source"]["status"] == "failed" and "source exploded" in results["source"]["error"]
    assert all(r["status"] == "failed" and "dense-source failed" in r["error"] for r in results["rows"])
    assert results["failed"][0] == {"name": "dense-source", "error": "RuntimeError: source exploded"}
    assert "dense (failed)" in (tmp_path / "b" / "results.md").read_text()


def test_compare_sets_two_regimes_side_by_side(upcycled, tmp_path, capsys):
    """The upcycled bench again through the CLI (every run finished: nothing trains), with
    --compare naming a pretraining bench: the figure, the table and the numbers."""
    up, _, cache = upcycled
    _fake_bench(tmp_path / "pre", "pretrain", {"smoe": [0.2, 0.1], "sharede_v2": [0.3, 0.2]})
    code = main(["bench", "--regime", "upcycle", "--preset", "micro", "--algorithms",
                 ",".join(ALGORITHMS), "--tasks", "piqa", "--data-dir", str(EVAL), "--no-analysis",
                 "--compare", str(tmp_path / "pre"), "--out", str(up), f"data.cache_dir={cache}"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((up / "results.json").read_text())
    comparison = saved["regime_comparison"]
    assert [e["label"] for e in comparison["regimes"]] == ["upcycle", "pretrain"]
    upc, pre = comparison["regimes"]
    assert pre["change_rate"] == pytest.approx({"smoe": 0.15, "sharede_v2": 0.25})
    assert pre["relative"] == pytest.approx({"smoe": 0.6, "sharede_v2": 0.25 / 0.15})
    assert set(upc["change_rate"]) == {"smoe", "sharede_v2"}  # dense has no router
    assert all(0 <= v <= 1 for v in upc["change_rate"].values())
    # two algorithms: each one's relative rate is its rate over the other's
    rates = upc["change_rate"]
    assert upc["relative"]["smoe"] == pytest.approx(rates["smoe"] / rates["sharede_v2"])
    diff = comparison["relative_difference"]
    assert diff["of"] == ["upcycle", "pretrain"]
    assert diff["by_algorithm"]["sharede_v2"] == pytest.approx(
        upc["relative"]["sharede_v2"] - pre["relative"]["sharede_v2"])
    assert comparison["shared_relative"]["sharede_v2"] == {"upcycle": upc["relative"]["sharede_v2"],
                                                            "pretrain": pre["relative"]["sharede_v2"]}
    png = up / comparison["figure"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (up / "report.html").read_text()
    assert "Routing stability by regime" in report and "Change rate (pretrain)" in report
    assert "| Algorithm | Change rate (upcycle) | Relative (upcycle) | Change rate (pretrain)" in \
        (up / "results.md").read_text()
    # the findings see both regimes; the fake pretraining bench has no traces to bootstrap
    found = {f["id"]: f for f in saved["findings"]}
    assert found["a_moe_beats_dense"]["verdict"] == "not_applicable"  # upcycled: not compute-matched
    g = found["g_shared_experts_stabler_when_upcycled"]
    assert g["verdict"] == "not_applicable" and "routing traces" in g["why"]
    assert "Paper findings" in report


def _fake_bench(path, regime, rates):
    """A bench output with one run per algorithm whose analysis holds these change rates."""
    runs = []
    for algorithm, values in rates.items():
        run = path / "runs" / f"{algorithm}-s0"
        (run / "analysis").mkdir(parents=True)
        entries = [{"from": 10 * i, "to": 10 * (i + 1), "mean": v} for i, v in enumerate(values)]
        (run / "analysis" / "metrics.json").write_text(json.dumps({"expert_change_rate": entries}))
        runs.append({"name": f"{algorithm}-s0", "algorithm": algorithm, "seed": 0, "status": "ok",
                     "run": str(run)})
    results = {"regime": regime, "preset": "x", "runs": runs, "config": {"train": {"max_steps": 30}}}
    (path / "results.json").write_text(json.dumps(results))
    return results


def test_regime_comparison_numbers(tmp_path):
    up = _fake_bench(tmp_path / "up", "upcycle", {"smoe": [0.4, 0.2], "xmoe": [0.3, 0.3],
                                                  "sharede_v2": [0.1, 0.1], "dense": [0.9]})
    _fake_bench(tmp_path / "pre", "pretrain", {"smoe": [0.2], "xmoe": [0.2], "sharede_v2": [0.2]})
    comparison = regime_comparison(up, tmp_path / "up", tmp_path / "pre")
    upc, pre = comparison["regimes"]
    assert upc["change_rate"] == pytest.approx({"smoe": 0.3, "xmoe": 0.3, "sharede_v2": 0.1})  # no dense
    assert upc["relative"]["sharede_v2"] == pytest.approx(0.1 / 0.3)
    assert pre["relative"] == pytest.approx({"smoe": 1.0, "xmoe": 1.0, "sharede_v2": 1.0})
    assert comparison["shared_relative"]["sharede_v2"]["upcycle"] < \
        comparison["shared_relative"]["sharede_v2"]["pretrain"]
    assert (tmp_path / "up" / "analysis" / "figures" / "regime_comparison.png").is_file()
    assert relative_rates({"a": 1.0}) == {"a": None}


def test_planning_the_upcycle_preset_and_errors(tmp_path):
    preset = load_bench_preset("upcycle")
    assert preset.regime == "upcycle" and preset.train_preset == "cpu-tiny"
    (source,), rows = plan_stages(tmp_path, preset, ["dense", "smoe", "sharede_v3"], 2)
    assert source.role == "source" and source.run_dir == str(tmp_path / "source" / "dense")
    assert source.config["train"]["max_steps"] == 270 and source.config["model"]["algorithm"] == "dense"
    assert [r.name for r in rows] == ["dense-s0", "smoe-s0", "sharede_v3-s0", "dense-s1", "smoe-s1",
                                      "sharede_v3-s1"]
    for r in rows:
        assert r.needs == ["dense-source"] and r.config["train"]["max_steps"] == 135
        assert r.config["train"]["seed"] == r.seed
    smoe1 = rows[4]
    assert smoe1.prepare["upcycle"]["seed"] == 1 and smoe1.config["model"]["expert_dim"] == 512
    assert smoe1.config["model"]["moe_options"]["router_init_std"] == 0.1
    # the source's own overrides from the command line; source.* needs a regime with a source
    (source,), _ = plan_stages(tmp_path, preset, ["smoe"], 1, overrides=["source.train.max_steps=100"])
    assert source.config["train"]["max_steps"] == 100
    with pytest.raises(ValueError, match="source"):
        plan_stages(tmp_path, load_bench_preset("micro"), ["smoe"], 1, overrides=["source.train.seed=1"])
    with pytest.raises(ValueError, match="unknown regime 'upcylce'.*upcycle"):
        run_bench(tmp_path, regime="upcylce", log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="--compare"):
        run_bench(tmp_path, preset="micro", compare=tmp_path / "nothing", log=lambda _: None)
