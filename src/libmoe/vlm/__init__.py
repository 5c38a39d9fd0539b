"""Vision-language sparse upcycling (the paper's LLaVA-style pipeline): model, presets, data, stages,
evaluation and analysis. The VLM bench regime is the bench's (`libmoe.bench.run_vlm_bench`). See
docs/vlm.md.

    from libmoe.vlm import parameter_report, train_stage
    parameter_report("paper-phi35-siglip")    # Table 3, on the meta device (no download)
    train_stage("pt", "runs/pt", preset="cpu-tiny")

Importing the package registers the VLM's run kind with `libmoe.analysis` (`VLM_RUN_KIND`), so
`libmoe.analysis.analyze_run` analyses VLM runs. transformers, PIL and the other optional
dependencies are imported only where used.
"""

from __future__ import annotations

from ..analysis import register_run_kind
from .analysis import VLM_RUN_KIND, analyze_vlm_run
from .data import load_conversations, load_image, load_mme
from .evaluate import check_tasks, evaluate_run, evaluate_vlm, score_mme
from .lmms import tasks_path
from .model import LibMoEVLM, build_vlm
from .plots import plot_subtask_routing
from .presets import STAGE_HELP, STAGES, VLM_PRESETS, load_vlm_preset
from .runs import active_parameters, latency_inputs, read_stage_config, stage_config_change
from .saving import load_vlm, save_vlm
from .stages import CONFIG_FILE, DEFAULT_CHECKPOINTS, stage_config
from .synth import SUBTASKS, write_synth_dataset
from .trace import record_vlm_trace
from .train import train_stage
from .upcycle import parameter_report, upcycle_vlm

register_run_kind(VLM_RUN_KIND)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CHECKPOINTS",
    "LibMoEVLM",
    "STAGES",
    "STAGE_HELP",
    "SUBTASKS",
    "VLM_PRESETS",
    "VLM_RUN_KIND",
    "active_parameters",
    "analyze_vlm_run",
    "build_vlm",
    "check_tasks",
    "evaluate_run",
    "evaluate_vlm",
    "latency_inputs",
    "load_conversations",
    "load_image",
    "load_mme",
    "load_vlm",
    "load_vlm_preset",
    "parameter_report",
    "plot_subtask_routing",
    "read_stage_config",
    "record_vlm_trace",
    "save_vlm",
    "score_mme",
    "stage_config",
    "stage_config_change",
    "tasks_path",
    "train_stage",
    "upcycle_vlm",
    "write_synth_dataset",
]

