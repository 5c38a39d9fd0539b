"""One run of a bench study, as the runner and the launchers pass it around (`RunSpec`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunSpec:
    """One training + evaluation of the study (picklable: it travels to worker processes). Its
    `config` is what the regime trains from (a language-model run's RunConfig as a dict; a VLM
    stage's job); `config_hash` names it."""

    name: str
    algorithm: str
    seed: int
    run_dir: str
    config: dict[str, Any]
    tasks: list[str] = field(default_factory=list)
    limits: dict[str, int | None] = field(default_factory=dict)
    data_dir: str | None = None
    val_tokens: int | str = "run"
    launcher: str = "local"
    nproc: int = 1  # processes per node under torchrun (one per GPU)
    torchrun: dict[str, Any] = field(default_factory=dict)  # nnodes, rdzv_endpoint, rdzv_id,
    # rdzv_backend, node_rank, join_timeout (libmoe.bench.placement) and offset: the run's place in
    # the study (its rendezvous port is the endpoint's + offset)
    threads: int | None = None
    log_file: str | None = None  # worker processes write their output here
    analysis: bool = True  # analyse the run's routing where it ran (RUN/analysis)
    interventions: bool | list[str] = True  # True, False or the studies: droptop, temperature
    regime: str = "pretrain"  # libmoe.bench.regimes: the regime that trains and evaluates it
    role: str = "row"  # "row": a row of the tables; "source": a run the rows start from;
    # "study": a run of an extra study (libmoe.bench.studies)
    evaluate: bool = True  # evaluate and time the trained model (a study's run needs neither)
    needs: list[str] = field(default_factory=list)  # runs of earlier stages this one starts from
    prepare: dict[str, Any] = field(default_factory=dict)  # the regime's, e.g. what to upcycle
    max_steps: int | None = None  # training steps, for the progress lines (None: the config's
    # train.max_steps, when it has one)

    def __post_init__(self) -> None:
        if self.max_steps is None:
            self.max_steps = (self.config.get("train") or {}).get("max_steps")

    @property
    def config_hash(self) -> str:
        payload = self.config if not self.prepare else {"config": self.config, "prepare": self.prepare}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
