"""Where the bench's runs execute: in this process, in worker processes (`--jobs`), or as Slurm
jobs through submitit; and the progress lines across runs (which run, its step, the study's ETA).

On a GPU node each worker process owns its GPUs: it takes one slot of `placement.gpu_slots`
(``CUDA_VISIBLE_DEVICES=<slot>``) before anything initialises CUDA, so inside it ``cuda:0`` is its
own GPU and a torchrun child sees exactly its slot's GPUs. Training under torchrun is chosen per
run inside `runner.run_one` (`libmoe.bench.lm.train_run`). A node other than node 0 of a
multi-node torchrun study (`node_rank` > 0) only joins each run's training (`lm.train_only`).
A Slurm job of several GPUs or nodes runs torchrun inside the job: one task per node, task 0
trains, evaluates and writes the row, the others join its training (`_run_slurm_task`).

Several nodes under ``--launcher torchrun`` share ``--out`` (one filesystem every node mounts):
node 0 publishes its decision on each run there before it acts (``OUT/.nodes/<run>.json``:
"train" just before it starts the run's torchrun, "skip" with the reason when it will not train
it: finished earlier, or a run it starts from failed) and a heartbeat (``OUT/.nodes/node0.json``,
`Node0Heartbeat`) whose session id tells this call's decisions from an earlier call's; every other
node waits for node 0's decision on each run (`await_decision`) and joins or skips it, so the
nodes never go out of step."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import Interrupted
from ..files import read_json, write_json
from .lm import distributed, train_only
from .runner import finished_row, run_one
from .safety import signals_ignored
from .spec import RunSpec


def _last_step(run_dir: str | Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    with path.open() as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                step = max(step, int(json.loads(line).get("step", 0)))
    return step


class Progress:
    """One line per event and, for worker processes, a periodic line with every active run's
    step and the study's ETA (from the steps per second of the runs so far)."""

    def __init__(self, specs: list[RunSpec], log: Callable[[str], None]):
        self.specs, self.log = specs, log
        self.total_steps = sum(s.max_steps or 0 for s in specs)  # a run of unknown length counts 0
        self.start = time.perf_counter()
        self.done: dict[str, dict] = {}
        self.active: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = {s.name: _last_step(s.run_dir) for s in specs}  # steps done before this call

    def steps_now(self) -> int:
        steps = 0
        for s in self.specs:
            limit = s.max_steps or 0
            steps += limit if s.name in self.done else min(limit, _last_step(s.run_dir))
        return steps

    def eta(self) -> str:
        steps = self.steps_now()
        fresh = steps - sum(min(v, s.max_steps or 0) for s, v in
                            zip(self.specs, self._base.values()))
        elapsed = time.perf_counter() - self.start
        if fresh <= 0 or elapsed < 1:
            return "?"
        left = (self.total_steps - steps) * elapsed / fresh
        return duration(left)

    def started(self, spec: RunSpec) -> None:
        self.active.add(spec.name)
        i = [s.name for s in self.specs].index(spec.name) + 1
        self.log(f"bench: [{i}/{len(self.specs)}] {spec.name} started ({len(self.done)} finished; "
                 f"study ETA {self.eta()})")

    def finished(self, spec: RunSpec, row: dict) -> None:
        self.active.discard(spec.name)
        self.done[spec.name] = row
        what = ("skipped (finished earlier)" if row.get("skipped") else
                f"ok, val ppl {row['ppl']:.2f}" if row["status"] == "ok" and row.get("ppl") else
                row["status"] if row["status"] == "ok" else f"FAILED: {row.get('error')}")
        self.log(f"bench: {spec.name} {what} [{len(self.done)}/{len(self.specs)} done, "
                 f"{duration(time.perf_counter() - self.start)} elapsed, ETA {self.eta()}]")

    def watch(self, every: float = 30.0) -> None:
        stop = self._stop = threading.Event()  # a fresh one: a study in stages watches each stage

        def loop():
            while not stop.wait(every):
                runs = ", ".join(f"{n} step {_last_step(self._spec(n).run_dir)}/"
                                 f"{self._spec(n).max_steps or '?'}" for n in sorted(self.active))
                if runs:
                    self.log(f"bench: {runs} | {len(self.done)}/{len(self.specs)} done | ETA {self.eta()}")

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def _spec(self, name: str) -> RunSpec:
        return next(s for s in self.specs if s.name == name)

    def stop(self) -> None:
        self._stop.set()


