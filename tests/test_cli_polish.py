"""The command line as a user meets it: `libmoe --version`, `libmoe --help`, and overrides checked by
one validator for every command that takes them (unknown key -> one line with a near match, exit 2,
nothing written), the VLM stage's values checked before work and a non-finite VLM loss -> exit 1."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from libmoe.cli import build_parser, main


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "libmoe.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_version_prints_the_installed_version():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout == f"libmoe {version('libmoe')}\n" and done.stderr == ""
    import libmoe

    assert libmoe.__version__ == version("libmoe")


def test_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: libmoe [-h] [--version] COMMAND ...")
    assert "research library for sparse Mixture-of-Experts" in text
    assert "Thin:" not in text and "entry point" not in text  # not the developer docstring
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:  # every command is listed, with its one line, in the grouped description
        shown = "analyze init-std" if name == "analyze-init-std" else name
        assert f"\n  {shown} " in text, name
    assert "exit codes: 0 " in text and "; 1 some work failed" in text and "; 2 bad input" in text
    assert "docs/" in text and "reliability" in text
    assert max(map(len, text.splitlines())) <= 100


BAD_OVERRIDES = [
    (["train", "--preset", "micro", "--out", "run", "train.bogus=1"], r"unknown config key 'train.bogus'\. "
     r"Valid keys of train: batch_size, "),
    (["train", "--preset", "micro", "--out", "run", "optim.lrr=1e-3"], r"Did you mean optim\.lr\?"),
    (["train", "--preset", "micro", "--out", "run", "checkpoint_every=5"],
     r"'checkpoint_every'\. Did you mean train\.checkpoint_every\?"),
    (["prepare", "--preset", "micro", "train.max_step=3"], r"Did you mean train\.max_steps\?"),
    (["analyze", "init-std", "--steps", "2", "--out", "study", "model.topk=2"],
     r"Did you mean model\.top_k\?"),
    (["bench", "--preset", "micro", "--out", "b", "model.topk=2"], r"Did you mean model\.top_k\?"),
    (["bench", "--preset", "micro", "--out", "b", "=3"], r"override '=3' must look like section\.key=value"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "train.bogus_key=5"],
     r"unknown VLM config key 'train\.bogus_key'\. Valid keys of train: batch_size, betas, checkpoint_at"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "checkpoint_every=2"],
     r"unknown VLM config key 'checkpoint_every'\. Did you mean train\.checkpoint_at\?"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "moe.topk=2"],
     r"Did you mean moe\.top_k\?"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "stage=vit"],
     r"'stage' cannot be overridden; use --stage\."),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "train=5"],
     r"'train' is a section, not a value"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "train.lr"],
     r"override 'train\.lr' must look like section\.key=value"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "train.lr=.inf"],
     r"train\.lr=inf is not valid; it must be a finite number > 0"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "train.batch_size=0"],
     r"train\.batch_size=0 is not valid"),
]


@pytest.mark.parametrize("argv, message", BAD_OVERRIDES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_override_is_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIBMOE_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert line.startswith("libmoe: error: ")
    assert re.search(message, line), line
    assert list(tmp_path.iterdir()) == []  # nothing written: no run, study, bench or cache directory


def test_vlm_train_unknown_key_from_the_real_entry_point(tmp_path):
    """`libmoe vlm train` used to run with exit 0 ignoring train.bogus_key=5 (issue 19)."""
    done = _cli("vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "--max-steps", "1",
                "train.lr=1e-4", "train.bogus_key=5", cwd=tmp_path)
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert line.startswith("libmoe: error: unknown VLM config key 'train.bogus_key'.")
    assert not (tmp_path / "v").exists()


def test_vlm_overrides_keep_numbers_and_reach_the_config():
    from libmoe.vlm.stages import stage_config

    cfg = stage_config("pt", "cpu-smoke", overrides=[
        "train.lr=1e-4", "train.betas=[0.9, 1e-1]", "moe.options.balance_coef=1e-2", "data.subtasks=[colour]",
        "model.vision.num_hidden_layers=1", "train.max_steps="])
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["betas"] == [0.9, 0.1]
    assert cfg["moe"]["options"]["balance_coef"] == 1e-2 and cfg["data"]["subtasks"] == ["colour"]
    assert cfg["model"]["vision"]["num_hidden_layers"] == 1 and cfg["train"]["max_steps"] is None


def test_vlm_non_finite_loss_stops_with_exit_1_and_no_checkpoint(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from libmoe.vlm.synth import write_synth_dataset

    monkeypatch.setenv("LIBMOE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_synth_dataset(data, n_per_task=4, n_test_per_task=1, image_size=32, log=None)
    out = tmp_path / "pt"
    rc = main(["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--data", str(data),
               "--out", str(out), "--max-steps", "3", "--device", "cpu", "train.lr=1e30",
               "train.warmup_ratio=0", "train.tensorboard=false"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("libmoe: training stopped at step 2 of ") and "the loss is nan" in err[-1]
    assert "no checkpoint was written" in err[-1] and "lower train.lr" in err[-1]
    assert not (out / "summary.json").exists()
    assert not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else True


@pytest.mark.parametrize("argv, message", [
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "--device", "cuda:7"],
     r"--device cuda:7: this machine has"),
    (["vlm", "train", "--stage", "pt", "--preset", "cpu-smoke", "--out", "v", "--device", "gpu"],
     r"--device 'gpu' is not a torch device"),
    (["vlm", "eval", "run", "--limit", "0"], r"--limit 0: give a positive number of questions"),
    (["vlm", "eval", "run", "--limit", "-3"], r"--limit -3: give a positive number"),
    (["vlm", "eval", "run", "--out", "."], r"--out '\.' is a directory; give the results file"),
    (["vlm", "eval", "run", "--device", "cuda:7"], r"--device cuda:7: this machine has"),
])
def test_vlm_arguments_are_checked_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIBMOE_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert re.search(message, line), line
    assert list(tmp_path.iterdir()) == []
