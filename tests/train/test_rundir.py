"""libmoe.train.rundir: run identity, config differences, resume guards, clearing a run directory."""

import json

import pytest

from libmoe.train import resolve_config
from libmoe.train.rundir import (
    RUN_FILES,
    check_run_dir,
    clear_run,
    config_diff,
    record_config_change,
    resume_changes,
    run_hash,
)


def cfg(*overrides):
    return resolve_config(overrides=list(overrides), preset="micro")


def test_config_diff_names_every_changed_leaf_with_old_and_new():
    a = {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "train": {"seed": 0}}
    b = {"optim": {"lr": 2e-3, "betas": [0.9, 0.95]}, "train": {"seed": 0, "extra": 1}}
    assert config_diff(a, b) == ["optim.lr: 0.001 -> 0.002", "train.extra: None -> 1"]
    assert config_diff(a, a) == []
    assert config_diff({"x": {"y": 1}}, {"x": 2}) == ["x: {'y': 1} -> 2"]
    assert config_diff(1, 2) == ["config: 1 -> 2"]


def test_run_hash_is_the_identity_of_a_run_not_of_how_it_is_run():
    base = run_hash(cfg())
    assert len(base) == 16 and base == run_hash(cfg())
    for what_a_run_is in ("train.seed=1", "model.algorithm=xmoe", "data.val_fraction=0.2"):
        assert run_hash(cfg(what_a_run_is)) != base, what_a_run_is
    for how_it_runs in ("data.cache_dir=/elsewhere", "train.log_every=7", "optim.lr=1e-2"):
        assert run_hash(cfg(how_it_runs)) == base, how_it_runs


def test_resume_changes_are_refused_unless_allowed():
    saved = cfg().to_dict()
    assert resume_changes(saved, cfg("train.log_every=3", "train.checkpoint_every=5"), 4, False) == []
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.003 -> 0\.01.*--allow-config-change"):
        resume_changes(saved, cfg("optim.lr=0.01"), 4, False)
    changes = resume_changes(saved, cfg("optim.lr=0.01", "train.max_steps=99"), 4, True)
    assert changes == ["optim.lr: 0.003 -> 0.01", "train.max_steps: 50 -> 99"]


def test_record_config_change_appends_strict_json_rows(tmp_path):
    record_config_change(tmp_path, 4, ["optim.lr: 0.003 -> 0.01"])
    record_config_change(tmp_path, 9, ["train.max_steps: 30 -> 99"])
    rows = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["changes"]) for r in rows] == [(4, ["optim.lr: 0.003 -> 0.01"]),
                                                        (9, ["train.max_steps: 30 -> 99"])]
    assert all(r["time"].endswith("Z") for r in rows)


def test_clear_run_removes_every_run_file_and_keeps_the_users(tmp_path):
    for name in RUN_FILES:
        path = tmp_path / name
        if "." in name:
            path.write_text("old")
        else:
            (path / "step_4").mkdir(parents=True)
    (tmp_path / "my_notes.txt").write_text("mine")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes.txt"]


def test_check_run_dir_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_run_dir(tmp_path / "file", False, False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("preset: micro\n")
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        check_run_dir(tmp_path / "run", False, False)
    check_run_dir(tmp_path / "run", False, True)
    check_run_dir(tmp_path / "run", True, False)


def test_clear_run_leaves_a_directory_without_a_run_alone(tmp_path):
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "notes.md").write_text("mine")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "my_results.json").write_text("{}")
    clear_run(tmp_path)  # --overwrite on a directory that never held a run
    assert (tmp_path / "analysis" / "notes.md").read_text() == "mine"
    assert (tmp_path / "eval" / "my_results.json").is_file()
