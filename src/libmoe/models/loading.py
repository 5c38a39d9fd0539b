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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..data.hf_tokenizer import write_transformers_tokenizer
from ..data.tokenizer import load_tokenizer
from ..files import CorruptFileError, read_json_object, sha256, write_bytes, write_text
from ..overrides import load_yaml
from .checkpoints import latest_checkpoint, list_checkpoints
from .config import ModelConfig
from .transformer import MoETransformer


@dataclass
class LoadedModel:
    """A model read back by load_model, with its tokenizer, the checkpoint it came from and its run config."""

    model: nn.Module  # a MoETransformer, or a transformers model for a transformers directory
    tokenizer: Any
    checkpoint: Path
    step: int | None
    config: dict[str, Any]  # the run's resolved config as saved ({} for a transformers directory)


def _damaged_fix(ckpt: Path) -> str:
    """What to do about a damaged file of checkpoint or model directory `ckpt`."""
    if ckpt.parent.name != "checkpoints":
        return ("write this model directory again with the command that made it (libmoe upcycle, "
                "libmoe export or libmoe train)")
    step = _step_of(ckpt)
    earlier = [c for c in list_checkpoints(ckpt.parent.parent) if _step_of(c) < step and _readable(c)]
    if earlier:
        return f"rerun training, or use an earlier checkpoint: {earlier[-1]}"
    return "rerun training (libmoe train --resume continues from an intact checkpoint, if any)"


def _step_of(ckpt: Path) -> int:
    suffix = ckpt.name[len("step_"):]
    return int(suffix) if suffix.isdigit() else -1


def _readable(ckpt: Path) -> bool:
    """Whether a checkpoint's model.safetensors at least has a whole header and all its bytes."""
    return _readable_file(ckpt / "model.safetensors")


def _readable_file(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001  safetensors' own error type, OSError, ...
        return False


def _load_weights(ckpt: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.safetensors of `ckpt`, checked against the checksum checkpoint.json records (when it
    does); a missing, truncated or altered file is a CorruptFileError naming it and the way out."""
    file = ckpt / "model.safetensors"
    if not file.is_file():
        raise CorruptFileError(file, "missing", _damaged_fix(ckpt))
    files = info.get("files")
    expected = files.get("model.safetensors") if isinstance(files, dict) else None
    if isinstance(expected, str) and sha256(file) != expected:
        raise CorruptFileError(file, "it does not match the checksum its checkpoint.json records",
                               _damaged_fix(ckpt))
    try:
        return load_file(str(file))
    except Exception:  # noqa: BLE001  SafetensorError, OSError, ...: never a traceback
        raise CorruptFileError(file, "truncated or not a safetensors file", _damaged_fix(ckpt)) from None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself, or a run directory's newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {str(path)!r}: give a run or checkpoint directory.")
    if (path / "model.safetensors").is_file() or is_transformers_dir(path):
        return path
    if (path / "config.yaml").is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"run {str(path)!r} has no checkpoint yet (checkpoints/step_N).")
        return ckpt
    raise ValueError(f"{str(path)!r} is not a libmoe model: expected a run directory (config.yaml, "
                     "checkpoints/), a checkpoint directory (model.safetensors, config.yaml) or a "
                     "transformers model directory (config.json).")


def is_transformers_dir(path: Path) -> bool:
    """A transformers model directory: config.json, and either no libmoe config.yaml (an exported
    or Hub model) or a model other than libmoe's MoETransformer (a checkpoint of a run that trains
    a transformers model, e.g. an upcycled Llama)."""
    if not (path / "config.json").is_file():
        return False
    if not (path / "config.yaml").is_file():
        return True
    config = read_json_object(path / "config.json", "write the directory again (its config.json is "
                              "transformers' description of the model)")
    return config.get("model_type") != "libmoe"


def _load_transformers(path: Path, device: str | torch.device) -> LoadedModel:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ValueError(f"{str(path)!r} is a transformers model directory; loading it needs "
                         "transformers: pip install 'libmoe[hub]'.") from err
    from . import hf_upcycled  # noqa: F401  (imports transformers) registers libmoe_upcycled

    fix = _damaged_fix(path)
    read_json_object(path / "config.json", fix)  # names the file, unlike transformers' message
    config, step = {}, None
    if (path / "config.yaml").is_file():  # a checkpoint of a libmoe run
        config = load_yaml(path / "config.yaml", "config", fix)
    if (path / "checkpoint.json").is_file():
        step = read_json_object(path / "checkpoint.json", fix).get("step")
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                       "tokenizer.model"))
    tokenizer = load_tokenizer(path if has_tokenizer else find_tokenizer(path))  # before the weights
    weights = sorted(path.glob("*.safetensors"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        if not weights:
            raise FileNotFoundError(f"{str(path)!r} has no safetensors weights (libmoe reads "
                                    "safetensors only); save the model with safe_serialization.") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CorruptFileError(path, f"transformers cannot load the model: {first}", fix) from None
    except Exception as err:  # noqa: BLE001  safetensors' own error on a truncated file
        if type(err).__name__ != "SafetensorError":
            raise
        bad = [w for w in weights if not _readable_file(w)] or [path]
        raise CorruptFileError(bad[0], "truncated or not a safetensors file", fix) from None
    if type(model).__name__ == "LibMoEForCausalLM":  # libmoe's own model saved by transformers
        model = model.to_libmoe()
    return LoadedModel(model.to(device).eval(), tokenizer, path, step, config)


def find_tokenizer(ckpt: Path) -> Path:
    """The tokenizer directory of checkpoint or model directory `ckpt`: its own tokenizer/, else
    its run's (two levels up); FileNotFoundError when neither exists."""
    for candidate in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no tokenizer for {str(ckpt)!r}: expected {ckpt}/tokenizer or the run's "
                            "tokenizer/ two levels up.")


