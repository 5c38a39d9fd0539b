"""Export upcycled transformers models to transformers' own MoE architectures, with the same logits.

    from libmoe.upcycle.export import export_model
    info = export_model("up-llama", "mixtral", "up-llama-mixtral")   # a directory, run or model
    info["max_abs_logit_diff"]                                       # <= 1e-4, else nothing is written

`libmoe export MODEL --to mixtral|qwen2_moe|qwen3_moe|olmoe --out DIR` is the command line. The
source is a `LibMoEUpcycledForCausalLM` (from `libmoe upcycle` or a checkpoint of its training run)
or a transformers model upcycled in memory. A mapping is made only where the mathematics agree:

| source | smoe | sharede_v2 |
|---|---|---|
| Llama, Mistral | mixtral, qwen2_moe | qwen2_moe |
| Qwen2 | qwen2_moe | qwen2_moe |
| Qwen3 | qwen3_moe (olmoe with one attention head) | refused |

smoe's router (softmax, top-k, renormalised) is Mixtral's and Qwen-MoE/OLMoE's with
norm_topk_prob; a router temperature is folded into the router weight and `routed_scaling` into
the experts' down projections. SharedE-V2's shared experts become Qwen2-MoE's shared expert (their
hidden units side by side) with a zero `shared_expert_gate`: sigmoid(0) = 0.5 is the upcycled
shared_scaling, any other scaling goes into its down projection. An smoe model exported to
qwen2_moe gets a zero-width shared expert (it adds exactly 0). Everything else (other algorithms,
non-gated experts, expert or router biases, capacity factors, libmoe's own MoETransformer) is
refused with a ValueError that names what differs and the targets that do work.

Before anything is written the exported model is run beside the source on a fixed random batch
(fp32); a largest logit difference above 1e-4 is refused. The directory (`save_pretrained`,
safetensors), the source's tokenizer files and export.json (source, target, the difference measured
again after reloading the written directory) follow; plain `AutoModelForCausalLM.from_pretrained`
loads it without libmoe.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.hf_tokenizer import is_libmoe_sentencepiece, write_transformers_tokenizer
from ..files import write_bytes, write_json
from ..models import MoETransformer, load_model, resolve_checkpoint
from ..models.upcycled import UpcycledMLP
from ..moe import MoELayer, TopKRouter

TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
SOURCES = ("llama", "mistral", "qwen2", "qwen3")
EXPORT_FILE = "export.json"
TOLERANCE = 1e-4
NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
         "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE"}
# transformers' hidden_act for each gated libmoe activation (ACT2FN's "gelu" is the exact erf GELU).
GATED = {"swiglu": ("silu", "swish"), "geglu": ("gelu",)}
WHY_NOT = {
    "sigma_moe": "its router takes sigmoid scores; the targets' routers take a softmax",
    "sharede_v3": "its router takes sigmoid scores (with a selection bias when balancing); the "
                  "targets' routers take a softmax",
    "xmoe": "its logits are cosines between a normalised low-dimensional projection of x and expert "
            "embeddings, not a linear map of x as the targets' routers are",
    "cosine": "its logits are cosine similarities (x and the router rows normalised), not a linear map",
    "perturbed_cosine": "its logits are perturbed cosine similarities, not a linear map",
    "hyper": "its hypernetwork generates a router bias, which the targets' routers do not have",
    "moe_plus_plus": "its zero, copy and constant experts and its gating residual have no counterpart",
    "tc_moe": "its negated and null expert slots have no counterpart",
    "expert_choice": "its experts choose tokens (a token's experts depend on the other tokens)",
    "dense": "it has no router (a dense FFN layer)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass(frozen=True)
class _Shape:
    """One MoE layer's shape: E routed experts, K per token, width M, shared width S (0: none)."""

    n_experts: int
    top_k: int
    width: int
    shared_width: int
    activation: str


