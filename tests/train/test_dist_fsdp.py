"""GPU efficiency settings, checked on CPU with gloo: FSDP2 skips the gradient reduce-scatter on
accumulation micro-batches and still gives the 1-process losses; under bf16 it gathers the blocks'
parameters in bf16 and reduces gradients in fp32 while every MoE router computes in fp32; AdamW
is fused only where every parameter is on CUDA."""

import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port, torchrun_env

from libmoe.models.run_config import config_from_dict
from libmoe.train import train
from libmoe.train.distributed import mixed_precision_policy
from libmoe.train.optim import adamw_kernel, build_optimizer

REDUCE_SCATTERS = ("reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter")


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _count_reduce_scatters() -> dict:
    counts = {"reduce_scatter": 0, "sync_flags": []}
    for name in REDUCE_SCATTERS:
        if hasattr(dist, name):
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                counts["reduce_scatter"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
    from torch.distributed.fsdp import FSDPModule

    original_flag = FSDPModule.set_requires_gradient_sync

    def flag(self, requires, *args, **kwargs):
        if self.__class__.__name__.startswith("FSDPMoETransformer"):
            counts["sync_flags"].append(bool(requires))
        return original_flag(self, requires, *args, **kwargs)

    FSDPModule.set_requires_gradient_sync = flag
    return counts


def _worker(rank: int, world: int, ports: list[int], cfg_dict: dict, out: str, results: str) -> None:
    report: dict = {}
    try:
        torchrun_env(rank, world, ports[0])
        counts = _count_reduce_scatters()
        train(config_from_dict(cfg_dict), out, progress=False)
        report.update(counts)
        torchrun_env(rank, world, ports[1])
        report["bf16"] = _bf16_step(config_from_dict(cfg_dict))
    except BaseException:  # noqa: BLE001  reported to the test, which names the rank
        report["error"] = traceback.format_exc()
    Path(results, f"rank{rank}.json").write_text(json.dumps(report))


def _bf16_step(cfg) -> dict:
    """One FSDP training step of MoE++ (whose router also reads parameters outside its forward)
    under bf16: the dtypes each module computes in, and the loss."""
    from dataclasses import replace

    from libmoe.models import MoETransformer
    from libmoe.moe import Router
    from libmoe.train.distributed import init_distributed, shutdown, wrap_model

    info = init_distributed("cpu")
    try:
        torch.manual_seed(0)
        raw = MoETransformer(replace(cfg.model, algorithm="moe_plus_plus"))
        model = wrap_model(raw, info, "fsdp", torch.bfloat16)
        seen = {"router": set(), "block": set()}
        for module in raw.modules():
            if isinstance(module, Router):
                module.register_forward_pre_hook(
                    lambda m, _: seen["router"].update(str(p.dtype) for p in m.parameters()))
        def block_dtypes(block, _):  # runs after FSDP's pre-forward hook has gathered the block
            seen["block"].update(str(p.dtype) for n, p in block.named_parameters() if "router" not in n)

        for block in raw.blocks:
            block.register_forward_pre_hook(block_dtypes)
        opt = build_optimizer(model, cfg)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.seq_len + 1),
                               generator=torch.Generator().manual_seed(info.rank))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        return {"router": sorted(seen["router"]), "block": sorted(seen["block"]),
                "loss": float(out.loss),
                "finite": all(torch.isfinite(p.to_local()).all().item() for p in model.parameters()),
                "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    finally:
        shutdown(info)


def test_fsdp_micro_batches_skip_gradient_sync_and_match_one_process(micro_config, tmp_path):
    cfg = micro_config("train.micro_batch_size=2", "train.parallel=fsdp", "train.eval_every=4",
                       "train.checkpoint_every=4", steps=3)
    train(cfg, tmp_path / "single", progress=False)  # 4 micro-batches of 2 per step
    ports = [free_port(), free_port()]
    mp.spawn(_worker, args=(2, ports, cfg.to_dict(), str(tmp_path / "fsdp"), str(tmp_path)), nprocs=2,
             join=True)  # 2 micro-batches of 2 per process and step
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
        steps, units = 3, cfg.model.n_layers + 1  # the blocks and the root
        assert report["sync_flags"] == [False, True] * steps
        assert report["reduce_scatter"] == steps * units  # once per unit and step, not per micro-batch
        bf16 = report["bf16"]
        assert bf16["router"] == ["torch.float32"]  # routers compute from fp32 weights
        assert bf16["block"] == ["torch.bfloat16"]  # the rest is gathered in bf16
        assert bf16["param_dtypes"] == ["torch.float32"]  # fp32 master weights
        assert bf16["finite"] and bf16["loss"] == bf16["loss"]
    got, expected = _losses(tmp_path / "fsdp"), _losses(tmp_path / "single")
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_mixed_precision_policy_gathers_in_the_run_dtype_and_reduces_in_fp32():
    assert mixed_precision_policy(None) is None
    assert mixed_precision_policy(torch.float32) is None
    for dtype in (torch.bfloat16, torch.float16):
        policy = mixed_precision_policy(dtype)
        assert policy.param_dtype == dtype
        assert policy.reduce_dtype == torch.float32


def test_adamw_is_fused_only_when_every_parameter_is_a_floating_cuda_tensor(micro_config):
    params = [torch.zeros(2), torch.zeros(3)]
    assert adamw_kernel(params, on_cuda=lambda p: True) == {"fused": True}
    assert adamw_kernel(params, on_cuda=lambda p: p is params[0]) == {"foreach": True}
    assert adamw_kernel([torch.zeros(2, dtype=torch.int64)], on_cuda=lambda p: True) == {"foreach": True}
    assert adamw_kernel(params) == {"foreach": True}  # the CPU
    from libmoe.models import MoETransformer

    opt = build_optimizer(MoETransformer(micro_config().model), micro_config())
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
