"""libmoe bench: the micro preset end to end, resume, failures, launchers, tables."""

import csv
import io
import json
import os
import platform
import shutil

import pytest
import torch

from conftest import SHAKESPEARE
from libmoe.bench import available_tasks, load_bench_preset, run_bench
from libmoe.bench import runner as bench_runner
from libmoe.bench.tables import aggregate, results_markdown
from libmoe.cli import main
from libmoe.data import corpus_hash, load_corpus, tokenizer_fingerprint

EVAL = SHAKESPEARE.parent / "eval"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro preset on dense + smoe, as a user runs it (embedded corpus, local task files)."""
    if not (EVAL / "piqa.validation.jsonl").is_file():
        pytest.skip("../shared/data/eval not present")
    out = tmp_path_factory.mktemp("bench") / "micro"
    cache = tmp_path_factory.mktemp("bench-cache")
    results = run_bench(out, preset="micro", algorithms=["dense", "smoe"], data_dir=EVAL,
                        overrides=[f"data.cache_dir={cache}"], log=lambda _: None)
    return out, results, results["elapsed_s"], cache


def test_micro_preset_end_to_end_on_two_algorithms(micro):
    out, results, seconds, _ = micro
    assert seconds > 0  # the time is reported (the README gives it; no timing assertion here)
    rows = {r["algorithm"]: r for r in results["rows"]}
    assert list(rows) == ["dense", "smoe"] and results["tasks"] == ["piqa", "arc_easy"]
    for r in rows.values():
        assert r["status"] == "ok" and 1 < r["ppl"] < 1000
        for task in ("piqa", "arc_easy"):
            assert 0 <= r[task] <= 100
        assert r["avg"] == pytest.approx((r["piqa"] + r["arc_easy"]) / 2)
        assert 1 <= r["avg_rank"] <= 2
        assert r["train_time_s"] > 0 and r["peak_mem_mb"] > 0 and r["latency_ms"] > 0
        assert r["tokens_per_s"] > 0
    assert rows["dense"]["params_total"] == rows["dense"]["params_active"]
    assert rows["smoe"]["params_active"] < rows["smoe"]["params_total"]
    # The two runs had the same config but for the algorithm, so the same token budget.
    configs = [json.loads((out / "runs" / f"{a}-s0" / "bench_run.json").read_text()) for a in rows]
    assert all(c["step"] == 30 for c in configs)
    ranks = sorted(r["avg_rank"] for r in rows.values())
    assert sum(ranks) == pytest.approx(3.0)  # ranks 1 and 2 (or 1.5 and 1.5), per task

    saved = json.loads((out / "results.json").read_text())
    assert [r["algorithm"] for r in saved["rows"]] == ["dense", "smoe"]
    md = (out / "results.md").read_text()
    assert "| Algorithm | PPL ↓ | PIQA | ARC-Easy | AVG ↑ | AVG Rank ↓ |" in md and "Latency" in md
    table = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [r["algorithm"] for r in table] == ["dense", "smoe"]
    assert float(table[1]["ppl"]) == pytest.approx(rows["smoe"]["ppl"], rel=1e-3)
    report = (out / "report.html").read_text()
    assert "smoe" in report and "dense" in report and "data:image/png;base64," in report
    assert (out / "analysis" / "metrics.json").is_file()
    assert (out / "analysis" / "figures" / "bench_ppl.png").is_file()
    analysed = json.loads((out / "runs" / "smoe-s0" / "analysis" / "metrics.json").read_text())
    assert analysed["algorithm"] == "smoe" and analysed["n_experts"] == 8  # analysed where it ran
    assert (out / "runs" / "smoe-s0" / "eval" / "results.json").is_file()


def test_rerun_skips_finished_runs_and_an_interrupted_run_resumes_exactly(micro, tmp_path):
    out, results, _, cache = micro
    messages = []
    again = run_bench(out, preset="micro", algorithms=["dense", "smoe"], data_dir=EVAL,
                      overrides=[f"data.cache_dir={cache}"], analysis=False, log=messages.append)
    assert sum("skipped (finished earlier)" in m for m in messages) == 2
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in results["rows"]]

    # Interrupt a copy of the smoe run after step 15, then let the bench finish it.
    from libmoe.models.run_config import config_from_dict
    from libmoe.train import train

    spec = next(s for s in bench_runner.plan_runs(
        tmp_path / "b", load_bench_preset("micro"), ["smoe"], 1,
        overrides=[f"data.cache_dir={cache}"]))
    train(config_from_dict(spec.config), spec.run_dir, stop_after=15, progress=False)
    resumed = run_bench(tmp_path / "b", preset="micro", algorithms=["smoe"], tasks=[],
                        overrides=[f"data.cache_dir={cache}"], analysis=False, log=lambda _: None)
    log = (tmp_path / "b" / "runs" / "smoe-s0" / "metrics.jsonl").read_text()
    assert '"step": 30' in log
    whole = next(r for r in results["runs"] if r["algorithm"] == "smoe")
    assert resumed["rows"][0]["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)


def test_a_failing_algorithm_is_reported_and_the_others_finish(tmp_path, monkeypatch, micro):
    _, _, _, cache = micro
    real = bench_runner._train

    def broken(spec, progress):
        if spec.algorithm == "xmoe":
            raise RuntimeError("router exploded")
        return real(spec, progress)

    monkeypatch.setattr(bench_runner, "_train", broken)
    results = run_bench(tmp_path / "b", preset="micro", algorithms=["xmoe", "smoe"], tasks=[],
                        overrides=[f"data.cache_dir={cache}"], log=lambda _: None)
    rows = {r["algorithm"]: r for r in results["rows"]}
    assert rows["xmoe"]["status"] == "failed" and "router exploded" in rows["xmoe"]["error"]
    assert rows["xmoe"]["ppl"] is None and rows["smoe"]["status"] == "ok"
    assert results["failed"] == [{"name": "xmoe-s0", "error": "RuntimeError: router exploded"}]
    assert "xmoe (failed)" in (tmp_path / "b" / "results.md").read_text()
    assert "router exploded" in (tmp_path / "b" / "report.html").read_text()
    # The failure is not remembered as finished: the next call tries again.
    monkeypatch.setattr(bench_runner, "_train", real)
    again = run_bench(tmp_path / "b", preset="micro", algorithms=["xmoe", "smoe"], tasks=[],
                      overrides=[f"data.cache_dir={cache}"], analysis=False, log=lambda _: None)
    assert all(r["status"] == "ok" for r in again["rows"])


def test_parallel_jobs_and_the_slurm_launcher(tmp_path, micro):
    _, _, _, cache = micro
    common = dict(preset="micro", tasks=[], overrides=[f"data.cache_dir={cache}"], analysis=False,
                  log=lambda _: None)
    pooled = run_bench(tmp_path / "pool", algorithms=["dense", "sigma_moe"], jobs=2, **common)
    assert [r["status"] for r in pooled["rows"]] == ["ok", "ok"]
    assert (tmp_path / "pool" / "runs" / "sigma_moe-s0" / "bench.log").read_text().count("step 30") >= 1
    slurm = run_bench(tmp_path / "slurm", algorithms=["dense"], launcher="slurm",
                      slurm={"cluster": "debug"}, **common)
    assert slurm["rows"][0]["status"] == "ok"
    # Same config and seed, so the same model: the launcher does not change the result.
    assert slurm["rows"][0]["ppl"] == pytest.approx(pooled["rows"][0]["ppl"], rel=1e-5)


def test_torchrun_launcher_trains_with_two_processes(tmp_path, micro, capfd):
    _, _, _, cache = micro
    results = run_bench(tmp_path / "tr", preset="micro", algorithms=["smoe"], tasks=[],
                        launcher="torchrun", nproc=2, overrides=[f"data.cache_dir={cache}"],
                        analysis=False, log=lambda _: None)
    row = results["runs"][0]
    assert row["status"] == "ok", row.get("error")
    assert (tmp_path / "tr" / "runs" / "smoe-s0" / "bench_config.yaml").is_file()
    assert "2 process(es)" in capfd.readouterr().out  # the trainer's own line, from torchrun


def test_aggregate_means_stds_and_ranks_within_seeds():
    def run(algorithm, seed, ppl, piqa, arc, status="ok"):
        return {"name": f"{algorithm}-s{seed}", "algorithm": algorithm, "seed": seed, "status": status,
                "ppl": ppl, "results": {"val_ppl": {"ppl": ppl}, "piqa": {"acc": piqa},
                                        "arc_easy": {"acc": arc}},
                "params_total": 10, "params_active": 5, "train_time_s": 2.0 + seed,
                "peak_mem_mb": 100.0, "latency_ms": 1.0, "tokens_per_s": 50.0}

    runs = [run("dense", 0, 30.0, 0.50, 0.40), run("smoe", 0, 20.0, 0.60, 0.30),
            run("dense", 1, 32.0, 0.54, 0.40), run("smoe", 1, 22.0, 0.50, 0.50),
            {"name": "xmoe-s0", "algorithm": "xmoe", "seed": 0, "status": "failed", "error": "boom"}]
    rows = {r["algorithm"]: r for r in aggregate(runs, ["piqa", "arc_easy"])}
    assert rows["dense"]["ppl"] == 31.0 and rows["dense"]["ppl_std"] == pytest.approx(2 ** 0.5)
    assert rows["smoe"]["piqa"] == pytest.approx(55.0) and rows["smoe"]["seeds"] == 2
    # seed 0: smoe 1st on piqa, 2nd on arc -> 1.5 each; seed 1: smoe 2nd, 1st -> 1.5
    assert rows["smoe"]["avg_rank"] == pytest.approx(1.5) and rows["dense"]["avg_rank"] == pytest.approx(1.5)
    assert rows["dense"]["avg"] == pytest.approx((45.0 + 47.0) / 2)
    assert rows["xmoe"]["status"] == "failed" and rows["xmoe"]["ppl"] is None
    md = results_markdown({"preset": "t", "description": "d", "algorithms": list(rows), "seeds": 2,
                           "elapsed_s": 60, "tasks": ["piqa", "arc_easy"], "rows": list(rows.values()),
                           "failed": [{"name": "xmoe-s0", "error": "boom"}]})
    assert "31.00 ± 1.41" in md and "xmoe (failed)" in md and "- xmoe-s0: boom" in md


def test_tasks_without_data_are_skipped_with_the_reason(tmp_path):
    ok, skipped = available_tasks(["piqa", "blimp"], None)
    assert ok == [] and "--data-dir" in skipped["piqa"]
    (tmp_path / "piqa.validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n')
    ok, skipped = available_tasks(["piqa", "hellaswag"], tmp_path)
    assert ok == ["piqa"] and "hellaswag.validation.jsonl" in skipped["hellaswag"]
    with pytest.raises(FileNotFoundError, match="hellaswag"):  # asked for by name: an error
        run_bench(tmp_path / "b", preset="micro", algorithms=["smoe"], tasks=["hellaswag"],
                  data_dir=tmp_path, log=lambda _: None)


def test_bench_presets_and_cli_errors(capsys, tmp_path):
    for name in ("micro", "default", "paper-158m", "paper-679m"):
        preset = load_bench_preset(name)
        assert preset.train_preset and preset.tasks
    with pytest.raises(ValueError, match="unknown bench preset 'defualt'.*default"):
        load_bench_preset("defualt")
    assert main(["bench", "--preset", "micro", "--algorithms", "smoe,smoe", "--out", str(tmp_path)]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["bench", "--launcher", "slurm", "--seeds", "0", "--out", str(tmp_path)]) == 2


def test_results_record_the_environment_and_show_the_corpus_hash(micro):
    out, results, _, _ = micro
    env = results["environment"]
    assert env["corpus"]["source"] == "embedded" and env["corpus"]["python"] == platform.python_version()
    assert env["corpus"]["hash"] == corpus_hash(load_corpus("embedded"))
    assert env["tokenizer"] == {"source": "train",
                                "hash": tokenizer_fingerprint(out / "runs" / "smoe-s0" / "tokenizer")}
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["cpus"] == os.cpu_count() and env["job_threads"] and "cpu" in env and "gpus" in env
    assert json.loads((out / "results.json").read_text())["environment"] == env
    md, report = (out / "results.md").read_text(), (out / "report.html").read_text()
    short = env["corpus"]["hash"][:16]
    assert f"embedded corpus of Python {platform.python_version()}" in md.split("## Scores")[0]
    assert "## Environment" in md and env["corpus"]["hash"] in md and short in report
    assert "<h2>Environment</h2>" in report and f"torch {torch.__version__}" in report


def test_compare_says_where_two_outputs_differ_and_what_it_means(micro, tmp_path, capsys):
    out, results, _, cache = micro
    saved = json.loads((out / "results.json").read_text())

    def other(name, **changes):
        folder = tmp_path / name
        folder.mkdir()
        value = {k: v for k, v in saved.items() if k != "environment"}
        if not changes.pop("old", False):
            value["environment"] = {**saved["environment"], **changes}
        (folder / "results.json").write_text(json.dumps(value))
        return folder

    same = other("same")
    assert main(["findings", str(out), "--compare", str(same), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "same data, config, software, machine" in printed and "identical for all 2" in printed
    assert f"corpus embedded from Python {platform.python_version()}" in printed

    machine = other("machine", cpu="Another CPU", torch_threads=64)
    assert main(["findings", str(out), "--compare", str(machine), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "(CPU model, torch threads)" in printed and "compare verdicts, not digits" in printed
    assert f"CPU model: {saved['environment']['cpu']} vs Another CPU" in printed

    corpus = {**saved["environment"]["corpus"], "hash": "0" * 64, "python": "3.99.0"}
    data = other("data", corpus=corpus, python="3.99.0")
    assert main(["findings", str(out), "--compare", str(data), "--dry-run", "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)["environment_comparison"]
    assert comparison["known"]
    assert {"corpus.hash", "python"} <= {d["field"] for d in comparison["differences"]}
    assert "different data" in comparison["summary"] and "3.99.0" in comparison["summary"]

    old = other("old", old=True)
    assert main(["findings", str(out), "--compare", str(old), "--dry-run"]) == 0
    assert "unknown: " in capsys.readouterr().out

    # Written into the output (a copy): results.json, results.md and report.html; still the bench's.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["findings", str(copy), "--compare", str(machine)]) == 0
    capsys.readouterr()
    assert json.loads((copy / "results.json").read_text())["environment_comparison"]["differences"]
    assert f"## Compared with {machine}" in (copy / "results.md").read_text()
    assert "| CPU model |" in (copy / "results.md").read_text()
    assert "Another CPU" in (copy / "report.html").read_text()
    # ... and the bench's own --compare (its runs finished: skipped) says the same.
    again = run_bench(copy, preset="micro", algorithms=["dense", "smoe"], data_dir=EVAL, compare=data,
                      overrides=[f"data.cache_dir={cache}"], analysis=False, log=lambda _: None)
    assert "different data" in again["environment_comparison"]["summary"]
    assert again["regime_comparison"]["regimes"][1]["bench"] == str(data)  # the regime comparison stays
    assert "different data" in (copy / "results.md").read_text()


def test_an_output_without_the_environment_record_still_loads(micro, tmp_path, capsys):
    out, _, _, _ = micro
    old = tmp_path / "old"
    shutil.copytree(out, old)
    saved = json.loads((old / "results.json").read_text())
    for key in ("environment", "environment_comparison"):
        saved.pop(key, None)
    (old / "results.json").write_text(json.dumps(saved))
    (old / ".libmoe-bench").unlink()  # as an output of a version before the record
    assert main(["findings", str(old), "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "environment: not recorded" in printed and "unknown: this output has no environment" in printed
    md = (old / "results.md").read_text()
    assert "(not recorded)" in md and "## Compared with" in md
    assert "Corpus:" not in md.split("## Scores")[0]
