"""Training never loses results and never fails silently (issue 19): a diverged loss, --overwrite,
damaged checkpoints, a torn metrics line, impossible configs, SIGTERM and resume guards, each
through the CLI: its exit code, one line on stderr, no traceback, nothing lost or written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libmoe.cli import main
from libmoe.files import CorruptFileError
from libmoe.train import (
    load_checkpoint,
    load_run_config,
    resolve_config,
    run_hash,
    train,
    verify_checkpoint,
)
from libmoe.train.stops import StopSignals

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare.txt not present")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Overrides for a fast micro run on tinyshakespeare (one data cache for the module)."""
    cache = tmp_path_factory.mktemp("cache")
    return [f"data.source={SHAKESPEARE}", f"data.cache_dir={cache}", "train.log_every=1",
            "train.eval_every=1000", "train.eval_tokens=2048", "train.tensorboard=false"]


def config(base, *overrides):
    return resolve_config(overrides=[*base, *overrides], preset="micro")


def cli(*args, timeout=120):
    """`libmoe ARGS` in a fresh interpreter: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "libmoe.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def run_main(capsys, *args):
    """`libmoe ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def losses(run):
    return [(r["step"], r.get("loss"), r.get("val_loss"))
            for r in map(strict, (run / "metrics.jsonl").read_text().splitlines())]


def snapshot(path):
    """Every file under `path` with its bytes (to show that nothing was written or lost)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that damage it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(config(base, "train.max_steps=4", "train.checkpoint_every=2"), run, progress=False)
    return run


def test_non_finite_loss_stops_with_one_line_and_saves_nothing(base, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli("train", "--out", run, *base, "optim.eps=0", "train.max_steps=6",
                       "train.checkpoint_every=2")
    line = one_line(err)
    assert code == 1 and "diverged" in line and "step 2" in line and "optim.eps=0" in line, line
    assert not (run / "checkpoints").exists() and not (run / "train_summary.json").exists()
    rows = [strict(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # null, never NaN
    assert rows[-1]["step"] == 2 and rows[-1]["loss"] is None
    # an infinite learning rate: the weights diverge after step 1; the step-2 checkpoint is refused
    run = tmp_path / "inf"
    code, _, err = run_main(capsys, "train", "--out", run, *base, "optim.lr=.inf", "train.max_steps=4",
                            "train.checkpoint_every=2", "train.log_every=4")
    assert code == 1 and "optim.lr=inf is not finite" in one_line(err)
    assert not (run / "checkpoints").exists() and not (run / "train_summary.json").exists()


def test_every_json_file_of_a_run_is_strict_and_checksummed(finished):
    for path in finished.rglob("*.json"):
        strict(path.read_text())
    for line in (finished / "metrics.jsonl").read_text().splitlines():
        strict(line)
    step = finished / "checkpoints" / "step_4"
    info = strict((step / "checkpoint.json").read_text())
    assert set(info["files"]) == {p.name for p in step.iterdir()} - {"checkpoint.json"}
    assert verify_checkpoint(step) is None
    trace = strict((step / "routing_trace.json").read_text())
    assert trace["run_hash"] == info["run_hash"] == run_hash(load_run_config(finished))


def test_overwrite_removes_every_file_of_the_old_run_once_the_config_is_checked(
        base, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in ("eval/results.json", "analysis/metrics.json", "traces/step_1/routing_trace.json",
                 "config_changes.jsonl"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}\n")
    (run / "notes.txt").write_text("mine\n")
    before = snapshot(run)
    code, _, err = run_main(capsys, "train", "--out", run, "--overwrite", *base, "model.top_k=9")
    assert code == 2 and "top_k=9 exceeds n_experts=8" in one_line(err)
    assert snapshot(run) == before  # a refused overwrite removes nothing
    code, _, err = run_main(capsys, "train", "--out", run, "--overwrite", *base,
                            "model.algorithm=xmoe", "train.max_steps=1")
    assert code == 0, err
    left = sorted(p.name for p in run.iterdir())
    assert left == ["checkpoints", "config.yaml", "metrics.jsonl", "notes.txt", "tokenizer",
                    "train_summary.json"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_1"]


@pytest.mark.parametrize("damage", ["truncated model.safetensors", "garbage trainer_state.pt",
                                    "garbage optimizer.pt", "no checksums, garbage optimizer.pt"])
def test_resume_skips_a_damaged_newest_checkpoint(base, finished, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    step4 = run / "checkpoints" / "step_4"
    name = damage.split()[-1]
    if name == "model.safetensors":
        data = (step4 / name).read_bytes()
        (step4 / name).write_bytes(data[: len(data) // 2])
    else:
        (step4 / name).write_bytes(b"\x80\x02garbage" * 10)
    if damage.startswith("no checksums"):  # a checkpoint written before checksums were recorded
        info = json.loads((step4 / "checkpoint.json").read_text())
        del info["files"]
        (step4 / "checkpoint.json").write_text(json.dumps(info))
        assert verify_checkpoint(step4) is None
    else:
        assert name in verify_checkpoint(step4)
    with pytest.raises(CorruptFileError, match=name) as err:
        load_checkpoint(step4)
    assert "weights_only" not in str(err.value)
    expected = losses(finished)
    code, out, err = run_main(capsys, "train", "--out", run, "--resume")
    assert code == 0 and not err, err
    assert f"skipping damaged checkpoint {step4} ({name}" in out
    assert f"continuing from {run / 'checkpoints' / 'step_2'} (step 2)" in out
    assert losses(run) == expected  # steps 3 and 4 retrained exactly as before


def test_resume_with_every_checkpoint_damaged_is_one_line(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for step in ("step_2", "step_4"):
        (run / "checkpoints" / step / "optimizer.pt").write_bytes(b"garbage")
    before = snapshot(run)
    code, _, err = run_main(capsys, "train", "--out", run, "--resume")
    line = one_line(err)
    assert code == 2 and "no intact checkpoint in" in line and "--overwrite" in line
    assert "step_4: optimizer.pt does not match its checksum" in line and "step_2" in line
    assert snapshot(run) == before


def test_a_torn_last_metrics_line_is_dropped_on_resume(base, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = config(base, "train.max_steps=3", "train.checkpoint_every=1000")
    train(cfg, run, stop_after=2, progress=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1')  # a write cut off by a crash
    code, _, err = run_main(capsys, "train", "--out", run, "--resume")
    assert code == 0, err
    assert [(s, val is None) for s, _, val in losses(run)] == [(1, True), (2, True), (3, True), (3, False)]
    # a damaged line before the last one is not guessed at: one line naming file and line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    code, _, err = run_main(capsys, "train", "--out", run, "--resume", "train.max_steps=3")
    line = one_line(err)
    assert code == 2 and "metrics.jsonl" in line and "line 2" in line, line


def test_impossible_config_is_refused_before_data_preparation(base, tmp_path):
    cache = tmp_path / "cache"
    args = [a for a in base if not a.startswith("data.cache_dir")] + [f"data.cache_dir={cache}"]
    code, _, err = cli("train", "--out", tmp_path / "run", *args, "model.top_k=9")
    assert code == 2 and "top_k=9 exceeds n_experts=8" in one_line(err)
    assert not (tmp_path / "run").exists() and not cache.exists()  # no data prepared, nothing written


@pytest.mark.parametrize("args, message", [
    (["--stop-after", "-1"], "--stop-after -1 must be a step of at least 1"),
    (["--stop-after", "0"], "--stop-after 0 must be a step of at least 1"),
    (["train.batch_size=6", "train.micro_batch_size=4"], "micro_batch_size=4 must divide"),
    (["train.seq_len=128"], "seq_len=128 exceeds model.max_seq_len=64"),
    (["model.moe_options={bogus: 1}"], "unknown option 'bogus'"),
])
def test_bad_arguments_are_refused_before_anything_is_written(base, tmp_path, capsys, args, message):
    code, _, err = run_main(capsys, "train", "--out", tmp_path / "run", *base, *args)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused(base, tmp_path, capsys):
    (tmp_path / "file").write_text("keep\n")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        code, _, err = run_main(capsys, "train", "--out", out, *base)
        assert code == 2 and "is a file" in one_line(err)
    assert (tmp_path / "file").read_text() == "keep\n"


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(base, tmp_path):
    args = [*base, "train.max_steps=30", "train.checkpoint_every=1000"]
    run = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, "-m", "libmoe.cli", "train", "--out", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            path = run / "metrics.jsonl"
            if path.is_file() and sum(1 for line in path.read_text().splitlines() if line.endswith("}")) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    line = one_line(err)
    assert proc.returncode == 1 and "interrupted by SIGTERM at step" in line, line
    step = int(line.split("at step ")[1].split(";")[0])
    assert 3 <= step < 30 and f"checkpoint written to {run / 'checkpoints' / f'step_{step}'}" in line
    assert "continue with --resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{step}"]
    assert not (run / "train_summary.json").exists()
    # The resume and the uninterrupted reference each run in a fresh interpreter, as the split run
    # did: in this process, state left by earlier tests (seen once in a full-suite run under load:
    # the losses differed in the 7th digit from step 5 on) would compare unlike with like.
    code, _, err = cli("train", "--out", run, "--resume")
    assert code == 0, err
    code, _, err = cli("train", "--out", tmp_path / "full", *args)
    assert code == 0, err
    assert losses(run) == losses(tmp_path / "full")  # bitwise, as if never interrupted


def test_the_first_signal_sets_a_flag_and_a_second_acts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is previous  # a second Ctrl-C interrupts
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_repeated_sigterm_cannot_kill_the_checkpoint_being_written():
    """Slurm signals every process and torchrun forwards the signal again: the second SIGTERM is
    ignored while training checkpoints; the previous handler is back once training exits."""
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # would end this test process if it were not ignored
        time.sleep(0.01)
        assert signals.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_resume_refuses_changed_settings_unless_allowed_and_records_them(base, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(base, "train.max_steps=4", "train.checkpoint_every=1000"), run, stop_after=2,
          progress=False)
    before = snapshot(run)
    code, _, err = run_main(capsys, "train", "--out", run, "--resume", "optim.lr=0.002",
                            "train.batch_size=4")
    line = one_line(err)
    assert code == 2 and "optim.lr: 0.003 -> 0.002" in line and "train.batch_size: 8 -> 4" in line
    assert "drop these overrides" in line and "--allow-config-change" in line
    assert snapshot(run) == before
    code, _, err = run_main(capsys, "train", "--out", run, "--resume", "--allow-config-change",
                            "optim.lr=0.002")
    assert code == 0, err
    (change,) = [strict(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert change["step"] == 2 and change["changes"] == ["optim.lr: 0.003 -> 0.002"] and change["time"]
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    row = next(strict(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step": 3' in x)
    assert row["lr"] == pytest.approx(0.002 * 3 / 5)  # the new lr in effect (warmup 3 of 5)


def test_resume_on_a_directory_without_a_run_is_refused(base, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("train", "--out", tmp_path / "empty", "--resume", *base)
    assert code == 2 and "no run in" in one_line(err) and "drop --resume" in err
    assert list((tmp_path / "empty").iterdir()) == []


def test_an_allowed_seed_change_keeps_the_runs_identity_so_its_traces_analyse(base, tmp_path):
    from libmoe.analysis import run_traces

    run = tmp_path / "run"
    train(config(base, "train.max_steps=4", "train.checkpoint_every=2"), run, stop_after=2, progress=False)
    train(config(base, "train.max_steps=4", "train.checkpoint_every=2", "train.seed=7"), run,
          resume=True, allow_config_change=True, progress=False)
    infos = [strict((p / "checkpoint.json").read_text()) for p in (run / "checkpoints").iterdir()]
    hashes = {info["run_hash"] for info in infos}
    assert len(hashes) == 1
    assert [t.step for t in run_traces(run)] == [2, 4]  # one run: not refused as a mix of two


def test_a_checkpoint_whose_trace_was_moved_away_still_resumes(finished, tmp_path):
    from libmoe.train import verify_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = run / "checkpoints" / "step_4"
    for trace in newest.glob("routing_trace.*"):  # what analyze advises for a damaged trace
        trace.rename(tmp_path / trace.name)
    assert verify_checkpoint(newest) is None
    (newest / "optimizer.pt").write_bytes(b"garbage")
    assert verify_checkpoint(newest) == "optimizer.pt does not match its checksum"
