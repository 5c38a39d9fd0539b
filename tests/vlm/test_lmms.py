"""libmoe.vlm.lmms: the lmms-eval model `libmoe_vlm` and the local tasks libmoe_synth_mme(_ll).

lmms-eval is not in the [test] extra (0.7.3 requires ruff>=0.16.4, which [test]'s ruff pin
excludes): these tests run where it is installed (docs/vlm.md, section lmms-eval) and skip elsewhere.
The command-line test is judged by the results file, since lmms-eval exits 0 when a task fails.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from libmoe.vlm import lmms  # noqa: E402
from libmoe.vlm.data import load_image, load_mme  # noqa: E402
from libmoe.vlm.evaluate import answer_logprobs, greedy_answers, score_mme  # noqa: E402
from libmoe.vlm.synth import write_synth_dataset  # noqa: E402
from libmoe.vlm.train import train_stage  # noqa: E402

LIMIT = 24  # questions the command-line run evaluates: the first 24, six categories of 2 images x 2
MAX_NEW = 8  # libmoe_synth_mme.yaml's max_new_tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset folder, run): a cpu-smoke PFT run (a few seconds) trained on a small synthetic set."""
    root = tmp_path_factory.mktemp("lmms")
    data = root / "synth"
    write_synth_dataset(data, n_per_task=12, n_test_per_task=2, image_size=32, log=None)
    run = root / "run"
    train_stage("pft", run, preset="cpu-smoke", data=str(data), device="cpu", log=lambda _: None)
    return data, run


@pytest.fixture(scope="module")
def adapter(trained):
    return lmms.LibMoEVLMLmms(pretrained=str(trained[1]), device="cpu", batch_size=5)


