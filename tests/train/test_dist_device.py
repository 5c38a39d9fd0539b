"""Device-correct collectives: every process group serves only its device type, and every
tensor a collective gets lives there.

The default group is bound to the training device's type (`backend_for`: ``cuda:nccl`` on a GPU,
``cpu:gloo`` here), so a tensor of another type fails loudly ("No backend type associated with
device type cpu", the crash every multi-GPU run hit at its first validation) instead of being
served by a fallback backend; host-side flags go to `cpu_group`, a ``cpu:gloo`` group beside it.

Here 2 gloo processes (torch.multiprocessing) stand in for NCCL on CUDA: their default group
serves CPU tensors only, and they run a real tiny training with validation every 2 steps and a
checkpoint, validation_loss directly, and a group bound to another device type ("cuda:gloo"),
which refuses a CPU tensor as NCCL does. The stand-in's limit: on a CPU machine the training
device IS the CPU, so a host tensor sent to the default group would pass here. What closes that
gap is the static check below: every torch.distributed collective in src/libmoe sits in a short
allow-list of functions that place their tensors (the device helpers check the placement with
`check_collective_device`, tested directly), so a new raw collective on a CPU tensor fails it.
"""

import ast
import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port, torchrun_env

from libmoe.devices import DistInfo, all_reduce_sum
from libmoe.eval.perplexity import validation_loss
from libmoe.models import MoETransformer
from libmoe.models.run_config import config_from_dict
from libmoe.train import train
from libmoe.train.distributed import all_reduce_max, all_reduce_min, any_rank, backend_for

SRC = Path(__file__).resolve().parents[2] / "src" / "libmoe"


def _windows(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.model.vocab_size, (5, cfg.seq_len + 1), generator=g)  # 5: padded over 2


def _train_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, results: str) -> None:
    torchrun_env(rank, world, port)
    from libmoe.train.distributed import cpu_group, init_distributed

    report: dict = {}
    try:
        info = init_distributed("cpu")
        report["backend"] = dist.get_backend_config()
        flags = cpu_group(info)
        report["cpu_group"] = dist.get_backend_config(flags)
        # A group bound to another device type refuses a CPU tensor, as NCCL does.
        other = dist.new_group(backend="cuda:gloo")
        try:
            dist.all_reduce(torch.zeros(1), group=other)
        except RuntimeError as err:
            report["other_type"] = str(err)
        cfg = config_from_dict(cfg_dict)
        torch.manual_seed(0)
        model = MoETransformer(cfg.model)
        loss, each = validation_loss(model, _windows(cfg), 2, info, per_window=True)
        report["val"] = [loss, each]
        report["flag"] = any_rank(rank == 1, info, flags)
        summary = train(cfg, out, progress=False)  # joins the same group, shuts it down at the end
        report["summary_step"] = summary["step"]
    except BaseException:  # noqa: BLE001  reported to the test, which names the rank
        report["error"] = traceback.format_exc()
    Path(results, f"rank{rank}.json").write_text(json.dumps(report))


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_validation_and_checkpoint_on_a_group_serving_only_the_training_device(
        micro_config, tmp_path):
    cfg = micro_config("train.eval_every=2", "train.checkpoint_every=4", steps=4)
    train(cfg, tmp_path / "single", progress=False)
    torch.manual_seed(0)
    expected = validation_loss(MoETransformer(cfg.model), _windows(cfg), 2, per_window=True)

    mp.spawn(_train_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path / "dist"), str(tmp_path)),
             nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
        assert report["backend"] == "cpu:gloo" and report["cpu_group"] == "cpu:gloo"
        assert "No backend type associated with device type cpu" in report["other_type"]
        assert report["flag"] is True
        assert report["summary_step"] == 4
        loss, each = report["val"]
        assert loss == pytest.approx(expected[0], rel=1e-6)
        assert each == pytest.approx(expected[1], rel=1e-6)
    val = {r["step"]: r["val_loss"] for r in _rows(tmp_path / "dist") if "val_loss" in r}
    single = {r["step"]: r["val_loss"] for r in _rows(tmp_path / "single") if "val_loss" in r}
    assert sorted(val) == [2, 4]
    assert val == pytest.approx(single, rel=1e-5)
    assert (tmp_path / "dist" / "checkpoints" / "step_4" / "model.safetensors").is_file()


