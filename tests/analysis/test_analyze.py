"""`libmoe analyze` end to end on tiny trained runs (libmoe.analysis.analyze, init_std, the CLI)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from libmoe.analysis import Trace, analyze_run, list_traces
from libmoe.analysis import metrics as M
from libmoe.train import resolve_config, train

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHAKESPEARE, EVAL_DIR = DATA / "tinyshakespeare.txt", DATA / "eval"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data not present")


def config(cache, algorithm, steps=8):
    return resolve_config(overrides=[
        f"data.source={SHAKESPEARE}", f"data.cache_dir={cache}", f"model.algorithm={algorithm}",
        f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4",
        "train.eval_tokens=2048", "train.tensorboard=false", "train.keep_checkpoints=1",
        "data.probe_tokens=512"], preset="micro")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("analyze")
    for algo in ("smoe", "dense"):
        train(config(data_cache, algo), root / algo, progress=False)
    return root


def cli(*args):
    return subprocess.run([sys.executable, "-m", "libmoe", *args], capture_output=True, text=True)


def test_metrics_follow_from_the_runs_traces_and_interventions_from_its_validation(runs, tmp_path):
    run = runs / "smoe"
    result = analyze_run(run, tmp_path / "a", figures=False)
    traces = [Trace.load(p) for _, p in list_traces(run)]
    assert [t.step for t in traces] == [4, 8]  # step 4's trace survived the checkpoint's pruning
    final = traces[-1]
    assert result["step"] == 8 and result["algorithm"] == "smoe" and result["n_tokens"] == final.n_tokens
    assert result["eae"] == M.eae(final) and result["router_margin"] == M.router_margin(final)
    assert result["ewa_by_domain"] == M.by_label(final, M.ewa)
    assert list(result["eae_by_domain"]["0"]) == ["tinyshakespeare"]
    assert result["expert_change_rate"] == [M.expert_change_rate(traces[0], final)]
    assert [s["step"] for s in result["router_saturation"]] == [4, 8]
    assert result["router_saturation"][-1]["topk"] == 1.0 and result["router_saturation"][-1]["top1"] == 1.0
    assert [c["step"] for c in result["coactivation"]] == [4, 8]
    assert set(result["load"]) == {"0", "1"} and sum(result["load"]["0"]["fraction"]) == pytest.approx(1)
    assert set(result["expert_similarity"]) == {"0", "1"}
    # the unperturbed val_ppl is the run's own logged val_ppl; deltas are perturbed minus baseline
    summary = json.loads((run / "train_summary.json").read_text())
    base = result["droptop"]["baseline"]["val_ppl"]
    assert base == pytest.approx(summary["val_ppl"], rel=1e-4) and result["val_ppl"] == base
    assert [r["name"] for r in result["droptop"]["runs"]] == ["DropTop1", "DropTop1&2"]
    for r in result["droptop"]["runs"] + result["temperature"]["runs"]:
        assert r["delta"]["val_ppl"] == pytest.approx(r["metrics"]["val_ppl"] - base)
    assert [r["tau"] for r in result["temperature"]["runs"]] == [0.1, 1.0, 10.0]
    assert result["temperature"]["runs"][1]["delta"]["val_ppl"] == 0.0
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["eae"] == pytest.approx(result["eae"])



def test_an_analysis_carries_its_runs_identity_and_is_reused_only_for_that_run(runs, tmp_path):
    from libmoe.analysis import load_analysis

    run = tmp_path / "smoe"
    shutil.copytree(runs / "smoe", run)
    result = analyze_run(run, run / "analysis", figures=False, interventions=False)
    checkpoint = json.loads((run / "checkpoints" / "step_8" / "checkpoint.json").read_text())
    assert result["run_hash"] == checkpoint["run_hash"] and len(result["run_hash"]) == 16
    assert load_analysis(run)["run_hash"] == result["run_hash"]
    written = json.loads((run / "analysis" / "metrics.json").read_text())
    written["run_hash"] = "0" * 16  # an analysis left by another run in this directory
    (run / "analysis" / "metrics.json").write_text(json.dumps(written))
    assert load_analysis(run) is None  # recomputed, never reused for the wrong run

def test_a_final_model_without_a_trace_gets_one_recorded_from_its_probe_set(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs / "smoe", run)
    original = Trace.load(run / "checkpoints" / "step_8")
    for f in (run / "checkpoints" / "step_8").glob("routing_trace.*"):
        f.unlink()
    result = analyze_run(run, tmp_path / "a", figures=False, interventions=False)
    assert result["eae"] == M.eae(original) and result["skipped"]["interventions"]
    assert [s["step"] for s in result["router_saturation"]] == [4, 8]


def test_without_trace_or_probe_data_the_tasks_routing_is_analysed(runs, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(runs / "smoe", run)
    ckpt = run / "checkpoints" / "step_8"
    for f in ckpt.glob("routing_trace.*"):
        f.unlink()
    config = ckpt / "config.yaml"
    config.write_text(config.read_text().replace(str(SHAKESPEARE), str(tmp_path / "gone.txt")))
    with pytest.raises(FileNotFoundError, match="--tasks"):
        analyze_run(run, tmp_path / "a", figures=False)
    result = analyze_run(run, tmp_path / "a", tasks=["piqa"], data_dir=EVAL_DIR, limit=3, figures=False)
    task_trace = Trace.load(tmp_path / "a" / "task_trace")
    assert result["eae"] == M.eae(task_trace) and result["n_tokens"] == task_trace.n_tokens
    assert "val_ppl" in result["skipped"] and "piqa/acc" in result["droptop"]["baseline"]
    assert "val_ppl" not in result["droptop"]["baseline"]


def test_routing_by_task_and_task_metrics_under_interventions(runs, tmp_path):
    result = analyze_run(runs / "smoe", tmp_path / "a", tasks=["piqa"], data_dir=EVAL_DIR, limit=3,
                         figures=False)
    assert set(result["eae_by_task"]["0"]) == {"piqa"} and set(result["ewa_by_task"]["1"]) == {"piqa"}
    task_trace = Trace.load(tmp_path / "a" / "task_trace")
    assert task_trace.labels == ["piqa"] and task_trace.meta["label_kind"] == "task"
    assert result["eae_by_task"]["0"]["piqa"] == M.eae(task_trace)["0"]
    assert {"val_ppl", "piqa/acc", "piqa/acc_norm"} <= set(result["droptop"]["baseline"])


def test_task_trace_records_each_documents_gold_request(runs, tmp_path):
    from libmoe.analysis.lm import record_task_trace
    from libmoe.eval.scoring import LMScorer
    from libmoe.models import load_model

    rows = [{"sentence": "Ann helped Bo because _ was kind.", "option1": "Ann", "option2": "Bo",
             "answer": "2"},
            {"sentence": "The cup fell off the table because _ was round.", "option1": "cup",
             "option2": "table", "answer": "1"}]
    (tmp_path / "winogrande.validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_model(runs / "smoe")
    trace = record_task_trace(loaded, ["winogrande"], tmp_path)
    scorer = LMScorer(loaded.model, loaded.tokenizer)
    gold = [("Ann helped Bo because Bo", " was kind."),
            ("The cup fell off the table because cup", " was round.")]
    expected = [scorer.encode_pair(c, x) for c, x in gold]
    ids = [ctx + cont for ctx, cont in expected]
    ids.sort(key=len, reverse=True)  # recorded longest first, padding left out
    assert torch.equal(trace.tokens, torch.tensor([t for row in ids for t in row]))
    assert torch.equal(trace.position, torch.tensor([p for row in ids for p in range(len(row))]))
    assert trace.labels == ["winogrande"] and trace.n_layers == 2


def test_dense_runs_are_analysed_without_routing(runs, tmp_path):
    result = analyze_run(runs / "dense", tmp_path / "d", figures=False)
    assert "routing" in result["skipped"] and "eae" not in result
    summary = json.loads((runs / "dense" / "train_summary.json").read_text())
    assert result["val_ppl"] == pytest.approx(summary["val_ppl"], rel=1e-4)  # for the comparison table
    assert (tmp_path / "d" / "metrics.json").is_file()


def test_cli_writes_metrics_figures_and_a_comparison_report(runs, tmp_path):
    out = tmp_path / "cmp"
    done = cli("analyze", str(runs / "smoe"), "--compare", str(runs / "dense"), "--no-interventions",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eae", "eae_by_domain", "ewa", "router_margin", "expert_change_rate", "router_saturation",
                "coactivation", "expert_similarity", "load"):
        assert metrics[key], key
    assert set(metrics["expert_change_rate"][0]) >= {"from", "to", "by_layer", "mean"}
    assert set(metrics["router_saturation"][0]) >= {"step", "top1", "topk"}
    report = (out / "report.html").read_text()
    assert "smoe" in report and "dense" in report and "data:image/png;base64," in report
    assert (out / "figures" / "change_rate.png").is_file()
    assert (runs / "dense" / "analysis" / "metrics.json").is_file()  # the compared run's own analysis
    again = cli("analyze", str(runs / "smoe"), "--compare", str(runs / "dense"), "--no-interventions",
                "--out", str(out))
    assert again.returncode == 0 and "using" in again.stderr  # reused, not recomputed


def test_cli_errors_are_one_line(runs, tmp_path):
    missing = cli("analyze", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli("analyze", str(runs / "smoe"), "--init-std", str(tmp_path))
    assert bad.returncode == 2 and "init_std.json" in bad.stderr


def test_init_std_study_trains_each_std_and_summarises_early_balance(data_cache, tmp_path):
    out = tmp_path / "study"
    args = ["analyze", "init-std", "--steps", "6", "--stds", "0.02,0.06", "--early-steps", "3",
            "--data", str(SHAKESPEARE), "--out", str(out), f"data.cache_dir={data_cache}",
            "train.eval_tokens=2048", "train.tensorboard=false"]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    study = json.loads((out / "init_std.json").read_text())
    assert study["stds"] == [0.02, 0.06] and study["early_steps"] == 3
    for key in ("0.02", "0.06"):
        rows = [json.loads(x) for x in (out / f"std_{key}" / "metrics.jsonl").read_text().splitlines()]
        balance = [r["aux_balance"] for r in rows if "aux_balance" in r]
        assert study["curves"][key]["balance"] == balance and len(balance) == 6
        assert study["early_balance"][key] == pytest.approx(sum(balance[:3]) / 3)
        cfg = (out / f"std_{key}" / "config.yaml").read_text()
        assert f"router_init_std: {key}" in cfg
    # the two runs differ only in their router init: same data order, different balance curves
    assert study["curves"]["0.02"]["balance"] != study["curves"]["0.06"]["balance"]
    assert (out / "figures" / "init_std.png").is_file() and (out / "report.html").is_file()
    again = cli(*args)
    assert again.returncode == 0 and again.stderr.count("reusing") == 2
