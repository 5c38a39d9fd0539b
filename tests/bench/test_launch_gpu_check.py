"""benchmarks/gpu_check.py end to end on a CPU (--smoke: tiny sizes, a few steps): one JSON file
with the device and every part's figures; a part that fails is recorded with its error, the
others keep their figures, and the script exits non-zero."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_records_every_part_and_a_failure(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work",
                             str(tmp_path / "work"), "--parts", "moe_layer,train_eager,train_ep2",
                             "--fail", "moe_layer"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "train_eager: OK" in result.stdout and "moe_layer: FAILED" in result.stdout  # progress lines
    report = json.loads(out.read_text())
    assert report["device"]["torch"] and report["device"]["visible_gpus"] == [] and report["smoke"]
    parts = report["parts"]
    assert parts["moe_layer"]["status"] == "failed" and "failure injected" in parts["moe_layer"]["error"]
    eager = parts["train_eager"]
    assert eager["status"] == "ok" and eager["steps"] == 3, eager
    assert eager["tokens_per_s"] > 0 and eager["step_time_s"] > 0 and eager["peak_mem_mb"] > 0
    assert "mfu" in eager  # None on a CPU (no peak FLOP/s), a fraction on a GPU
    assert parts["train_ep2"] == {"status": "skipped", "why": "needs 2 GPUs or more, 0 visible"}
    assert report["failed"] == ["moe_layer"] and report["ok"] is False and report["elapsed_s"] > 0
    assert report["schedule"].startswith("sequential")  # one part at a time: no shared CPUs, no overlap
    first = parts["moe_layer"]
    assert eager["started_s"] >= first["started_s"] + first["seconds"] - 0.6  # the parent polls every 0.5 s


def test_gpu_check_plan_fits_the_lease_and_splits_the_batch():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    boxes = [full for _, full, _ in gpu_check.PARTS.values()]
    assert sum(boxes) <= 460 < 8 * 60  # sequential parts: every time box fits the default budget
    assert gpu_check.STEPS["train_eager"][0] == 100  # the 100 eager steps of paper-158m
    assert [gpu_check.dividing_count(n, 64) for n in range(1, 9)] == [1, 2, 2, 4, 4, 4, 4, 8]
