"""torchrun on CPU (gloo) with 2 processes: same global batch, so the same losses as 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from libmoe.train import train


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "libmoe", "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows]


def overrides(cfg):
    return [f"data.source={cfg.data.source}", f"data.cache_dir={cfg.data.cache_dir}",
            f"model.algorithm={cfg.model.algorithm}", f"train.max_steps={cfg.train.max_steps}",
            "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4",
            "train.eval_tokens=2048", "train.tensorboard=false"]


@pytest.fixture
def single(micro_config, tmp_path):
    cfg = micro_config("model.moe_options={bias_balancing: 0.01}", steps=6)
    train(cfg, tmp_path / "single", progress=False)
    return cfg, losses(tmp_path / "single")


def test_ddp_two_processes_match_one(single, tmp_path):
    """With micro-batches, so that bias balancing's selection counts, summed over the
    accumulation and then over ranks, would show rank 0's counts being broadcast over the others'
    (DDP's buffer broadcast before each forward, which libmoe turns off)."""
    cfg, expected = single
    result = torchrun("--out", str(tmp_path / "ddp"), *overrides(cfg),
                      "model.moe_options={bias_balancing: 0.01}", "train.micro_batch_size=1")
    assert result.stdout.count("done: step 6") == 1  # rank 0 alone reports
    got = losses(tmp_path / "ddp")
    assert [s for s, _ in got] == [s for s, _ in expected]
    # Micro-batches of one sequence against one batch: matmuls of other shapes round otherwise, and
    # six steps grow that to 4e-5 of the loss on some CPUs (an AMD EPYC host; 1e-5 on others).
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=2e-4)
    assert (tmp_path / "ddp" / "checkpoints" / "step_6" / "routing_trace.safetensors").is_file()
    from safetensors.torch import load_file

    one, two = (load_file(str(tmp_path / run / "checkpoints" / "step_6" / "model.safetensors"))
                for run in ("single", "ddp"))
    biases = [k for k in one if k.endswith("expert_bias")]
    assert biases and any(one[k].abs().sum() > 0 for k in biases)
    for k in biases:  # every rank's counts summed: the same balancing as one process
        assert torch.allclose(one[k], two[k]), k


def test_fsdp_two_processes_match_one_and_resume(single, tmp_path):
    cfg, expected = single
    args = ["--out", str(tmp_path / "fsdp"), *overrides(cfg), "train.parallel=fsdp",
            "model.moe_options={bias_balancing: 0.01}"]
    torchrun(*args, "--stop-after", "3")
    torchrun("--out", str(tmp_path / "fsdp"), "--resume")
    got = losses(tmp_path / "fsdp")
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_sigterm_to_a_torchrun_job_stops_every_rank_at_one_step_with_a_checkpoint(single, tmp_path):
    """SIGTERM to the whole job (as Slurm sends it; torchrun forwards it to its workers again):
    every rank agrees on the step (a non-blocking vote each step), one checkpoint of that step is
    written, the job exits non-zero, and --resume continues it under torchrun."""
    import signal
    import time

    cfg, _ = single
    run = tmp_path / "ddp"
    args = [a for a in overrides(cfg) if not a.startswith(("train.max_steps", "train.checkpoint_every"))]
    args += ["train.max_steps=400", "train.checkpoint_every=1000", "train.eval_every=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "libmoe", "train", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
        if len(rows) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:] + err[-2000:]
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert len(steps) == 1 and 3 <= steps[0] < 400, (steps, err[-2000:])
    assert f"interrupted by SIGTERM at step {steps[0]}" in out + err
    resumed = torchrun(*args, "--out", str(run), "--resume", "--stop-after", str(steps[0] + 2))
    assert f"step_{steps[0] + 2}" in resumed.stdout + resumed.stderr