def export_model(path_or_model: str | Path | nn.Module, to: str, out: str | Path,
                 overwrite: bool = False) -> dict[str, Any]:
    """Convert an upcycled model (a directory, run or checkpoint, or the model itself) to the
    transformers architecture `to` and write it to `out`; returns what export.json records."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not a target; choose one of {', '.join(TARGETS)} "
                         "(or libmoe for libmoe's own model directory).")
    out = Path(out)
    if (out / "config.json").is_file() and not overwrite:
        raise ValueError(f"{str(out)!r} already holds a model; pass --overwrite or a new --out.")
    src, origin, tokenizer_dir = _load_source(path_or_model, to)
    refuse_unless_exact(src, to)
    first = next(src.parameters())
    dtype, was_training = first.dtype, src.training
    if dtype != torch.float32 or first.device.type != "cpu":  # verify in fp32 on the CPU, on a copy
        src = copy.deepcopy(src).to("cpu", torch.float32)
    src.eval()
    try:
        target = _convert(src, to)
        tokens = _probe_tokens(src.config)
        diff = _max_diff(src, target, tokens)
        if diff > TOLERANCE:
            raise ValueError(f"the {NAMES[to]} model's logits differ from the source's by {diff:.3g} "
                             f"(> {TOLERANCE:g}); nothing was written. Please report this as a bug.")
        out.mkdir(parents=True, exist_ok=True)
        target.to(dtype).save_pretrained(str(out))
        del target
        tokenizer = _copy_tokenizer(tokenizer_dir, out)
        from transformers import AutoModelForCausalLM

        back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        reloaded = _max_diff(src, back, tokens)
    finally:
        src.train(was_training)
    shape = _shapes(src)
    info = {"source": origin, "source_architecture": type(src).__name__, "target": to,
            "target_architecture": type(back).__name__, "algorithm": _algorithm(src),
            "n_experts": shape.n_experts, "top_k": shape.top_k, "moe_layers": _moe_indices(src),
            "shared_expert_width": shape.shared_width, "max_abs_logit_diff": reloaded,
            "max_abs_logit_diff_before_saving": diff, "tolerance": TOLERANCE,
            "probe": f"{tuple(tokens.shape)} random tokens, seed 0", "tokenizer": tokenizer}
    write_json(out / EXPORT_FILE, info)
    if reloaded > TOLERANCE:
        raise ValueError(f"{out}: the reloaded {NAMES[to]} model's logits differ from the source's by "
                         f"{reloaded:.3g} (> {TOLERANCE:g}); do not use it. Please report this as a bug.")
    return info


def exact_targets(model: nn.Module) -> list[str]:
    """The targets that `model` (an upcycled transformers model) exports to exactly."""
    return [t for t in TARGETS if not differences(model, t)]


def refuse_unless_exact(model: nn.Module, to: str) -> None:
    """Raise ValueError naming what differs when `model` does not map exactly onto `to`."""
    diffs = differences(model, to)
    if not diffs:
        return
    works = exact_targets(model)
    hint = (f" It exports exactly to: {', '.join(works)}." if works else
            " No transformers target computes it exactly; keep the libmoe_upcycled directory, which "
            "AutoModelForCausalLM loads after `import libmoe`.")
    raise ValueError(f"cannot export this model to {to} ({NAMES[to]}) exactly: "
                     f"{'; '.join(diffs)}.{hint}")


# --- what differs -------------------------------------------------------------------------------

def differences(model: nn.Module, to: str) -> list[str]:
    """Why `model` (a transformers model with UpcycledMLP layers) does not map exactly onto `to`;
    empty when it does."""
    cfg, kind = model.config, model.config.model_type
    if kind not in SOURCES:
        return [f"its source architecture {type(model).__name__} (model_type {kind!r}) has no "
                f"counterpart here; the sources that export are {', '.join(NAMES[s] for s in SOURCES)}"]
    moes = [m.moe for m in model.modules() if isinstance(m, UpcycledMLP)]
    diffs = list(dict.fromkeys(d for moe in moes for d in _layer_differences(moe, cfg)))
    if diffs:
        return diffs
    shapes = {_shape(moe) for moe in moes}
    if len(shapes) > 1:
        return ["its MoE layers differ in shape (experts, top-k, width); the targets' configs take one "
                "for every layer"]
    shape = shapes.pop()
    src, tgt = NAMES[kind], NAMES[to]
    qk_norm = kind == "qwen3"
    if to in ("mixtral", "qwen2_moe"):
        if qk_norm:
            diffs.append(f"{src}'s QK-norm (q_norm, k_norm) has no counterpart in {tgt}")
        if kind == "qwen2" and to == "mixtral":
            diffs.append("Qwen2's q/k/v projections have biases, which Mixtral's attention lacks")
        if kind == "llama" and getattr(cfg, "attention_bias", False):
            where = "its attention" if to == "mixtral" else "its o_proj"
            diffs.append(f"Llama's attention_bias adds biases to q/k/v/o_proj; {tgt} has none in {where}")
    elif to == "qwen3_moe":
        if not qk_norm:
            diffs.append(f"Qwen3-MoE normalises each head's q and k (QK-norm), which {src} does not")
        elif len(set(cfg.layer_types)) > 1:
            diffs.append("Qwen3-MoE slides its attention window on every layer or none; this Qwen3 "
                         f"slides on layers {_sliding_layers(cfg)} only")
    elif to == "olmoe":
        if not qk_norm:
            diffs.append(f"OLMoE normalises q and k (QK-norm), which {src} does not")
        else:
            one_head = cfg.num_attention_heads == cfg.num_key_value_heads == 1
            if not (one_head and _head_dim(cfg) == cfg.hidden_size):
                diffs.append("OLMoE's QK-norm normalises the q (and k) of all heads together, Qwen3's "
                             "each head on its own; they agree only for one attention head (and one "
                             "key-value head) as wide as the model")
            if _sliding_layers(cfg):
                diffs.append("OLMoE has no sliding-window attention")
    if shape.shared_width and to != "qwen2_moe":
        diffs.append(f"its shared experts have no counterpart in {tgt} (Qwen2-MoE has a shared expert)")
    dense = [i for i in range(cfg.num_hidden_layers) if i not in _upcycled(model)]
    if dense and to in ("mixtral", "olmoe"):
        diffs.append(f"layers {dense} keep their dense MLP, and every {tgt} layer is an MoE layer "
                     "(qwen2_moe and qwen3_moe have mlp_only_layers)")
    return diffs


def _layer_differences(moe: nn.Module, cfg: Any) -> list[str]:
    alg = moe.algorithm
    if not isinstance(moe, MoELayer) or alg not in ("smoe", "sharede_v2"):
        return [f"algorithm {alg!r}: {WHY_NOT.get(alg, 'its router is not a softmax top-k router')} "
                "(smoe and sharede_v2 export)"]
    router, opts = moe.router, moe.opts
    if type(router) is not TopKRouter:
        return [f"its {type(router).__name__} is not libmoe's softmax top-k router"]
    diffs = []
    if router.bias is not None and bool(router.bias.detach().ne(0).any()):
        diffs.append("a router bias (bias=True), which the targets' routers do not have")
    if opts.bias_balancing > 0 and bool(router.expert_bias.ne(0).any()):
        diffs.append("an auxiliary-loss-free selection bias (bias_balancing): experts are chosen on "
                     "scores + bias, which the targets cannot express")
    if opts.n_group or opts.topk_group:
        diffs.append(f"group-limited routing (n_group={opts.n_group}, topk_group={opts.topk_group})")
    if router.drop_top:
        diffs.append(f"a DropTop-{router.drop_top} perturbation is set on the router")
    if opts.capacity_factor is not None:
        diffs.append(f"capacity_factor={opts.capacity_factor} drops tokens over an expert's capacity; "
                     "the targets never drop tokens")
    act = moe.experts.activation
    if not act.gated:
        diffs.append(f"{act.name} experts: the targets' experts are gated, act(x W_gate) * (x W_up), "
                     "which scales quadratically with x where a non-gated FFN does not, so no choice "
                     "of weights computes it")
    elif cfg.hidden_act not in GATED.get(act.name, ()):
        diffs.append(f"{act.name} experts in a model whose hidden_act is {cfg.hidden_act!r}")
    experts = [moe.experts] + ([moe.shared_experts] if moe.shared_experts is not None else [])
    if any(_nonzero(getattr(e, b, None)) for e in experts for b in ("b1", "b2", "b3")):
        diffs.append("expert biases (b1/b2/b3), which the targets' experts do not have")
    return diffs


def _nonzero(t: Tensor | None) -> bool:
    return t is not None and bool(t.detach().ne(0).any())


def _native_refusal(config: Any, to: str) -> ValueError:
    """The ValueError for libmoe's own MoETransformer (ModelConfig `config`)."""
    diffs = ["LayerNorm, which subtracts the mean and adds a bias (the targets use RMSNorm)"]
    if config.rope_dim != config.head_dim:
        diffs.append(f"rotary embeddings on {config.rope_dim} of each head's {config.head_dim} "
                     "dimensions (the targets rotate whole heads)")
    act = config.moe_options.get("activation", "relu")
    if act not in GATED:
        diffs.append(f"{act} experts (the targets' experts are gated, act(x W_gate) * (x W_up), "
                     "which no non-gated FFN equals)")
    if config.algorithm not in ("smoe", "sharede_v2"):
        diffs.append(f"algorithm {config.algorithm!r}: {WHY_NOT.get(config.algorithm, '')}".rstrip(": "))
    return ValueError(f"cannot export libmoe's own MoETransformer to {to} ({NAMES[to]}) exactly: "
                      f"{'; '.join(diffs)}. Export it with --to libmoe (LibMoEForCausalLM, which "
                      "AutoModelForCausalLM loads after `import libmoe`).")


