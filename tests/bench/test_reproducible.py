"""Same command, same machine, same numbers: the micro bench run twice, each time from an empty
data cache (so the tokenizer is trained and the corpus packed again) in a fresh directory, gives
identical results.json numbers but for the timings (`outputs.TIMING_FIELDS`), identical routing
metrics and validation-window losses, and the same environment record."""

import json
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE
from libmoe.bench import run_bench
from libmoe.bench.outputs import TIMING_FIELDS, without_timings
from libmoe.environment import (
    ENVIRONMENT_FIELDS,
    compare_environments,
    comparison_lines,
    environment_record,
    environment_rows,
    environment_summary,
)

EVAL = SHAKESPEARE.parent / "eval"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "bench.md"


def _bench(directory, monkeypatch):
    """The same command in `directory`: relative --out and cache, as a user types it."""
    directory.mkdir()
    monkeypatch.chdir(directory)
    # One task (the micro preset has two) keeps a task score among the numbers at half the time.
    has_task = (EVAL / "piqa.validation.jsonl").is_file()
    results = run_bench("bench", preset="micro", algorithms=["dense", "smoe"],
                        tasks=["piqa"] if has_task else [], data_dir=EVAL if has_task else None,
                        overrides=["data.cache_dir=cache"], log=lambda _: None)
    out = directory / "bench"
    saved = json.loads((out / "results.json").read_text())
    assert saved["environment"] == results["environment"]
    analysis = json.loads((out / "analysis" / "metrics.json").read_text())
    for metrics in analysis.values():
        metrics.pop("path")  # where the run is (resolved): the only entry that is not a number
    files = {"analysis/metrics.json": analysis}
    for algorithm in ("dense", "smoe"):
        name = f"runs/{algorithm}-s0/eval/val_windows.json"
        files[name] = json.loads((out / name).read_text())
    return saved, files


