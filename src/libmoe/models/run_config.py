"""Run configuration: typed sections loaded from YAML with strict validation.

A run is resolved in layers, later ones winning: the preset's YAML (``libmoe/configs/<preset>.yaml``),
the user's YAML file, command-line flags, then dotted overrides (``optim.lr=1e-3``). Every key is
checked against the dataclasses below; an unknown key is an error that names the closest valid keys.
The resolved config is written to ``<out>/config.yaml`` and is the run's record: `load_run_config`
reads it back and `prepare_run_data` builds (or finds cached) the data it names, for training,
evaluation and analysis alike.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import overrides
from ..data import HUB_ALIASES
from ..data.packed import PackedData, prepare_data
from ..files import write_text
from ..moe.options import check_choice, check_number
from .config import ModelConfig, load_preset


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training and validation tokens."""

    source: str = "embedded"  # "embedded", a directory/.txt/.jsonl path, "hf:NAME" or "slimpajama"
    hub: dict[str, Any] = field(default_factory=dict)  # load_hub_corpus options (split, max_documents...)
    tokenizer: str = "train"  # "train": SentencePiece BPE on the training split; else a path / Hub name
    max_doc_chars: int = 50_000  # longer documents are cut at line breaks (finer validation split)
    val_fraction: float = 0.005  # of each domain's text, held out by document
    min_val_tokens: int = 16_384  # the validation split grows to at least this many tokens (estimated)
    split_seed: int = 0  # the validation split and tokenizer do not depend on the training seed
    probe_tokens: int = 4096  # validation tokens (spread over domains) traced at every checkpoint
    max_train_tokens: int | None = None  # stop packing training tokens here (Hub streams: stop reading)
    tokenizer_chars: int = 50_000_000  # Hub streams: characters of training text for the tokenizer
    cache_dir: str | None = None  # tokenised shards; default ~/.cache/libmoe/data
    shard_tokens: int = 1 << 27
    # Processes that tokenise a large stream (the result is the same for any count); None: one per
    # CPU core, up to 32. Not part of the run's identity.
    num_proc: int | None = None

    def __post_init__(self) -> None:
        check_number("data.val_fraction", self.val_fraction, 0.0)
        if self.val_fraction >= 0.5:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be below 0.5.")
        for name in ("max_doc_chars", "min_val_tokens", "probe_tokens", "shard_tokens",
                     "tokenizer_chars"):
            check_number(f"data.{name}", getattr(self, name), 1, integer=True)
        if self.max_train_tokens is not None:
            check_number("data.max_train_tokens", self.max_train_tokens, 1, integer=True)
        if self.num_proc is not None:
            check_number("data.num_proc", self.num_proc, 1, integer=True)


@dataclass
class OptimConfig:
    """AdamW with a linear warmup then cosine decay to min_lr_ratio * lr (paper Table 6)."""

    lr: float = 2.5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.01
    # Parameters whose name contains one of these substrings get no weight decay.
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "embed"])
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 0.1  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        check_number("optim.lr", self.lr, 0.0)
        check_number("optim.min_lr_ratio", self.min_lr_ratio, 0.0)
        check_number("optim.warmup_steps", self.warmup_steps, 0, integer=True)
        check_number("optim.weight_decay", self.weight_decay, 0.0)
        check_number("optim.grad_clip", self.grad_clip, 0.0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={self.betas} must be two numbers, e.g. [0.9, 0.95].")


@dataclass
class TrainConfig:
    """The loop: batch, length, logging, evaluation, checkpoints, precision and parallelism."""

    max_steps: int = 1000  # optimizer steps; sets the schedule's length
    batch_size: int = 64  # sequences per optimizer step, summed over all processes
    micro_batch_size: int | None = None  # sequences per forward per process; None: no accumulation
    seq_len: int | None = None  # default: model.max_seq_len
    seed: int = 0
    log_every: int = 10
    eval_every: int = 1000
    eval_tokens: int | None = 1 << 20  # validation tokens per evaluation; None: the whole split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    precision: str = "auto"  # auto: bf16 autocast on GPUs that support it, fp32 on CPU
    device: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    # Under torchrun: shard each MoE layer's routed experts over this many ranks (all-to-all token
    # exchange), data parallel over the world size / expert_parallel groups of ranks.
    expert_parallel: int = 1
    compile: bool = False  # torch.compile each transformer block (MoE layers with fullgraph=True)
    # Peak FLOP/s of one device for the MFU figure; None: libmoe's table for known GPUs (none on CPU).
    peak_flops: float | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            check_number(f"train.{name}", getattr(self, name), 1, integer=True)
        for name in ("micro_batch_size", "seq_len", "eval_tokens"):
            if getattr(self, name) is not None:
                check_number(f"train.{name}", getattr(self, name), 1, integer=True)
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        check_number("train.expert_parallel", self.expert_parallel, 1, integer=True)
        if not isinstance(self.compile, bool):
            raise ValueError(f"train.compile={self.compile!r} must be true or false.")
        if self.peak_flops is not None:
            check_number("train.peak_flops", self.peak_flops, 0.0, strict=True)


@dataclass
class RunConfig:
    """A training run's whole config: the preset, model, data, optim and train sections, and --init."""

    preset: str = "micro"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The weights the run started from (`libmoe train --init`): a libmoe model directory, run or
    # checkpoint, or a transformers causal LM (directory or Hub name), which is then the model
    # trained and `model` only records its shape (libmoe.models.transformers_lm).
    init: str | None = None

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _valid_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type (YAML and the command line give strings for
    numbers like 3e-4), or a ValueError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} must be a list, e.g. {key}=[a,b].")
        (item,) = typing.get_args(hint)
        return [_coerce(key, v, item) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} must be a mapping, e.g. {key}={{k: v}}.")
        return dict(value)
    if hint is Any:
        return value
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if value is None or isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a valid {hint.__name__}.") from None
    return value