def duration(seconds: float) -> str:
    """`seconds` as "1h02m" or "3m07s"."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


FINISHED = "finished earlier"  # node 0's reason for skipping a run that has its row


def _failed(spec: RunSpec, err: BaseException) -> dict[str, Any]:
    """The row of a run whose worker or job died before run_one could write one."""
    return {"name": spec.name, "algorithm": spec.algorithm, "seed": spec.seed, "run": spec.run_dir,
            "status": "failed", "error": f"{type(err).__name__}: {err}"}


# ----------------------------------------------------------------------------- several nodes

NODES_DIR = ".nodes"  # in --out: node 0's heartbeat and its decision on each run
HEARTBEAT_S = 5.0  # node 0 rewrites its heartbeat this often
POLL_S = 2.0  # another node reads node 0's files this often
DEAD_AFTER_S = 3600.0  # another node gives up when node 0's heartbeat has not moved for this long
DECISION_TIMEOUT_S = 48 * 3600.0  # ... or when one decision takes this long with node 0 alive
REPORT_EVERY_S = 300.0  # the waiting node's progress line
_LIVE: dict[str, str] = {}  # {nodes dir: node 0's session seen beating by this process}


def _nodes_dir(spec: RunSpec) -> Path | None:
    nodes = (spec.torchrun or {}).get("nodes_dir")
    return Path(nodes) if nodes else None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = read_json(path)
    except (OSError, ValueError):  # absent, or (on a filesystem without atomic renames) half-written
        return None
    return value if isinstance(value, dict) else None


class Node0Heartbeat:
    """Node 0 of a multi-node torchrun study, for the length of its call: a fresh session id,
    given to every spec (`publish_decision` stamps its decisions with it), and a thread rewriting
    ``<nodes_dir>/node0.json`` every HEARTBEAT_S, marked "ended" on exit. Another node trusts
    only a session it has seen beat, so a previous call's files never pass for this one's."""

    def __init__(self, nodes_dir: str | Path, specs: list[RunSpec]):
        self.path = Path(nodes_dir) / "node0.json"
        self.specs = specs
        self.session = uuid.uuid4().hex
        self.beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, ended: bool = False) -> None:
        self.beat += 1
        with contextlib.suppress(OSError):  # a hiccup of the shared filesystem: the next beat retries
            write_json(self.path, {"session": self.session, "beat": self.beat, "ended": ended,
                                   "time": time.time()})

    def __enter__(self) -> str:
        for spec in self.specs:
            spec.torchrun = {**(spec.torchrun or {}), "session": self.session}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                self._write()

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()
        return self.session

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write(ended=True)


def publish_decision(spec: RunSpec, decision: str, why: str = "") -> None:
    """Node 0 of a multi-node torchrun study: tell the other nodes whether it trains `spec` now
    ("train", written just before its torchrun starts) or not ("skip", with `why`). A no-op for
    any other study (no session in the spec)."""
    rdzv = spec.torchrun or {}
    nodes = _nodes_dir(spec)
    if nodes is None or not rdzv.get("session") or int(rdzv.get("node_rank") or 0) != 0:
        return
    write_json(nodes / f"{spec.name}.json", {"session": rdzv["session"], "decision": decision,
                                             "why": why, "time": time.time()})


def await_decision(spec: RunSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A node other than node 0: wait for node 0's decision on `spec` ({"decision": "train" or
    "skip", "why"}) in the shared --out, polling every POLL_S with a line every REPORT_EVERY_S.
    Only a decision of node 0's live session counts (one whose heartbeat this process saw move);
    an ended session decides "skip" for every run it had not decided. Raises after DEAD_AFTER_S
    without a heartbeat (node 0 not running, or --out not shared) or DECISION_TIMEOUT_S in all."""
    nodes = _nodes_dir(spec)
    assert nodes is not None
    key = str(nodes)
    beat_file, decision_file = nodes / "node0.json", nodes / f"{spec.name}.json"
    start = last_change = last_report = time.monotonic()
    first, previous = True, None
    while True:
        beat = _read(beat_file)
        now = time.monotonic()
        if beat is not None and not first and beat != previous:  # it moved: node 0 is running
            _LIVE[key], last_change = str(beat.get("session")), now
        first, previous = False, beat
        live = _LIVE.get(key)
        if live is not None:
            decision = _read(decision_file)
            if decision is not None and decision.get("session") == live:
                return decision
            if beat is not None and beat.get("session") == live and beat.get("ended"):
                return {"decision": "skip", "why": "node 0 ended its study before this run"}
        if now - last_change > DEAD_AFTER_S:
            raise RuntimeError(f"node 0's heartbeat {beat_file} has not moved for "
                               f"{duration(now - last_change)}: "
                               "start node 0 with the same command, and give every node the same --out on a "
                               "filesystem they all share (node 0 publishes there which runs it trains).")
        if now - start > DECISION_TIMEOUT_S:
            raise RuntimeError(f"node 0 decided nothing on {spec.name} in {duration(now - start)}; "
                               "rerun the study on every node.")
        if now - last_report >= REPORT_EVERY_S:
            state = "alive" if live is not None and now - last_change < 4 * HEARTBEAT_S + POLL_S else \
                f"not seen beating for {duration(now - last_change)}"
            log(f"bench: waiting for node 0's decision on {spec.name} in {nodes} (node 0 {state}; "
                f"waited {duration(now - start)})")
            last_report = now
        time.sleep(POLL_S)