def _visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def _requests(adapter, rows, kind, second):
    """Instances as lmms-eval builds them: (context, second, doc_to_visual, doc_id, task, split), with
    `second` the continuation (loglikelihood) or the generation kwargs; second(doc) when callable."""
    adapter.task_dict = {"t": {"test": rows}}
    return [Instance(request_type=kind, arguments=(r["question"], second, _visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, r in enumerate(rows)]


def test_tasks_path_and_cli(capsys):
    from libmoe.cli import main

    folder = lmms.tasks_path()
    names = {p.name for p in folder.iterdir()}
    want = {"libmoe_synth_mme.yaml", "libmoe_synth_mme_ll.yaml", "_default_template_yaml", "utils.py"}
    assert want <= names
    main(["vlm", "lmms-tasks-path"])
    assert capsys.readouterr().out.strip() == str(folder)


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("libmoe_vlm") is lmms.LibMoEVLMLmms, (
        "the lmms_eval.models entry point is missing: reinstall libmoe (pip install -e .)")


def test_image_tensor_is_load_image(trained):
    path = sorted((trained[0] / "images" / "test").glob("*.png"))[0]
    with Image.open(path) as im:
        assert torch.equal(lmms.image_tensor(im, 48), load_image(path, 48))


def test_loglikelihood_is_the_summed_logprob(trained, adapter):
    rows = load_mme(trained[0])[:6]
    ref = answer_logprobs(adapter.model, adapter.tokenizer, adapter.template, rows, ["Yes", "No"])
    for j, answer in enumerate(["Yes", " No"]):  # lmms-eval's multiple_choice prefixes " "
        out = adapter.loglikelihood(_requests(adapter, rows, "loglikelihood", answer))
        lls = torch.tensor([ll for ll, _ in out])
        assert (lls < 0).all(), "a log-likelihood, not a loss"
        assert torch.allclose(lls, ref[:, j], atol=1e-5)
        assert all(isinstance(g, bool) for _, g in out)
    # the `loglikelihood` output type passes the task's doc_to_target, a callable
    out = adapter.loglikelihood(_requests(adapter, rows, "loglikelihood", lambda doc: doc["answer"]))
    want = [ref[i, 0 if r["answer"] == "Yes" else 1] for i, r in enumerate(rows)]
    assert torch.allclose(torch.tensor([ll for ll, _ in out]), torch.tensor(want), atol=1e-5)
    # acc_mutual_info's unconditional requests are bare (context, continuation) pairs, with no image
    (ll, greedy), = adapter.loglikelihood([Instance("loglikelihood", ("", " Yes"), 0,
                                                    metadata={"task": "t", "doc_id": 0, "repeats": 1})])
    assert np.isfinite(ll) and ll < 0 and isinstance(greedy, bool)


def test_generate_until_is_greedy_and_honours_until(trained, adapter):
    rows = load_mme(trained[0])[:7]

    def gen(kwargs):
        return adapter.generate_until(_requests(adapter, rows, "generate_until", kwargs))

    ref = greedy_answers(adapter.model, adapter.tokenizer, adapter.template, rows, max_new_tokens=4)
    assert gen({"max_new_tokens": 4, "until": ["\n\n"], "do_sample": False}) == ref
    ref1 = greedy_answers(adapter.model, adapter.tokenizer, adapter.template, rows, max_new_tokens=1)
    assert gen({"max_new_tokens": 1}) == ref1
    # `until`: cut at the first occurrence (here: the first word the model produced)
    words = [a.split()[1] for a in ref if len(a.split()) > 1]
    if words:
        stop = words[0]
        want = [a[: a.find(stop)] if stop in a else a for a in ref]
        assert gen({"max_new_tokens": 4, "until": stop}) == want
    with pytest.raises(NotImplementedError, match="multi-round"):
        adapter.generate_until_multi_round([])


def _task_utils():
    spec = importlib.util.spec_from_file_location("libmoe_lmms_task_utils", lmms.tasks_path() / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _aggregate(utils, payloads: list[dict]) -> dict:
    """Run lmms-eval's part by hand: per metric, the aggregation over the values process_results gave."""
    by_metric: dict[str, list] = {}
    for p in payloads:
        for k, v in p.items():
            by_metric.setdefault(k, []).append(v)
    return {k: getattr(utils, f"aggregate_{k}")(v) for k, v in by_metric.items()}


def test_task_metrics_are_score_mme(trained):
    utils = _task_utils()
    rows = load_mme(trained[0])
    texts = ["Yes.", "no", "maybe", "Y", "yes, it is", "No"] * (len(rows) // 6 + 1)
    got = _aggregate(utils, [utils.process_results(r, [t]) for r, t in zip(rows, texts)])
    ref = score_mme(rows, [utils.parse_yes_no(t) for t in texts[: len(rows)]])
    assert [utils.parse_yes_no(t) for t in texts[:6]] == ["Yes", "No", "other", "Yes", "Yes", "No"]
    assert got["acc"] == ref["acc"] and got["acc_plus"] == ref["acc_plus"] and got["score"] == ref["score"]
    for cat, m in ref["by_category"].items():
        assert got[f"{cat}_acc"] == m["acc"] and got[f"{cat}_acc_plus"] == m["acc_plus"]
    # the log-likelihood variant: the higher of (Yes, No), as (ll, is_greedy) or as the strings
    # lmms-eval 0.7.3 makes of them without libmoe_vlm's patch
    doc = rows[0]
    assert utils.process_results_ll(doc, [(-1.0, True), (-2.0, False)])["acc"]["pred"] == "Yes"
    assert utils.process_results_ll(doc, ["(-3.0, False)", "(-2.0, True)"])["acc"]["pred"] == "No"


def test_synth_dir_resolution(trained, monkeypatch, tmp_path):
    monkeypatch.setenv(lmms.SYNTH_ENV, str(trained[0]))
    assert lmms.synth_dir() == trained[0]
    monkeypatch.setenv(lmms.SYNTH_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mme.json"):
        lmms.synth_dir()
    monkeypatch.delenv(lmms.SYNTH_ENV)
    monkeypatch.setattr(lmms, "_run_data", {"source": str(trained[0]), "file": "instruct.json"})
    assert lmms.synth_dir() == trained[0]  # the evaluated run's own dataset folder


def test_launcher_exits_1_when_lmms_eval_swallows_an_error(monkeypatch):
    import lmms_eval.__main__ as lmms_main

    def broken(*args, **kwargs):
        raise RuntimeError("task index failed")

    monkeypatch.setattr(lmms_main, "TaskManager", broken)  # raised inside lmms-eval's try/except
    args = ["--model", "libmoe_vlm", "--model_args", "pretrained=x", "--tasks", "libmoe_synth_mme"]
    assert lmms.main(args) == 1


def test_lmms_eval_command_line(trained, tmp_path):
    """`python -m lmms_eval --model libmoe_vlm ...` offline, judged by its results and samples files."""
    data, run = trained
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != lmms.SYNTH_ENV}  # the run's own dataset folder
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               LMMS_EVAL_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "libmoe_vlm",
           "--model_args", f"pretrained={run},device=cpu,batch_size=8",
           "--tasks", "libmoe_synth_mme,libmoe_synth_mme_ll", "--include_path", str(lmms.tasks_path()),
           "--output_path", str(out), "--limit", str(LIMIT), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    files = glob.glob(str(out / "*" / "*_results.json"))
    log = f"exit status {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert files, f"no results file ({log})"
    with open(files[0]) as f:
        results = json.load(f)["results"]

    adapter = lmms.LibMoEVLMLmms(pretrained=str(run), device="cpu")
    model, tokenizer, template = adapter.model, adapter.tokenizer, adapter.template
    rows = load_mme(data)[:LIMIT]
    utils = _task_utils()
    texts = greedy_answers(model, tokenizer, template, rows, max_new_tokens=MAX_NEW)
    lls = answer_logprobs(model, tokenizer, template, rows, ["Yes", "No"])
    expected = {
        "libmoe_synth_mme": score_mme(rows, [utils.parse_yes_no(t) for t in texts]),
        "libmoe_synth_mme_ll": score_mme(rows, ["Yes" if a >= b else "No" for a, b in lls.tolist()]),
    }
    for task, ref in expected.items():
        got = results[task]
        for key in ("acc", "acc_plus", "score"):
            assert got[f"{key},none"] == pytest.approx(ref[key]), (task, key)
        assert len(ref["by_category"]) == 6
        for cat, m in ref["by_category"].items():
            assert got[f"{cat}_acc,none"] == pytest.approx(m["acc"])
            assert got[f"{cat}_acc_plus,none"] == pytest.approx(m["acc_plus"])

    # per question: the same generations and log-likelihoods as libmoe.vlm.evaluate
    def samples(task):
        (path,) = glob.glob(str(out / "*" / f"*_samples_{task}.jsonl"))
        return sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])

    gen = samples("libmoe_synth_mme")
    assert [s["input"] for s in gen] == [r["question"] for r in rows]
    assert [str(s["filtered_resps"]).strip() for s in gen] == [t.strip() for t in texts]
    ll = samples("libmoe_synth_mme_ll")
    got_ll = torch.tensor([[float(x[0]) for x in s["filtered_resps"]] for s in ll])
    assert torch.allclose(got_ll, lls, atol=1e-4)
