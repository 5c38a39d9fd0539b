"""A VLM directory on disk (a checkpoint, or the newest checkpoint of a run): vlm.json (the
model spec and stage), model.safetensors and the tokenizer. `load_vlm` rebuilds the model from its
spec, MoE layers included (`upcycle_vlm` without copying weights), then loads the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..files import write_json
from ..models import latest_checkpoint
from ..moe import legacy_options
from .model import MODEL_FILE, VLM_FILE, LibMoEVLM, load_state, model_state
from .upcycle import upcycle_vlm


def save_vlm(model: LibMoEVLM, tokenizer, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write vlm.json, model.safetensors and the tokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "libmoe-vlm", "model": model.spec, "aux_combine": model.aux_combine, **(extra or {})}
    write_json(directory / VLM_FILE, meta, indent=1)
    save_file(model_state(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    return directory


def is_vlm_dir(path: str | Path) -> bool:
    return (Path(path) / VLM_FILE).is_file()


def load_vlm(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) of a VLM directory: a checkpoint, or a run (its newest checkpoint)."""
    from transformers import AutoTokenizer  # seconds to import, and only loading needs it

    directory = resolve_model_dir(directory)
    meta = json.loads((directory / VLM_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    spec = meta["model"]
    model = LibMoEVLM(spec)
    state = load_file(str(directory / MODEL_FILE))
    if spec.get("moe"):
        upcycle_vlm(model, **_with_saved_layout(spec["moe"], state), copy_weights=False)
    model.aux_combine = meta.get("aux_combine", model.aux_combine)
    load_state(model, state)
    return model.to(device).eval(), tokenizer, meta


def _with_saved_layout(moe: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """upcycle_vlm's settings of a saved model, with the MoE++ slot counts of a model saved before
    they scaled with E (1 zero + 1 copy + 6 constant experts then), read off the router weight of
    a vision layer (the connector, of another width, has no copy or constant experts)."""
    routers = [t for k, t in state.items() if k.endswith("router.weight") and not k.startswith("connector")]
    if not routers or moe["algorithm"] in ("dense",):
        return moe
    rows, width = routers[0].shape
    options = dict(moe.get("options") or {})
    legacy = legacy_options(moe["algorithm"], width, moe.get("n_experts", 6), moe.get("top_k", 3), rows,
                            **options)
    return {**moe, "options": {**options, **legacy}} if legacy else moe


def resolve_model_dir(path: str | Path) -> Path:
    """A directory holding vlm.json: `path` itself, or the newest checkpoint of the run `path`."""
    path = Path(path)
    if is_vlm_dir(path):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is not None and is_vlm_dir(ckpt):
        return ckpt
    raise FileNotFoundError(f"{path} is not a libmoe VLM run or checkpoint (no {VLM_FILE} in it or in its "
                            "newest checkpoint); train one with `libmoe vlm train`.")