def _run_in_worker(spec: RunSpec) -> dict[str, Any]:
    publish_decision(spec, "train")
    return run_one(spec, progress=False)


def follow_run(spec: RunSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A node other than node 0: this node's part of the run's training, as a row for the progress
    lines (node 0's bench_run.json is the run's row). Over several nodes sharing --out, it waits
    for node 0's decision on the run first and skips what node 0 skips."""
    if finished_row(spec) is not None:
        return {"name": spec.name, "status": "ok", "skipped": True}
    if _nodes_dir(spec) is not None:
        decision = await_decision(spec, log)
        if decision.get("decision") != "train":
            why = decision.get("why") or "node 0 skipped it"
            if why == FINISHED:
                return {"name": spec.name, "status": "ok", "skipped": True}
            return {"name": spec.name, "status": "failed", "error": f"not trained by node 0: {why}"}
    try:
        train_only(spec)
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001  node 0 reports the run; this node goes on
        return _failed(spec, err)
    return {"name": spec.name, "status": "ok"}


def run_all(specs: list[RunSpec], jobs: int = 1, launcher: str = "local",
            slurm: dict[str, Any] | None = None, slurm_folder: str | Path | None = None,
            log: Callable[[str], None] = print, progress: Progress | None = None,
            gpus: list[str] | None = None, node_rank: int = 0) -> list[dict[str, Any]]:
    """Run every spec with the chosen launcher; rows in the order of `specs`. `progress` (one
    over the whole study, when it runs in stages) reports them; by default, one over `specs`.
    `gpus`: one CUDA_VISIBLE_DEVICES value per concurrent worker (`placement.gpu_slots`; None on
    a CPU). `node_rank` > 0: this node only joins each run's torchrun training (`follow_run`)."""
    progress = progress or Progress(specs, log)
    rows: dict[str, dict] = {}
    todo = []
    for spec in specs:
        done = finished_row(spec)
        if done is not None:
            rows[spec.name] = dict(done, skipped=True)
            publish_decision(spec, "skip", FINISHED)
            progress.finished(spec, rows[spec.name])
        else:
            todo.append(spec)
    work = follow_run if node_rank > 0 else _run_in_worker
    if launcher == "slurm":
        rows.update(_run_slurm(todo, progress, slurm or {}, slurm_folder))
    elif jobs <= 1:
        for spec in todo:
            progress.started(spec)
            if node_rank > 0:
                rows[spec.name] = follow_run(spec, log)
            else:
                publish_decision(spec, "train")
                rows[spec.name] = run_one(spec, progress=None)
            progress.finished(spec, rows[spec.name])
    else:
        rows.update(_run_pool(todo, jobs, progress, gpus, work))
    return [rows[s.name] for s in specs]


def _die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to end this worker when the bench process
    dies (a killed bench must not leave trainings running)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_STOPPING = None  # in a worker process: the bench's "stop" event (set by init_worker)


def init_worker(slots=None, stopping=None) -> None:
    """Worker initializer: take this worker's GPUs (one value of the `slots` queue, see
    `take_gpu_slot`); keep the bench's `stopping` event (see `start_unless_stopped`); die with the
    bench (above); leave the terminal's process group, so that Ctrl-C reaches the bench alone,
    which then sends each worker one SIGTERM; and take SIGTERM outside training as an interruption
    (inside, the trainer checkpoints first)."""
    global _STOPPING
    _STOPPING = stopping
    take_gpu_slot(slots)
    _die_with_parent()
    with contextlib.suppress(OSError):
        os.setpgrp()

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)


