"""A regime is one class and one registry line: the runner, launchers, skipping, findings and the
output files are the bench's (libmoe.bench.regimes.base)."""

import pytest

from libmoe.bench import REGIMES, Regime, get_regime, run_bench, score_table
from libmoe.bench.outputs import write_output_json, write_output_text
from libmoe.bench.tables import markdown


class CountRegime(Regime):
    """A toy regime: each run "trains" by counting to its seed + 1; its score is ten times that."""

    name = "count"
    default_preset = "micro"
    description = "each run counts to its seed"

    def plan(self, ctx):
        return [[ctx.spec(f"{a}-s{s}", a, s, ctx.out / "runs" / f"{a}-s{s}", {"algorithm": a, "seed": s})
                 for s in range(ctx.seeds) for a in ctx.algorithms]]

    def train(self, spec, progress):
        return {"steps": spec.seed + 1}

    def evaluate(self, spec, summary, row):
        row.update(status="ok", score=10 * summary["steps"])

    def results(self, study):
        rows = [{"algorithm": r["algorithm"], "score": r["score"]} for r in study.rows]
        return {"preset": study.preset, "regime": self.name, "algorithms": study.algorithms,
                "seeds": study.seeds, "rows": rows, "runs": study.rows, "failed": []}, {}, []

    def write_outputs(self, out, results, analysis, figures):
        write_output_json(out, "results.json", results)
        write_output_text(out, "results.md", markdown(self.score_table(results)) + "\n")

    def score_table(self, results):
        return [["Algorithm", "Score"], *[[r["algorithm"], str(r["score"])] for r in results["rows"]]]


def test_a_new_regime_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(REGIMES, "count", CountRegime())
    out = tmp_path / "count"
    common = dict(preset="micro", regime="count", algorithms=["dense", "smoe"], seeds=2, jobs=1,
                  log=lambda _: None)
    results = run_bench(out, **common)
    assert [r["score"] for r in results["rows"]] == [10, 10, 20, 20]
    assert {f["id"] for f in results["findings"]} and (out / "results.md").is_file()
    assert (out / "runs" / "smoe-s1" / "bench_run.json").is_file()  # the runner saved every row
    assert score_table(results) == [["Algorithm", "Score"], ["dense", "10"], ["smoe", "10"], ["dense", "20"],
                                    ["smoe", "20"]]
    again = run_bench(out, **common)
    assert all(r.get("skipped") for r in again["runs"])  # finished runs are the runner's to skip


@pytest.mark.parametrize("name", sorted(REGIMES))
def test_every_registered_regime_implements_the_interface(name):
    regime = get_regime(name)
    for method in ("plan", "train", "evaluate", "results", "write_outputs", "score_table"):
        assert getattr(type(regime), method) is not getattr(Regime, method), (name, method)
    assert regime.name == name and regime.default_preset and regime.description