# --- loading the source -------------------------------------------------------------------------

def _load_source(path_or_model, to: str) -> tuple[nn.Module, str, Path | None]:
    """(transformers model with UpcycledMLP layers, a description of where it came from, the
    directory holding its tokenizer files or None). libmoe's own models are refused here."""
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
        inner = getattr(model, "model", None)
        if isinstance(model, MoETransformer) or isinstance(inner, MoETransformer):
            native = model if isinstance(model, MoETransformer) else inner
            raise _native_refusal(native.config, to)
        if type(model).__name__ == "LibMoEUpcycledForCausalLM":
            model = inner
        _check_upcycled(model, type(path_or_model).__name__)
        return model, type(path_or_model).__name__, None
    ckpt = resolve_checkpoint(path_or_model)
    config_json = ckpt / "config.json"
    model_type = json.loads(config_json.read_text()).get("model_type") if config_json.is_file() else None
    if model_type in (None, "libmoe"):  # a libmoe run, checkpoint or exported model directory
        raise _native_refusal(load_model(ckpt).model.config, to)
    from transformers import AutoModelForCausalLM

    from ..models import hf_upcycled  # noqa: F401  (imports transformers) registers libmoe_upcycled

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    if type(model).__name__ == "LibMoEUpcycledForCausalLM":
        model = model.model
    _check_upcycled(model, f"{ckpt} (model_type {model_type!r})")
    return model, str(ckpt), _tokenizer_dir(ckpt)


