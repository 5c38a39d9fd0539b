"""The findings in a real (micro) bench output: results.json, results.md and report.html carry
them, the extra studies run, and `libmoe findings DIR` rewrites them from an edited output."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest

from libmoe.bench import run_bench
from libmoe.bench.studies import parse_studies
from libmoe.cli import main
from libmoe.findings import FINDINGS, VERDICTS


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("findings") / "bench"
    results = run_bench(out, preset="micro", algorithms=["dense", "smoe", "xmoe"], tasks=[],
                        studies="init-std,droptop,temperature", log=lambda _: None)
    return out, results


def test_every_bench_output_holds_every_finding(bench):
    out, results = bench
    assert results["studies"]["run"] == ["init-std", "droptop", "temperature"]
    assert results["studies"]["init_std"]["stds"] == [0.02, 0.04, 0.06]
    assert [r["algorithm"] for r in results["rows"]] == ["dense", "smoe", "xmoe"]  # study runs are no rows
    saved = json.loads((out / "results.json").read_text())
    found = {f["id"]: f for f in saved["findings"]}
    assert list(found) == list(FINDINGS)
    assert all(f["verdict"] in VERDICTS and f["why"] for f in found.values())
    # the inputs are there: the checks that need only this bench are measured
    for claim in ("a_moe_beats_dense", "c_init_std_balance", "d_margin_grows_with_depth", "e_droptop_hurts",
                  "f_temperature", "h_subtask_specialisation"):
        assert found[claim]["measured"].get("parts"), claim
    assert found["g_shared_experts_stabler_when_upcycled"]["verdict"] == "not_applicable"
    assert found["a_moe_beats_dense"]["figure"] == "analysis/figures/bench_ppl.png"
    assert found["c_init_std_balance"]["figure"] == "analysis/figures/init_std.png"
    assert (out / "studies" / "init_std" / "init_std.json").is_file()
    assert (out / "runs" / "smoe-s0" / "eval" / "val_windows.json").is_file()
    assert (out / "runs" / "smoe-s0" / "analysis" / "intervention_units.json").is_file()
    # the per-unit files are the numbers of the tables: exp(mean window loss) is the perplexity
    run = out / "runs" / "smoe-s0"
    windows = json.loads((run / "eval" / "val_windows.json").read_text())
    row = next(r for r in results["runs"] if r["name"] == "smoe-s0")
    assert math.exp(statistics.fmean(windows["window_nll"])) == pytest.approx(row["ppl"], rel=1e-6)
    units = json.loads((run / "analysis" / "intervention_units.json").read_text())
    metrics = json.loads((run / "analysis" / "metrics.json").read_text())
    assert set(units["runs"]) == {"unperturbed", "DropTop1", "DropTop1&2", "tau=0.1", "tau=10"}
    dt1 = next(r for r in metrics["droptop"]["runs"] if r["name"] == "DropTop1")["metrics"]["val_ppl"]
    assert math.exp(statistics.fmean(units["runs"]["DropTop1"]["val_nll"])) == pytest.approx(dt1, rel=1e-6)
    md = (out / "results.md").read_text()
    assert "## Paper findings" in md and "a_moe_beats_dense" in md and "(analysis/figures/init_std.png)" in md
    report = (out / "report.html").read_text()
    assert 'id="findings"' in report and 'href="#fig-init-std"' in report and 'id="fig-init-std"' in report
    assert report.count('class="verdict v-') == len(FINDINGS)


def test_findings_cli_rewrites_an_edited_output(bench, tmp_path, capsys):
    src, _ = bench
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    results = json.loads((out / "results.json").read_text())
    results["runs"] = [r for r in results["runs"] if r["algorithm"] != "dense"]  # the dense row removed
    results["findings"] = []
    (out / "results.json").write_text(json.dumps(results))
    shutil.rmtree(out / "runs" / "dense-s0")
    assert main(["findings", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| a_moe_beats_dense" in printed and "not applicable" in printed
    saved = {f["id"]: f for f in json.loads((out / "results.json").read_text())["findings"]}
    assert saved["a_moe_beats_dense"]["verdict"] == "not_applicable"
    assert "no finished dense row" in saved["a_moe_beats_dense"]["why"]
    assert "no finished dense row" in (out / "results.md").read_text()
    assert "no finished dense row" in (out / "report.html").read_text()
    # --only prints without writing
    before = (out / "results.json").read_text()
    assert main(["findings", str(out), "--only", "e_droptop_hurts", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in printed] == ["e_droptop_hurts"]
    assert (out / "results.json").read_text() == before


def test_findings_cli_list_and_errors(tmp_path, capsys):
    assert main(["findings", "--list"]) == 0
    assert capsys.readouterr().out.count("\n") == len(FINDINGS)
    assert main(["findings", str(tmp_path)]) == 2
    assert "no results.json; give a `libmoe bench` output directory" in capsys.readouterr().err


def test_studies_option():
    assert parse_studies("all") == ["init-std", "droptop", "temperature"]
    assert parse_studies("none") == [] and parse_studies(None) is None
    assert parse_studies("temperature,init-std") == ["init-std", "temperature"]
    with pytest.raises(ValueError, match="Did you mean droptop"):
        parse_studies("init-std,dropto")


def test_default_preset_plans_the_init_std_study(tmp_path):
    from libmoe.bench import load_bench_preset, plan_stages

    (stage,) = plan_stages(tmp_path, load_bench_preset("default"), ["dense", "smoe"], 1)
    rows = [s for s in stage if s.role == "row"]
    study = [s for s in stage if s.role == "study"]
    assert [s.name for s in rows] == ["dense-s0", "smoe-s0"]
    assert [s.name for s in study] == ["init_std-0.02", "init_std-0.04", "init_std-0.06"]
    for s, std in zip(study, (0.02, 0.04, 0.06)):
        cfg = s.config
        assert cfg["model"]["algorithm"] == "smoe" and cfg["model"]["moe_options"]["router_init_std"] == std
        assert cfg["train"]["max_steps"] == 90 and cfg["train"]["log_every"] == 1
        assert not s.evaluate and not s.analysis and s.tasks == []
        assert s.run_dir == str(tmp_path / "studies" / "init_std" / f"std_{std:g}")
        # the same data, batch and model as the table's runs
        row = rows[0].config
        assert cfg["data"] == row["data"] and cfg["model"]["d_model"] == row["model"]["d_model"]
        assert cfg["train"]["batch_size"] == row["train"]["batch_size"]
    assert rows[0].interventions == ["droptop", "temperature"]
    (stage,) = plan_stages(tmp_path, load_bench_preset("default"), ["smoe"], 1, studies=["droptop"])
    assert [s.role for s in stage] == ["row"] and stage[0].interventions == ["droptop"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A micro bench of two seeds with the routing studies and three checkpoints (claim b's two
    intervals): about 20 s on 2 cores."""
    out = tmp_path_factory.mktemp("findings") / "seeded"
    results = run_bench(out, preset="micro", algorithms=["dense", "smoe", "xmoe"], seeds=2, tasks=[],
                        studies="droptop,temperature", overrides=["train.checkpoint_every=10"],
                        log=lambda _: None)
    return out, results


