"""Training variance in the verdicts (libmoe.findings.variance, seed_spreads): a one-seed verdict
says it holds for this training run only and which seed spread would overturn it, beside the
measured one (robust or not) or a note that none is measured; several seeds give t intervals
"over N seeds"; the measured spreads' table, its lookup and the records a multi-seed output gives."""

from __future__ import annotations

import math

import pytest
import torch
from findings_fixtures import run, write_init_std, write_results, write_val_windows

from libmoe.findings import SEED_SPREADS, check_findings, findings_html, findings_markdown, findings_table
from libmoe.findings import seed_spreads as spreads_module
from libmoe.findings.seed_spreads import config_summary, measured_spread, spread_records
from libmoe.findings.stats import Z975

CONFIG = {"preset": "cpu-tiny", "model": {"d_model": 128, "n_layers": 4, "algorithm": "(each)",
                                          "moe_options": {"router_init_std": 0.1}},
          "train": {"max_steps": 270, "batch_size": 32, "seed": "(each)"}, "data": {"source": "embedded"}}


def record(spreads: dict[str, float], config=None, provisional=False) -> dict:
    return {"spreads": spreads, "seeds": 3, "source": "a test", "output": "bench-claims",
            "date": "2026-12-07", "provisional": provisional,
            "config": config_summary({"config": config or CONFIG})}


def a_bench(out, deltas: dict[str, float], seeds: int = 1, preset: str = "default", config=None,
            n: int = 400):
    """dense + MoE rows whose window losses differ from dense by deltas[alg] (plus seed noise)."""
    rows = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        base = 3.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        losses = {"dense": base}
        for alg, d in deltas.items():
            losses[alg] = base + d + 0.01 * seed + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
        rows += [(f"{a}-s{seed}", a, seed, v) for a, v in losses.items()]
    write_results(out, [run(name, a, s, float(torch.exp(v.mean()))) for name, a, s, v in rows], preset=preset,
                  config=config or CONFIG)
    for name, _, _, v in rows:
        write_val_windows(out / "runs" / name, v)
    return out


def a_finding(out):
    (f,) = check_findings(out, ["a_moe_beats_dense"])
    return f, {p["name"]: p for p in f["measured"]["parts"]}


@pytest.fixture
def table(monkeypatch):
    """SEED_SPREADS with only the test's records (the shipped ones set aside)."""
    for key in list(SEED_SPREADS):
        monkeypatch.delitem(SEED_SPREADS, key)
    return SEED_SPREADS


def test_one_seed_verdicts_hold_for_this_run_with_the_overturning_spread(tmp_path, table):
    table["default"] = {"a_moe_beats_dense": record({"smoe": 0.005, "xmoe": 0.02}, provisional=True)}
    f, parts = a_finding(a_bench(tmp_path, {"smoe": -0.05, "xmoe": -0.02, "tc_moe": -0.04}))
    assert f["verdict"] == "reproduced" and f["scope"] == "this training run"
    for p in parts.values():
        assert p["scope"] == "this training run" and p["seeds"] == 1
        low, high = p["ci95"]
        e = (p["estimate"] - high) / -Z975  # the interval's end nearest 0
        assert p["overturn_spread"] == pytest.approx(math.sqrt((p["estimate"] / Z975) ** 2 - e * e))
    smoe, xmoe, tc = parts["smoe"], parts["xmoe"], parts["tc_moe"]
    assert smoe["robust"] is True and smoe["measured_spread"]["value"] == 0.005
    assert xmoe["robust"] is False  # 0.02 measured > about 0.01 needed
    s_star = f"{100 * xmoe['overturn_spread']:#.2g}%"
    assert xmoe["variance"] == (f"holds for this run; a seed spread above {s_star} would overturn it "
                                "(measured seed spread 2.0%, provisional: not robust)")
    assert tc["robust"] is None
    assert "seed spread not measured for preset default; run --seeds 3" in tc["variance"]
    # the claim: reproduced needs every part, so the weakest decides and xmoe makes it not robust
    v = f["variance"]
    assert v["binding_part"] == "xmoe" and v["robust"] is False
    assert v["summary"] == (f"this run only; reproduced unless the seed spread exceeds {s_star} (xmoe); "
                            f"not robust to the measured spread (xmoe: 2.0% > {s_star}, provisional); "
                            "parts robust 1 of 3, 1 not measured")
    assert "Training variance: one seed, so a verdict holds for this training run only" in f["why"]
    assert "xmoe: holds for this run; a seed spread above" in f["why"]
    # the tables: a column before the figure, in Markdown and HTML
    table_rows = findings_table([f])
    assert table_rows[0][-2:] == ["Training variance", "Figure"] and table_rows[1][4] == v["summary"]
    assert v["summary"] in findings_markdown([f]) and "<th>Training variance</th>" in findings_html([f])


