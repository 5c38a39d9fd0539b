"""Throughput you can read: the peak FLOP/s table, MFU, the progress line, and a metrics window that
counts expert selections without host syncs."""

import pytest
import torch

from libmoe.devices import DistInfo
from libmoe.models import build_model, count_parameters
from libmoe.moe import Routing
from libmoe.syncs import HostSyncCounter
from libmoe.train.metrics import MetricsLogger, StepWindow
from libmoe.train.throughput import PEAK_FLOPS, device_peak_flops, mfu, precision_key, run_peak_flops

BF16 = torch.bfloat16


@pytest.mark.parametrize("name, bf16_tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10G", 70), ("NVIDIA A10", 125), ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05), ("NVIDIA L4", 121), ("NVIDIA GeForce RTX 4090", 165.2),
    ("Tesla V100-SXM2-32GB", 15.7), ("AMD Instinct MI300X", 1307.4),
])
def test_device_names_find_their_dense_peak(name, bf16_tflops):
    assert device_peak_flops(name, BF16) == pytest.approx(bf16_tflops * 1e12)


def test_unknown_devices_and_cpu_get_no_peak_unless_given():
    assert device_peak_flops("NVIDIA RTX A1000", BF16) is None  # not an A100
    assert device_peak_flops("Tesla T4", BF16) is None
    assert run_peak_flops(None, torch.device("cpu"), None) is None
    assert run_peak_flops(2e14, torch.device("cpu"), None) == 2e14  # train.peak_flops wins
    assert mfu(1e6, 1e9, None) is None


def test_precision_columns():
    assert precision_key(BF16) == "bf16" and precision_key(torch.float16) == "fp16"
    assert precision_key(None) in ("tf32", "fp32")
    for peaks in PEAK_FLOPS.values():
        assert set(peaks) == {"bf16", "fp16", "tf32", "fp32"}
        assert peaks["fp16"] >= peaks["fp32"] and peaks["tf32"] >= peaks["fp32"]
    assert device_peak_flops("NVIDIA H100 80GB HBM3", torch.float16) == pytest.approx(989.4e12)


def test_mfu_is_achieved_over_peak_flops():
    # 4 GPUs at 1e15 FLOP/s each; 2e6 tokens/s over all of them at 7e8 FLOPs/token is 35%.
    assert mfu(2e6, 7e8, 1e15, n_devices=4) == pytest.approx(0.35)
    assert mfu(2e6, 7e8, 1e15) == pytest.approx(1.4)  # one device: the caller's count matters


def test_active_parameters_count_shared_experts_and_top_k():
    """flops_per_token (train/trainer.py) is 6 x active non-embedding parameters + attention: the
    active count holds top_k routed experts and the shared ones, so a shared-expert model with
    the same k has the dense model's expert FLOPs and only one router row fewer per layer."""
    _, smoe = count_parameters(build_model("micro", "smoe"))
    _, shared = count_parameters(build_model("micro", "sharede_v2"))
    dense, dense_active = count_parameters(build_model("micro", "dense"))
    cfg = build_model("micro", "smoe").config
    assert dense == dense_active
    assert smoe - dense_active == cfg.n_layers * cfg.n_experts * cfg.d_model  # the routers
    assert smoe - shared == cfg.n_layers * cfg.d_model  # one routed expert became a shared one


def output(topk_idx, n_slots):
    T = topk_idx.shape[0]
    routing = Routing(topk_idx, torch.ones(topk_idx.shape), torch.zeros(T, n_slots), torch.zeros(T, n_slots))

    class Out:
        loss = torch.tensor(2.0)
        aux_loss = torch.tensor(0.1)
        aux = {"balance": torch.tensor(1.0)}

    out = Out()
    out.routing = [routing, routing]
    return out


def test_window_counts_selections_without_host_syncs():
    ids = torch.tensor([[0, 3], [3, -1], [-1, -1], [5, 0], [3, 2]])  # -1: expert_choice padding
    window = StepWindow(DistInfo(device=torch.device("cpu")))
    window.add(output(ids, 6), 0.5)  # the first call allocates the counters
    with HostSyncCounter() as syncs:
        window.add(output(ids, 6), 0.5)
    assert syncs.count == 0, syncs.summary()
    valid = ids[ids >= 0]
    expected = 2 * torch.bincount(valid, minlength=6).double()
    for counts in window.counts:
        assert torch.equal(counts, expected)
    window.steps, window.elapsed = 1, 0.5
    row = window.row(1, tokens_per_step=10)
    assert row["loss"] == pytest.approx(2.0) and row["tokens_per_s"] == pytest.approx(20.0)
    assert row["load"][0]["dead"] == 2 and row["load"][0]["max_frac"] == pytest.approx(3 / 7)


def test_progress_line_shows_mfu_when_known(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, max_steps=10, start_step=0, tensorboard=False, progress=False)
    row = {"step": 1, "loss": 3.0, "aux_loss": 0.01, "lr": 1e-3, "tokens_per_s": 12345.0}
    logger.log(row)
    logger.log({**row, "step": 2, "mfu": 0.3712})
    logger.close()
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "MFU" not in first
    assert "12,345 tok/s | MFU 37.1% |" in second


def test_training_rows_carry_mfu_only_with_a_known_peak(micro_config, tmp_path):
    import json

    from libmoe.train import train

    train(micro_config("train.peak_flops=1e11", steps=2), tmp_path / "peak", progress=False)
    train(micro_config(steps=2), tmp_path / "cpu", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "peak" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e11)
    cpu = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert all("mfu" not in r for r in cpu)  # a CPU has no peak in the table: no made-up figure


def test_compile_is_refused_where_it_cannot_run(micro_config):
    from libmoe.train.trainer import check_config

    with pytest.raises(ValueError, match="train.compile=false for a transformers model"):
        check_config(micro_config("train.compile=true"), hf=True)
    with pytest.raises(ValueError, match="fsdp runs in fp32 only"):
        check_config(micro_config("train.compile=true", "train.parallel=fsdp", "train.precision=bf16"),
                     world_size=2)
    fp32 = micro_config("train.compile=true", "train.parallel=fsdp", "train.precision=fp32")
    check_config(fp32, world_size=2)
    check_config(micro_config("train.compile=true", "train.precision=bf16"), world_size=2)  # DDP compiles
