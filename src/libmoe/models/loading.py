"""Load a trained libmoe model (and its tokenizer) from a run or checkpoint directory.

    from libmoe.models import load_model
    loaded = load_model("runs/tiny-smoe")            # newest checkpoint of the run
    loaded = load_model("runs/tiny-smoe/checkpoints/step_300")
    loaded.model, loaded.tokenizer, loaded.step

A run directory holds ``config.yaml``, ``tokenizer/`` and ``checkpoints/step_<N>/``; a checkpoint
directory holds ``model.safetensors`` and ``config.yaml`` (see docs/training.md). A directory in
transformers' format (``config.json`` + weights + tokenizer files: an exported model, or any Hugging
Face causal LM) loads through ``AutoModelForCausalLM``. Weights are read with safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from .config import ModelConfig
from .transformer import MoETransformer


@dataclass
class LoadedModel:
    model: nn.Module  # a MoETransformer, or a transformers model for a transformers directory
    tokenizer: Any
    checkpoint: Path
    step: int | None
    config: dict[str, Any]  # the run's resolved config as saved ({} for a transformers directory)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself, or a run directory's newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {str(path)!r}: give a run or checkpoint directory.")
    if (path / "model.safetensors").is_file() or _is_transformers_dir(path):
        return path
    if (path / "config.yaml").is_file():
        from ..train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"run {str(path)!r} has no checkpoint yet (checkpoints/step_N).")
        return ckpt
    raise ValueError(f"{str(path)!r} is not a libmoe model: expected a run directory (config.yaml, "
                     "checkpoints/), a checkpoint directory (model.safetensors, config.yaml) or a "
                     "transformers model directory (config.json).")


def _is_transformers_dir(path: Path) -> bool:
    """A transformers model directory: config.json, and either no libmoe config.yaml (an exported
    or Hub model) or a model other than libmoe's MoETransformer (a checkpoint of a run that trains
    a transformers model, e.g. an upcycled Llama)."""
    if not (path / "config.json").is_file():
        return False
    if not (path / "config.yaml").is_file():
        return True
    return json.loads((path / "config.json").read_text()).get("model_type") != "libmoe"


def _load_transformers(path: Path, device: str | torch.device) -> LoadedModel:
    from ..data.tokenizer import load_tokenizer

    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ValueError(f"{str(path)!r} is a transformers model directory; loading it needs "
                         "transformers: pip install 'libmoe[hub]'.") from err
    import libmoe.upcycle.hf_saving  # noqa: F401  registers libmoe_upcycled with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    if type(model).__name__ == "LibMoEForCausalLM":  # libmoe's own model saved by transformers
        model = model.model
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                       "tokenizer.model"))
    tokenizer = load_tokenizer(path if has_tokenizer else _find_tokenizer(path))
    config, step = {}, None
    if (path / "config.yaml").is_file():  # a checkpoint of a libmoe run
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if (path / "checkpoint.json").is_file():
        step = json.loads((path / "checkpoint.json").read_text()).get("step")
    return LoadedModel(model.to(device).eval(), tokenizer, path, step, config)


def _find_tokenizer(ckpt: Path) -> Path:
    for candidate in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no tokenizer for {str(ckpt)!r}: expected {ckpt}/tokenizer or the run's "
                            "tokenizer/ two levels up.")


def save_model_dir(out: str | Path, model: MoETransformer, run_config: dict[str, Any],
                   tokenizer_dir: str | Path) -> Path:
    """Write a model directory: model.safetensors, config.yaml (`run_config` with the model's
    section), tokenizer/, and transformers' config.json when transformers is installed, so both
    `load_model` and AutoModelForCausalLM (after `import libmoe`) load it."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(run_config, model=model.config.to_dict())
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    try:
        from .hf import write_hf_config
    except ImportError:  # transformers is optional; libmoe reads the directory without it
        return out
    write_hf_config(out, model.config)
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a run (newest checkpoint) or checkpoint directory, in eval mode, with its
    tokenizer; see the module docstring."""
    from ..data.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(path)
    if _is_transformers_dir(ckpt):
        return _load_transformers(ckpt, device)
    config_path = ckpt / "config.yaml"
    if not config_path.is_file():
        config_path = ckpt.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{str(ckpt)!r} is not a libmoe checkpoint: no config.yaml beside it.")
    config = yaml.safe_load(config_path.read_text()) or {}
    if "model" not in config:
        raise ValueError(f"{str(config_path)!r} has no model section; it is not a libmoe run config.")
    model = MoETransformer(ModelConfig(**config["model"]))
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    model.to(device).eval()
    step = None
    if (ckpt / "checkpoint.json").is_file():
        step = json.loads((ckpt / "checkpoint.json").read_text()).get("step")
    return LoadedModel(model, load_tokenizer(_find_tokenizer(ckpt)), ckpt, step, config)
