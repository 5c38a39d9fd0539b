"""Expert parallelism on CPU with gloo: the sharded layer, a small training loop and libmoe's
train() under EP=2 (2 processes) and EP=2 x DP=2 (4 processes) give one process's results.

Each spawned worker computes the one-process reference itself (same seed, whole batch), then the
expert-parallel version on its slice, and asserts; a failing worker fails the test with its
traceback."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port

from libmoe.devices import DistInfo
from libmoe.models import ModelConfig, MoETransformer
from libmoe.moe import build_moe
from libmoe.moe.expert_parallel import ExpertParallelExperts, expert_shards, shard_experts
from libmoe.syncs import HostSyncCounter
from libmoe.train.expert_parallel import (
    check_expert_parallel,
    clip_grad_norm,
    expert_parallel_groups,
    gather_expert_state,
    shard_model,
    slice_expert_state,
)

ALGORITHMS = ("smoe", "sharede_v3", "moe_plus_plus", "tc_moe")
LAYER_OPTIONS = {"smoe": {}, "sharede_v3": {"bias_balancing": 0.01}, "moe_plus_plus": {}, "tc_moe": {}}
EXPERT_KEYS = ("w1", "w2", "w3", "b1", "b2", "b3")


def spawn(fn, world: int, *args, init: bool = True) -> None:
    """Run fn(rank, world, *args) in `world` processes, in a gloo process group when `init` (a
    worker's exception fails the test)."""
    mp.start_processes(_worker, args=(fn, world, free_port(), init, args), nprocs=world,
                       start_method="spawn")


def _worker(rank, fn, world, port, init, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if not init:
        return fn(rank, world, *args)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- the layer -----------------------------------------------------------------------------


def _layer_cases(rank, world, ep):
    info = DistInfo(rank, world)
    shard = expert_parallel_groups(ep, info)
    rows = 2  # sequences per rank
    mine = slice(rank * rows, (rank + 1) * rows)
    for algorithm in ALGORITHMS:
        torch.manual_seed(0)
        layer = build_moe(algorithm, d_model=16, n_experts=4, expert_dim=8, top_k=2,
                          expert_bias=True, activation="swiglu", **LAYER_OPTIONS[algorithm])
        x = torch.randn(world * rows, 6, 16)
        g = torch.randn(world * rows, 6, 16)
        ref = copy.deepcopy(layer)
        out = ref(x)
        (out.output * g).sum().backward()
        sharded = shard_experts(copy.deepcopy(layer), shard)
        got = sharded(x[mine])
        _close(got.output, out.output[mine], f"{algorithm} output")
        (got.output * g[mine]).sum().backward()
        experts = sharded.experts
        block = slice(experts.start, experts.start + experts.n_local)
        for name in EXPERT_KEYS:
            p = getattr(experts, name)
            if p is None:
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if shard.replicas is not None:
                dist.all_reduce(grad, group=shard.replicas)
            _close(grad, getattr(ref.experts, name).grad[block], f"{algorithm} grad of {name}")
        for (name, p), q in zip(sharded.router.named_parameters(), ref.router.parameters()):
            if p.grad is not None:
                grad = p.grad.clone()
                dist.all_reduce(grad)
                _close(grad, q.grad, f"{algorithm} router grad of {name}")
        # The split sizes' .tolist() is the one host sync, forward and backward (grouped dispatch).
        sharded.opts = dataclasses.replace(sharded.opts, dispatch="grouped")
        with HostSyncCounter() as syncs:
            (sharded(x[mine]).output * g[mine]).sum().backward()
        assert syncs.count == 1, syncs.summary()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # tokens travel in bf16
            want, got = ref(x).output[mine], sharded(x[mine]).output
        _close(got.float(), want.float(), f"{algorithm} bf16 output", rtol=2e-2, atol=2e-2)


def _experts_edge_cases(rank, world, ep):
    """Skipped ids (-1, >= E) and every token sent to one rank: the other ranks receive nothing."""
    shard = expert_parallel_groups(ep, DistInfo(rank, world))
    torch.manual_seed(1)
    layer = build_moe("smoe", d_model=8, n_experts=4, expert_dim=4, top_k=2)
    sharded = ExpertParallelExperts(layer.experts, shard)
    x = torch.randn(5, 8, requires_grad=True)
    for ids in (torch.tensor([[0, -1], [1, 4], [0, 1], [-1, -1], [1, 0]]), torch.full((5, 2), -1)):
        w = torch.rand(5, 2, requires_grad=True)
        want = layer.experts(x, ids, w)
        got = sharded(x, ids, w)
        _close(got, want, f"ids {ids.tolist()}")
        got.sum().backward()


# --- a training loop -----------------------------------------------------------------------


def _tiny_model(algorithm: str) -> ModelConfig:
    n_experts = 9 if algorithm == "sharede_v3" else 8  # sharede_v3: 8 routed + 1 shared
    return ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, head_dim=8, max_seq_len=16,
                       algorithm=algorithm, n_experts=n_experts, expert_dim=8, top_k=2, n_shared=1,
                       moe_options=LAYER_OPTIONS[algorithm])


def _train(model, ddp, tokens, steps, clip, world, opt=None):
    opt = opt or torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        batch = tokens[step]
        out = ddp(batch[:, :-1], batch[:, 1:])
        (out.loss + out.aux_loss).backward()
        norm = clip_grad_norm(ddp, clip, world)
        opt.step()
        for layer in model.modules():
            if hasattr(layer, "update_bias") and hasattr(layer, "router"):
                layer.update_bias()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss + out.aux_loss))
        losses.append(float(norm))
    return losses, opt


