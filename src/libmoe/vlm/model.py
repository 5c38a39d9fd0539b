"""The LLaVA-style vision-language model: a thin composition of transformers modules.

    vision tower (SigLIP or CLIP, `SiglipVisionModel` / `CLIPVisionModel`)
      -> hidden states of `feature_layer` (-2: the penultimate layer, as LLaVA; CLIP's CLS dropped)
      -> optional S2 multi-scale features (scales (1, 3): the image at 3x resolution split into 3x3
         crops, each encoded, the crop features stitched and area-pooled back to the base grid,
         concatenated along channels with the 1x features; the connector input is then 2 x width)
      -> connector (`mlp2x_gelu`: Linear -> GELU -> Linear, or `linear`)
      -> the causal LM (anything `AutoModelForCausalLM` builds, libmoe's own models included),
         whose input embeddings at the `<image>` positions are replaced by the image features.

Every `<image>` in a prompt is expanded to `n_image_tokens` copies of the image token id (one per
patch of the base grid), so batches are plain padded id tensors (padding on the right).

A model directory holds ``vlm.json`` (the resolved sub-model configs, so it loads without the
Hub), ``model.safetensors`` (tied weights stored once) and the tokenizer. After VIT upcycling
``vlm.json`` also records the MoE settings and `load_vlm` (`libmoe.vlm.saving`) rebuilds the MoE
layers before loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..upcycle.hf import UpcycledMLP

VLM_FILE = "vlm.json"
MODEL_FILE = "model.safetensors"
VISION_CLASSES = {"siglip_vision_model": "SiglipVisionModel", "clip_vision_model": "CLIPVisionModel"}
CONNECTORS = ("mlp2x_gelu", "linear")
IMAGE_TOKEN = "<image>"


def _hf():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the vlm extra
        raise ImportError("libmoe.vlm needs transformers: pip install 'libmoe[vlm]'") from e
    return transformers


def sub_config(spec: dict[str, Any]):
    """A transformers config from a preset's `vision` / `lm` section (`model_type` plus fields;
    `pretrained` is the Hub name, used only when weights are loaded)."""
    transformers = _hf()
    spec = {k: v for k, v in spec.items() if k != "pretrained"}
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError("a vision/lm section needs model_type (e.g. siglip_vision_model, qwen2, phi3).")
    if model_type == "libmoe":
        from ..models.hf import register_auto

        register_auto()
    return transformers.AutoConfig.for_model(model_type, **spec)


class Connector(nn.Module):
    """`mlp2x_gelu`: fc2(GELU(fc1(x))) with fc1 [d_in -> d_out], fc2 [d_out -> d_out]; `linear`: fc1 only."""

    def __init__(self, kind: str, d_in: int, d_out: int):
        super().__init__()
        if kind not in CONNECTORS:
            raise ValueError(f"unknown connector {kind!r}; choose one of {', '.join(CONNECTORS)}.")
        self.kind = kind
        self.fc1 = nn.Linear(d_in, d_out)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        return self.fc2(self.act(x)) if self.kind == "mlp2x_gelu" else x


class VLMMoE(UpcycledMLP):
    """An upcycled vision-tower MLP or connector. Layers of one vision forward share `chain`, so
    MoE++'s gating residual sees the previous MoE layer's router logits (also while routing is
    recorded: the residual never depends on logging)."""

    def __init__(self, moe: nn.Module, chain: dict | None = None, dropout: nn.Module | None = None):
        super().__init__(moe, dropout)
        self.chain = chain

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        prev = self.chain.get("logits") if self.chain is not None else None
        if prev is not None and prev.shape[0] != x.reshape(-1, shape[-1]).shape[0]:
            prev = None
        out = self.moe(x, prev_logits=prev)
        if self.chain is not None:
            self.chain["logits"] = out.routing.logits if out.routing is not None else None
        self.aux_loss, self.aux, self.routing = out.aux_loss, out.aux, out.routing
        return out.output if self.dropout is None else self.dropout(out.output)


@dataclass
class VLMOutput:
    logits: Tensor
    loss: Tensor | None = None  # cross-entropy + combined aux loss
    ce: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)


class LibMoEVLM(nn.Module):
    """vision tower -> connector -> LM (see the module docstring). `spec` is the resolved model
    section: {"vision": config dict, "lm": config dict, "connector", "feature_layer",
    "s2_scales", "image_token_id", "moe": None or the upcycling settings}."""

    def __init__(self, spec: dict[str, Any], vision: nn.Module | None = None, lm: nn.Module | None = None):
        super().__init__()
        transformers = _hf()
        self.spec = spec
        vcfg, lcfg = sub_config(spec["vision"]), sub_config(spec["lm"])
        if vcfg.model_type not in VISION_CLASSES:
            raise ValueError(f"vision model_type {vcfg.model_type!r} is not supported; use one of "
                             f"{', '.join(VISION_CLASSES)}.")
        vision_cls = getattr(transformers, VISION_CLASSES[vcfg.model_type])
        self.vision = vision if vision is not None else vision_cls(vcfg)
        self.lm = lm if lm is not None else transformers.AutoModelForCausalLM.from_config(lcfg)
        self.is_clip = vcfg.model_type == "clip_vision_model"
        self.feature_layer = int(spec.get("feature_layer", -2))
        self.scales = [int(s) for s in (spec.get("s2_scales") or [1])]
        if self.scales[0] != 1 or sorted(self.scales) != self.scales:
            raise ValueError(f"s2_scales {self.scales} must start at 1 and increase (the paper: [1, 3]).")
        self.image_size, self.patch_size = int(vcfg.image_size), int(vcfg.patch_size)
        self.grid = self.image_size // self.patch_size
        d_v, d_lm = int(vcfg.hidden_size), int(lcfg.hidden_size)
        self.connector = Connector(spec.get("connector", "mlp2x_gelu"), d_v * len(self.scales), d_lm)
        self.image_token_id = spec.get("image_token_id")
        self.aux_combine = "sum"
        self.chain: dict[str, Tensor | None] = {}
        self.vision.register_forward_pre_hook(lambda *_: self.chain.clear())

    # -- shapes --------------------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def pixel_size(self) -> int:
        """Side of the input images: the vision tower's size times the largest S2 scale."""
        return self.image_size * self.scales[-1]

    # -- image features ------------------------------------------------------------------------
    def _tower(self, pixels: Tensor) -> Tensor:
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        h = out.hidden_states[self.feature_layer]
        return h[:, 1:] if self.is_clip else h  # [N, grid*grid, d_v]

    def image_features(self, pixels: Tensor) -> Tensor:
        """pixels [N, 3, S, S] (S = pixel_size) -> connector output [N, n_image_tokens, d_lm]."""
        n, g, size = pixels.shape[0], self.grid, self.image_size
        feats = []
        for s in self.scales:
            side = s * size
            x = pixels if pixels.shape[-1] == side else F.interpolate(
                pixels, size=(side, side), mode="area" if pixels.shape[-1] > side else "bicubic")
            if s == 1:
                feats.append(self._tower(x))
                continue
            # s x s crops of the tower's size, row-major, encoded together, stitched back
            crops = (x.reshape(n, 3, s, size, s, size).permute(0, 2, 4, 1, 3, 5)
                     .reshape(n * s * s, 3, size, size))
            f = self._tower(crops)  # [n*s*s, g*g, d]
            d = f.shape[-1]
            f = f.reshape(n, s, s, g, g, d).permute(0, 5, 1, 3, 2, 4).reshape(n, d, s * g, s * g)
            f = F.adaptive_avg_pool2d(f, g)  # area pooling back to the base grid
            feats.append(f.flatten(2).transpose(1, 2))
        return self.connector(torch.cat(feats, dim=-1))

    # -- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        if self.image_token_id is None:
            raise ValueError("the model has no image token id (build it with build_vlm).")
        mask = input_ids == self.image_token_id
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        n_tokens = int(mask.sum())
        if n_tokens:
            if pixel_values is None:
                raise ValueError("the text holds image tokens but no pixel_values were given.")
            feats = self.image_features(pixel_values.to(embeds.dtype))
            if feats.shape[0] * feats.shape[1] != n_tokens:
                raise ValueError(f"{n_tokens} image tokens in the text but {feats.shape[0]} image(s) of "
                                 f"{feats.shape[1]} tokens each; expand every <image> with the tokenizer.")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        elif pixel_values is not None:
            raise ValueError("pixel_values were given but the text holds no <image> token.")
        return embeds

    def moe_layers(self) -> list[VLMMoE]:
        return [m for m in self.modules() if isinstance(m, VLMMoE)]

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        result = VLMOutput(logits=logits)
        layers = [m for m in self.moe_layers() if m.aux_loss is not None]
        if layers:
            scale = 1.0 / len(layers) if self.aux_combine == "mean" else 1.0
            result.aux_loss = torch.stack([m.aux_loss.float() for m in layers]).sum() * scale
            for m in layers:
                for name, value in m.aux.items():
                    v = value.detach().float() * scale
                    result.aux[name] = result.aux[name] + v if name in result.aux else v
        if labels is not None:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=-100)
            result.ce = ce
            result.loss = ce + result.aux_loss if result.aux_loss is not None else ce
            lm_aux = getattr(out, "aux_loss", None)  # an MoE language model's own (libmoe's models)
            if isinstance(lm_aux, Tensor):
                result.loss = result.loss + lm_aux.float()
        return result


