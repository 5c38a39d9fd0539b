"""What the study does around a regime's runs (libmoe.bench.study): results.json's shared keys in
the regime's layout, the preset object used as given, and the finish line naming the files written."""

import dataclasses
import json

from libmoe.bench import REGIMES, Regime, load_bench_preset, markdown_page, run_bench, write_tables


class TinyRegime(Regime):
    """Each run "trains" to its seed; its own results.json key is the preset's description."""

    name = "tiny"
    default_preset = "micro"
    description = "each run is its seed"
    results_layout = ("regime", "told", "preset")

    def plan(self, ctx):
        return [[ctx.spec(f"{a}-s{s}", a, s, ctx.out / "runs" / f"{a}-s{s}", {"a": a, "s": s})
                 for s in range(ctx.seeds) for a in ctx.algorithms]]

    def train(self, spec, progress):
        return {"seed": spec.seed}

    def evaluate(self, spec, summary, row):
        row.update(status="ok", value=summary["seed"])

    def results(self, study):
        return {"told": study.bench_preset.description, "rows": [r["value"] for r in study.rows]}, {}, []

    def write_outputs(self, out, results, analysis, figures):  # no report.html
        rows = [["value"], *[[v] for v in results["rows"]]]
        write_tables(out, results, markdown_page("tiny", [], []), rows)

    def score_table(self, results):
        return [["Value"], *[[str(v)] for v in results["rows"]]]


def test_shared_keys_layout_preset_and_files_written(tmp_path, monkeypatch):
    monkeypatch.setitem(REGIMES, "tiny", TinyRegime())
    preset = dataclasses.replace(load_bench_preset("micro"), description="a changed preset")
    messages = []
    results = run_bench(tmp_path / "out", preset=preset, regime="tiny", algorithms=["dense", "smoe"],
                        log=messages.append)
    assert results["told"] == "a changed preset" == results["description"]  # the object as given
    keys = list(results)
    assert keys[:3] == ["regime", "told", "preset"]  # the regime's layout first
    assert {"algorithms", "seeds", "runs", "n_runs", "failed", "machine", "regime_comparison", "elapsed_s",
            "findings"} <= set(keys)  # the shared keys, filled by the study
    assert results["n_runs"] == 2 and results["failed"] == []
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved)[1:4] == ["regime", "told", "preset"]  # after the writer's stamp
    out = tmp_path / "out"
    assert messages[-1].endswith(f"wrote {out / 'results.md'}, {out / 'results.csv'} and "
                                 f"{out / 'results.json'}")  # no report.html: not named


def test_claims_preset_is_the_default_with_three_seeds(tmp_path):
    from libmoe.bench import plan_stages
    from libmoe.bench.presets import resolve_seeds

    claims, default = load_bench_preset("claims"), load_bench_preset("default")
    assert claims.seeds >= 3 and claims.extends == "default" and default.seeds == 1
    for key in ("train_preset", "overrides", "val_tokens", "studies", "study_options", "jobs", "regime"):
        assert getattr(claims, key) == getattr(default, key), key  # inherited, so they stay in sync
    assert claims.tasks == []  # chance-level at this scale; the time goes to seeds
    assert resolve_seeds(claims, None) == claims.seeds and resolve_seeds(claims, 2) == 2  # --seeds wins
    (stage,) = plan_stages(tmp_path, claims, ["dense", "smoe"], resolve_seeds(claims, None))
    rows = [s for s in stage if s.role == "row"]
    names = [f"{a}-s{i}" for a in ("dense", "smoe") for i in range(claims.seeds)]
    assert sorted(s.name for s in rows) == names
    assert [s.name for s in stage if s.role == "study"] == ["init_std-0.02", "init_std-0.04", "init_std-0.06"]
    (base,) = plan_stages(tmp_path, default, ["dense"], 1)
    dense0 = next(s for s in rows if s.name == "dense-s0")
    assert dense0.config == base[0].config  # seed 0 trains as the default bench's dense run


def test_presets_extend_merge_and_refuse_bad_keys(tmp_path, monkeypatch):
    import pytest

    from libmoe.bench import presets

    monkeypatch.setattr(presets, "BENCH_DIR", tmp_path)
    (tmp_path / "base.yaml").write_text(
        "train_preset: micro\noverrides: {train.max_steps: 30, train.log_every: 5}\n"
        "study_options: {init-std: {stds: [0.02, 0.04], steps: 9}}\ntasks: [piqa]\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base\nseeds: 2\noverrides: {train.max_steps: 12}\nstudy_options: {init-std: {steps: 6}}\n"
        "tasks: []\n")
    child = presets.load_bench_preset("child")
    assert child.train_preset == "micro" and child.seeds == 2 and child.tasks == []
    assert child.overrides == {"train.max_steps": 12, "train.log_every": 5}  # merged, the child's win
    assert child.study_options == {"init-std": {"stds": [0.02, 0.04], "steps": 6}}
    assert presets.load_bench_preset("base").seeds == 1
    for text, match in (("extends: nowhere\n", "unknown bench preset 'nowhere' \\(extended by bad\\)"),
                        ("train_preset: micro\nseeds: 0\n", "seeds must be a whole number >= 1"),
                        ("train_preset: micro\nseeds: two\n", "seeds must be a whole number >= 1"),
                        ("train_preset: micro\nseed: 3\n", "unknown keys \\['seed'\\]")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ValueError, match=match):
            presets.load_bench_preset("bad")
    (tmp_path / "base.yaml").write_text("extends: child\ntrain_preset: micro\n")
    with pytest.raises(ValueError, match="in a cycle: child -> base -> child"):
        presets.load_bench_preset("child")


def test_algorithm_options_reach_only_their_algorithm(tmp_path):
    from dataclasses import replace

    from libmoe.bench import plan_stages

    default = load_bench_preset("default")
    preset = replace(default, algorithm_options={"tc_moe": {"expert_init": "dense_match"}})
    assert preset.algorithm_override_list("tc_moe") == ["model.moe_options.expert_init=dense_match"]
    (stage,) = plan_stages(tmp_path, preset, ["smoe", "tc_moe"], 1, studies=[])
    by_name = {s.name: s.config["model"]["moe_options"] for s in stage}
    assert by_name["tc_moe-s0"]["expert_init"] == "dense_match"
    assert "expert_init" not in by_name["smoe-s0"]  # the other algorithms keep the preset's options
    # the preset's own options are kept beside the algorithm's (merged, not replaced)
    assert by_name["tc_moe-s0"]["router_init_std"] == by_name["smoe-s0"]["router_init_std"]


def test_the_users_overrides_win_over_algorithm_options_and_names_are_checked(tmp_path):
    from dataclasses import replace

    import pytest

    from libmoe.bench import plan_stages

    preset = replace(load_bench_preset("default"),
                     algorithm_options={"sigma_moe": {"sigma_renormalize": False}})
    (stage,) = plan_stages(tmp_path, preset, ["sigma_moe"], 1, studies=[],
                           overrides=["model.moe_options.sigma_renormalize=true"])
    assert stage[0].config["model"]["moe_options"]["sigma_renormalize"] is True  # LibMoE's form on request
    typo = replace(preset, algorithm_options={"sigma_moee": {"sigma_renormalize": False}})
    with pytest.raises(ValueError, match="sigma_moe"):
        plan_stages(tmp_path, typo, ["smoe"], 1, studies=[])
