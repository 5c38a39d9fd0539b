"""Upcycling transformers decoder models in memory: their MLPs become libmoe MoE layers.

    from transformers import AutoModelForCausalLM
    from libmoe.upcycle.hf import upcycle_hf_model, moe_aux_loss
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B")
    upcycle_hf_model(model, "smoe", n_experts=8, top_k=2)      # same logits at init (exact algorithms)
    loss = model(ids, labels=ids).loss + moe_aux_loss(model)

The structure this builds is also how an upcycled model loads, so it lives in
`libmoe.models.upcycled` (see there which MLPs are understood); re-exported here.
"""

from ..models.upcycled import (
    GATED_ACTIVATIONS,
    MLP_KINDS,
    PLAIN_ACTIVATIONS,
    DenseMLP,
    UpcycledMLP,
    find_mlps,
    mlp_weights,
    moe_aux_loss,
    upcycle_hf_model,
)

__all__ = ["GATED_ACTIVATIONS", "MLP_KINDS", "PLAIN_ACTIVATIONS", "DenseMLP", "UpcycledMLP", "find_mlps",
           "mlp_weights", "moe_aux_loss", "upcycle_hf_model"]