def test_a_contradicted_claim_is_robust_when_one_contradiction_is(tmp_path, table):
    table["default"] = {"a_moe_beats_dense": record({"smoe": 0.01, "sigma_moe": 0.2})}
    f, parts = a_finding(a_bench(tmp_path, {"smoe": 0.08, "sigma_moe": 0.09}))
    assert f["verdict"] == "not_reproduced"
    assert parts["smoe"]["robust"] is True and parts["sigma_moe"]["robust"] is False
    v = f["variance"]
    assert v["binding_part"] == "sigma_moe" and v["robust"] is True and v["robust_evidence"] == "smoe"
    s_star = {k: f"{100 * p['overturn_spread']:#.2g}%" for k, p in parts.items()}
    assert v["summary"].startswith(f"this run only; not reproduced unless the seed spread exceeds "
                                   f"{s_star['sigma_moe']} (sigma_moe); robust to the measured spread (smoe: "
                                   f"1.0% < {s_star['smoe']})")


def test_undecided_parts_and_unmeasured_presets(tmp_path, table):
    f, parts = a_finding(a_bench(tmp_path, {"smoe": 0.0}, preset="micro"))
    assert f["verdict"] == "inconclusive" and parts["smoe"]["overturn_spread"] is None
    assert parts["smoe"]["variance"] == "undecided in this run already (evaluation noise)"
    assert f["variance"]["summary"] == "this run only; undecided already"
    f, parts = a_finding(a_bench(tmp_path / "b", {"smoe": -0.05}, preset="micro"))
    assert parts["smoe"]["measured_spread"] is None
    words = parts["smoe"]["variance"]
    assert "seed spread not measured for preset micro; run --seeds 3 or --preset claims" in words
    assert f["variance"]["summary"].endswith("; seed spread not measured")


def test_spread_lookup_by_preset_then_by_configuration(table):
    table["default"] = {"a_moe_beats_dense": record({"smoe": 0.01})}
    mine = {"preset": "default", "config": CONFIG}
    assert measured_spread(mine, "a_moe_beats_dense", "smoe")["config_differs"] == []
    assert measured_spread(mine, "a_moe_beats_dense", "xmoe") is None
    assert measured_spread(mine, "b_change_rate_falls", "smoe") is None
    # the claims preset trains the default's configuration: default's records serve it
    claims = {"preset": "claims", "config": CONFIG}
    assert measured_spread(claims, "a_moe_beats_dense", "smoe")["preset"] == "default"
    # the same preset with another configuration: shown, marked; another preset's: not used
    other = {"model": {**CONFIG["model"], "moe_options": {"router_init_std": 0.0625}}}
    changed = {"preset": "default", "config": {**CONFIG, **other}}
    assert measured_spread(changed, "a_moe_beats_dense", "smoe")["config_differs"] == ["model.moe_options"]
    assert measured_spread({**changed, "preset": "claims"}, "a_moe_beats_dense", "smoe") is None
    # an output from before results.json had a config: its own preset's record, unmarked
    assert measured_spread({"preset": "default"}, "a_moe_beats_dense", "smoe")["config_differs"] == []
    assert measured_spread({"preset": "claims"}, "a_moe_beats_dense", "smoe") is None


def test_another_configuration_is_marked_in_the_words(tmp_path, table):
    table["default"] = {"a_moe_beats_dense": record({"smoe": 0.001})}
    config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 900}}
    _, parts = a_finding(a_bench(tmp_path, {"smoe": -0.05}, config=config))
    assert "(measured seed spread 0.10%, with another train.max_steps: robust)" in parts["smoe"]["variance"]