def _check_upcycled(model: nn.Module, what: str) -> None:
    if not hasattr(model, "config") or not any(isinstance(m, UpcycledMLP) for m in model.modules()):
        raise ValueError(f"{what} has no upcycled MoE layers; export takes a model written by "
                         "`libmoe upcycle` from a transformers model (or a checkpoint of its training run).")


def _tokenizer_dir(ckpt: Path) -> Path | None:
    """The directory with the model's transformers tokenizer files: the model's own, or its run's."""
    for candidate in (ckpt, ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", ckpt.parent.parent):
        if any((candidate / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return candidate
    return None


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> bool:
    """The tokenizer in transformers' format at `out`'s top level: a transformers tokenizer's files
    copied, a SentencePiece tokenizer libmoe trained converted (libmoe.data.hf_tokenizer)."""
    if tokenizer_dir is None:
        return False
    if is_libmoe_sentencepiece(tokenizer_dir):  # its tokenizer.json is libmoe's, not transformers'
        write_transformers_tokenizer(tokenizer_dir, out)
        return True
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            write_bytes(out / name, (tokenizer_dir / name).read_bytes())
    return True


# --- the structure of the source ----------------------------------------------------------------

def _upcycled(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer index: its UpcycledMLP}."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return {}
    return {i: layer.mlp for i, layer in enumerate(layers)
            if isinstance(getattr(layer, "mlp", None), UpcycledMLP)}


def _moe_indices(model: nn.Module) -> list[int]:
    return sorted(_upcycled(model))


def _algorithm(model: nn.Module) -> str:
    return next(iter(_upcycled(model).values())).moe.algorithm


def _shape(moe: nn.Module) -> _Shape:
    shared = moe.shared_experts
    width = shared.n_experts * shared.expert_dim if shared is not None else 0
    return _Shape(moe.n_experts, moe.top_k, moe.expert_dim, width, moe.experts.activation.name)


def _shapes(model: nn.Module) -> _Shape:
    return _shape(next(iter(_upcycled(model).values())).moe)


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _sliding_layers(cfg: Any) -> list[int]:
    """Layers with sliding-window attention."""
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    return list(range(cfg.num_hidden_layers)) if getattr(cfg, "sliding_window", None) else []


# --- the conversion -----------------------------------------------------------------------------

def target_config(model: nn.Module, to: str):
    """The transformers config of `to` that computes what `model` does (checked by the caller)."""
    from transformers import AutoConfig

    cfg = model.config
    shape = _shapes(model)
    layers = cfg.num_hidden_layers
    moe = next(iter(_upcycled(model).values())).moe
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=_head_dim(cfg), hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=bool(cfg.tie_word_embeddings),
        rope_parameters=copy.deepcopy(cfg.rope_parameters), attention_dropout=cfg.attention_dropout,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        num_experts_per_tok=shape.top_k, router_aux_loss_coef=float(moe.opts.balance_coef),
        architectures=[ARCHITECTURES[to]],
    )
    sliding = _sliding_layers(cfg)
    window = getattr(cfg, "sliding_window", None) if sliding else None
    dense = [i for i in range(layers) if i not in _upcycled(model)]
    if to == "mixtral":
        extra = dict(intermediate_size=shape.width, num_local_experts=shape.n_experts,
                     sliding_window=window)
    elif to == "qwen2_moe":
        extra = dict(
            num_experts=shape.n_experts, moe_intermediate_size=shape.width,
            intermediate_size=cfg.intermediate_size, shared_expert_intermediate_size=shape.shared_width,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense,
            qkv_bias=cfg.model_type == "qwen2", use_sliding_window=bool(sliding),
            sliding_window=window, max_window_layers=getattr(cfg, "max_window_layers", layers),
            layer_types=["sliding_attention" if i in sliding else "full_attention" for i in range(layers)])
    elif to == "qwen3_moe":
        extra = dict(num_experts=shape.n_experts, moe_intermediate_size=shape.width,
                     intermediate_size=cfg.intermediate_size, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=dense,
                     attention_bias=bool(cfg.attention_bias), use_sliding_window=bool(sliding),
                     sliding_window=window)
    else:  # olmoe
        extra = dict(intermediate_size=shape.width, num_experts=shape.n_experts, norm_topk_prob=True,
                     attention_bias=bool(cfg.attention_bias), clip_qkv=None)
    return AutoConfig.for_model(to, **common, **extra)


def _moe_weights(moe: nn.Module, prefix: str, to: str) -> dict[str, Tensor]:
    """The target's weights for one MoE layer: router (temperature folded in), experts as
    gate_up_proj [E, 2M, D] / down_proj [E, D, M] (routed_scaling folded in) and, for qwen2_moe,
    the shared expert with a zero gate (sigmoid(0) = 0.5; the rest of shared_scaling folded in)."""
    router, ex, opts = moe.router, moe.experts, moe.opts
    weight = router.weight.detach()
    if router.temperature != 1.0:
        weight = weight / router.temperature
    down = ex.w2.detach().transpose(1, 2)
    if opts.routed_scaling != 1.0:
        down = down * opts.routed_scaling
    state = {f"{prefix}gate.weight": weight,
             f"{prefix}experts.gate_up_proj": torch.cat([ex.w1.detach().transpose(1, 2),
                                                        ex.w3.detach().transpose(1, 2)], dim=1),
             f"{prefix}experts.down_proj": down}
    if to == "qwen2_moe":
        D = moe.d_model
        shared = moe.shared_experts
        if shared is None:  # a zero-width shared expert adds exactly zero
            gate = up = torch.zeros(0, D, dtype=weight.dtype)
            sdown = torch.zeros(D, 0, dtype=weight.dtype)
        else:  # n shared experts of width M side by side = one MLP of width n*M
            gate = shared.w1.detach().permute(1, 0, 2).reshape(D, -1).t()
            up = shared.w3.detach().permute(1, 0, 2).reshape(D, -1).t()
            sdown = shared.w2.detach().reshape(-1, D).t()
            if opts.shared_scaling != 0.5:
                sdown = sdown * (opts.shared_scaling / 0.5)
        state.update({f"{prefix}shared_expert.gate_proj.weight": gate,
                      f"{prefix}shared_expert.up_proj.weight": up,
                      f"{prefix}shared_expert.down_proj.weight": sdown,
                      f"{prefix}shared_expert_gate.weight": torch.zeros(1, D, dtype=weight.dtype)})
    return state


def _convert(model: nn.Module, to: str) -> nn.Module:
    """Build the `to` model (fp32, eval) holding `model`'s weights."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():  # a zero-width shared expert has nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        target = AutoModelForCausalLM.from_config(target_config(model, to), dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if ".mlp.moe." not in k}
    for i, mlp in _upcycled(model).items():
        state.update(_moe_weights(mlp.moe, f"model.layers.{i}.mlp.", to))
    expected = target.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the {NAMES[to]} model's weights do not match the source's (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}); it cannot be exported exactly.")
    try:
        target.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
    except RuntimeError as err:  # shapes differ
        raise ValueError(f"the {NAMES[to]} model's weights do not match the source's: {err}") from err
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    return target.eval()


def _probe_tokens(cfg: Any) -> Tensor:
    length = min(16, cfg.max_position_embeddings)
    return torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, tokens: Tensor) -> float:
    return float((a(tokens).logits - b(tokens).logits).abs().max())
