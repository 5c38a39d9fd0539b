"""Where a bench run's processes go: the GPUs this machine shows (`visible_gpus`), one slot of
them per concurrent job (`gpu_slots`; a worker gets ``CUDA_VISIBLE_DEVICES=<its slot>``, so inside
it ``cuda``/``cuda:0`` is its own GPU), and the torchrun command of a job (`torchrun_command`):
``--standalone`` on one node (torchrun binds a free rendezvous port per job, so several jobs run at
once on one node), or a c10d rendezvous at ``--rdzv-endpoint`` over several nodes, each run with
its own rendezvous id and port (the endpoint's port plus the run's place in the study), so that
runs in parallel never meet in one rendezvous.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Rendezvous", "default_jobs", "endpoint_for", "gpu_slots", "gpus_per_job", "torchrun_command",
           "visible_gpus"]

DEFAULT_RDZV_PORT = 29400  # torchrun's own default for c10d
JOIN_TIMEOUT_S = 3 * 3600  # a node waits this long for the others (the driver evaluates in between)


def visible_gpus(env: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (indices or
    UUIDs): its list when set (an empty value hides every GPU), else 0..N-1 for the N devices
    torch sees (none on a CPU-only machine or a PyTorch without CUDA). `env` and `count` stand in
    for os.environ and torch.cuda.device_count() (tests fake a GPU node with them)."""
    env = os.environ if env is None else env
    if count is None:
        count = _cuda_count()
    if count == 0:  # CPU only (CUDA_VISIBLE_DEVICES may still be set): no GPU placement
        return []
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    names = [n.strip() for n in listed.split(",") if n.strip()]
    # CUDA stops at the first invalid entry ("-1" hides every GPU): keep the ones before it
    cut = next((i for i, n in enumerate(names) if n.startswith("-")), len(names))
    return names[:cut][:count]


def _cuda_count() -> int:
    if not (torch.version.cuda or getattr(torch.version, "hip", None)):
        return 0
    try:
        return torch.cuda.device_count()  # NVML where it can: no CUDA context in the bench process
    except Exception:  # noqa: BLE001  a broken driver: no GPU for the bench's purpose
        return 0


def gpus_per_job(launcher: str, nproc: int) -> int:
    """GPUs one job of the bench takes on this node: torchrun's processes per node, else 1."""
    return nproc if launcher == "torchrun" else 1


def default_jobs(gpus: list[str], per_job: int, fallback: int) -> int:
    """--jobs when not given: as many jobs as the visible GPUs hold (at least one), else `fallback`
    (a CPU-only machine keeps the preset's default)."""
    return max(1, len(gpus) // per_job) if gpus else fallback


def gpu_slots(gpus: list[str], jobs: int, per_job: int) -> list[str] | None:
    """One CUDA_VISIBLE_DEVICES value per concurrent job, round-robin over `gpus` (job i takes
    gpus[i*per_job:(i+1)*per_job]); None without GPUs (CPU: no placement). Refuses more GPUs than
    are visible, before any work."""
    if not gpus:
        return None
    if jobs * per_job > len(gpus):
        raise ValueError(f"--jobs {jobs} x {per_job} GPU(s) per job needs {jobs * per_job} GPUs but "
                         f"{len(gpus)} are visible ({','.join(gpus)}); lower --jobs or --nproc-per-node.")
    return [",".join(gpus[i * per_job:(i + 1) * per_job]) for i in range(jobs)]


@dataclass
class Rendezvous:
    """torchrun's multi-node options for the bench's jobs (one node: all defaults, --standalone).
    `node_rank` 0 is the node that runs the study (prepares, evaluates, writes the tables); the
    others only join each run's training."""

    nnodes: int = 1
    endpoint: str | None = None  # HOST[:PORT] of the rendezvous (node 0's address)
    rdzv_id: str = "libmoe-bench"
    backend: str = "c10d"
    node_rank: int = 0
    join_timeout: int = JOIN_TIMEOUT_S

    def check(self, launcher: str = "torchrun") -> None:
        """One sentence naming the fix for an impossible combination (a Slurm job finds its own
        endpoint: its first node)."""
        if self.nnodes < 1 or self.node_rank < 0 or self.node_rank >= self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} with --node-rank {self.node_rank}: give --nnodes >= 1 "
                             "and a --node-rank from 0 to nnodes-1.")
        if launcher == "slurm" and self.node_rank:
            raise ValueError("--node-rank is for --launcher torchrun; a Slurm job places its own nodes.")
        if self.nnodes > 1 and not self.endpoint and launcher != "slurm":
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST[:PORT] (node 0's address, "
                             "reachable from every node) so that the nodes find each other.")

    def as_dict(self) -> dict[str, Any]:
        """The options as RunSpec.torchrun holds them (what `torchrun_command` reads)."""
        return dict(nnodes=self.nnodes, rdzv_endpoint=self.endpoint, rdzv_id=self.rdzv_id,
                    rdzv_backend=self.backend, node_rank=self.node_rank, join_timeout=self.join_timeout)


def endpoint_for(endpoint: str, offset: int) -> str:
    """HOST:PORT+offset (PORT defaults to torchrun's 29400): the rendezvous of the run at `offset`."""
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    if not host:
        host, port = endpoint, ""
    return f"{host}:{int(port or DEFAULT_RDZV_PORT) + offset}"


def torchrun_command(nproc: int, entry: list[str], rdzv: Mapping[str, Any] | None = None,
                     name: str = "run", offset: int = 0) -> list[str]:
    """`python -m torch.distributed.run ... <entry>`: --standalone for one node; for several, a
    c10d rendezvous at the endpoint's port + `offset` with id "<rdzv_id>-<name>" (every node of
    one run computes the same), waiting up to `join_timeout` seconds for the other nodes."""
    rdzv = dict(rdzv or {})
    nnodes = int(rdzv.get("nnodes") or 1)
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and not rdzv.get("rdzv_endpoint"):
        cmd += ["--standalone", f"--nproc-per-node={nproc}"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                f"--rdzv-backend={rdzv.get('rdzv_backend') or 'c10d'}",
                f"--rdzv-endpoint={endpoint_for(rdzv['rdzv_endpoint'], offset)}",
                f"--rdzv-id={rdzv.get('rdzv_id') or 'libmoe-bench'}-{name}",
                f"--rdzv-conf=join_timeout={int(rdzv.get('join_timeout') or JOIN_TIMEOUT_S)}"]
        if (rdzv.get("rdzv_backend") or "c10d") == "static":
            cmd.append(f"--node-rank={int(rdzv.get('node_rank') or 0)}")
    return cmd + entry