def test_several_seeds_are_t_intervals_over_seeds_and_give_spread_records(tmp_path, table):
    out = a_bench(tmp_path, {"smoe": -0.1, "xmoe": -0.08}, seeds=3)
    f, parts = a_finding(out)
    assert f["verdict"] == "reproduced" and f["scope"] == "over 3 seeds"
    assert f["variance"]["summary"] == "over 3 seeds (t interval)"
    assert parts["smoe"]["scope"] == "over 3 seeds" and parts["smoe"]["method"] == "t interval over 3 seeds"
    assert parts["smoe"]["seed_spread"] == pytest.approx(0.01, abs=0.003)  # the 0.01-per-seed drift
    spread = f"{100 * parts['smoe']['seed_spread']:#.2g}%"
    assert parts["smoe"]["variance"] == f"over 3 seeds (t interval); seed spread here {spread}"
    assert "overturn_spread" not in parts["smoe"]
    results = {"preset": "claims", "config": CONFIG}
    records = spread_records([f], results, "a test", output=str(out), date="2026-12-07")
    rec = records["a_moe_beats_dense"]
    assert rec["spreads"] == {k: round(parts[k]["seed_spread"], 6) for k in ("smoe", "xmoe")}
    assert rec["seeds"] == 3 and rec["provisional"] is False and rec["config"] == config_summary(results)
    # filed under a preset, the records are what the lookup reads
    table["default"] = records
    (one,) = check_findings(a_bench(tmp_path / "one", {"smoe": -0.1, "xmoe": -0.08}), ["a_moe_beats_dense"])
    assert all(p["robust"] is True for p in one["measured"]["parts"])


def test_claim_c_trains_one_seed_whatever_seeds(tmp_path, table):
    write_results(tmp_path, [run("smoe-s0", "smoe", 0, 10.0)], preset="default", studies=("init-std",))
    write_init_std(tmp_path, {0.02: [1.0 + 0.01 * (i % 3) for i in range(30)],
                              0.04: [1.5 + 0.01 * (i % 2) for i in range(30)]}, 30)
    (f,) = check_findings(tmp_path, ["c_init_std_balance"])
    (p,) = f["measured"]["parts"]
    assert f["verdict"] == "reproduced" and p["scope"] == "this training run"
    assert "its study trains one seed whatever --seeds" in p["variance"]
    assert p["overturn_spread"] > 0 and "%" not in f["variance"]["summary"]  # balance-loss units


def test_not_applicable_and_old_findings_render_a_dash(tmp_path):
    write_results(tmp_path, [run("smoe-s0", "smoe", 0, 10.0)], studies=())
    (f,) = check_findings(tmp_path, ["e_droptop_hurts"])
    assert f["verdict"] == "not_applicable" and f["variance"]["summary"] == "–"
    old = {k: v for k, v in f.items() if k != "variance"}  # an output checked before this existed
    assert findings_table([old])[1][4] == "–" and "<td>–</td>" in findings_html([old])


def test_shipped_spreads_have_their_provenance():
    assert SEED_SPREADS is spreads_module.SEED_SPREADS
    for preset, claims in SEED_SPREADS.items():
        for claim, rec in claims.items():
            keys = {"spreads", "seeds", "source", "output", "date", "provisional", "config"}
            assert keys <= set(rec), (preset, claim)
            assert all(v >= 0 for v in rec["spreads"].values())
    issue = SEED_SPREADS["default"]["a_moe_beats_dense"]
    if issue["provisional"]:  # until the seeds study replaces it
        assert "issue 22" in issue["source"] and issue["seeds"] == 2 and "tc_moe" not in issue["spreads"]


def test_a_contradicted_part_without_a_finite_estimate_cannot_crash_the_findings():
    # a part decided "not_reproduced" whose estimate is not finite has no s*; with it the only
    # contradicted part, the claim's variance summary says undecided instead of failing (the
    # findings run at the end of a study, before its tables are written)
    from libmoe.findings.variance import annotate

    parts = [{"name": "smoe", "verdict": "reproduced", "estimate": -0.03, "ci95": [-0.04, -0.02],
              "sign": -1},
             {"name": "tc_moe", "verdict": "not_reproduced", "estimate": math.nan, "ci95": [0.01, 0.02],
              "sign": -1}]
    entry = {"id": "a_moe_beats_dense", "verdict": "not_reproduced", "measured": {"parts": parts}}
    annotate(entry, {"preset": "default", "config": CONFIG}, percent=True)
    assert entry["variance"]["summary"] == "this run only; undecided already"


def test_spreads_measured_before_the_per_algorithm_settings_are_marked(table):
    # a record made without algorithm_options is "another configuration" for an output with them
    table["default"] = {"a_moe_beats_dense": record({"smoe": 0.01})}
    table["default"]["a_moe_beats_dense"]["config"]["algorithm_options"] = {}
    options = {"tc_moe": {"expert_init": "dense_match"}}
    now = {"preset": "default", "config": {**CONFIG, "algorithm_options": options}}
    assert measured_spread(now, "a_moe_beats_dense", "smoe")["config_differs"] == ["algorithm_options"]
    before = {"preset": "default", "config": {**CONFIG, "algorithm_options": {}}}
    assert measured_spread(before, "a_moe_beats_dense", "smoe")["config_differs"] == []
