"""libmoe.vlm stages on the cpu-smoke preset: what PT/PFT/VIT train, VIT checkpoints and traces,
clear errors, exact resume, and the `libmoe vlm train|eval` and `libmoe analyze` commands."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

import libmoe.vlm.stages as vlm_stages  # noqa: E402
import libmoe.vlm.train as vlm_train  # noqa: E402
from libmoe.cli import main  # noqa: E402
from libmoe.models.checkpoints import list_checkpoints  # noqa: E402
from libmoe.moe.trace import Trace  # noqa: E402
from libmoe.vlm.model import MODEL_FILE, model_state  # noqa: E402
from libmoe.vlm.synth import SUBTASK_GROUPS, SUBTASKS, write_synth_dataset  # noqa: E402
from libmoe.vlm.train import train_stage  # noqa: E402

PRESET = "cpu-smoke"
VIT_STEPS = 5  # the preset's: checkpoints at 20..100% are steps 1..5
FAST = ["train.tensorboard=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """LIBMOE_CACHE in a tmp dir; env["last"]: the initial model of the latest stage run."""
    initial: dict[str, dict[str, torch.Tensor]] = {}
    original = vlm_train.build_stage_model

    def capture(cfg, records, folder, log):
        model, tokenizer = original(cfg, records, folder, log)
        initial["last"] = {k: v.clone() for k, v in model_state(model).items()}
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIBMOE_CACHE", str(tmp_path_factory.mktemp("libmoe-cache")))
        mp.setattr(vlm_train, "build_stage_model", capture)
        yield initial


@pytest.fixture(scope="module")
def data(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("vlm-synth")
    write_synth_dataset(root, n_per_task=4, n_test_per_task=2, image_size=32, log=None)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, env):
    """pt -> pft -> vit (smoe) runs, each with the initial model it started from."""
    root = tmp_path_factory.mktemp("vlm-runs")
    logs: dict[str, list[str]] = {"pt": [], "pft": [], "vit": []}
    out = {"root": root, "logs": logs, "initial": {}, "summary": {}}
    out["summary"]["pt"] = train_stage("pt", root / "pt", preset=PRESET, data=str(data), device="cpu",
                                       log=logs["pt"].append)
    out["initial"]["pt"] = env["last"]
    out["summary"]["pft"] = train_stage("pft", root / "pft", init=str(root / "pt"), device="cpu",
                                        overrides=FAST, log=logs["pft"].append)
    out["initial"]["pft"] = env["last"]
    out["summary"]["vit"] = train_stage("vit", root / "vit", init=str(root / "pft"), algorithm="smoe",
                                        device="cpu", overrides=FAST + ["train.log_every=1"],
                                        log=logs["vit"].append)
    out["initial"]["vit"] = env["last"]
    return out


def _final(run):
    return load_file(str(list_checkpoints(run)[-1] / MODEL_FILE))


def _changed(a, b):
    return not torch.equal(a, b)


# -- what each stage trains ----------------------------------------------------------------------------------
def test_pt_changes_only_the_connector(runs):
    start, end = runs["initial"]["pt"], _final(runs["root"] / "pt")
    assert set(start) == set(end)
    connector = [k for k in end if k.startswith("connector.")]
    assert connector and all(_changed(start[k], end[k]) for k in connector)
    others = [k for k in end if not k.startswith("connector.")]
    assert others and all(torch.equal(start[k], end[k]) for k in others), \
        [k for k in others if _changed(start[k], end[k])][:5]
    assert runs["summary"]["pt"]["steps"] == 6
    assert [p.name for p in list_checkpoints(runs["root"] / "pt")] == ["step_6"]
    assert (runs["root"] / "pt" / "tensorboard").is_dir()


def test_pft_starts_from_pt_and_trains_everything(runs):
    start, end = runs["initial"]["pft"], _final(runs["root"] / "pft")
    pt_end = _final(runs["root"] / "pt")
    assert all(torch.equal(start[k], pt_end[k]) for k in pt_end)  # --init: the pt run's final model
    # vision layer 0 feeds feature_layer -2; the LM and connector get gradients everywhere
    vision = [k for k in end if k.startswith("vision.") and ".layers.0." in k]
    lm = [k for k in end if k.startswith("lm.") and ".layers." in k]
    connector = [k for k in end if k.startswith("connector.")]
    for group in (vision, lm, connector):
        assert group and all(_changed(start[k], end[k]) for k in group), \
            [k for k in group if not _changed(start[k], end[k])][:5]
    assert any("starting from" in line for line in runs["logs"]["pft"])


def test_vit_upcycles_checkpoints_and_traces(runs):
    vit = runs["root"] / "vit"
    cfg = vlm_stages.load_stage_config(vit)
    assert cfg["stage"] == "vit" and cfg["algorithm"] == "smoe"
    assert cfg["init"] == str((runs["root"] / "pft").resolve())
    start = runs["initial"]["vit"]
    pft_end = _final(runs["root"] / "pft")
    # the upcycled model: the pft weights outside the MoE layers, experts copied from the dense MLPs
    for k, v in pft_end.items():
        if k in start:
            assert torch.equal(start[k], v), k
    assert any(".moe.router.weight" in k for k in start) and "connector.moe.experts.w1" in start
    w1 = start["connector.moe.experts.w1"]
    assert all(torch.equal(w1[e], pft_end["connector.fc1.weight"].t()) for e in range(w1.shape[0]))

    ckpts = list_checkpoints(vit)
    assert [p.name for p in ckpts] == [f"step_{s}" for s in range(1, VIT_STEPS + 1)]
    labels = sorted(SUBTASKS)
    previous = None
    for step, ckpt in enumerate(ckpts, start=1):
        meta = json.loads((ckpt / "vlm.json").read_text())
        assert meta["stage"] == "vit" and meta["step"] == step and meta["model"]["moe"]["algorithm"] == "smoe"
        trace = Trace.load(ckpt)
        assert trace.labels == labels and trace.step == step
        assert trace.meta["layer_names"] == ["vision0", "vision1", "connector"]
        assert trace.n_layers == 3 and set(trace.label.tolist()) == set(range(len(labels)))
        weights = load_file(str(ckpt / MODEL_FILE))
        if previous is not None:
            assert _changed(previous["connector.moe.router.weight"], weights["connector.moe.router.weight"])
        previous = weights

    rows = [json.loads(line) for line in (vit / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, VIT_STEPS + 1))
    for r in rows:
        assert {"loss", "aux_loss", "aux_balance", "aux_z", "lr", "grad_norm"} <= set(r)
        assert r["aux_loss"] > 0 and r["aux_balance"] > 0
        assert [entry["layer"] for entry in r["load"]] == [0, 1, 2]
    summary = json.loads((vit / "summary.json").read_text())
    assert summary["steps"] == VIT_STEPS and 0 <= summary["synth_mme"]["acc"] <= 1
    assert (vit / "eval" / "results.json").is_file()


# -- errors --------------------------------------------------------------------------------------------------
def _one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


def test_wrong_stage_init_is_one_clear_line(runs, tmp_path):
    root = runs["root"]
    with pytest.raises(ValueError) as e:
        train_stage("vit", tmp_path / "a", init=str(root / "pt"), algorithm="smoe", device="cpu")
    assert "is a pt run" in _one_line(e) and "pft run" in _one_line(e)
    with pytest.raises(ValueError) as e:
        train_stage("pft", tmp_path / "b", init=str(root / "vit"), device="cpu")
    assert "is a vit run" in _one_line(e)
    with pytest.raises(ValueError) as e:
        train_stage("pt", tmp_path / "c", init=str(root / "pft"), device="cpu")
    assert "takes no --init" in _one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        train_stage("pft", tmp_path / "d", init=str(tmp_path / "nowhere"), device="cpu")
    assert "not a libmoe vlm run" in _one_line(e)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a pft run may continue a pft run (the dense baseline of a VIT comparison)
    cfg = vlm_stages.stage_config("pft", init=str(root / "pft"))
    assert cfg["init"] == str((root / "pft").resolve()) and cfg["preset"] == PRESET


def test_algorithm_errors(runs, tmp_path):
    pft = str(runs["root"] / "pft")
    with pytest.raises(ValueError) as e:
        train_stage("vit", tmp_path / "a", init=pft, algorithm="smoee", device="cpu")
    assert "unknown MoE algorithm 'smoee'" in _one_line(e) and "Did you mean smoe" in _one_line(e)
    with pytest.raises(ValueError) as e:
        train_stage("vit", tmp_path / "b", init=pft, device="cpu")
    assert "--algorithm" in _one_line(e)
    with pytest.raises(ValueError) as e:
        train_stage("vit", tmp_path / "c", init=pft, algorithm="dense", device="cpu")
    assert "no router" in _one_line(e)
    with pytest.raises(ValueError) as e:
        train_stage("pft", tmp_path / "d", init=str(runs["root"] / "pt"), algorithm="smoe", device="cpu")
    assert "vit stage only" in _one_line(e)
    with pytest.raises(ValueError) as e:
        train_stage("vti", tmp_path / "e", device="cpu")
    assert "Did you mean vit" in _one_line(e)


@pytest.mark.parametrize("as_folder", [False, True])
def test_missing_image_is_one_clear_line(tmp_path, as_folder, env):
    record = {"id": "r1", "image": "images/missing.png",
              "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                {"from": "gpt", "value": "A red square."}]}
    path = tmp_path / ("pt.json" if as_folder else "data.json")
    path.write_text(json.dumps([record]))
    with pytest.raises(FileNotFoundError) as e:
        train_stage("pt", tmp_path / "run", preset=PRESET, data=str(tmp_path if as_folder else path),
                    device="cpu")
    assert "missing.png not found" in _one_line(e) and "'r1'" in _one_line(e)


# -- exact resume --------------------------------------------------------------------------------------------
def test_interrupted_vit_resumes_exactly(runs, tmp_path):
    a = runs["root"] / "vit"
    b = tmp_path / "vit-b"
    shutil.copytree(a, b)
    for ckpt in list_checkpoints(b):  # "interrupted" after step 2's checkpoint
        if int(ckpt.name.split("_")[1]) > 2:
            shutil.rmtree(ckpt)
    for name in ("summary.json", "eval"):
        shutil.rmtree(b / name) if (b / name).is_dir() else (b / name).unlink()
    assert [p.name for p in list_checkpoints(b)] == ["step_1", "step_2"]
    step2 = load_file(str(b / "checkpoints" / "step_2" / MODEL_FILE))
    log: list[str] = []
    train_stage("vit", b, init=str(runs["root"] / "pft"), algorithm="smoe", device="cpu",
                overrides=FAST + ["train.log_every=1"], log=log.append)
    assert any(f"resuming {b} from step 2" in line for line in log)
    assert [p.name for p in list_checkpoints(b)] == [f"step_{s}" for s in range(1, VIT_STEPS + 1)]
    want, got = _final(a), _final(b)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert any(_changed(step2[k], got[k]) for k in got)  # steps 3..5 did train
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # no duplicated rows
    for ra, rb in zip(rows_a, rows_b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["aux_loss"] == pytest.approx(ra["aux_loss"], abs=1e-6)
    # the same config in the same directory continues; another config is refused
    with pytest.raises(ValueError, match="another config"):
        train_stage("vit", b, init=str(runs["root"] / "pft"), algorithm="xmoe", device="cpu",
                    overrides=FAST + ["train.log_every=1"])



def test_sigterm_checkpoints_the_current_vit_step_and_the_rerun_is_exact(runs, tmp_path, monkeypatch):
    """SIGTERM mid-stage: a checkpoint of the current step and Interrupted (not a killed process);
    the same call then continues to the uninterrupted run's weights."""
    import os
    import signal

    from libmoe.errors import Interrupted

    real, calls = vlm_train.make_batch, []

    def make_batch(*args, **kwargs):  # SIGTERM arrives during the third step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    b = tmp_path / "vit"
    args = dict(init=str(runs["root"] / "pft"), algorithm="smoe", device="cpu", overrides=FAST,
                log=lambda _: None)
    monkeypatch.setattr(vlm_train, "make_batch", make_batch)
    with pytest.raises(Interrupted, match="interrupted by SIGTERM at step 3"):
        train_stage("vit", b, **args)
    assert [p.name for p in list_checkpoints(b)] == ["step_1", "step_2", "step_3"]
    assert not (b / "summary.json").exists()
    monkeypatch.setattr(vlm_train, "make_batch", real)
    train_stage("vit", b, **args)
    want, got = _final(runs["root"] / "vit"), _final(b)
    for k in want:
        assert torch.equal(want[k], got[k]), k