def _build(cls: type, values: dict[str, Any], prefix: str, all_keys: list[str]) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = prefix + key
        if key not in names:
            raise ValueError(f"unknown config key {dotted!r}.{overrides.key_hint(dotted, all_keys)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config section {dotted!r} must be a mapping, not {value!r}.")
            kwargs[key] = _build(hint, value, dotted + ".", all_keys)
        else:
            kwargs[key] = _coerce(dotted, value, hint)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `update`, recursing into mappings; `data.hub` (options of one particular
    dataset) is replaced whole, so switching datasets does not inherit the old one's options."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("hub",):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}} (libmoe.overrides, shared by every command)."""
    return overrides.parse_override(item)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, or one line saying why not (libmoe.overrides.load_yaml)."""
    return overrides.load_yaml(path)


def resolve_config(
    layers: list[dict[str, Any]] | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> RunConfig:
    """Merge the preset (named by `preset`, else by the layers' ``preset`` key, else ``micro``)
    with `layers` (dicts, later wins) and dotted `overrides`, then validate strictly."""
    merged: dict[str, Any] = {}
    for layer in layers or []:
        merged = deep_merge(merged, layer)
    for item in overrides or []:
        merged = deep_merge(merged, parse_override(item))
    name = preset or merged.get("preset") or "micro"
    base = load_preset(name)
    base["preset"] = name
    data = merged.get("data")
    local = isinstance(data, dict) and "source" in data and not _is_hub_source(data["source"])
    if local and "hub" not in data:
        # The preset's Hub-stream options (paper presets read SlimPajama) do not apply to the
        # local source the user chose instead; options the user gives are kept and checked.
        base.get("data", {}).pop("hub", None)
    merged = deep_merge(base, {k: v for k, v in merged.items() if k != "preset"})
    return _build(RunConfig, merged, "", _valid_keys(RunConfig))


def _is_hub_source(source: Any) -> bool:
    return isinstance(source, str) and (source.startswith("hf:") or source in HUB_ALIASES)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from a full dict (e.g. a run's saved config.yaml), validated."""
    return _build(RunConfig, values, "", _valid_keys(RunConfig))


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no run (no config.yaml).")
    return config_from_dict(load_yaml(path))


def prepare_run_data(cfg: RunConfig, log=print) -> PackedData:
    """The packed, cached data of a run config (built on first use; `libmoe prepare` runs just
    this, e.g. before a multi-process job on a large stream)."""
    d = cfg.data
    return prepare_data(
        d.source, tokenizer=d.tokenizer, vocab_size=cfg.model.vocab_size, seq_len=cfg.seq_len,
        val_fraction=d.val_fraction, min_val_tokens=d.min_val_tokens,
        max_doc_chars=d.max_doc_chars, split_seed=d.split_seed, shard_tokens=d.shard_tokens,
        max_train_tokens=d.max_train_tokens, tokenizer_chars=d.tokenizer_chars,
        hub=d.hub or None, cache_dir=d.cache_dir, log=log, num_proc=d.num_proc,
    )
