"""The command line as a user runs it: `python -m libmoe ...`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from libmoe.moe import ALGORITHMS
from libmoe.moe.smoke import smoke_train


def run(*args):
    return subprocess.run([sys.executable, "-m", "libmoe", *args], capture_output=True, text=True)


def test_algorithms_lists_the_registry():
    result = run("algorithms")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == list(ALGORITHMS)


def test_unknown_algorithm_is_one_line_without_traceback():
    result = run("bench", "--preset", "micro", "--algorithms", "smeo", "--out", "/nonexistent/never")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unknown MoE algorithm 'smeo'" in result.stderr and "smoe" in result.stderr


def test_every_algorithm_learns_through_its_router():
    rows = smoke_train(steps=25, tokens=128)
    assert [r["algorithm"] for r in rows] == list(ALGORITHMS)
    for r in rows:
        assert r["loss_end"] < 0.9 * r["loss_start"], r


SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
needs_data = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared data not present")


def train_args(tmp_path, *extra):
    return ("train", "--preset", "micro", "--out", str(tmp_path / "run"),
            f"data.cache_dir={tmp_path / 'cache'}", "train.tensorboard=false", *extra)


@pytest.mark.parametrize("source,message", [
    ("missing", "does not exist"),
    ("empty", "holds no text"),
    ("short.txt", "too small"),
    ("binary.txt", "skipped as not UTF-8, e.g."),
])
def test_train_bad_data_is_one_line_and_writes_nothing(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("Too short to train on.")
    (tmp_path / "binary.txt").write_bytes(b"caf\xe9 \xff\xfe")
    result = run(*train_args(tmp_path, "--data", str(tmp_path / source)))
    assert result.returncode == 2
    assert result.stderr.startswith("libmoe: error:") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_unknown_key_names_the_closest(tmp_path):
    result = run(*train_args(tmp_path, "optim.lrr=1e-3"))
    assert result.returncode == 2 and "optim.lrr" in result.stderr and "optim.lr" in result.stderr


@needs_data
def test_train_cli_resolves_config_layers_and_refuses_to_overwrite(tmp_path):
    (tmp_path / "exp.yaml").write_text("model:\n  algorithm: xmoe\noptim:\n  lr: 1.0e-3\n")
    args = train_args(tmp_path, str(tmp_path / "exp.yaml"), "--data", str(SHAKESPEARE),
                      "--max-steps", "2", "optim.warmup_steps=1", "train.eval_every=2")
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "done: step 2" in result.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["preset"] == "micro" and saved["model"]["algorithm"] == "xmoe"
    assert saved["optim"]["lr"] == 1e-3 and saved["optim"]["warmup_steps"] == 1
    assert saved["model"]["d_model"] == 64 and saved["train"]["max_steps"] == 2
    again = run(*args)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    # --resume with nothing else picks up the saved config and, the run being complete, stops.
    resumed = run("train", "--out", str(tmp_path / "run"), "--resume")
    assert resumed.returncode == 0 and "done: step 2" in resumed.stdout


@needs_data
def test_prepare_builds_the_cache_train_then_reuses(tmp_path):
    args = ("--preset", "micro", "--data", str(SHAKESPEARE), f"data.cache_dir={tmp_path / 'cache'}")
    result = run("prepare", *args)
    assert result.returncode == 0, result.stderr
    assert "training a 512-piece BPE tokenizer" in result.stdout
    assert "validation tokens, 512 pieces, domains: tinyshakespeare" in result.stdout
    trained = run("train", *args, "--out", str(tmp_path / "run"), "--max-steps", "1",
                  "train.tensorboard=false")
    assert trained.returncode == 0 and "using cached tokens" in trained.stdout


EVAL_DIR = SHAKESPEARE.parent / "eval"


@needs_data
def test_eval_cli_writes_results_a_table_and_the_comparison(tmp_path):
    trained = run(*train_args(tmp_path, "--data", str(SHAKESPEARE), "--max-steps", "2"))
    assert trained.returncode == 0, trained.stderr
    result = run("eval", str(tmp_path / "run"), "--tasks", "piqa,blimp_passive_1,val_ppl", "--data-dir",
                 str(EVAL_DIR), "--limit", "4")
    assert result.returncode == 0, result.stderr
    assert "| task | acc | acc_norm | ppl | n |" in result.stdout and "| piqa |" in result.stdout
    assert "piqa: 4 documents in" in result.stderr and "val_ppl:" in result.stderr
    saved = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert saved["results"]["piqa"]["n"] == 4 and saved["config"]["step"] == 2
    assert saved["config"]["limit"] == 4
    # val_ppl evaluates the windows training evaluated: the run's own last logged number.
    logged = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert saved["results"]["val_ppl"]["loss"] == pytest.approx(logged["val_loss"], abs=1e-5)
    second = run("eval", str(tmp_path / "run" / "checkpoints" / "step_2"), "--tasks", "piqa",
                 "--data-dir", str(EVAL_DIR), "--limit", "2", "--out", str(tmp_path / "b.json"))
    assert second.returncode == 0, second.stderr
    table = run("eval-table", str(tmp_path / "run" / "eval" / "results.json"), str(tmp_path / "b.json"),
                "--out", str(tmp_path / "cmp"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "| Model | PPL ↓ | PIQA | blimp_passive_1 | AVG ↑ | AVG Rank ↓ |"
    assert lines[2].startswith("| run | ") and lines[3].startswith("| step_2 |  | ")
    assert lines[3].endswith("|  |  |  |")  # no blimp score: no AVG, no rank
    assert (tmp_path / "cmp.md").read_text().splitlines() == lines
    assert (tmp_path / "cmp.csv").read_text().splitlines()[0] == "model,ppl,piqa,blimp_passive_1,avg,avg_rank"


@needs_data
def test_eval_bad_input_is_one_line(tmp_path):
    trained = run(*train_args(tmp_path, "--data", str(SHAKESPEARE), "--max-steps", "1"))
    assert trained.returncode == 0, trained.stderr
    unknown = run("eval", str(tmp_path / "run"), "--tasks", "piqq")
    assert unknown.returncode == 2 and "Did you mean piqa?" in unknown.stderr
    assert "blimp_<paradigm> (67 of them)" in unknown.stderr and "task YAML file" in unknown.stderr
    missing = run("eval", str(tmp_path / "run"), "--tasks", "race", "--data-dir", str(tmp_path))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"needs {tmp_path / 'race.test.jsonl'}" in missing.stderr and "EleutherAI/race" in missing.stderr
    assert "model:" not in missing.stderr  # checked before the model loads
    not_model = run("eval", str(tmp_path), "--tasks", "piqa")
    assert not_model.returncode == 2 and "is not a libmoe model" in not_model.stderr
    saved = tmp_path / "run" / "checkpoints" / "step_1" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    config["data"]["source"] = "../elsewhere/corpus"  # as trained from another directory
    saved.write_text(yaml.safe_dump(config))
    moved = run("eval", str(tmp_path / "run"), "--tasks", "piqa,val_ppl", "--data-dir", str(EVAL_DIR),
                "--limit", "2")
    assert moved.returncode == 2 and "relative to the directory the run was trained from" in moved.stderr
    assert "piqa:" not in moved.stderr  # val_ppl is checked first, before any task runs
    names = run("eval-table", str(tmp_path / "x.json"), "--names", "a,b")
    assert names.returncode == 2 and "2 names for 1 result files" in names.stderr
