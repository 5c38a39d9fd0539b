"""Issue 19, the read side: every loader (eval, analyze, upcycle, export, findings, eval-table)
answers a damaged file with one line naming it and the way out; eval results accumulate per
task; arguments (--limit, --out, --device, tasks) are checked before any work; analyze refuses
traces of different runs. One tiny micro run is trained per module and copied per test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from libmoe.cli import main
from libmoe.devices import check_device
from libmoe.eval.table import read_results

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
EVAL_DIR = SHAKESPEARE.parent / "eval"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """A 4-step micro run with checkpoints (and traces) at steps 2 and 4."""
    if not SHAKESPEARE.is_file() or not (EVAL_DIR / "piqa.validation.jsonl").is_file():
        pytest.skip("../shared/data (tinyshakespeare.txt, eval/) not present")
    from libmoe.train import resolve_config, train

    cfg = resolve_config(overrides=[f"data.source={SHAKESPEARE}", f"data.cache_dir={data_cache}",
                                    "train.max_steps=4", "train.log_every=2", "train.eval_every=4",
                                    "train.checkpoint_every=2", "train.eval_tokens=1024",
                                    "train.tensorboard=false"], preset="micro")
    out = tmp_path_factory.mktemp("trained") / "run"
    train(cfg, out)
    return out


@pytest.fixture
def run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libmoe.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def one_line(err: str, *needles: str) -> str:
    """The single error line of a refusal, checked to be clean and to contain `needles`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("libmoe: error: "), err
    assert "Traceback" not in err and "weights_only" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def call(capsys, *args: str) -> tuple[int, str]:
    """`libmoe ARGS` in this process: (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def truncate(path: Path, keep: int = 3000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- corrupt files: one line naming the file and the way out ---------------------------------------------


def test_truncated_weights_one_line_from_every_loader(run, tmp_path, capsys):
    weights = run / "checkpoints" / "step_4" / "model.safetensors"
    truncate(weights)
    before = files_under(run)
    result = cli("eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "2")
    assert result.returncode == 2
    line = one_line(result.stderr, str(weights), "damaged")
    assert str(run / "checkpoints" / "step_2") in line  # the way out: the earlier, intact checkpoint
    for args in (["analyze", run, "--no-interventions"],
                 ["export", run, "--out", tmp_path / "exported"],
                 ["upcycle", run, "--algorithm", "smoe", "--n-experts", "2", "--top-k", "1",
                  "--out", tmp_path / "upcycled"]):
        code, err = call(capsys, *args)
        assert code == 2, args
        one_line(err, str(weights), "use an earlier checkpoint")
    assert files_under(run) == before  # nothing written into the run
    assert not (tmp_path / "exported").exists() and not (tmp_path / "upcycled").exists()


def test_weights_that_fail_their_checksum_are_refused(run, capsys):
    ckpt = run / "checkpoints" / "step_4"
    if "model.safetensors" not in (json.loads((ckpt / "checkpoint.json").read_text()).get("files") or {}):
        pytest.skip("this training writes no checksums")
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in a weight: the file still parses
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    code, err = call(capsys, "eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "2")
    assert code == 2
    one_line(err, "model.safetensors", "checksum")


def test_damaged_config_checkpoint_json_and_tokenizer(run, capsys):
    ckpt = run / "checkpoints" / "step_4"
    args = ["eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "2"]
    for name, text in (("config.yaml", "model: [\n"), ("config.yaml", "- just\n- a list\n"),
                       ("checkpoint.json", "{\"step\": 4")):
        saved = (ckpt / name).read_bytes()
        (ckpt / name).write_text(text)
        code, err = call(capsys, *args)
        assert code == 2, name
        one_line(err, str(ckpt / name), "damaged")
        (ckpt / name).write_bytes(saved)
    truncate(run / "tokenizer" / "tokenizer.model")
    result = cli(*args)
    assert result.returncode == 2
    one_line(result.stderr, str(run / "tokenizer" / "tokenizer.model"), "SentencePiece", "data.cache_dir")
    assert not (run / "eval").exists()


def test_damaged_transformers_directory(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    exported = tmp_path / "exported"
    assert call(capsys, "export", run, "--out", exported)[0] == 0
    (exported / "config.yaml").unlink()  # now read as a transformers directory, as from the Hub
    args = ["eval", exported, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "2"]
    damages = (("config.json", "{\"model_type\": "), ("tokenizer.json", "[1"), ("model.safetensors", None))
    for name, damage in damages:
        saved = (exported / name).read_bytes()
        if damage is None:
            truncate(exported / name)
        else:
            (exported / name).write_text(damage)
        code, err = call(capsys, *args)
        assert code == 2, name
        one_line(err, str(exported / name), "damaged", "again")
        (exported / name).write_bytes(saved)
    assert not (exported / "eval").exists()


def test_damaged_routing_traces(run, capsys):
    trace = run / "checkpoints" / "step_2"
    (trace / "routing_trace.json").write_text("not json")
    result = cli("analyze", run, "--no-interventions")
    assert result.returncode == 2
    one_line(result.stderr, str(trace / "routing_trace.json"), "damaged", "move")
    (trace / "routing_trace.json").write_text((run / "checkpoints" / "step_4" / "routing_trace.json")
                                              .read_text())
    truncate(trace / "routing_trace.safetensors", 100)
    code, err = call(capsys, "analyze", run, "--no-interventions")
    assert code == 2
    one_line(err, str(trace / "routing_trace.safetensors"), "damaged")
    assert not (run / "analysis").exists()


def test_damaged_task_file(run, tmp_path, capsys):
    data = tmp_path / "tasks"
    data.mkdir()
    good = '{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}'
    (data / "piqa.validation.jsonl").write_text(good + '\n{"goal\n')
    code, err = call(capsys, "eval", run, "--tasks", "piqa", "--data-dir", data)
    assert code == 2
    one_line(err, str(data / "piqa.validation.jsonl"), "line 2")
    (data / "piqa.validation.jsonl").write_text('{"question": "a"}\n')  # another dataset's schema
    code, err = call(capsys, "eval", run, "--tasks", "piqa", "--data-dir", data)
    assert code == 2
    one_line(err, "piqa", "fields")


def test_findings_on_results_it_cannot_use(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    for text in ("{}", "[1, 2]", "{\"runs\": ", "{\"runs\": []}"):
        (bench / "results.json").write_text(text)
        result = cli("findings", bench) if text == "{}" else None
        code, err = (result.returncode, result.stderr) if result else call(capsys, "findings", bench)
        assert code == 2, text
        one_line(err, str(bench / "results.json"))
        assert (bench / "results.json").read_text() == text  # nothing rewritten
        assert sorted(p.name for p in bench.iterdir()) == ["results.json"]


def test_findings_only_unknown_ids_near_match(tmp_path, capsys):
    code, err = call(capsys, "findings", tmp_path, "--only", "a_moe")  # checked before any file is read
    assert code == 2
    one_line(err, "unknown finding 'a_moe'", "Did you mean a_moe_beats_dense?")
    code, err = call(capsys, "findings", tmp_path, "--only", "")
    assert code == 2
    one_line(err, "no finding ids")


def test_eval_table_refuses_files_it_cannot_read(tmp_path, capsys):
    path = tmp_path / "results.json"
    for text, needle in (("not json", "damaged"), ("[1]", "no \"results\" mapping"),
                         ('{"results": {"piqa": 0.5}}', "not a mapping of metrics")):
        path.write_text(text)
        code, err = call(capsys, "eval-table", path)
        assert code == 2, text
        one_line(err, str(path), needle)


# ---- evaluation results accumulate per task --------------------------------------------------------------


def test_eval_results_accumulate_per_task(run, capsys):
    out = run / "eval" / "results.json"
    assert call(capsys, "eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "3")[0] == 0
    first = json.loads(out.read_text())
    code, err = call(capsys, "eval", run / "checkpoints" / "step_2", "--tasks", "arc_easy", "--data-dir",
                     EVAL_DIR, "--limit", "2", "--out", out)
    assert code == 0 and "kept the earlier results of piqa" in err
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"piqa", "arc_easy"}
    assert saved["results"]["piqa"] == first["results"]["piqa"]  # the earlier task is kept as it was
    for task, step in (("piqa", 4), ("arc_easy", 2)):
        entry = saved["evaluated"][task]
        assert entry["step"] == step and entry["checkpoint"].endswith(f"step_{step}")
        assert entry["time"].endswith("Z") and entry["time"][:4].isdigit()
        assert entry["libmoe_version"] and entry["libmoe_version"] != "unknown"
    assert saved["evaluated"]["arc_easy"]["limit"] == 2
    # evaluating a task again replaces only its entry
    assert call(capsys, "eval", run, "--tasks", "arc_easy", "--data-dir", EVAL_DIR, "--limit", "3")[0] == 0
    again = json.loads(out.read_text())
    assert again["results"]["arc_easy"]["n"] == 3 and again["evaluated"]["arc_easy"]["step"] == 4
    assert again["results"]["piqa"] == first["results"]["piqa"]
    assert again["evaluated"]["piqa"] == saved["evaluated"]["piqa"]
    # the readers of the format still read it
    name, results = read_results(out)
    assert name == "run" and set(results) == {"piqa", "arc_easy"}


def test_eval_keeps_a_legacy_results_file_and_refuses_others(run, tmp_path, capsys):
    out = tmp_path / "results.json"
    legacy = {"results": {"hellaswag": {"acc": 0.25, "n": 4}},
              "config": {"model": str(run), "step": 2, "libmoe_version": "0.0.9"}}
    out.write_text(json.dumps(legacy))
    args = ["eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "2", "--out", out]
    assert call(capsys, *args)[0] == 0
    saved = json.loads(out.read_text())
    assert saved["results"]["hellaswag"] == legacy["results"]["hellaswag"]
    assert saved["evaluated"]["hellaswag"]["step"] == 2 and saved["evaluated"]["hellaswag"]["time"] is None
    for text, needle in (("{\"results\": ", "damaged"),
                         ('{"results": {"piqa": {"acc,none": 0.5}}, "config": {"model": "hf"}}',
                          "not written by `libmoe eval`")):
        out.write_text(text)
        code, err = call(capsys, *args)
        assert code == 2
        one_line(err, str(out), needle, "--out")
        assert out.read_text() == text  # never silently replaced


# ---- arguments are checked before any work ---------------------------------------------------------------


def test_limit_batch_size_and_val_tokens_are_checked_first(run, capsys):
    truncate(run / "checkpoints" / "step_4" / "model.safetensors")  # loading would fail: it must not start
    for extra, needle in ((["--limit", "0"], "--limit 0"), (["--limit", "-1"], "--limit -1"),
                          (["--batch-size", "0"], "--batch-size 0"), (["--val-tokens", "0"], "--val-tokens")):
        for command in (["eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR],
                        ["analyze", run, "--no-interventions"]):
            code, err = call(capsys, *command, *extra)
            assert code == 2, (command, extra)
            one_line(err, needle)
    code, err = call(capsys, "eval", run, "--tasks", "piqq", "--data-dir", EVAL_DIR)
    assert code == 2
    one_line(err, "piqq", "Did you mean piqa")
    code, err = call(capsys, "analyze", run, "--tasks", "piqq")
    assert code == 2
    one_line(err, "piqq")
    assert not (run / "eval").exists() and not (run / "analysis").exists()


def test_eval_out_directory_means_results_json_inside(run, tmp_path, capsys):
    outdir = tmp_path / "evals"
    outdir.mkdir()
    assert call(capsys, "eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--limit", "2",
                "--out", outdir)[0] == 0
    assert set(json.loads((outdir / "results.json").read_text())["results"]) == {"piqa"}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    truncate(run / "checkpoints" / "step_4" / "model.safetensors")  # refused before loading
    code, err = call(capsys, "eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--out",
                     blocker / "results.json")
    assert code == 2
    one_line(err, str(blocker), "is a file")
    code, err = call(capsys, "analyze", run, "--no-interventions", "--out", blocker)
    assert code == 2
    one_line(err, str(blocker), "is a file")
    assert blocker.read_text() == "x"


def missing_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.device_count()}"
    return "cuda"


def test_unavailable_device_is_refused_before_loading(run):
    truncate(run / "checkpoints" / "step_4" / "model.safetensors")  # a load would name this file
    device = missing_device()
    result = cli("eval", run, "--tasks", "piqa", "--data-dir", EVAL_DIR, "--device", device)
    assert result.returncode == 2
    line = one_line(result.stderr, f"--device {device}", "use --device cpu" if device == "cuda" else device)
    assert "model.safetensors" not in line


def test_check_device():
    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu")
    with pytest.raises(ValueError, match="cannot run a model"):
        check_device("meta")
    with pytest.raises(ValueError, match=missing_device()):
        check_device(missing_device())
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="no mps device"):
            check_device("mps")


# ---- a run directory holds one run -----------------------------------------------------------------------


def _edit_meta(directory: Path, **changes) -> None:
    path = directory / "routing_trace.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_analyze_refuses_traces_of_different_runs(run, capsys):
    stale = run / "traces" / "step_3"  # as an earlier run in the same directory would leave it
    stale.mkdir(parents=True)
    for f in (run / "checkpoints" / "step_2").glob("routing_trace.*"):
        shutil.copy(f, stale / f.name)
    _edit_meta(stale, step=3, run_hash="0123456789abcdef")
    meta = json.loads((run / "checkpoints" / "step_2" / "routing_trace.json").read_text())
    code, err = call(capsys, "analyze", run, "--no-interventions")
    if meta.get("run_hash"):  # training records its run's hash in every trace
        assert code == 2
        one_line(err, "traces of different runs", "run_hash", "step_3", "--overwrite")
    _edit_meta(stale, run_hash=None, algorithm="xmoe")  # a legacy trace (no hash) of another algorithm
    code, err = call(capsys, "analyze", run, "--no-interventions")
    assert code == 2
    one_line(err, "traces of different runs", "algorithm", "'xmoe'", str(stale))
    assert not (run / "analysis").exists()
    _edit_meta(stale, algorithm=meta["algorithm"])  # legacy, same run's layout: accepted
    code, err = call(capsys, "analyze", run, "--no-interventions")
    assert code == 0, err
    assert json.loads((run / "analysis" / "metrics.json").read_text())["step"] == 4