@pytest.fixture
def one_thread():
    """Both benches on one torch thread: the same numbers hold for any fixed thread count, and on
    a loaded 2-core machine two threads' spinning made this test ten times slower (152 s vs 14 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_same_command_twice_gives_the_same_numbers(tmp_path, monkeypatch, one_thread):
    first, first_files = _bench(tmp_path / "one", monkeypatch)
    second, second_files = _bench(tmp_path / "two", monkeypatch)

    # The numbers the bench reports are there and were measured: perplexities, task scores,
    # losses, routing metrics and the findings' estimates.
    rows = {r["algorithm"]: r for r in first["rows"]}
    assert all(r["status"] == "ok" and 1 < r["ppl"] < 1000 for r in rows.values())
    assert all(r.get("piqa") is not None for r in rows.values()) or not first["tasks"]
    assert first_files["analysis/metrics.json"]["smoe"]["router_margin"]
    assert any(part.get("ci95") for f in first["findings"] for part in f["measured"].get("parts", []))

    # Identical but for the timings (a time, a speed or a memory reading differs on every run).
    assert {k for r in first["runs"] for k in r if k in TIMING_FIELDS} >= {"train_time_s", "latency_ms"}
    env_a, env_b = first.pop("environment"), second.pop("environment")
    assert without_timings(first) == without_timings(second)
    assert first_files == second_files

    # The environment record: the data's hashes, and nothing else differing (but the libmoe
    # checkout's commit, should someone commit in between).
    assert env_a["corpus"]["source"] == "embedded" and len(env_a["corpus"]["hash"]) == 64
    assert env_a["tokenizer"]["hash"] and env_a["tokenizer"] == env_b["tokenizer"]
    assert env_a["job_threads"] == [1]  # the runs trained in this process, on its one thread
    comparison = compare_environments(env_a, env_b, configs=(first["config"], second["config"]))
    assert {d["field"] for d in comparison["differences"]} <= {"libmoe_commit", "libmoe_modified"}
    if comparison["same"]:
        assert comparison["summary"].startswith("same data, config, software, machine")


@pytest.mark.parametrize("field", TIMING_FIELDS)
def test_the_timing_fields_are_documented(field):
    section = DOCS.read_text().split("## Comparing numbers across machines", 1)[-1]
    assert f"`{field}`" in section


def test_the_environment_record_and_its_comparison():
    env = environment_record(corpus={"source": "embedded", "hash": "a" * 64, "python": "3.11.7"},
                             tokenizer={"source": "train", "hash": "b" * 16}, job_threads=[2, 1, 2])
    assert env["job_threads"] == [1, 2] and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["determinism"]["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert json.loads(json.dumps(env)) == env  # plain JSON
    assert {key.split(".")[0] for key, _, _ in ENVIRONMENT_FIELDS} <= set(env)

    same = compare_environments(env, json.loads(json.dumps(env)), "B")
    assert same["known"] and same["same"] and same["differences"] == []
    # A config that differs only in where files go is the same config.
    config = {"data": {"source": "embedded", "cache_dir": "/a"}, "train": {"max_steps": 30}}
    moved = {"data": {"source": "embedded", "cache_dir": "/b"}, "train": {"max_steps": 30}}
    assert compare_environments(env, env, "B", configs=(config, moved))["same"]
    longer = {"data": {"source": "embedded"}, "train": {"max_steps": 60}}
    changed = compare_environments(env, env, "B", configs=(config, longer))
    assert [(d["label"], d["this"], d["other"]) for d in changed["differences"]] == [
        ("config train.max_steps", "30", "60")]
    assert "different configs (config train.max_steps)" in changed["summary"]

    machine = compare_environments(env, {**env, "cpu": "Other", "gpus": ["NVIDIA H100"]}, "B")
    assert [d["field"] for d in machine["differences"]] == ["cpu", "gpus"]
    assert "different machines" in machine["summary"] and "compare verdicts, not digits" in machine["summary"]
    assert comparison_lines(machine)[1:] == [f"  CPU model: {env['cpu']} vs Other",
                                             "  GPUs: none vs NVIDIA H100"]

    other_python = {**env, "python": "3.12.1", "corpus": {**env["corpus"], "hash": "c" * 64,
                                                          "python": "3.12.1"}}
    data = compare_environments(env, other_python, "B")
    assert "different data (corpus hash)" in data["summary"] and "3.11.7 vs 3.12.1" in data["summary"]
    assert data["differences"][0]["this"] == "a" * 16  # hashes shortened for display

    for unknown in (compare_environments(env, None, "B"), compare_environments(None, env, "B")):
        assert unknown["known"] is False and unknown["summary"].startswith("unknown: ")
    assert "B has no environment record" in compare_environments(env, None, "B")["summary"]
    assert "this output and B have no environment record" in compare_environments(None, None, "B")["summary"]
    assert environment_summary(None).startswith("environment: not recorded")
    assert "corpus embedded from Python 3.11.7 sha256:aaaaaaaaaaaa" in environment_summary(env)
    assert environment_rows(None)[1][0] == "(not recorded)"
    assert dict(environment_rows(env)[1:])["Corpus"].endswith("sha256 " + "a" * 64)


def test_a_record_that_failed_is_compared_as_unknown():
    from libmoe.environment import compare_environments

    failed = {"error": "ValueError: the corpus moved"}
    assert compare_environments(failed, failed, "other")["known"] is False


def test_a_failing_environment_record_never_costs_the_tables(tmp_path, monkeypatch, one_thread):
    # describing the machine runs after hours of training: if it fails, the tables are still written
    import libmoe.bench.study as study_module

    def broken(*args, **kwargs):
        raise RuntimeError("no /proc/cpuinfo here")

    monkeypatch.setattr(study_module, "environment_info", broken)
    monkeypatch.chdir(tmp_path)
    run_bench("bench", preset="micro", algorithms=["dense"], tasks=[], studies="none", analysis=False,
              overrides=["data.cache_dir=cache", "train.max_steps=4"], log=lambda _: None)
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["environment"] == {"error": "RuntimeError: no /proc/cpuinfo here"}
    assert (tmp_path / "bench" / "results.md").is_file() and (tmp_path / "bench" / "report.html").is_file()
