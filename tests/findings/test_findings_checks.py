"""Each paper-finding check on small synthetic bench outputs whose verdict is known: one that
reproduces the claim, one that contradicts it (never reported as reproduced), one too noisy to
tell, and one without the check's inputs (not applicable)."""

from __future__ import annotations

import json

import pytest
import torch
from findings_fixtures import (
    drifting_traces,
    margin_trace,
    run,
    save_traces,
    specialised_trace,
    write_init_std,
    write_interventions,
    write_results,
    write_val_windows,
)

from libmoe.findings import FINDINGS, check_findings


def verdict(out, claim):
    (f,) = check_findings(out, [claim])
    assert f["id"] == claim and f["why"]
    return f


def windows(mean: float, n: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + noise * torch.randn(n, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- a


def a_bench(tmp_path, deltas: dict[str, float], noise: float = 0.05, n: int = 200):
    """dense + MoE rows whose per-window losses differ from dense by `deltas` (shared window noise
    plus a little independent noise, as two models on the same windows)."""
    base = windows(3.0, n, 0.5, 0)
    rows = {"dense": base}
    for i, (alg, d) in enumerate(deltas.items(), 1):
        rows[alg] = base + d + windows(0.0, n, noise, i)
    out = write_results(tmp_path, [run(f"{a}-s0", a, 0, float(torch.exp(v.mean()))) for a, v in rows.items()])
    for a, v in rows.items():
        write_val_windows(out / "runs" / f"{a}-s0", v)
    return out


def test_a_reproduced_when_every_moe_is_lower(tmp_path):
    f = verdict(a_bench(tmp_path, {"smoe": -0.05, "xmoe": -0.03}), "a_moe_beats_dense")
    assert f["verdict"] == "reproduced"
    parts = f["measured"]["parts"]
    assert [p["name"] for p in parts] == ["smoe", "xmoe"] and all(p["ci95"][1] < 0 for p in parts)
    assert "bootstrap over 200 validation windows" in f["why"] and "2000 resamples" in f["why"]
    assert f["figure"] is None  # the output holds no figure


def test_a_contradicted_by_one_worse_algorithm(tmp_path):
    f = verdict(a_bench(tmp_path, {"smoe": -0.05, "tc_moe": +0.05}), "a_moe_beats_dense")
    assert f["verdict"] == "not_reproduced"
    assert {p["name"]: p["verdict"] for p in f["measured"]["parts"]} == {"smoe": "reproduced",
                                                                        "tc_moe": "not_reproduced"}


def test_a_inconclusive_when_the_gap_is_within_noise(tmp_path):
    f = verdict(a_bench(tmp_path, {"smoe": -0.002}, noise=0.3, n=30), "a_moe_beats_dense")
    assert f["verdict"] == "inconclusive"
    lo, hi = f["measured"]["parts"][0]["ci95"]
    assert lo < 0 < hi


def test_a_with_seeds_uses_the_seed_spread(tmp_path):
    rows = []
    for seed, (d, m) in enumerate([(22.0, 21.0), (22.5, 21.6), (21.8, 20.9)]):
        rows += [run(f"dense-s{seed}", "dense", seed, d), run(f"smoe-s{seed}", "smoe", seed, m)]
    f = verdict(write_results(tmp_path / "clear", rows), "a_moe_beats_dense")
    assert f["verdict"] == "reproduced" and "t interval over 3 seeds" in f["why"]
    rows = []
    for seed, (d, m) in enumerate([(22.0, 21.0), (22.5, 23.4), (21.8, 21.9)]):  # one seed better, one worse
        rows += [run(f"dense-s{seed}", "dense", seed, d), run(f"smoe-s{seed}", "smoe", seed, m)]
    assert verdict(write_results(tmp_path / "spread", rows), "a_moe_beats_dense")["verdict"] == "inconclusive"


def test_a_not_applicable_without_dense_or_in_other_regimes(tmp_path):
    out = write_results(tmp_path / "nodense", [run("smoe-s0", "smoe", 0, 20.0)])
    assert verdict(out, "a_moe_beats_dense")["verdict"] == "not_applicable"
    out = write_results(tmp_path / "up", [run("dense-s0", "dense", 0, 20.0), run("smoe-s0", "smoe", 0, 19.0)],
                        regime="upcycle")
    f = verdict(out, "a_moe_beats_dense")
    assert f["verdict"] == "not_applicable" and "compute-matched" in f["why"]


def test_a_without_window_losses_is_not_called_reproduced(tmp_path):
    out = write_results(tmp_path, [run("dense-s0", "dense", 0, 22.0), run("smoe-s0", "smoe", 0, 18.0)])
    f = verdict(out, "a_moe_beats_dense")
    assert f["verdict"] == "inconclusive" and "no per-window" in f["measured"]["parts"][0]["why"]


# ----------------------------------------------------------------------------- b


def b_bench(tmp_path, change: list[float], n_seq: int = 32, seq_len: int = 16):
    out = write_results(tmp_path, [run("smoe-s0", "smoe"), run("xmoe-s0", "xmoe")])
    for i, alg in enumerate(("smoe", "xmoe")):
        save_traces(out / "runs" / f"{alg}-s0", drifting_traces(n_seq, seq_len, change, seed=i))
    return out


def test_b_reproduced_when_routing_settles(tmp_path):
    f = verdict(b_bench(tmp_path, [0.6, 0.3, 0.05]), "b_change_rate_falls")
    assert f["verdict"] == "reproduced"
    assert all(p["estimate"] > 0.2 and p["first_interval"] == "10->20" for p in f["measured"]["parts"])


def test_b_contradicted_when_routing_churns_more(tmp_path):
    assert verdict(b_bench(tmp_path, [0.05, 0.3, 0.6]), "b_change_rate_falls")["verdict"] == "not_reproduced"


def test_b_inconclusive_with_a_flat_rate_on_few_tokens(tmp_path):
    f = verdict(b_bench(tmp_path, [0.3, 0.3], n_seq=6, seq_len=4), "b_change_rate_falls")
    assert f["verdict"] == "inconclusive"
    assert any(p["ci95"][0] < 0 < p["ci95"][1] for p in f["measured"]["parts"])


def test_b_not_applicable_with_two_traces(tmp_path):
    f = verdict(b_bench(tmp_path, [0.5]), "b_change_rate_falls")
    assert f["verdict"] == "not_applicable" and "three routing traces" in f["measured"]["parts"][0]["why"]


# ----------------------------------------------------------------------------- c


def c_bench(tmp_path, means: dict[float, float], noise: float, steps: int = 30):
    out = write_results(tmp_path, [run("smoe-s0", "smoe")], studies=("init-std",))
    g = torch.Generator().manual_seed(0)
    common = noise * torch.randn(steps, generator=g)  # the same data order: shared step noise
    curves = {s: (m + common + 0.2 * noise * torch.randn(steps, generator=g)).tolist()
              for s, m in means.items()}
    write_init_std(out, curves, early_steps=steps)
    return out


def test_c_reproduced_when_balance_grows_with_std(tmp_path):
    f = verdict(c_bench(tmp_path, {0.02: 1.00, 0.04: 1.05, 0.06: 1.10}, 0.02), "c_init_std_balance")
    assert f["verdict"] == "reproduced" and [p["name"] for p in f["measured"]["parts"]] == ["0.04 vs 0.02",
                                                                                         "0.06 vs 0.04"]
    assert "blocks of 3 logged steps" in f["why"]


def test_c_contradicted_when_smaller_std_balances_worse(tmp_path):
    f = verdict(c_bench(tmp_path, {0.02: 1.10, 0.04: 1.05, 0.06: 1.00}, 0.02), "c_init_std_balance")
    assert f["verdict"] == "not_reproduced"


def test_c_inconclusive_when_curves_overlap(tmp_path):
    f = verdict(c_bench(tmp_path, {0.02: 1.00, 0.06: 1.001}, 0.5), "c_init_std_balance")
    assert f["verdict"] == "inconclusive"
    # a window of two blocks is too few units to bootstrap, whatever the interval says
    f = verdict(c_bench(tmp_path / "short", {0.02: 1.00, 0.06: 1.5}, 0.01, steps=10), "c_init_std_balance")
    assert f["verdict"] == "inconclusive" and "fewer than 8" in f["measured"]["parts"][0]["why"]


def test_c_not_applicable_without_the_study(tmp_path):
    out = write_results(tmp_path, [run("smoe-s0", "smoe")])
    f = verdict(out, "c_init_std_balance")
    assert f["verdict"] == "not_applicable" and "--studies init-std" in f["why"]


# ----------------------------------------------------------------------------- d


def d_bench(tmp_path, margins: list[float], noise: float, n_seq: int = 32, seq_len: int = 16,
            regime="pretrain"):
    out = write_results(tmp_path, [run("smoe-s0", "smoe"), run("sharede_v2-s0", "sharede_v2")], regime=regime)
    for i, alg in enumerate(("smoe", "sharede_v2")):
        save_traces(out / "runs" / f"{alg}-s0", [margin_trace(n_seq, seq_len, margins, noise, seed=i)])
    return out


def test_d_reproduced_when_margin_rises_with_depth(tmp_path):
    f = verdict(d_bench(tmp_path, [0.05, 0.2, 0.35, 0.5], 0.1), "d_margin_grows_with_depth")
    assert f["verdict"] == "reproduced"
    by_layer = f["measured"]["parts"][0]["margin_by_layer"]
    assert by_layer == sorted(by_layer) and by_layer[0] == pytest.approx(0.05, abs=0.02)


def test_d_contradicted_when_margin_falls(tmp_path):
    f = verdict(d_bench(tmp_path, [0.5, 0.35, 0.2, 0.05], 0.1), "d_margin_grows_with_depth")
    assert f["verdict"] == "not_reproduced"


def test_d_inconclusive_when_flat_and_noisy(tmp_path):
    f = verdict(d_bench(tmp_path, [0.3, 0.3, 0.3], 0.3, n_seq=6, seq_len=4), "d_margin_grows_with_depth")
    assert f["verdict"] == "inconclusive"


def test_d_vlm_leaves_the_last_layer_out(tmp_path):
    # rising but for a last layer that drops, as the paper reports for the vision tower
    out = d_bench(tmp_path, [0.05, 0.2, 0.35, 0.0], 0.05, regime="vlm")
    f = verdict(out, "d_margin_grows_with_depth")
    assert f["verdict"] == "reproduced" and "but its last" in f["why"]
    # with layer names, the connector (after the tower) is left out too
    for alg in ("smoe", "sharede_v2"):
        t = margin_trace(32, 16, [0.05, 0.2, 0.35, 0.0, 0.0], 0.05)
        t.meta["layer_names"] = ["vision0", "vision1", "vision2", "vision3", "connector"]
        save_traces(out / "runs" / f"{alg}-s0", [t])
    f = verdict(out, "d_margin_grows_with_depth")
    assert f["verdict"] == "reproduced" and f["measured"]["parts"][0]["margin_by_layer"] == pytest.approx(
        [0.05, 0.2, 0.35], abs=0.02)


# ----------------------------------------------------------------------------- e, f


def intervention_bench(tmp_path, effects: dict[str, float], n: int = 200, noise: float = 0.02,
                       algorithms=("smoe", "xmoe"), seeds: int = 1):
    """Runs whose per-window losses under each measurement are the baseline + effects[name]."""
    rows = [run(f"{a}-s{s}", a, s) for s in range(seeds) for a in algorithms]
    out = write_results(tmp_path, rows)
    for i, r in enumerate(rows):
        base = windows(3.0, n, 0.5, 100 + i)
        units = {"unperturbed": base}
        for j, (name, e) in enumerate(effects.items()):
            units[name] = base + e + windows(0.0, n, noise, 10 * i + j)
        write_interventions(out / "runs" / r["name"], units)
    return out


def test_e_reproduced_when_droptop_hurts_and_more_so_twice(tmp_path):
    f = verdict(intervention_bench(tmp_path, {"DropTop1": 0.2, "DropTop1&2": 0.5}), "e_droptop_hurts")
    assert f["verdict"] == "reproduced"
    assert [p["name"] for p in f["measured"]["parts"]] == ["smoe DropTop1", "smoe DropTop1&2 vs 1",
                                                           "xmoe DropTop1", "xmoe DropTop1&2 vs 1"]


def test_e_contradicted_when_droptop_helps(tmp_path):
    f = verdict(intervention_bench(tmp_path, {"DropTop1": -0.2, "DropTop1&2": 0.3}), "e_droptop_hurts")
    assert f["verdict"] == "not_reproduced"
    # DropTop1&2 is still worse than DropTop1: only the first part of each algorithm fails
    assert [p["verdict"] for p in f["measured"]["parts"]] == ["not_reproduced", "reproduced"] * 2


def test_e_inconclusive_within_noise(tmp_path):
    f = verdict(intervention_bench(tmp_path, {"DropTop1": 0.001, "DropTop1&2": 0.002}, n=20, noise=0.5),
                "e_droptop_hurts")
    assert f["verdict"] == "inconclusive"


def test_e_with_seeds_and_not_applicable(tmp_path):
    f = verdict(intervention_bench(tmp_path / "s", {"DropTop1": 0.2, "DropTop1&2": 0.5}, seeds=3),
                "e_droptop_hurts")
    assert f["verdict"] == "reproduced" and "t interval over 3 seeds" in f["why"]
    out = write_results(tmp_path / "none", [run("smoe-s0", "smoe")], studies=())
    f = verdict(out, "e_droptop_hurts")
    assert f["verdict"] == "not_applicable" and "--studies droptop" in f["why"]


def test_f_temperature_verdicts(tmp_path):
    ok = verdict(intervention_bench(tmp_path / "ok", {"tau=0.1": 0.01, "tau=10": 0.4}), "f_temperature")
    assert ok["verdict"] == "reproduced" and [p["name"] for p in ok["measured"]["parts"]] == ["smoe", "xmoe"]
    bad = verdict(intervention_bench(tmp_path / "bad", {"tau=0.1": 0.4, "tau=10": 0.01}), "f_temperature")
    assert bad["verdict"] == "not_reproduced"
    noisy = intervention_bench(tmp_path / "noisy", {"tau=0.1": 0.1, "tau=10": 0.101}, n=20, noise=0.5)
    noisy = verdict(noisy, "f_temperature")
    assert noisy["verdict"] == "inconclusive"
    none = write_results(tmp_path / "none", [run("smoe-s0", "smoe")], studies=("droptop",))
    assert verdict(none, "f_temperature")["verdict"] == "not_applicable"


def test_e_vlm_judges_accuracy(tmp_path):
    out = write_results(tmp_path, [run("smoe-s0", "smoe")], regime="vlm")
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(400, generator=g) < 0.8).double()
    worse = torch.where(torch.rand(400, generator=g) < 0.3, 0.0, base)
    worst = torch.where(torch.rand(400, generator=g) < 0.5, 0.0, worse)
    units = {"unperturbed": base, "DropTop1": worse, "DropTop1&2": worst}
    write_interventions(out / "runs" / "smoe-s0", units, metric="synth_mme/correct")
    f = verdict(out, "e_droptop_hurts")
    assert f["verdict"] == "reproduced" and "MME accuracy" in f["why"] and "400 questions" in f["why"]


# ----------------------------------------------------------------------------- g


def g_benches(tmp_path, up_change: dict[str, float], pre_change: dict[str, float], n_seq: int = 32,
              seq_len: int = 16):
    """An upcycle and a pretrain bench whose algorithms' change rates are set by `*_change`."""
    paths = {"upcycle": tmp_path / "up", "pretrain": tmp_path / "pre"}
    for regime, change in (("upcycle", up_change), ("pretrain", pre_change)):
        out = write_results(paths[regime], [run(f"{a}-s0", a) for a in change], regime=regime)
        for i, (a, c) in enumerate(change.items()):
            save_traces(out / "runs" / f"{a}-s0", drifting_traces(n_seq, seq_len, [c, c], seed=i))
    comparison = {"regimes": [{"regime": r, "bench": str(p)} for r, p in paths.items()]}
    for p in paths.values():
        results = json.loads((p / "results.json").read_text())
        results["regime_comparison"] = comparison
        (p / "results.json").write_text(json.dumps(results))
    return paths["upcycle"]


def test_g_reproduced_when_shared_experts_are_relatively_stabler_upcycled(tmp_path):
    out = g_benches(tmp_path, {"smoe": 0.5, "xmoe": 0.5, "sharede_v2": 0.2, "sharede_v3": 0.25},
                    {"smoe": 0.5, "xmoe": 0.5, "sharede_v2": 0.5, "sharede_v3": 0.5})
    f = verdict(out, "g_shared_experts_stabler_when_upcycled")
    assert f["verdict"] == "reproduced"
    p = f["measured"]["parts"][0]
    assert p["name"] == "sharede_v2" and p["relative_upcycle"] < 0.6 < 0.9 < p["relative_pretrain"]


def test_g_contradicted_and_inconclusive(tmp_path):
    out = g_benches(tmp_path / "bad", {"smoe": 0.3, "sharede_v2": 0.6, "sharede_v3": 0.6},
                    {"smoe": 0.5, "sharede_v2": 0.3, "sharede_v3": 0.3})
    assert verdict(out, "g_shared_experts_stabler_when_upcycled")["verdict"] == "not_reproduced"
    out = g_benches(tmp_path / "noisy", {"smoe": 0.4, "sharede_v2": 0.4}, {"smoe": 0.4, "sharede_v2": 0.4},
                    n_seq=6, seq_len=3)
    assert verdict(out, "g_shared_experts_stabler_when_upcycled")["verdict"] == "inconclusive"


def test_g_not_applicable_without_a_comparison(tmp_path):
    out = write_results(tmp_path, [run("sharede_v2-s0", "sharede_v2"), run("smoe-s0", "smoe")])
    f = verdict(out, "g_shared_experts_stabler_when_upcycled")
    assert f["verdict"] == "not_applicable" and "--compare" in f["why"]


# ----------------------------------------------------------------------------- h


def h_bench(tmp_path, concentrated: dict[str, list[bool]], peak: dict[str, float], seqs: int = 8,
            seq_len: int = 16):
    out = write_results(tmp_path, [run(f"{a}-s0", a) for a in concentrated])
    for i, a in enumerate(concentrated):
        save_traces(out / "runs" / f"{a}-s0",
                    [specialised_trace(4, seqs, seq_len, concentrated[a], peak[a], seed=i)])
    return out


SPREAD, EVEN = [True, False, True, False], [False, False, False, False]


def test_h_reproduced_when_xmoe_tc_specialise_and_tc_is_peaked(tmp_path):
    out = h_bench(tmp_path, {"smoe": EVEN, "sharede_v2": EVEN, "xmoe": SPREAD, "tc_moe": SPREAD},
                  {"smoe": 0.6, "sharede_v2": 0.6, "xmoe": 0.55, "tc_moe": 0.9})
    f = verdict(out, "h_subtask_specialisation")
    assert f["verdict"] == "reproduced"
    spread = f["measured"]["parts"][0]
    assert spread["name"] == "xmoe spread vs SMoE family" and spread["spread"] > spread["family_spread"]
    assert "within domains" in f["why"]


def test_h_contradicted_when_the_smoe_family_specialises(tmp_path):
    out = h_bench(tmp_path, {"smoe": SPREAD, "sharede_v2": SPREAD, "xmoe": EVEN, "tc_moe": EVEN},
                  {"smoe": 0.9, "sharede_v2": 0.9, "xmoe": 0.6, "tc_moe": 0.6})
    f = verdict(out, "h_subtask_specialisation")
    assert f["verdict"] == "not_reproduced"
    assert all(p["verdict"] == "not_reproduced" for p in f["measured"]["parts"])


def test_h_inconclusive_on_few_tokens(tmp_path):
    out = h_bench(tmp_path, {"smoe": EVEN, "xmoe": EVEN, "tc_moe": EVEN},
                  {"smoe": 0.6, "xmoe": 0.6, "tc_moe": 0.6}, seqs=3, seq_len=3)
    assert verdict(out, "h_subtask_specialisation")["verdict"] == "inconclusive"


def test_h_parts_not_applicable_without_xmoe_and_tc(tmp_path):
    out = h_bench(tmp_path, {"smoe": EVEN, "sigma_moe": SPREAD}, {"smoe": 0.6, "sigma_moe": 0.6})
    f = verdict(out, "h_subtask_specialisation")
    assert f["verdict"] == "not_applicable"


# ----------------------------------------------------------------------------- the registry


def test_every_claim_of_the_issue_is_registered_and_a_bare_output_is_never_reproduced(tmp_path):
    assert list(FINDINGS) == ["a_moe_beats_dense", "b_change_rate_falls", "c_init_std_balance",
                              "d_margin_grows_with_depth", "e_droptop_hurts", "f_temperature",
                              "g_shared_experts_stabler_when_upcycled", "h_subtask_specialisation"]
    out = write_results(tmp_path, [run("dense-s0", "dense", 0, 20.0), run("smoe-s0", "smoe", 0, 19.0)],
                        studies=())
    found = check_findings(out)
    assert [f["id"] for f in found] == list(FINDINGS)
    assert all(f["verdict"] in ("not_applicable", "inconclusive") for f in found)
    assert all({"id", "claim", "paper_ref", "measured", "verdict", "why", "figure"} <= set(f) for f in found)


def test_a_broken_input_is_inconclusive_and_says_why(tmp_path):
    out = a_bench(tmp_path, {"smoe": -0.05})
    (out / "runs" / "smoe-s0" / "eval" / "val_windows.json").write_text("{not json")
    f = verdict(out, "a_moe_beats_dense")
    assert f["verdict"] == "inconclusive" and "could not read" in f["why"]


def test_unknown_finding_is_a_helpful_error(tmp_path):
    out = write_results(tmp_path, [run("smoe-s0", "smoe")])
    with pytest.raises(ValueError, match="Did you mean f_temperature"):
        check_findings(out, ["f_temperature_"])