def take_gpu_slot(slots) -> str | None:
    """Set CUDA_VISIBLE_DEVICES to the next value of the `slots` queue (each worker takes one and
    keeps it for every run it trains; no GPU placement without a queue). It runs before the
    worker touches CUDA, so the worker's ``cuda``/``cuda:0`` is its own GPU and a torchrun child
    inherits exactly its GPUs. Returns the value taken."""
    if slots is None:
        return None
    slot = slots.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = slot
    return slot


def start_unless_stopped(work: Callable[[RunSpec], dict[str, Any]], spec: RunSpec) -> dict[str, Any]:
    """A worker's call: `work(spec)`, unless the bench is stopping. ProcessPoolExecutor hands a
    worker its next run before the current one ends (a queued run can no longer be cancelled), so
    without this check an interrupted bench would wait while that run trained to its end."""
    if _STOPPING is not None and _STOPPING.is_set():
        raise Interrupted(f"{spec.name}: not started (the bench was interrupted)")
    return work(spec)


def signal_workers(pool, futures) -> None:
    """Cancel the `futures` of a ProcessPoolExecutor not started yet and send each of its worker
    processes one SIGTERM (a worker in training checkpoints, then raises Interrupted)."""
    for future in futures:
        future.cancel()
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)


def _stop_pool(pool, futures: dict, rows: dict[str, dict], progress: Progress, stopping) -> None:
    """The bench was interrupted: cancel the runs not started (`stopping` keeps those a worker
    already holds from starting), send every worker SIGTERM (its training checkpoints) and wait
    for the running ones to stop; their rows land in `rows`."""
    with signals_ignored():
        stopping.set()
        signal_workers(pool, futures)
        for future, spec in futures.items():
            if future.cancelled() or spec.name in rows:
                continue
            try:
                rows[spec.name] = future.result()
            except Interrupted:
                continue
            except Exception as err:  # noqa: BLE001  the worker process itself died
                rows[spec.name] = _failed(spec, err)
            progress.finished(spec, rows[spec.name])


def _run_pool(specs: list[RunSpec], jobs: int, progress: Progress, gpus: list[str] | None = None,
              work: Callable[[RunSpec], dict[str, Any]] = _run_in_worker) -> dict[str, dict]:
    threads = max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(specs))))  # a lone run takes every core
    rows = {}
    progress.watch()
    try:
        context = multiprocessing.get_context("spawn")
        slots = None
        stopping = context.Event()
        if gpus:
            slots = context.Queue()
            for slot in gpus[:jobs]:
                slots.put(slot)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=init_worker,
                                 initargs=(slots, stopping)) as pool:
            futures = {}
            for spec in specs:
                Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
                child = RunSpec(**{**asdict(spec), "threads": spec.threads or threads,
                                   "log_file": str(Path(spec.run_dir) / "bench.log")})
                futures[pool.submit(start_unless_stopped, work, child)] = spec
            for spec in specs[:jobs]:
                progress.started(spec)
            started = min(jobs, len(specs))
            try:
                for future in as_completed(futures):
                    spec = futures[future]
                    try:
                        rows[spec.name] = future.result()
                    except Interrupted:  # a worker got a signal of its own: stop the study
                        raise KeyboardInterrupt(spec.name) from None
                    except Exception as err:  # noqa: BLE001  the worker process itself died
                        rows[spec.name] = _failed(spec, err)
                    progress.finished(spec, rows[spec.name])
                    if started < len(specs):
                        progress.started(specs[started])
                        started += 1
            except KeyboardInterrupt:
                _stop_pool(pool, futures, rows, progress, stopping)
                raise
    finally:
        progress.stop()
    return rows


CPUS_PER_GPU = 8  # a job's default CPU cores per GPU (torchrun's ranks, data loading, tokenising)