# -- the command line ----------------------------------------------------------------------------------------
def test_cli_train_writes_a_run(data, tmp_path, capsys, env):
    out = tmp_path / "cli-pt"
    rc = main(["vlm", "train", "--stage", "pt", "--preset", PRESET, "--data", str(data), "--out", str(out),
               "--max-steps", "2", "--device", "cpu", "train.tensorboard=false", "train.lr=2.0e-3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stage"] == "pt" and summary["steps"] == 2
    cfg = vlm_stages.load_stage_config(out)
    assert cfg["kind"] == "vlm" and cfg["train"]["lr"] == 2e-3 and cfg["train"]["max_steps"] == 2
    assert (out / "checkpoints" / "step_2" / MODEL_FILE).is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()



def test_overwrite_replaces_the_run_and_keeps_the_users_files(data, tmp_path, capsys, env):
    out = tmp_path / "pt"
    args = ["vlm", "train", "--stage", "pt", "--preset", PRESET, "--data", str(data), "--out", str(out),
            "--device", "cpu", "train.tensorboard=false"]
    assert main([*args, "--max-steps", "2"]) == 0
    (out / "my_notes.md").write_text("mine")
    assert main([*args, "--max-steps", "1", "--overwrite"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1"]  # the old run is gone
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / "my_notes.md").read_text() == "mine"

def test_overrides_parse_exponent_floats():
    from libmoe.vlm.presets import apply_overrides

    cfg = apply_overrides({"train": {}, "moe": {"options": {}}},
                          ["train.lr=1e-4", "moe.options.balance_coef=1e-2"])
    assert cfg["train"]["lr"] == 1e-4 and cfg["moe"]["options"]["balance_coef"] == 1e-2


def test_cli_wrong_stage_init_returns_2(runs, tmp_path, capsys):
    rc = main(["vlm", "train", "--stage", "vit", "--init", str(runs["root"] / "pt"), "--algorithm", "smoe",
               "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("libmoe: error:") and "is a pt run" in err[0]


def test_cli_eval_writes_results(runs, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["vlm", "eval", str(runs["root"] / "vit"), "--tasks", "synth_mme,synth_open",
               "--out", str(out), "--limit", "2"])  # 2 questions (one pair) per category
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"synth_mme", "synth_open"}
    mme, open_ = results["synth_mme"], results["synth_open"]
    assert {"acc", "acc_plus", "by_category", "score", "chance", "n"} <= set(mme)
    assert set(mme["by_category"]) == set(SUBTASKS) and mme["n"] == 2 * len(SUBTASKS)
    assert mme["chance"]["acc"] == 0.5 and mme["chance"]["acc_plus"] == 0.25
    for m in mme["by_category"].values():
        assert {"acc", "acc_plus", "score", "n"} <= set(m) and m["n"] == 2
        assert 0 <= m["acc_plus"] <= m["acc"] <= 1
    assert {"acc", "by_category", "n"} <= set(open_) and open_["n"] == 2 * len(SUBTASKS)
    assert "synth_mme: acc" in capsys.readouterr().out
    assert main(["vlm", "eval", str(runs["root"] / "vit"), "--tasks", "synth_mmee"]) == 2
    assert "Did you mean synth_mme" in capsys.readouterr().err


def test_analyze_vlm_run(runs, capsys):
    vit = runs["root"] / "vit"
    assert main(["analyze", str(vit), "--limit", "2"]) == 0
    m = json.loads((vit / "analysis" / "metrics.json").read_text())
    assert m["kind"] == "vlm" and m["algorithm"] == "smoe" and m["step"] == VIT_STEPS
    n_layers = 3
    assert set(m["eae_by_task"]) == {str(i) for i in range(n_layers)}
    for per_task in m["eae_by_task"].values():
        assert set(per_task) == set(SUBTASKS)
    groups = set(SUBTASK_GROUPS.values())
    assert set(m["ewa_by_group"]) == {str(i) for i in range(n_layers)}
    for per_group in m["ewa_by_group"].values():
        assert set(per_group) == groups
    margin = m["router_margin"]
    assert {str(i) for i in range(n_layers)} <= set(margin)
    rates = m["expert_change_rate"]
    assert [(r["from"], r["to"]) for r in rates] == [(s, s + 1) for s in range(1, VIT_STEPS)]
    assert all(0 <= r["mean"] <= 1 for r in rates)
    names = [r["name"] for r in m["droptop"]["runs"]]
    assert names == ["DropTop1", "DropTop1&2"]
    assert "synth_mme/acc" in m["droptop"]["baseline"]
    assert (vit / "analysis" / "figures" / "vlm_subtask_routing.png").is_file()


def test_a_stage_is_reproducible_whatever_ran_before(data, tmp_path, env):
    """Same config, same result: the model's init comes from train.seed, not from the global RNG
    state left by earlier work in the process (e.g. writing the synthetic dataset)."""
    import torch

    losses = []
    for i in range(2):
        torch.rand(1000 * (i + 1))  # a different amount of random numbers drawn before each run
        train_stage("pt", tmp_path / f"pt{i}", preset=PRESET, data=str(data), device="cpu", max_steps=2,
                    overrides=["train.tensorboard=false", "train.log_every=1"], log=lambda _: None)
        rows = [json.loads(line) for line in (tmp_path / f"pt{i}" / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows])
    assert losses[0] == losses[1]
