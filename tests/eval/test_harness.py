"""The ``libmoe`` model of lm-evaluation-harness: registered by installing the project, its three
request types equal to `LMScorer`'s, and one task giving identical scores through both tools."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from libmoe.eval import LMScorer  # noqa: E402
from libmoe.models import load_model  # noqa: E402
from libmoe.train import train  # noqa: E402

EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_installing_registers_the_model_lazily():
    code = ("import sys; from lm_eval.api.registry import get_model; import lm_eval.models; "
            "assert 'libmoe' in sys.modules['lm_eval.api.registry'].model_registry; "
            "assert 'libmoe.eval' not in sys.modules; print(get_model('libmoe').__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "libmoe.eval.harness"


def test_requests_equal_the_scorer(micro_config, tmp_path):
    train(micro_config(steps=2), tmp_path / "run", progress=False)
    lm = get_model("libmoe").create_from_arg_string(f"pretrained={tmp_path / 'run'}",
                                                    {"batch_size": "4", "device": None})
    loaded = load_model(tmp_path / "run")
    scorer = LMScorer(loaded.model, loaded.tokenizer, batch_size=3)
    pairs = [("First Citizen:", " Before we proceed"), ("", " All: Speak, speak."),
             ("MENENIUS: What work's, my countrymen,", " in hand?")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in scorer.loglikelihood(pairs)], abs=1e-5)
    texts = ["First Citizen: You are all resolved rather to die than to famish?"]
    assert lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts])) == \
        pytest.approx(scorer.loglikelihood_rolling(texts), abs=1e-5)
    gen = [("First Citizen:", {"until": ["\n"], "max_gen_toks": 8})]
    assert lm.generate_until(instances("generate_until", gen)) == scorer.generate_until(gen)
    with pytest.raises(ValueError, match="not understood by the libmoe model.*pretrained"):
        get_model("libmoe")(pretrained=str(tmp_path / "run"), temperature=1)


@pytest.mark.skipif(not (EVAL / "piqa.validation.jsonl").is_file(), reason="shared eval data not present")
def test_one_task_scores_identically_in_libmoe_eval_and_lm_eval(micro_config, tmp_path):
    """A task file in the harness's format, read by both tools, on a trained micro model."""
    train(micro_config(steps=4), tmp_path / "run", progress=False)
    with (EVAL / "piqa.validation.jsonl").open() as f:
        records = [next(f) for _ in range(24)]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_piqa.jsonl").write_text("".join(records))
    task_file = tmp_path / "tasks" / "local_piqa.yaml"
    task_file.write_text(
        "task: local_piqa\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tasks' / 'local_piqa.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{goal}}\\nAnswer:\"\n"
        "doc_to_target: label\ndoc_to_choice: \"{{[sol1, sol2]}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    ours = subprocess.run([sys.executable, "-m", "libmoe", "eval", str(tmp_path / "run"), "--tasks",
                           str(task_file), "--out", str(tmp_path / "ours.json")],
                          capture_output=True, text=True)
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "libmoe", "--model_args",
                             f"pretrained={tmp_path / 'run'}", "--tasks", "local_piqa", "--include_path",
                             str(tmp_path / "tasks"), "--batch_size", "16", "--output_path",
                             str(tmp_path / "harness")], capture_output=True, text=True)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    mine = json.loads((tmp_path / "ours.json").read_text())["results"]["local_piqa"]
    (harness_file,) = (tmp_path / "harness").rglob("results_*.json")
    harness = json.loads(harness_file.read_text())["results"]["local_piqa"]
    assert mine["n"] == 24
    assert mine["acc"] == harness["acc,none"] and mine["acc_norm"] == harness["acc_norm,none"]
    assert mine["acc_stderr"] == pytest.approx(harness["acc_stderr,none"])
