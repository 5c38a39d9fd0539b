"""The run config schema lives in `libmoe.models.run_config` (evaluation and analysis read run
configs without importing training); re-exported here, where training's callers find it."""

from ..models.run_config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    deep_merge,
    load_run_config,
    load_yaml,
    parse_override,
    prepare_run_data,
    resolve_config,
)

__all__ = ["DataConfig", "OptimConfig", "RunConfig", "TrainConfig", "config_from_dict", "deep_merge",
           "load_run_config", "load_yaml", "parse_override", "prepare_run_data", "resolve_config"]
