"""The VLM learning test (issues 9 and 22): cpu-tiny from random initialisation, stage pft without
--init, on two easy subtasks (colour, texture) for the preset's 300 steps, learns what it is asked:

- held-out yes/no questions (synth_mme: "Is the triangle blue? Please answer yes or no.", one yes
  and one no question per test image) at >= 85% overall and >= 75% per subtask (chance 0.5);
- held-out open questions ("What colour is the triangle?", "What texture is shown?") at >= 85%
  overall and >= 60% per subtask (chance 1/6 and 1/3).

Measured on the 2-core CPU (train.seed 0, 1, 2): yes/no 1.00 / 0.995 / 1.00 (colour 1.00 / 0.99 /
1.00, texture 1.00), open 1.00 / 1.00 / 1.00. The test takes 12 s on one thread (it sets one: two
threads on the shared 2-core VM took 138 s).

Why yes/no stayed at chance before (0.50-0.57 after 300 steps in every variant tried: single- and
multi-turn records, lr 1e-3 to 3e-3, batch 32 to 128, a 4-layer or d 128 LM, 64 px images with 64
image tokens, 1000 steps), and what changed: the LM's init. transformers initialises Qwen2 with
N(0, 0.02), a scale sized for d >= 768; at cpu-tiny's d 64 the word embeddings have norm 0.16
beside image features of norm 3.1, so after the first attention layer a question's word ("blue") is
drowned in the image tokens it attended to. Open questions need only the image, so they were
learned; a yes/no answer is a comparison of the word with the image (neither alone predicts it:
every colour word is asked as often with "yes" as with "no"), and the model never found it (log
odds of yes/no within 0.001 of each other after 1000 steps, on the training set too). With
`initializer_range: 0.125` (= d^-1/2, embedding norm 1) the same preset reaches 0.97-1.00 in 300
steps; 0.05 still fails, 0.1 passes on two seeds of three (0.76 on the third), 0.2 passes too.
docs/vlm.md "Presets" has the numbers."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from libmoe.vlm.presets import load_vlm_preset  # noqa: E402
from libmoe.vlm.synth import write_synth_dataset  # noqa: E402
from libmoe.vlm.train import train_stage  # noqa: E402

SUBTASKS = ["colour", "texture"]


@pytest.fixture
def one_thread():
    """One torch thread while the test trains: cpu-tiny's matrices are too small for a second one to
    pay for itself, and with other work on the cores two threads made this test 12x slower (138 s
    against 11.6 s, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cpu_tiny_learns_colour_and_texture(tmp_path, monkeypatch, record_property, one_thread):
    monkeypatch.setenv("LIBMOE_CACHE", str(tmp_path / "cache"))
    preset = load_vlm_preset("cpu-tiny")
    d = preset["data"]
    # the preset's synthetic data (same seed, sizes, images and record format), for the two subtasks only
    write_synth_dataset(tmp_path / "data", subtasks=SUBTASKS, n_per_task=d["n_per_task"],
                        n_test_per_task=d["n_test_per_task"], image_size=d["image_size"],
                        multi_turn=d["multi_turn"], log=None)
    assert preset["stages"]["pft"]["max_steps"] == 300
    summary = train_stage("pft", tmp_path / "run", preset="cpu-tiny", data=str(tmp_path / "data"),
                          overrides=["data.subtasks=[colour, texture]", "train.tensorboard=false"],
                          device="cpu", log=lambda _: None)
    assert summary["steps"] == 300
    from libmoe.vlm.evaluate import evaluate_run

    payload = evaluate_run(tmp_path / "run", ["synth_open", "synth_mme"], data=tmp_path / "data",
                           out=tmp_path / "eval.json", log=lambda _: None)
    results = payload["results"]
    assert set(results["synth_open"]["by_category"]) == set(SUBTASKS)
    assert results["synth_open"]["n"] == 2 * d["n_test_per_task"]
    assert results["synth_open"]["acc"] >= 0.85, results["synth_open"]  # measured 1.00
    for category, metrics in results["synth_open"]["by_category"].items():
        assert metrics["acc"] >= 0.6, (category, metrics)  # chance: 1/6 (colour), 1/3 (texture)
    mme = results["synth_mme"]
    record_property("synth_mme_acc", mme["acc"])
    assert mme["n"] == 2 * 2 * d["n_test_per_task"]
    assert set(mme["by_category"]) == set(SUBTASKS)
    assert mme["acc"] >= 0.85, mme  # the criterion; measured 0.995-1.00
    for category, metrics in mme["by_category"].items():
        assert metrics["acc"] >= 0.75, (category, metrics)  # chance 0.5
    assert summary["synth_mme"]["acc"] == mme["acc"]  # the stage's own end-of-run evaluation agrees
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == results