def save_model_dir(out: str | Path, model: MoETransformer, run_config: dict[str, Any],
                   tokenizer_dir: str | Path, log: Any = None) -> Path:
    """Write a model directory: model.safetensors, config.yaml (`run_config` with the model's
    section) and tokenizer/, which libmoe's loaders read; with transformers installed also its
    config.json (bos/eos/pad ids from the tokenizer) and, at the top level, the tokenizer in
    transformers' format (tokenizer.json, tokenizer_config.json, special_tokens_map.json; see
    libmoe.data.hf_tokenizer), so that AutoTokenizer and AutoModelForCausalLM (after `import
    libmoe`) load the directory alone. Each file is written atomically. `log` (default: stderr)
    gets one line when transformers' files are skipped."""
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    config = dict(run_config, model=model.config.to_dict())
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    for file in sorted(f for f in tokenizer_dir.rglob("*") if f.is_file()):
        write_bytes(out / "tokenizer" / file.relative_to(tokenizer_dir), file.read_bytes())
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    try:
        from .hf import LibMoEConfig  # imports transformers
    except ImportError:  # transformers is optional; libmoe reads the directory without it
        for name in ("config.json", "generation_config.json", *tokenizer_files):  # an older export's
            (out / name).unlink(missing_ok=True)
        say(f"libmoe: {out}: transformers' config.json and AutoTokenizer files skipped (transformers is "
            "not installed: pip install transformers); libmoe reads the directory without them.")
        return out
    ids: dict[str, int | None] = {}
    try:
        ids = write_transformers_tokenizer(tokenizer_dir, out, model.config.max_seq_len)
    except Exception as err:  # noqa: BLE001  the model's files stand without them: say why, go on
        for name in tokenizer_files:
            (out / name).unlink(missing_ok=True)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        say(f"libmoe: {out}: AutoTokenizer files skipped: {first}")
    from transformers import GenerationConfig

    hf_config = LibMoEConfig.from_model_config(model.config, architectures=["LibMoEForCausalLM"], **ids)
    write_text(out / "config.json", hf_config.to_json_string())
    generation = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    write_text(out / "generation_config.json", generation.to_json_string())
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a run (newest checkpoint) or checkpoint directory, in eval mode, with its
    tokenizer; see the module docstring."""
    ckpt = resolve_checkpoint(path)
    if is_transformers_dir(ckpt):
        return _load_transformers(ckpt, device)
    config_path = ckpt / "config.yaml"
    if not config_path.is_file():
        config_path = ckpt.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{str(ckpt)!r} is not a libmoe checkpoint: no config.yaml beside it.")
    fix = _damaged_fix(ckpt)
    config = load_yaml(config_path, "config", fix)
    if not isinstance(config.get("model"), dict):
        raise CorruptFileError(config_path, "no model section: not a libmoe run config", fix)
    try:
        model_config = ModelConfig(**config["model"])
    except TypeError as err:  # an unknown or missing key
        raise CorruptFileError(config_path, f"its model section is not a libmoe model: {err}", fix) from None
    except ValueError as err:
        raise CorruptFileError(config_path, f"its model section is invalid: {err}", fix) from None
    info: dict[str, Any] = {}
    if (ckpt / "checkpoint.json").is_file():
        info = read_json_object(ckpt / "checkpoint.json", fix)
    tokenizer = load_tokenizer(find_tokenizer(ckpt))  # a damaged tokenizer fails before the weights load
    state = _load_weights(ckpt, info)
    # A MoE++ model saved before its slot counts scaled with E: build it with the counts it had.
    fitted = model_config.with_saved_layout({k: tuple(v.shape) for k, v in state.items()})
    if fitted is not model_config:
        model_config, config = fitted, dict(config, model=fitted.to_dict())
    model = MoETransformer(model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys or shapes: not this config's weights
        first = (str(err).strip().splitlines() or ["mismatch"])[0]
        raise CorruptFileError(ckpt / "model.safetensors", f"its tensors do not fit the model in "
                               f"{config_path.name} ({first.rstrip(':.')})", fix) from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, ckpt, info.get("step"), config)