# -- building, saving, loading -------------------------------------------------------------------
def resolved_spec(model_section: dict[str, Any]) -> dict[str, Any]:
    """The preset's model section with each sub-model's full config dict (no Hub needed later)."""
    spec = dict(model_section)
    for part in ("vision", "lm"):
        section = dict(model_section[part])
        cfg = sub_config(section).to_dict()
        cfg.pop("transformers_version", None)
        drop = ("architectures", "_name_or_path", "torch_dtype", "dtype")
        cfg = {k: v for k, v in cfg.items() if k not in drop}
        if section.get("pretrained"):
            cfg["pretrained"] = section["pretrained"]
        spec[part] = cfg
    return spec


def build_vlm(model_section: dict[str, Any], tokenizer=None, pretrained: bool = False,
              device: str | torch.device = "cpu") -> LibMoEVLM:
    """A dense LibMoEVLM for `tokenizer` (which has the <image> token). With `pretrained`, the
    sections' Hub names are loaded (`pretrained: NAME`); otherwise everything is random. Without a
    tokenizer the LM keeps the preset's vocab_size (for counting parameters, e.g. on "meta")."""
    transformers = _hf()
    spec = resolved_spec(model_section)
    vision = lm = None
    if pretrained and spec["vision"].get("pretrained"):
        cls = getattr(transformers, VISION_CLASSES[spec["vision"]["model_type"]])
        vision = cls.from_pretrained(spec["vision"]["pretrained"])
    if pretrained and spec["lm"].get("pretrained"):
        lm = transformers.AutoModelForCausalLM.from_pretrained(spec["lm"]["pretrained"])
    if lm is None and tokenizer is not None:  # a random LM gets the tokenizer's vocabulary
        spec["lm"]["vocab_size"] = len(tokenizer)
    spec["image_token_id"] = (tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None
                              else int(spec["lm"]["vocab_size"]) - 1)
    if str(device) == "meta":
        with torch.device("meta"):
            model = LibMoEVLM(spec, vision, lm)
    else:
        model = LibMoEVLM(spec, vision, lm)
    if lm is not None and tokenizer is not None:
        if lm.get_input_embeddings().num_embeddings < len(tokenizer):
            lm.resize_token_embeddings(len(tokenizer))
        spec["lm"]["vocab_size"] = lm.get_input_embeddings().num_embeddings
    return model.to(device) if str(device) != "meta" else model


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tied (shared-storage) tensors kept once, under their first name."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        meta = t.device.type == "meta"
        key = (name,) if meta else (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t
    return out


def model_state(model: LibMoEVLM) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in _unique_state(model).items()}


def load_state(model: LibMoEVLM, state: dict[str, Tensor]) -> None:
    """Load `state` (as `model_state` writes it) strictly, tied weights included."""
    result = model.load_state_dict(state, strict=False)
    full = model.state_dict()
    missing = [k for k in result.missing_keys
               if not any(full[k].data_ptr() == full[s].data_ptr() for s in state if s in full)]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]} (was it written by another preset or stage?).")
