"""The bench on GPU nodes and clusters, checked on a CPU: which GPUs each worker gets
(CUDA_VISIBLE_DEVICES per worker, from a faked list of visible GPUs), --jobs' default, the torchrun
commands of one node and several, the Slurm job parameters, and the cost table's MFU."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from libmoe.bench import Rendezvous, launchers, visible_gpus
from libmoe.bench.launchers import (
    Node0Heartbeat,
    Progress,
    _run_pool,
    job_row,
    publish_decision,
    slurm_parameters,
    slurm_rendezvous,
    take_gpu_slot,
)
from libmoe.bench.lm import distributed, throughput_from_metrics, training_command
from libmoe.bench.placement import default_jobs, gpu_slots, torchrun_command
from libmoe.bench.spec import RunSpec
from libmoe.bench.study import plan_study
from libmoe.bench.tables import COST, aggregate, cost_table
from libmoe.cli import main
from libmoe.errors import Interrupted


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({}, count=4) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}, count=2) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}, count=2) == ["GPU-a1", "GPU-b2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,-1,4"}, count=1) == ["3"]  # CUDA stops at -1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=0) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, count=0) == []  # CPU only: no placement
    assert visible_gpus() == []  # this machine (CPU-only PyTorch)


def test_gpu_slots_round_robin_and_refusal():
    gpus = [str(i) for i in range(8)]
    assert gpu_slots(gpus, 8, 1) == [str(i) for i in range(8)]
    assert gpu_slots(gpus, 2, 4) == ["0,1,2,3", "4,5,6,7"]
    assert gpu_slots(["2", "5", "7"], 2, 1) == ["2", "5"]
    assert gpu_slots([], 3, 1) is None  # CPU: no placement, as before
    with pytest.raises(ValueError, match=r"--jobs 3 x 4 GPU\(s\) per job needs 12 GPUs but 8 are visible"):
        gpu_slots(gpus, 3, 4)
    assert default_jobs(gpus, 1, 2) == 8 and default_jobs(gpus, 4, 2) == 2 and default_jobs([], 1, 2) == 2
    assert default_jobs(["0"], 2, 1) == 1


def _plan(tmp_path, **kw):
    args = dict(out=tmp_path / "b", preset="micro", algorithms=["dense", "smoe"], seeds=1, data=None,
                tasks=[], data_dir=None, jobs=None, launcher="local", nproc=1, slurm=None, overrides=[],
                analysis=False, regime=None, compare=None, studies="none", log=lambda _: None)
    args.update(kw)
    return plan_study(**args)[0]


def test_jobs_default_to_the_visible_gpus_each_with_its_own(tmp_path):
    eight = [str(i) for i in range(8)]
    study = _plan(tmp_path, visible=eight)
    assert study.jobs == 8 and study.gpus == eight
    study = _plan(tmp_path, visible=["4", "6"], jobs=1)
    assert study.gpus == ["4"]
    study = _plan(tmp_path, visible=eight, launcher="torchrun", nproc=4)
    assert study.jobs == 2 and study.gpus == ["0,1,2,3", "4,5,6,7"]
    with pytest.raises(ValueError, match="lower --jobs or --nproc-per-node"):
        _plan(tmp_path, visible=eight, launcher="torchrun", nproc=4, jobs=3)
    assert not (tmp_path / "b").exists()  # refused before any work
    cpu = _plan(tmp_path, visible=[])  # CPU only: the preset's default, no placement
    assert cpu.jobs == 1 and cpu.gpus is None
    assert _plan(tmp_path, visible=[], launcher="torchrun", nproc=2).jobs == 1


def _probe(spec):
    time.sleep(0.3)  # let both workers take a run
    return {"name": spec.name, "status": "ok", "pid": os.getpid(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_each_worker_process_gets_its_own_gpus(tmp_path):
    specs = [RunSpec(f"r{i}", "dense", 0, str(tmp_path / f"r{i}"), {"train": {"max_steps": 1}})
             for i in range(4)]
    rows = _run_pool(specs, 2, Progress(specs, lambda _: None), gpus=["3", "5,6"], work=_probe)
    seen = {r["pid"]: r["cuda"] for r in rows.values()}
    assert set(seen.values()) == {"3", "5,6"}  # one slot per worker, kept for every run it trains
    for r in rows.values():
        assert r["cuda"] == seen[r["pid"]]


def _until_stopped(spec):
    """A run that trains until its worker gets SIGTERM (as run_one: then Interrupted)."""
    Path(spec.run_dir, "started").write_text(str(os.getpid()))
    try:
        time.sleep(30)
    except KeyboardInterrupt:
        raise Interrupted(spec.name) from None
    return {"name": spec.name, "status": "ok"}


def test_an_interrupted_pool_starts_no_queued_run(tmp_path):
    """ProcessPoolExecutor hands a worker its next run before the current one ends; an interrupted
    bench must not wait while that run trains (it once waited 14 minutes)."""
    specs = [RunSpec(f"r{i}", "dense", 0, str(tmp_path / f"r{i}"), {}) for i in range(5)]
    running = [Path(s.run_dir, "started") for s in specs[:2]]

    def interrupt_when_both_run():
        deadline = time.monotonic() + 60
        while not all(p.is_file() for p in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a KeyboardInterrupt in the bench's main thread

    threading.Thread(target=interrupt_when_both_run, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _run_pool(specs, 2, Progress(specs, lambda _: None), work=_until_stopped)
    assert all(p.is_file() for p in running)
    assert not any(Path(s.run_dir, "started").exists() for s in specs[2:])  # the queued run never started
    assert time.monotonic() - start < 25  # it did not wait for a queued run's 30 s


def test_take_gpu_slot_sets_the_worker_environment(monkeypatch):
    import queue

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    slots = queue.Queue()
    slots.put("2,3")
    assert take_gpu_slot(slots) == "2,3" and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert take_gpu_slot(None) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_torchrun_commands_for_one_node_and_several(tmp_path):
    one = torchrun_command(8, ["-m", "libmoe", "train"])
    assert "--standalone" in one and "--nproc-per-node=8" in one  # torchrun binds a free port per job
    study = _plan(tmp_path, launcher="torchrun", nproc=8, visible=[], overrides=["train.batch_size=32"],
                  rendezvous=Rendezvous(nnodes=4, endpoint="node0", rdzv_id="study1"))
    cmds = [training_command(s) for s in study.every]
    for i, (spec, cmd) in enumerate(zip(study.every, cmds)):
        assert "--standalone" not in cmd
        assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=node0:{29400 + i}", f"--rdzv-id=study1-{spec.name}"} <= set(cmd)
        assert cmd[cmd.index("train"):][:4] == ["train", spec.run_dir + "/bench_config.yaml", "--out",
                                                spec.run_dir]
        assert distributed(spec)
    ports = {a for c in cmds for a in c if a.startswith("--rdzv-endpoint=")}
    assert len(ports) == len(cmds)  # one rendezvous per run: runs in parallel never meet
    with pytest.raises(ValueError, match="needs --rdzv-endpoint"):
        _plan(tmp_path, launcher="torchrun", rendezvous=Rendezvous(nnodes=2))
    with pytest.raises(ValueError, match="give --launcher torchrun"):
        _plan(tmp_path, rendezvous=Rendezvous(nnodes=2, endpoint="h:1"))
    with pytest.raises(ValueError, match="--node-rank from 0"):
        _plan(tmp_path, launcher="torchrun", rendezvous=Rendezvous(nnodes=2, endpoint="h:1", node_rank=2))


def test_slurm_jobs_of_several_gpus_and_nodes(tmp_path):
    study = _plan(tmp_path, launcher="slurm", nproc=4, rendezvous=Rendezvous(nnodes=2))  # no endpoint
    params = slurm_parameters(study.every, {"slurm_partition": "gpu", "timeout_min": 600})
    assert params == {"timeout_min": 600, "name": "libmoe-bench", "nodes": 2, "gpus_per_node": 4,
                      "tasks_per_node": 1, "slurm_partition": "gpu", "cpus_per_task": 32}  # 8 per GPU
    assert slurm_parameters(study.every, {"cpus_per_task": 12})["cpus_per_task"] == 12  # the user's wins
    assert slurm_parameters(study.every, {"slurm_cpus_per_task": 6})["slurm_cpus_per_task"] == 6
    assert "cpus_per_task" not in slurm_parameters(study.every, {"slurm_cpus_per_task": 6})
    assert slurm_parameters(study.every, {"gpus_per_node": 8})["cpus_per_task"] == 64
    assert slurm_parameters(_plan(tmp_path, launcher="slurm").every, {}) == \
        {"timeout_min": 1440, "name": "libmoe-bench"}  # one process on a CPU: as before
    one_gpu = slurm_parameters(_plan(tmp_path, launcher="slurm").every, {"gpus_per_node": 1})
    assert one_gpu["cpus_per_task"] == 8
    import submitit

    executor = submitit.AutoExecutor(folder=str(tmp_path / "slurm"), cluster="debug")
    executor.update_parameters(**{k: v for k, v in params.items() if k != "slurm_partition"})  # names valid
    spec = slurm_rendezvous(study.every[0], "4242", ["gpu-a", "gpu-b"], 2)
    cmd = training_command(spec)
    assert {"--nnodes=2", "--nproc-per-node=4", f"--rdzv-endpoint=gpu-a:{20000 + 4242}",
            "--rdzv-id=slurm-4242-dense-s0"} <= set(cmd)
    single = slurm_rendezvous(study.every[0], "7", ["gpu-a"], 1)
    assert "--standalone" in training_command(single)


def test_cost_table_shows_mfu_when_the_metrics_have_it(tmp_path):
    rows = [{"step": 10, "loss": 3.0, "mfu": 0.9, "step_time_s": 9.0}] + \
        [{"step": 10 * i, "loss": 3.0, "mfu": 0.3 + 0.1 * (i % 2), "step_time_s": 0.5} for i in range(2, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    figures = throughput_from_metrics(tmp_path)
    assert figures["mfu"] == pytest.approx(0.35) and figures["step_time_s"] == pytest.approx(0.5)
    assert throughput_from_metrics(tmp_path / "none") == {"mfu": None, "step_time_s": None}

    def run(algorithm, mfu):
        return {"name": algorithm, "algorithm": algorithm, "seed": 0, "status": "ok", "ppl": 10.0,
                "results": {"val_ppl": {"ppl": 10.0}}, "params_total": 10, "params_active": 5,
                "train_time_s": 2.0, "peak_mem_mb": 1.0, "latency_ms": 1.0, "tokens_per_s": 5.0,
                "step_time_s": 0.5 if mfu else None, "mfu": mfu}

    table = cost_table({"rows": aggregate([run("dense", 0.375), run("smoe", None)], [])})
    mfu = [label for _, label in COST].index("MFU") + 1
    assert table[0][mfu] == "MFU" and table[1][mfu] == "37.5%" and table[2][mfu] == "—"


def test_bench_help_says_the_jobs_default(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CPU-only machine: default the preset's" in text and "--nproc-per-node" in text
    assert "--rdzv-endpoint" in text and "--nnodes" in text


def _slurm_task():
    import submitit

    return {"name": "r", "status": "ok"} if submitit.JobEnvironment().global_rank == 0 else None


def test_a_job_of_several_tasks_gives_task_0s_row(tmp_path):
    import sys

    import cloudpickle
    import submitit

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the job's process cannot import the tests
    try:
        executor = submitit.AutoExecutor(folder=str(tmp_path / "slurm"), cluster="local")
        executor.update_parameters(tasks_per_node=2, timeout_min=5)  # a 2-node job: one task per node
        job = executor.submit(_slurm_task)
        assert job.num_tasks == 2
        with pytest.raises(AssertionError, match="use `results\\(\\)`"):
            job.result()  # what the launcher called before: every multi-node run recorded failed
        assert job_row(job) == {"name": "r", "status": "ok"}
        executor.update_parameters(tasks_per_node=1)
        assert job_row(executor.submit(_slurm_task)) == {"name": "r", "status": "ok"}
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture
def fast_nodes(monkeypatch):
    """Node 0's heartbeat and the other nodes' polling at test speed."""
    monkeypatch.setattr(launchers, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(launchers, "POLL_S", 0.005)
    monkeypatch.setattr(launchers, "REPORT_EVERY_S", 0.05)
    monkeypatch.setattr(launchers, "_LIVE", {})


def _node_plan(tmp_path, rank, algorithms=("dense", "smoe")):
    return _plan(tmp_path, launcher="torchrun", nproc=2, visible=[], algorithms=list(algorithms),
                 rendezvous=Rendezvous(nnodes=2, endpoint="node0:29500", node_rank=rank))


def test_a_node_other_than_node_0_joins_or_skips_each_run_as_node_0_decides(tmp_path, monkeypatch,
                                                                             fast_nodes):
    import threading

    study = _node_plan(tmp_path, 1)
    node0 = _node_plan(tmp_path, 0).every
    nodes = tmp_path / "b" / ".nodes"
    assert all(s.torchrun["nodes_dir"] == str(nodes) for s in study.every)
    # a previous call's files: an ended session that had decided to train smoe
    nodes.mkdir(parents=True)
    (nodes / "node0.json").write_text(json.dumps({"session": "old", "beat": 9, "ended": True}))
    (nodes / "smoe-s0.json").write_text(json.dumps({"session": "old", "decision": "train"}))
    joined, lines = [], []

    def fake_train_only(spec):
        joined.append(training_command(spec))
        raise RuntimeError("rendezvous timed out")

    def node_0():
        with Node0Heartbeat(nodes, node0):
            time.sleep(0.1)  # node 0 prepares the data; the other node waits
            publish_decision(node0[0], "train")
            time.sleep(0.1)
            publish_decision(node0[1], "skip", "not run: dense-s0 failed (boom)")
            time.sleep(0.05)

    monkeypatch.setattr(launchers, "train_only", fake_train_only)
    thread = threading.Thread(target=node_0)
    thread.start()
    rows = launchers.run_all(study.every, 1, "torchrun", log=lines.append, node_rank=1)
    thread.join()
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "rendezvous timed out" in rows[0]["error"] and "dense-s0 failed (boom)" in rows[1]["error"]
    assert len(joined) == 1 and "--rdzv-endpoint=node0:29500" in joined[0]  # smoe: never joined
    assert any("waiting for node 0's decision on dense-s0" in line for line in lines)
    assert not (tmp_path / "b" / "runs" / "dense-s0" / "bench_run.json").exists()  # node 0 writes rows
    # node 0 ended its call: the runs it had not decided are skipped at once
    late = _node_plan(tmp_path, 1, ("dense", "smoe", "xmoe")).every[2]
    row = launchers.follow_run(late, lines.append)
    assert row["status"] == "failed" and "node 0 ended its study" in row["error"]


def test_node_0_publishes_train_before_it_starts_a_run(tmp_path, monkeypatch, fast_nodes):
    node0 = _node_plan(tmp_path, 0).every
    nodes = tmp_path / "b" / ".nodes"
    seen = []

    def fake_run_one(spec, progress=None):
        seen.append(json.loads((nodes / f"{spec.name}.json").read_text()))
        return {"name": spec.name, "status": "ok"}

    monkeypatch.setattr(launchers, "run_one", fake_run_one)
    with Node0Heartbeat(nodes, node0) as session:
        launchers.run_all(node0, 1, "torchrun", log=lambda _: None)
    assert [(d["session"], d["decision"]) for d in seen] == [(session, "train")] * 2
    assert json.loads((nodes / "node0.json").read_text())["ended"] is True
    one_node = _plan(tmp_path, launcher="torchrun", nproc=2, visible=[]).every[0]
    assert "nodes_dir" not in one_node.torchrun
    publish_decision(one_node, "train")  # one node: nothing to publish


def test_another_node_gives_up_without_node_0s_heartbeat(tmp_path, monkeypatch, fast_nodes):
    monkeypatch.setattr(launchers, "DEAD_AFTER_S", 0.1)
    spec = _node_plan(tmp_path, 1).every[0]
    with pytest.raises(RuntimeError, match="give every node the same --out on a filesystem they all share"):
        launchers.follow_run(spec, lambda _: None)


def test_seeds_default_to_the_presets(tmp_path):
    # `--seeds` not given: the preset's (claims: 3); given: it wins
    assert _plan(tmp_path, preset="claims", seeds=None).seeds == 3
    assert _plan(tmp_path, preset="claims", seeds=2).seeds == 2
    assert _plan(tmp_path, preset="micro", seeds=None).seeds == 1