def _loop_cases(rank, world, ep):
    from torch.nn.parallel import DistributedDataParallel

    from libmoe.models.run_config import RunConfig
    from libmoe.train.optim import full_state_dicts

    info = DistInfo(rank, world)
    rows = 2
    for algorithm in ALGORITHMS:
        mcfg = _tiny_model(algorithm)
        cfg = RunConfig(model=mcfg)
        cfg.train.expert_parallel = ep
        torch.manual_seed(0)
        tokens = torch.randint(0, 64, (3, world * rows, 9))
        full = MoETransformer(mcfg)
        init = copy.deepcopy(full.state_dict())
        # one process, the whole batch: loss, grad norm per step (each rank's losses are its mean)
        ref_losses, ref_opt = _train(full, full, tokens, 3, 0.5, 1)
        model = MoETransformer(mcfg)
        model.load_state_dict(init)
        shard_model(model, cfg, info)
        ddp = DistributedDataParallel(model)
        local = tokens[:, rank * rows : (rank + 1) * rows]
        losses, opt = _train(model, ddp, local, 3, 0.5, world)
        mean = torch.tensor(losses[0::2])
        dist.all_reduce(mean)
        _close((mean / world).tolist(), ref_losses[0::2], f"{algorithm} losses", rtol=1e-5)
        _close(losses[1::2], ref_losses[1::2], f"{algorithm} grad norms", rtol=1e-4)
        # full state: gathered shards equal the one-process model and optimizer
        model_state, opt_state = gather_expert_state(ddp, opt, *full_state_dicts(ddp, opt))
        ref_model, ref_state = full_state_dicts(full, ref_opt)
        if rank != 0:  # full state dicts are rank 0's
            assert not model_state
            continue
        assert list(model_state) == list(ref_model)
        for key, value in ref_model.items():
            _close(model_state[key], value, f"{algorithm} state {key}", rtol=1e-4, atol=1e-4)
        for key, entry in ref_state["state"].items():
            for name, value in entry.items():
                _close(opt_state["state"][key][name], value, f"{algorithm} opt {key}.{name}",
                       rtol=1e-4, atol=1e-6)
        # and back: slicing the full optimizer state gives this rank's
        _, mine = full_state_dicts(ddp, opt)
        sliced = slice_expert_state(ddp, copy.deepcopy(opt_state))
        for key in expert_shards(ddp):
            for name in EXPERT_KEYS:
                entry = sliced["state"].get(f"{key}.{name}")
                if entry is not None:
                    _close(entry["exp_avg"], mine["state"][f"{key}.{name}"]["exp_avg"], "slice")


def _cases(rank, world, ep):
    _layer_cases(rank, world, ep)
    _experts_edge_cases(rank, world, ep)
    _loop_cases(rank, world, ep)


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_layer_and_training_loop_match_one_process(world, ep):
    """For smoe, sharede_v3, moe_plus_plus and tc_moe: the sharded layer's output and gradients,
    skipped ids and ranks that receive no token, then three steps of a DDP loop with
    `clip_grad_norm` (losses and gradient norms), the gathered full state and its slicing back.
    One spawn per world size: starting processes is most of the time."""
    spawn(_cases, world, ep)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("change,world,message", [
    ({"expert_parallel": 2}, 3, "must divide the number of processes"),
    ({"expert_parallel": 2, "parallel": "fsdp"}, 2, "works with train.parallel=ddp"),
    ({"expert_parallel": 3}, 3, "must divide the 8 routed experts"),
    ({"expert_parallel": 2, "precision": "fp16"}, 2, "does not support precision fp16"),
])
def test_unsupported_combinations_are_refused(change, world, message):
    from dataclasses import replace

    from libmoe.models.run_config import RunConfig

    cfg = RunConfig(model=_tiny_model("smoe"))
    cfg = replace(cfg, train=replace(cfg.train, **change))
    with pytest.raises(ValueError, match=message):
        check_expert_parallel(cfg, world)
    check_expert_parallel(replace(cfg, train=replace(cfg.train, expert_parallel=1)), world)