def _failing_data_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, results: str) -> None:
    torchrun_env(rank, world, port)
    import time

    from libmoe.train import trainer

    def broken(cfg, log=print):
        raise ValueError("data source is broken")

    if rank == 0:
        trainer.prepare_run_data = broken
    report: dict = {}
    start = time.perf_counter()
    try:
        train(config_from_dict(cfg_dict), out, progress=False)
    except BaseException as err:  # noqa: BLE001
        report["error"] = f"{type(err).__name__}: {err}"
    report["seconds"] = time.perf_counter() - start
    Path(results, f"rank{rank}.json").write_text(json.dumps(report))


def test_a_failure_while_rank_0_prepares_the_data_stops_the_waiting_ranks_at_once(micro_config, tmp_path):
    cfg = micro_config(steps=2)
    args = (2, free_port(), cfg.to_dict(), str(tmp_path / "run"), str(tmp_path))
    mp.spawn(_failing_data_worker, args=args, nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["error"] == "ValueError: data source is broken"
    assert "stopped waiting for rank 0 to prepare the data" in r1["error"]
    assert r1["seconds"] < 120  # not the data timeout (a day)


def test_collective_helpers_refuse_a_tensor_off_their_groups_device():
    """On a GPU the default group takes tensors on info.device and a cpu_group CPU tensors: the
    helpers check it before any collective (no group is needed to see the refusal)."""
    gpu = DistInfo(0, 2, 0, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="move it there first"):
        all_reduce_sum(torch.zeros(2), gpu)
    with pytest.raises(ValueError, match="move it there first"):
        all_reduce_max(torch.zeros(1), gpu)  # default group: the training device
    with pytest.raises(ValueError, match="move it there first"):
        all_reduce_min(torch.zeros(1, device="meta"), gpu, group=object())  # a cpu_group: CPU only
    assert backend_for(torch.device("cuda", 1)) == "cuda:nccl"
    assert backend_for(torch.device("cpu")) == "cpu:gloo"


# --- every collective call sits in a function that places its tensors --------------------

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list", "barrier",
    "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
}
DIST_MODULES = {"dist", "torch.distributed", "funcol", "c10d"}

# (file under src/libmoe, function) -> where its tensors live. A new collective goes through one
# of these helpers, or is added here with the reason its tensors are on the group's device.
ALLOWED = {
    ("devices.py", "all_reduce_sum"): "checks t is on info.device (default group)",
    ("train/distributed.py", "_reduce"): "checks: info.device on the default group, CPU on a cpu_group",
    ("train/distributed.py", "StepVote.poll"): "a CPU flag on the cpu_group (required)",
    ("train/distributed.py", "barrier"): "no tensor: a cpu_group, or the default group on this GPU",
    ("moe/routers.py", "TopKRouter.update_bias"): "bias-balancing counts: a buffer on the model's device",
    ("moe/functional.py", "balance_loss"): "routing counts on the model's device",
}
# Expert parallelism exchanges activations that are on the model's device by construction, on
# its own expert group (tests/train/test_expert_parallel.py runs it).
ALLOWED_FILES = {"moe/expert_parallel.py", "train/expert_parallel.py"}


def _collective_calls(path: Path):
    """(qualified function name, collective, line) for each torch.distributed collective call."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                base = ast.unparse(child.func.value)
                if child.func.attr in COLLECTIVES and base in DIST_MODULES:
                    found.append((".".join(scope), child.func.attr, child.lineno))
            visit(child, scope)

    visit(tree, [])
    return found


def test_every_collective_call_is_in_an_allowed_function():
    calls = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for func, name, line in _collective_calls(path):
            calls.setdefault((rel, func), []).append(f"{rel}:{line} dist.{name} in {func or 'module'}")
    stray = [where for key, hits in calls.items()
             if key not in ALLOWED and key[0] not in ALLOWED_FILES for where in hits]
    assert not stray, ("collective calls outside the device-placing helpers (use devices.all_reduce_sum or "
                       "train.distributed's helpers, or allow the function in this test with the reason "
                       f"its tensors are on the group's device): {stray}")
    # The allow-list names functions that still exist and still call a collective (no stale entry).
    assert set(ALLOWED) <= set(calls), sorted(set(ALLOWED) - set(calls))
