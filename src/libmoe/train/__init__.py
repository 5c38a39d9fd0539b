"""Pretraining: the training loop, checkpoints with routing traces, torchrun. The run config and
reading checkpoints back live in `libmoe.models` and are re-exported here.

    from libmoe.train import resolve_config, train
    cfg = resolve_config(preset="micro", overrides=["model.algorithm=smoe", "train.max_steps=20"])
    summary = train(cfg, "runs/micro-smoe")
"""

from ..models.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    verify_checkpoint,
)
from ..models.run_config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    load_run_config,
    prepare_run_data,
    resolve_config,
)
from .checkpoint import agreed_checkpoint, save_checkpoint
from .metrics import MetricsLogger, load_summary
from .rundir import RUN_FILES, config_diff, remove_entries, run_hash
from .stops import StopSignals
from .trace import record_routing, save_trace
from .trainer import check_config, train

__all__ = [
    "RUN_FILES",
    "DataConfig",
    "MetricsLogger",
    "OptimConfig",
    "RunConfig",
    "StopSignals",
    "TrainConfig",
    "agreed_checkpoint",
    "check_config",
    "config_diff",
    "config_from_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_run_config",
    "load_summary",
    "newest_intact_checkpoint",
    "prepare_run_data",
    "record_routing",
    "remove_entries",
    "resolve_config",
    "run_hash",
    "save_checkpoint",
    "save_trace",
    "train",
    "verify_checkpoint",
]