def test_with_seeds_claim_a_and_the_routing_claims_are_t_intervals_over_seeds(seeded, capsys):
    out, results = seeded
    found = {f["id"]: f for f in results["findings"]}
    for claim in ("a_moe_beats_dense", "b_change_rate_falls", "d_margin_grows_with_depth", "e_droptop_hurts",
                  "f_temperature", "h_subtask_specialisation"):
        f = found[claim]
        tested = [p for p in f["measured"]["parts"] if p["verdict"] != "not_applicable"]
        assert tested, claim
        for p in tested:
            assert p["method"] == "t interval over 2 seeds", (claim, p["name"])
            assert p["scope"] == "over 2 seeds"
            assert len(p["per_seed"]) == 2 and p["seed_spread"] >= 0 and "overturn_spread" not in p
        assert f["scope"] == "over 2 seeds" and f["variance"]["summary"] == "over 2 seeds (t interval)", claim
        assert "t intervals over seeds" in f["why"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["findings"][0]["variance"]["scope"] == "over 2 seeds"
    assert "over 2 seeds (t interval)" in (out / "results.md").read_text()
    assert "over 2 seeds (t interval)" in (out / "report.html").read_text()
    # the records of SEED_SPREADS this output gives, printed to paste
    from libmoe.findings.measure_spreads import main as measure

    measure([str(out), "--preset", "micro"])
    printed = capsys.readouterr().out
    assert printed.startswith("{'micro': {'a_moe_beats_dense': {'spreads': {'smoe':")
    assert "'seeds': 2" in printed and "'provisional': False" in printed