def slurm_parameters(specs: list[RunSpec], options: dict[str, Any]) -> dict[str, Any]:
    """submitit's update_parameters for the study's jobs: the defaults (a day, "libmoe-bench"),
    then, for runs of several GPUs or nodes, nodes = --nnodes, gpus_per_node = --nproc-per-node and
    one task per node (torchrun inside the job starts one process per GPU), then `options` (the
    user's --slurm-option values win). A job with GPUs gets CPUS_PER_GPU cores per GPU of its task
    (cpus_per_task) unless the options name cpus_per_task: Slurm's default of one core per task
    would put torchrun and every rank it starts on one core."""
    params: dict[str, Any] = {"timeout_min": 24 * 60, "name": "libmoe-bench"}
    if specs and distributed(specs[0]):
        spec = specs[0]
        params.update(nodes=int((spec.torchrun or {}).get("nnodes") or 1), gpus_per_node=spec.nproc,
                      tasks_per_node=1)
    params.update(options)
    gpus = params.get("gpus_per_node", params.get("slurm_gpus_per_node"))
    tasks = params.get("tasks_per_node", params.get("slurm_ntasks_per_node")) or 1
    if isinstance(gpus, int) and gpus > 0 and not {"cpus_per_task", "slurm_cpus_per_task"} & set(options):
        params["cpus_per_task"] = max(1, CPUS_PER_GPU * gpus // int(tasks))
    return params


def job_row(job) -> dict[str, Any] | None:
    """The row a submitit job returned: task 0's (`_run_slurm_task`: node 0 writes the row, the
    other tasks return None). submitit's `Job.result()` refuses a job of several tasks (one per
    node of a multi-node run), so such a job's row is its task 0's result."""
    if getattr(job, "num_tasks", 1) > 1:
        return job.task(0).result()
    return job.result()


def slurm_rendezvous(spec: RunSpec, job_id: str, hostnames: list[str], num_nodes: int) -> RunSpec:
    """`spec` as one Slurm job of `num_nodes` nodes trains it: one node standalone; several meet
    at the first node's host, on a port and with an id taken from the job id (every task of the
    job computes the same, and no two jobs share them)."""
    if num_nodes <= 1:
        return replace(spec, torchrun={**(spec.torchrun or {}), "nnodes": 1, "rdzv_endpoint": None})
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    port = 20000 + int(digits) % 20000
    return replace(spec, torchrun={**(spec.torchrun or {}), "nnodes": num_nodes, "offset": 0,
                                   "rdzv_endpoint": f"{hostnames[0]}:{port}",
                                   "rdzv_id": f"slurm-{job_id}", "rdzv_backend": "c10d"})


def _run_slurm_task(spec: RunSpec) -> dict[str, Any] | None:
    """One task of a Slurm job: a run of one process trains here (`run_one`); a run of several
    GPUs or nodes runs torchrun inside the job, task 0 (node 0) trains, evaluates and writes the
    row, the other tasks (one per node) join its training and return None."""
    if not distributed(spec):
        return run_one(spec, progress=False)
    import submitit

    env = submitit.JobEnvironment()
    spec = slurm_rendezvous(spec, env.job_id, list(env.hostnames), env.num_nodes)
    if env.global_rank == 0:
        return run_one(spec, progress=False)
    train_only(spec)
    return None


def _run_slurm(specs: list[RunSpec], progress: Progress, options: dict[str, Any],
               folder: str | Path | None) -> dict[str, dict]:
    """Submit each run as a Slurm job through submitit (options: submitit's update_parameters,
    e.g. slurm_partition, timeout_min, gpus_per_node, cpus_per_task; "cluster": "local" or
    "debug" runs them on this machine, as submitit does for testing; see `slurm_parameters`)."""
    try:
        import submitit
    except ImportError as err:
        raise ValueError("--launcher slurm needs submitit: pip install 'libmoe[slurm]'.") from err
    options = dict(options)
    cluster = options.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=str(folder or "slurm"), cluster=cluster)
    executor.update_parameters(**slurm_parameters(specs, options))
    jobs = []
    for spec in specs:
        jobs.append((spec, executor.submit(_run_slurm_task, spec)))
        progress.started(spec)
        progress.log(f"bench: {spec.name} submitted as job {jobs[-1][1].job_id}")
    rows = {}
    progress.watch(every=60.0)
    try:
        for spec, job in jobs:
            try:
                rows[spec.name] = job_row(job)
            except Exception as err:  # noqa: BLE001  the job failed outside run_one
                rows[spec.name] = _failed(spec, err)
            progress.finished(spec, rows[spec.name])
    finally:
        progress.stop()
    return rows
