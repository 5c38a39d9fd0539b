"""The decoder-only MoE Transformer of the paper's language-modelling experiments.

Pre-LayerNorm blocks: x + Attn(LN(x)), then x + FFN(LN(x)) where FFN is a `build_moe` layer
(or the compute-matched dense FFN). Causal SDPA attention with rotary embeddings on a fraction of
each head's dimensions, untied output head, no dropout. Shapes: B batch, S sequence, D d_model.

`MoETransformer.compile_blocks()` compiles each block (its MoE layer included) with torch.compile
and fullgraph=True (train.compile); see its docstring for the shapes and when blocks run eagerly.

Decoding: `forward(..., cache=KVCache())` keeps each layer's keys and values so that the next call
feeds only the new tokens (transformers' DynamicCache serves as well: the attention uses its
`update` / `get_seq_length`); `attention_mask` ([B, T] with 0 at padding, left padding included,
or a ready [B, 1, S, T] mask) and `position_ids` work as in transformers' decoders. Without any of
them the forward is the training path: causal SDPA over the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as nn_module  # the global forward-hook registries

from ..moe import REGISTRY, MoEOutput, Routing, build_moe, routes_per_token
from .config import ModelConfig


def rotary_tables(seq_len: int, rope_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [S, rope_dim / 2] for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dim, 2, device=device).float() / rope_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x [B, H, S, Dh] pairwise (x1, x2 halves); the
    remaining dims pass through unchanged."""
    r = cos.shape[-1]
    if r == 0:
        return x
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class KVCache:
    """Each layer's keys and values [B, H, T, Dh] of the positions seen so far, for incremental
    decoding. It has the methods of transformers' DynamicCache that the attention calls (`update`,
    `get_seq_length`), so either kind serves `MoETransformer.forward(cache=...)`."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any) -> tuple[Tensor, Tensor]:
        """Append a layer's new keys and values; return all of that layer's."""
        if layer_idx == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], keys], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], values], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


@dataclass
class Attending:
    """What attention takes beyond the training path's causal SDPA over a whole window.
    mask: [B or 1, 1, S, T] bool (True attends) or float (added to the scores), T = cached + S;
    cache: a KVCache or transformers Cache; eager: compute softmax(QK^T / sqrt(Dh)) explicitly;
    weights: when a list, each layer appends its attention weights [B, H, S, T] (eager too)."""

    mask: Tensor | None = None
    cache: Any = None
    eager: bool = False
    weights: list[Tensor] | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attending: Attending | None = None,
                layer_idx: int = 0) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attending is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if attending.cache is not None:
                k, v = attending.cache.update(k, v, layer_idx)
            if attending.eager or attending.weights is not None:
                scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5
                if attending.mask is not None:
                    mask = attending.mask
                    scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                              else scores + mask)
                weights = scores.softmax(-1).to(q.dtype)
                if attending.weights is not None:
                    attending.weights.append(weights)
                y = weights @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attending.mask)
        return self.out(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, first_moe: bool = False):
        super().__init__()
        self.layer, self.first_moe = layer, first_moe
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            n_experts, top_k, options = cfg.moe_args()
            router = REGISTRY[cfg.algorithm].router
            if "gating_residual" in getattr(router, "OPTIONS", {}):
                # MoE++'s W_g (on unless moe_options turns it off) exists only where it is used:
                # every MoE layer but the first receives the previous layer's logits.
                gated = options.get("gating_residual", True)
                options["gating_residual"] = False if first_moe and isinstance(gated, bool) else gated
            self.ffn = build_moe(cfg.algorithm, cfg.d_model, n_experts, cfg.expert_dim, top_k,
                                 **options)
        else:
            activation = cfg.moe_options.get("activation", "relu")
            self.ffn = build_moe("dense", cfg.d_model, cfg.n_experts, cfg.dense_width, 1,
                                 activation=activation)
        self.compiled_forward = None  # set by compile_body(): torch.compile of `body`

    def compile_body(self, backend: str = "inductor", **options) -> None:
        """Compile `body` (attention, norms, the FFN/MoE layer) with fullgraph=True; the block's
        own hooks (FSDP2's all-gathers) stay outside the graph, as torchtitan arranges it."""
        self.compiled_forward = torch.compile(self.body, backend=backend, fullgraph=True, **options)

    def forward(self, x, cos, sin, prev_logits, attending: Attending | None = None):
        if self.compiled_forward is None or attending is not None or _hooked(self):
            return self.body(x, cos, sin, prev_logits, attending)
        # One graph for every batch size: training micro-batches, validation's short last batch
        # and the probe trace's batch would otherwise each compile their own.
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return self.compiled_forward(x, cos, sin, prev_logits)

    def body(self, x, cos, sin, prev_logits, attending: Attending | None = None):
        """x [B, S, D] -> (x after attention and FFN, the FFN's MoEOutput)."""
        x = x + self.attn(self.norm1(x), cos, sin, attending, self.layer)
        out: MoEOutput = self.ffn(self.norm2(x), prev_logits=prev_logits)
        return x + out.output, out


def _hooked(block: Block) -> bool:
    """Whether forward hooks would run on the block's FFN layer (a RoutingRecorder's, which copy the
    routing to the host, something a fullgraph graph cannot hold): the block then runs eagerly."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return bool(block.ffn._forward_hooks or block.ffn._forward_pre_hooks)


@dataclass
class LMOutput:
    """logits [B, S, V]; loss: language-model cross-entropy (None without targets); aux_loss: sum
    over layers of each layer's weighted aux terms; aux: per-term sums over layers (unweighted);
    routing: one Routing per MoE layer, in depth order; hidden_states (the embeddings, each block's
    output, the last one after the final norm) and attentions (each layer's weights) when asked."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    routing: list[Routing] = field(default_factory=list)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class DecoderOutput:
    """`Decoder.decode`'s result: `hidden` [B, S, D] after the final norm, the rest as LMOutput's."""

    hidden: Tensor
    aux_loss: Tensor
    aux: dict[str, Tensor]
    routing: list[Routing]
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class Decoder:
    """The decoder without its output head: embedding, blocks, final norm and rotary tables, built
    by `build_decoder` on an nn.Module and run by `decode`. MoETransformer adds the head; the
    transformers classes (libmoe.models.hf) hold the same modules under the same names."""

    def build_decoder(self, cfg: ModelConfig, head: bool = False) -> None:
        """Build the modules (and, with `head`, the output head `head` too) and initialise them."""
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        first = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), None)
        self.blocks = nn.ModuleList(Block(cfg, i, i == first) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        own = [self.embed]
        if head:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            own.append(self.head)
        # N(0, init_std) for embeddings, attention and head; MoE layers keep their own init
        # (routers N(0, router_init_std), experts like the compute-matched dense FFN).
        for module in own + [m for b in self.blocks for m in (b.attn.qkv, b.attn.out)]:
            nn.init.normal_(module.weight, std=cfg.init_std)
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.rope_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Whether a KV cache reproduces the whole sequence's routing (not so for expert choice)
        self.routes_per_token = routes_per_token(self.blocks)

    def decode(self, tokens: Tensor | None, inputs_embeds: Tensor | None = None, *,
               attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
               cache: Any = None, output_hidden_states: bool = False,
               output_attentions: bool = False, eager: bool = False) -> DecoderOutput:
        """tokens [B, S] (or `inputs_embeds` [B, S, D]) -> DecoderOutput. `cache` (KVCache or a
        transformers Cache) holds the keys and values of the positions before these S and takes
        theirs; `attention_mask` is [B, cached + S] (1 attends, 0 is padding) or a ready 4D mask;
        `position_ids` [B or 1, S] default to the cache positions; `eager` computes attention
        explicitly (as `output_attentions` must). With none of them: the training path."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of tokens and inputs_embeds.")
        B, S = tokens.shape if tokens is not None else inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        n_positions = self.rope_cos.shape[0]
        if past + S > n_positions:
            what = f"{past} cached + {S} new positions" if past else f"sequence length {S}"
            raise ValueError(f"{what} exceed max_seq_len={n_positions}; shorten the input or raise "
                             "max_seq_len (max_position_embeddings).")
        if cache is not None and not self.routes_per_token:
            raise ValueError("this model's routing looks across the tokens of the batch (expert choice, "
                             "or a capacity_factor), so decoding with a KV cache would route otherwise "
                             "than the whole sequence does; decode without a cache (use_cache=False).")
        x = self.embed(tokens) if tokens is not None else inputs_embeds
        attending = None
        if (cache is not None or attention_mask is not None or position_ids is not None or eager
                or output_attentions):
            attending = Attending(causal_mask(attention_mask, past, S, x.device), cache, eager,
                                  [] if output_attentions else None)
        if position_ids is None:
            cos, sin = self.rope_cos[past : past + S], self.rope_sin[past : past + S]
        else:
            if position_ids.numel() and int(position_ids.max()) >= n_positions:
                raise ValueError(f"position_ids reach {int(position_ids.max())}, beyond "
                                 f"max_seq_len={n_positions}.")
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        aux: dict[str, Tensor] = {}
        routing: list[Routing] = []
        hidden_states: list[Tensor] | None = [] if output_hidden_states else None
        prev_logits = None  # MoE++'s gating residual: each MoE layer sees the previous one's logits
        for block in self.blocks:
            if hidden_states is not None:
                hidden_states.append(x)
            x, out = block(x, cos, sin, prev_logits, attending)
            aux_loss = aux_loss + out.aux_loss
            for name, value in out.aux.items():
                aux[name] = aux[name] + value.detach() if name in aux else value.detach()
            if out.routing is not None:
                routing.append(out.routing)
                prev_logits = out.routing.logits
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return DecoderOutput(x, aux_loss, aux, routing,
                             tuple(hidden_states) if hidden_states is not None else None,
                             tuple(attending.weights) if output_attentions else None)


def causal_mask(attention_mask: Tensor | None, past: int, S: int, device: torch.device) -> Tensor:
    """The [B or 1, 1, S, past + S] bool mask of S new positions after `past` cached ones: causal,
    without the keys `attention_mask` [B, past + S] marks 0. A query that would see no key at all
    (a left-padding position) sees every key instead, so that its (ignored) output stays finite.
    A 4D `attention_mask` is returned as it is."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    T = past + S
    mask = (torch.arange(T, device=device) <= torch.arange(past, T, device=device)[:, None])[None, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the input "
                             f"has {past} cached + {S} new ones; give a mask of length {T}.")
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask


class MoETransformer(Decoder, nn.Module):
    """Decoder-only Transformer LM with MoE FFNs (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.build_decoder(cfg, head=True)

    def compile_blocks(self, backend: str = "inductor", **options) -> MoETransformer:
        """torch.compile each block in place (train.compile) with fullgraph=True: attention, norms
        and the MoE layer (router, dispatch, aux losses, the Routing record) form one graph per
        block, and anything that would break it (a host sync, a data-dependent Python branch)
        raises instead of silently running eagerly. Call it before DDP/FSDP2 wrapping (torchtitan's
        order: compile per block, then shard); `options` go to torch.compile (e.g. mode=...).

        Graphs: the blocks share one code object (Block.body), so blocks of one structure share
        their compiled graphs: one per (first MoE layer or not, dense or MoE FFN, grad mode). The
        batch dimension is dynamic, so validation's and the probe trace's batch sizes reuse them;
        the sequence length stays static (every window has the run's seq_len). A forward while
        hooks watch an FFN layer (RoutingRecorder) runs the blocks eagerly. Returns self."""
        # Each (structure, grad mode) is a cache entry of Block.body's code; leave room beyond
        # torch's default 8 for dense + MoE blocks, inference_mode and no_grad together.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for block in self.blocks:
            block.compile_body(backend, **options)
        return self

    def forward(self, tokens: Tensor | None, targets: Tensor | None = None,
                inputs_embeds: Tensor | None = None, **decoding: Any) -> LMOutput:
        """tokens [B, S] (or `inputs_embeds` [B, S, d_model] instead, e.g. a VLM's image and text
        embeddings) -> LMOutput. `decoding`: Decoder.decode's keywords (cache, attention_mask,
        position_ids, output_hidden_states, output_attentions, eager)."""
        out = self.decode(tokens, inputs_embeds, **decoding)
        logits = self.head(out.hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return LMOutput(logits, loss, out.aux_loss, out.aux, out.routing, out.hidden_states,
                        out.attentions)
