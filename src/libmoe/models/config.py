"""Model configuration and presets of the decoder-only MoE Transformer (paper Table 5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..moe.layer import check_algorithm, legacy_options, scaled_options
from ..moe.options import LIBMOE_INIT, check_number, libmoe_router_init_std
from ..overrides import did_you_mean


@dataclass
class ModelConfig:
    """A decoder-only, pre-LayerNorm Transformer whose FFN sublayers are MoE layers.

    n_experts / top_k / expert_dim describe the compute budget shared by every algorithm: the
    dense baseline's FFN width is top_k * expert_dim, and shared-expert algorithms take `n_shared`
    of the n_experts and of the top_k as always-on experts (the paper's 64 routed + 2 shared, k 6).
    """

    vocab_size: int = 8000
    d_model: int = 512
    n_layers: int = 16
    n_heads: int = 4
    head_dim: int = 82
    rope_fraction: float = 0.5
    rope_base: float = 10000.0
    max_seq_len: int = 1024
    algorithm: str = "smoe"
    n_experts: int = 66
    expert_dim: int = 128
    top_k: int = 8
    n_shared: int = 2
    moe_every: int = 1
    moe_options: dict[str, Any] = field(default_factory=dict)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Set by upcycling: the dense FFN width (default top_k * expert_dim) and the blocks whose FFN
    # is an MoE layer (default every moe_every-th). Left out of to_dict() while unset.
    ffn_dim: int | None = None
    moe_layers: list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "max_seq_len",
                     "n_experts", "expert_dim", "top_k", "moe_every"):
            check_number(name, getattr(self, name), 1, integer=True)
        check_number("n_shared", self.n_shared, 0, integer=True)
        check_number("rope_fraction", self.rope_fraction, 0.0)
        if self.rope_fraction > 1:
            raise ValueError(f"rope_fraction={self.rope_fraction} must be between 0 and 1.")
        check_algorithm(self.algorithm)
        if self.ffn_dim is not None:
            check_number("ffn_dim", self.ffn_dim, 1, integer=True)
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"moe_layers {bad} are not block indices of a {self.n_layers}-layer "
                                 f"model; give indices in 0..{self.n_layers - 1}.")
        if self.uses_shared and self.n_shared >= self.top_k:
            raise ValueError(
                f"n_shared={self.n_shared} must be below top_k={self.top_k} for {self.algorithm}: "
                "shared experts take part of the top-k budget."
            )

    @property
    def uses_shared(self) -> bool:
        return self.algorithm in ("sharede_v2", "sharede_v3")

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head: the even number nearest below rope_fraction * head_dim."""
        return int(self.head_dim * self.rope_fraction) // 2 * 2

    def moe_args(self) -> tuple[int, int, dict[str, Any]]:
        """(n routed experts, top_k, options) for build_moe under this config's budget, with
        router_init_std "libmoe" resolved to LibMoE's d_model^-1/2 * sqrt(2 / n_layers)."""
        options = dict(self.moe_options)
        if options.get("router_init_std") == LIBMOE_INIT:
            options["router_init_std"] = libmoe_router_init_std(self.d_model, self.n_layers)
        if self.uses_shared:
            options.setdefault("n_shared", self.n_shared)
            return self.n_experts - self.n_shared, self.top_k - self.n_shared, options
        return self.n_experts, self.top_k, options

    def is_moe_layer(self, layer: int) -> bool:
        """MoE FFN in the `moe_layers` blocks, else in every `moe_every`-th layer (the last of each
        group); dense FFN elsewhere."""
        if self.algorithm == "dense":
            return False
        if self.moe_layers is not None:
            return layer in self.moe_layers
        return (layer + 1) % self.moe_every == 0

    @property
    def dense_width(self) -> int:
        """Width of the dense FFN sublayers: ffn_dim, or the compute-matched top_k * expert_dim."""
        return self.ffn_dim if self.ffn_dim is not None else self.top_k * self.expert_dim

    @property
    def has_moe_layers(self) -> bool:
        """Whether any block's FFN is an MoE layer (not the case for dense or moe_layers=[])."""
        return any(self.is_moe_layer(i) for i in range(self.n_layers))

    def resolved_moe_options(self) -> dict[str, Any]:
        """moe_options plus the values this model's MoE layers give the options whose default
        scales with the layer's size (MoE++'s n_zero, n_copy, n_const): what to_dict() records."""
        if not self.has_moe_layers:
            return dict(self.moe_options)
        n_experts, top_k, options = self.moe_args()
        scaled = scaled_options(self.algorithm, self.d_model, n_experts, top_k, **options)
        return {**self.moe_options, **scaled}

    def with_saved_layout(self, shapes: Mapping[str, Sequence[int]]) -> ModelConfig:
        """This config, or a copy whose moe_options add the values a saved model was built with
        when its tensors (`shapes`: state-dict key -> shape) show it predates the size-scaled
        defaults: a MoE++ model saved before its slot counts scaled with E records no counts, and
        its router weights have the rows of the then fixed 1 zero + 1 copy + 6 constant experts.
        Loaders call it before building the model."""
        rows = next((int(shape[0]) for key, shape in shapes.items()
                     if key.endswith("ffn.router.weight") and len(shape) == 2), None)
        if rows is None or not self.has_moe_layers:
            return self
        n_experts, top_k, options = self.moe_args()
        legacy = legacy_options(self.algorithm, self.d_model, n_experts, top_k, rows, **options)
        return replace(self, moe_options={**self.moe_options, **legacy}) if legacy else self

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values, with the size-scaled MoE options resolved (so a saved
        model reloads with the same layout whatever later defaults say)."""
        d = asdict(self)
        for key in ("ffn_dim", "moe_layers"):  # unset: keep the configs (and hashes) of older runs
            if d[key] is None:
                del d[key]
        d["moe_options"] = self.resolved_moe_options()
        return d


def preset_file(name: str) -> Path:
    """The YAML file of preset `name` (model, data, optim and train sections)."""
    return CONFIG_DIR / f"{name}.yaml"


def load_preset(name: str) -> dict[str, Any]:
    """The sections of preset `name` as plain dicts."""
    path = preset_file(name)
    if not path.is_file():
        raise ValueError(
            f"unknown preset {name!r}.{did_you_mean(name, PRESETS)} Valid: {', '.join(PRESETS)}."
        )
    return yaml.safe_load(path.read_text()) or {}


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Preset name -> its model section. The YAML files in libmoe/configs/ are the single source.
PRESETS: dict[str, dict[str, Any]] = {}
for _path in sorted(CONFIG_DIR.glob("*.yaml")):
    PRESETS[_path.stem] = {}
for _name in PRESETS:
    PRESETS[_name] = load_preset(_name).get("model", {})


def model_config(preset: str = "micro", algorithm: str = "smoe", **overrides: Any) -> ModelConfig:
    """The preset's config for `algorithm`, with field overrides (unknown names are an error)."""
    if preset not in PRESETS:
        load_preset(preset)  # raises the helpful error
    valid = [f.name for f in fields(ModelConfig)]
    for key in overrides:
        if key not in valid:
            raise ValueError(f"unknown model option {key!r}.{did_you_mean(key, valid)}")
    return replace(ModelConfig(**PRESETS[preset], algorithm=algorithm), **overrides)
