"""libmoe bench never loses results and never fails silently (issue 19): everything knowable from
the arguments is refused before any work (exit 2, one line, nothing touched), failed runs make the
command exit 1 with a last line that counts them, and SIGTERM stops a study that a rerun resumes."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libmoe.bench import run_bench
from libmoe.bench import runner as bench_runner
from libmoe.bench.outputs import MANIFEST, OUTPUT_FILES
from libmoe.cli import main
from libmoe.files import read_json

ARGS = ["bench", "--preset", "micro", "--algorithms", "dense,smoe", "--no-analysis"]


@pytest.fixture(scope="module")
def cache(data_cache):
    return data_cache  # the session's: the data are prepared once


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """One finished micro study (dense + smoe); each test works on its own copy."""
    out = tmp_path_factory.mktemp("reliability") / "micro"
    run_bench(out, preset="micro", algorithms=["dense", "smoe"], overrides=[f"data.cache_dir={cache}"],
              analysis=False, log=lambda _: None)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    return out


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `out`: its bytes and modification time."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libmoe.cli", *args], capture_output=True, text=True)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_rerun_with_a_changed_override_is_refused_before_any_work(finished, tmp_path, cache):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    assert all(name in before for name in OUTPUT_FILES)
    done = _cli(*ARGS, "--out", str(out), f"data.cache_dir={cache}", "train.max_steps=20")
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert "dense-s0" in line and "train.max_steps: 30 -> 20" in line
    assert "--out" in line and "--overwrite" in line
    assert _snapshot(out) == before  # results.json/md/csv, report.html and every run: byte-identical


def test_overwrite_replaces_the_runs_made_with_another_config(finished, tmp_path, cache):
    out = _copy(finished, tmp_path)
    (out / "runs" / "smoe-s0" / "my_notes.txt").write_text("mine")
    dense = _snapshot(out / "runs" / "dense-s0")
    results = run_bench(out, preset="micro", algorithms=["smoe"], analysis=False, overwrite=True,
                        overrides=[f"data.cache_dir={cache}", "train.max_steps=20"], log=lambda _: None)
    assert results["rows"][0]["status"] == "ok"
    assert read_json(out / "runs" / "smoe-s0" / "bench_run.json")["step"] == 20
    assert not (out / "runs" / "smoe-s0" / "checkpoints" / "step_30").exists()  # the old run is gone
    assert (out / "runs" / "smoe-s0" / "my_notes.txt").read_text() == "mine"  # not libmoe's: kept
    assert _snapshot(out / "runs" / "dense-s0") == dense  # not part of this study: untouched
    assert [r["algorithm"] for r in read_json(out / "results.json")["rows"]] == ["smoe"]


def test_an_out_holding_files_the_bench_did_not_write_is_refused(finished, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.md").write_text("# my own notes\n")
    assert main([*ARGS, "--out", str(foreign)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "results.md" in line and "did not write" in line
    assert [p.name for p in foreign.iterdir()] == ["results.md"]
    assert (foreign / "results.md").read_text() == "# my own notes\n"
    # A results.md edited by hand in a bench output is no longer the bench's either, even with
    # its mark still in place (notes appended): the manifest's hash tells.
    out = _copy(finished, tmp_path)
    (out / "results.md").write_text("# rewritten by hand\n")
    assert main([*ARGS, "--out", str(out)]) == 2
    assert "results.md" in _one_line(capsys.readouterr().err)
    out = _copy(finished, tmp_path / "appended")
    with (out / "results.md").open("a") as f:
        f.write("\nMy notes on this study.\n")
    assert main([*ARGS, "--out", str(out)]) == 2
    assert "results.md" in _one_line(capsys.readouterr().err)
    assert (out / "results.md").read_text().endswith("My notes on this study.\n")
    out = _copy(finished, tmp_path / "checked")  # `libmoe findings` rewrites the outputs it checks
    assert main(["findings", str(out)]) == 0
    # still the bench's (and a moved data cache is no reason to refuse a study)
    assert main([*ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    # ... while the bench's own outputs (recognised by their marks and the manifest) are fine.
    (out / "results.md").unlink()
    (out / MANIFEST).unlink()
    from libmoe.bench.outputs import check_out_dir

    check_out_dir(out)
    (tmp_path / "a_file").write_text("x")
    assert main([*ARGS, "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, expect", [
    (["model.top_k=9"], "top_k=9 exceeds n_experts=8"),  # knowable from the arguments: no data built
    (["train.max_stps=5"], "Did you mean train.max_steps"),
    (["--algorithms", ""], "names no algorithm"),
    (["--algorithms", ","], "names no algorithm"),
    (["--algorithms", "dense,smoee"], "Did you mean smoe"),
])
def test_mistakes_in_the_arguments_are_refused_up_front_and_write_nothing(tmp_path, capsys, args, expect):
    out, cache = tmp_path / "never", tmp_path / "fresh-cache"
    assert main([*ARGS, "--out", str(out), f"data.cache_dir={cache}", *args]) == 2
    assert expect in _one_line(capsys.readouterr().err)
    assert not out.exists()
    assert not cache.exists()  # refused before any data preparation


def test_a_bench_whose_runs_all_fail_exits_1_and_its_last_line_counts_them(tmp_path, capsys, monkeypatch,
                                                                            cache, finished):
    def broken(spec, progress):
        raise RuntimeError("router exploded")

    monkeypatch.setattr(bench_runner, "_train", broken)
    out = tmp_path / "b"
    assert main([*ARGS, "--out", str(out), f"data.cache_dir={cache}"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 2 bench run(s) failed" in last and "dense-s0, smoe-s0" in last
    assert str(out / "results.md") in last
    assert "router exploded" in (out / "results.md").read_text()  # the tables still came out
    assert read_json(out / "results.json")["failed"][0]["error"] == "RuntimeError: router exploded"


def test_sigterm_stops_the_study_and_a_rerun_resumes_it(tmp_path, cache, finished):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "libmoe.cli", *ARGS, "--out", str(out), f"data.cache_dir={cache}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "runs" / "dense-s0" / "bench_run.json"
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.is_file(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)  # smoe-s0 has just started
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "1 of 2 run(s) finished" in last and "rerun the same command" in last
    assert not any((out / name).exists() for name in OUTPUT_FILES)  # no table of "failed" rows
    assert read_json(out / "runs" / "smoe-s0" / "bench_run.json")["status"] == "interrupted"
    checkpointed = (out / "runs" / "smoe-s0" / "checkpoints").is_dir()
    kept = (first.read_bytes(), os.stat(first).st_mtime_ns)

    again = _cli(*ARGS, "--out", str(out), f"data.cache_dir={cache}")
    assert again.returncode == 0, again.stderr
    assert "dense-s0 skipped (finished earlier)" in again.stderr
    if checkpointed:
        assert "resume: continuing from" in again.stdout + again.stderr
    assert (first.read_bytes(), os.stat(first).st_mtime_ns) == kept  # the finished run: untouched
    smoe = read_json(out / "runs" / "smoe-s0" / "bench_run.json")
    assert smoe["status"] == "ok" and smoe["step"] == 30
    assert [r["status"] for r in read_json(out / "results.json")["rows"]] == ["ok", "ok"]


def test_sigterm_reaches_the_worker_processes_which_checkpoint(tmp_path, cache, finished):
    out = tmp_path / "pool"
    cmd = [sys.executable, "-m", "libmoe.cli", *ARGS, "--jobs", "2", "--out", str(out),
           f"data.cache_dir={cache}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / "runs" / name / "metrics.jsonl" for name in ("dense-s0", "smoe-s0")]
    deadline = time.monotonic() + 240
    while not all(p.is_file() for p in logs) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.is_file() for p in logs), proc.communicate()[1]  # both workers are training
    proc.send_signal(signal.SIGTERM)  # to the bench alone: it forwards one SIGTERM to each worker
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "bench interrupted" in err.strip().splitlines()[-1]
    rows = [read_json(out / "runs" / name / "bench_run.json") for name in ("dense-s0", "smoe-s0")]
    statuses = {r["status"] for r in rows}
    assert statuses <= {"interrupted", "ok"} and "interrupted" in statuses
    for row in rows:  # a worker stopped in training wrote a checkpoint at that step
        assert row["status"] == "ok" or any((Path(row["run"]) / "checkpoints").iterdir())
    assert not (out / "results.json").exists()


def test_the_vlm_bench_refuses_a_changed_config_and_skips_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBMOE_CACHE", str(tmp_path / "cache"))  # the synthetic dataset, not ~/.cache
    out = tmp_path / "vlm"
    common = dict(preset="vlm-micro", regime="vlm", algorithms=["smoe"], log=lambda _: None)
    run_bench(out, **common)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"source/pt made with another config \(train.lr: 0.001 -> 0.5\)"):
        run_bench(out, overrides=["train.lr=0.5"], **common)
    with pytest.raises(ValueError, match="unknown VLM config key 'train.bogus'"):
        run_bench(out, overrides=["train.bogus=1"], **common)
    assert _snapshot(out) == before  # refused before any work: nothing rewritten
    again = run_bench(out, **common)
    assert again["runs"][0]["skipped"] and not again["failed"]
    run = "runs/smoe-s0/bench_run.json"
    assert _snapshot(out)[run] == before[run]  # the finished VIT run: untouched
    assert read_json(out / "results.json")["libmoe"]["writer"] == "libmoe bench"


def test_failure_line_counts_and_names_the_failed_runs(tmp_path):
    from libmoe.bench.safety import failure_line

    assert failure_line({"runs": [{}, {}], "failed": []}, tmp_path) is None
    failed = [{"name": f"algo{i}-s0"} for i in range(6)]
    line = failure_line({"n_runs": 8, "failed": failed}, tmp_path)
    assert line.startswith("6 of 8 bench run(s) failed (algo0-s0, algo1-s0, algo2-s0, algo3-s0, ...)")
    assert str(tmp_path / "results.md") in line and "\n" not in line
