"""What a study needs to know about a trained VLM run, beside its scores: its parameter counts,
the inputs of one forward at batch 1 (to time it), how its stage's config changed since it was
trained, and its stage's resolved config. The bench's vlm regime (`libmoe.bench.regimes.vlm`)
uses these; they know nothing of the bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ..models import count_parameters
from ..overrides import load_yaml
from ..train import config_diff
from .model import LibMoEVLM
from .stages import CONFIG_FILE, config_hash


def active_parameters(model: LibMoEVLM) -> tuple[int, int]:
    """(total, active per token) parameters of a VLM: each MoE layer's routed experts count
    top_k of n_experts (`libmoe.models.count_parameters`, which the VLM's layers satisfy)."""
    return count_parameters(model)


def latency_inputs(model: LibMoEVLM) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, pixels) of one forward at batch 1, on the model's device: one image (seeded
    noise) and a 16-token question; time `model(*latency_inputs(model))`."""
    device = next(model.parameters()).device
    ids = torch.full((1, model.n_image_tokens + 16), 5, dtype=torch.long)
    ids[0, : model.n_image_tokens] = model.image_token_id
    pixels = torch.randn(1, 3, model.pixel_size, model.pixel_size, generator=torch.Generator().manual_seed(0))
    return ids.to(device), pixels.to(device)


def stage_config_change(run: str | Path, cfg: dict[str, Any]) -> list[str] | None:
    """How RUN/config.yaml differs from the stage config `cfg` (None: the same, or nothing
    readable to compare)."""
    try:
        old = load_yaml(Path(run) / CONFIG_FILE)
    except (OSError, ValueError):  # absent or unreadable: nothing to compare
        return None
    return None if config_hash(old) == config_hash(cfg) else (config_diff(old, cfg) or ["config"])


def read_stage_config(run: str | Path) -> dict[str, Any]:
    """RUN/config.yaml (a stage's resolved config), {} without it."""
    path = Path(run) / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else {}

