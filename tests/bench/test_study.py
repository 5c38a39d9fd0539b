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