# --- libmoe's train() ----------------------------------------------------------------------

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
# smoe counts its balance loss's selections over every rank (scope "global"); sharede_v3 (8 routed
# experts + 1 shared) balances with the selection bias, whose counts are all-reduced too; moe_plus_plus
# accumulates gradients over micro-batches of 2 sequences.
E2E_OPTIONS = {"smoe": ["model.moe_options={balance_scope: global}"],
               "sharede_v3": ["model.n_experts=9", "model.moe_options={bias_balancing: 0.01}"],
               "moe_plus_plus": ["train.micro_batch_size=2"], "tc_moe": []}


@pytest.fixture(scope="module")
def e2e(data_cache, tmp_path_factory):
    """config(algorithm, *overrides) for 4 steps of the micro preset (32-token sequences, validation
    and a checkpoint at the end), and the runs directory."""
    from libmoe.train import resolve_config

    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")

    def config(algorithm: str, *overrides: str):
        base = [f"data.source={SHAKESPEARE}", f"data.cache_dir={data_cache}", f"model.algorithm={algorithm}",
                "train.max_steps=4", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4",
                "train.seq_len=32", "train.eval_tokens=1024", "train.tensorboard=false",
                "data.probe_tokens=256", *E2E_OPTIONS[algorithm]]
        return resolve_config(overrides=base + list(overrides), preset="micro")

    return config, tmp_path_factory.mktemp("ep-runs")


@pytest.fixture(scope="module")
def reference(e2e):
    """One process's metrics for each algorithm (4 steps)."""
    from libmoe.train import train

    config, root = e2e
    for algorithm in ALGORITHMS:
        train(config(algorithm), root / "one" / algorithm, progress=False)
    return {a: losses(root / "one" / a) for a in ALGORITHMS}


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"] if "loss" in r else r["val_loss"]) for r in rows]


def _train_runs(rank, world, runs):
    """train(cfg, out, **kwargs) for each (cfg, out, port, kwargs), as torchrun would start it;
    each run must send tokens through sharded experts."""
    from libmoe.train import train

    calls = []
    forward = ExpertParallelExperts.forward
    ExpertParallelExperts.forward = lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    for cfg, out, port, kwargs in runs:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_PORT=str(port))
        before = len(calls)
        train(cfg, out, progress=False, **kwargs)
        assert len(calls) > before, f"{out}: no expert-parallel forward"


def _assert_same(got, want, what):
    assert [s for s, _ in got] == [s for s, _ in want], what
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4), what


def test_train_ep2_matches_one_process_and_resumes_across(e2e, reference):
    """EP=2 over 2 processes: the 1-process losses (train and validation) for every algorithm; a
    checkpoint written under EP resumes in one process, and one written by one process under EP."""
    from libmoe.train import train

    config, root = e2e
    ep2 = "train.expert_parallel=2"
    one_first = root / "one-then-ep"
    train(config("smoe"), one_first, progress=False, stop_after=2)
    runs = [(config(a, ep2), root / "ep2" / a, free_port(), {}) for a in ALGORITHMS]
    runs += [(config("smoe", ep2), root / "ep-then-one", free_port(), {"stop_after": 2}),
             (config("smoe", ep2), one_first, free_port(), {"resume": True})]
    spawn(_train_runs, 2, runs, init=False)
    train(config("smoe"), root / "ep-then-one", progress=False, resume=True)
    for algorithm in ALGORITHMS:
        _assert_same(losses(root / "ep2" / algorithm), reference[algorithm], algorithm)
    _assert_same(losses(root / "ep-then-one"), reference["smoe"], "EP=2 checkpoint resumed in 1 process")
    _assert_same(losses(one_first), reference["smoe"], "1-process checkpoint resumed under EP=2")
    # checkpoints hold one process's layout: the full expert tensors
    from safetensors.torch import load_file

    ep_state = load_file(str(root / "ep2" / "smoe" / "checkpoints" / "step_4" / "model.safetensors"))
    one_state = load_file(str(root / "one" / "smoe" / "checkpoints" / "step_4" / "model.safetensors"))
    assert {k: v.shape for k, v in ep_state.items()} == {k: v.shape for k, v in one_state.items()}


def test_train_ep2_dp2_matches_one_process(e2e, reference):
    """EP=2 x DP=2 over 4 processes: the 1-process losses for every algorithm."""
    config, root = e2e
    runs = [(config(a, "train.expert_parallel=2"), root / "ep2dp2" / a, free_port(), {}) for a in ALGORITHMS]
    spawn(_train_runs, 4, runs, init=False)
    for algorithm in ALGORITHMS:
        _assert_same(losses(root / "ep2dp2" / algorithm), reference[algorithm], algorithm)


def test_check_config_refuses_what_expert_parallelism_cannot_run(micro_config):
    from libmoe.train.trainer import check_config

    with pytest.raises(ValueError, match="must divide the number of processes"):
        check_config(micro_config("train.expert_parallel=2"), 1)
    with pytest.raises(ValueError, match="must divide the 7 routed experts"):
        check_config(micro_config("train.expert_parallel=2", algorithm="sharede_v3"), 2)
    check_config(micro_config("train.expert_parallel=2"), 4)
