"""The decoder-only MoE Transformer of the paper's language-modelling experiments.

Pre-LayerNorm blocks: x + Attn(LN(x)), then x + FFN(LN(x)) where FFN is a `build_moe` layer
(or the compute-matched dense FFN). Causal SDPA attention with rotary embeddings on a fraction of
each head's dimensions, untied output head, no dropout. Shapes: B batch, S sequence, D d_model.

`MoETransformer.compile_blocks()` compiles each block (its MoE layer included) with torch.compile
and fullgraph=True (train.compile); see its docstring for the shapes and when blocks run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as nn_module  # the global forward-hook registries

from ..moe import REGISTRY, MoEOutput, Routing, build_moe
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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, first_moe: bool = False):
        super().__init__()
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

    def forward(self, x, cos, sin, prev_logits):
        if self.compiled_forward is None or _hooked(self):
            return self.body(x, cos, sin, prev_logits)
        # One graph for every batch size: training micro-batches, validation's short last batch
        # and the probe trace's batch would otherwise each compile their own.
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return self.compiled_forward(x, cos, sin, prev_logits)

    def body(self, x, cos, sin, prev_logits):
        """x [B, S, D] -> (x after attention and FFN, the FFN's MoEOutput)."""
        x = x + self.attn(self.norm1(x), cos, sin)
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
    routing: one Routing per MoE layer, in depth order."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    routing: list[Routing] = field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only Transformer LM with MoE FFNs (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        first = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), None)
        self.blocks = nn.ModuleList(Block(cfg, i, i == first) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # N(0, init_std) for embeddings, attention and head; MoE layers keep their own init
        # (routers N(0, router_init_std), experts like the compute-matched dense FFN).
        own = [self.embed, self.head] + [m for b in self.blocks for m in (b.attn.qkv, b.attn.out)]
        for module in own:
            nn.init.normal_(module.weight, std=cfg.init_std)
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.rope_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

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
                inputs_embeds: Tensor | None = None) -> LMOutput:
        """tokens [B, S] (or `inputs_embeds` [B, S, d_model] instead, e.g. a VLM's image and text
        embeddings) -> LMOutput."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of tokens and inputs_embeds.")
        B, S = tokens.shape if tokens is not None else inputs_embeds.shape[:2]
        if self.config.max_seq_len < S:
            raise ValueError(
                f"sequence length {S} exceeds max_seq_len={self.config.max_seq_len}; "
                "shorten the input or raise max_seq_len."
            )
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.embed(tokens) if tokens is not None else inputs_embeds
        aux_loss = x.new_zeros((), dtype=torch.float32)
        aux: dict[str, Tensor] = {}
        routing: list[Routing] = []
        prev_logits = None  # MoE++'s gating residual: each MoE layer sees the previous one's logits
        for block in self.blocks:
            x, out = block(x, cos, sin, prev_logits)
            aux_loss = aux_loss + out.aux_loss
            for name, value in out.aux.items():
                aux[name] = aux[name] + value.detach() if name in aux else value.detach()
            if out.routing is not None:
                routing.append(out.routing)
                prev_logits = out.routing.logits
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return LMOutput(logits, loss, aux_loss, aux, routing)
