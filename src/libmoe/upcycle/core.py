"""Upcycling libmoe models: dense FFN -> MoE layer with copied experts, SharedE-Upcyc, and the
model directory `libmoe upcycle` writes.

Exactness at initialisation: with every expert a copy of the dense FFN, an MoE layer whose
combine weights sum to one over the chosen experts computes the dense FFN exactly. That holds for
EXACT_AT_INIT (renormalised or softmaxed top-k weights; shared-expert algorithms with the dense
FFN as the one shared expert and a 0.5/0.5 mix, as in the paper) and not for NOT_EXACT_AT_INIT,
whose entries say why.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..files import write_json
from ..models import MoETransformer, find_tokenizer, load_model, save_model_dir
from ..models.transformers_lm import transformers_source
from ..models.upcycled import SHARED_ALGORITHMS, copy_into_experts
from ..moe.layer import check_algorithm

EXACT_AT_INIT = ("smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "cosine",
                 "perturbed_cosine", "hyper")
NOT_EXACT_AT_INIT = {
    "moe_plus_plus": "its zero-computation experts (zero, copy, constant) are routed slots too: "
                     "the weight they receive is not FFN output",
    "tc_moe": "close but not exact: the null slots' probability (about n_null * e^-10 of the total "
              "at init) stays in the weights' denominator, and a chosen negated slot computes -FFN",
    "expert_choice": "experts choose tokens: a token's weights are its raw scores for the experts "
                     "that chose it, which need not sum to one (or it may be chosen by none)",
}
UPCYCLE_FILE = "upcycle.json"  # upcycle_checkpoint's record in the new model dir (source, algorithm, E, k)


def _dense_source(model, what: str):
    if not isinstance(model, MoETransformer):
        raise ValueError(f"{what} needs a libmoe MoETransformer; got {type(model).__name__}.")
    if model.config.algorithm != "dense":
        raise ValueError(f"{what} needs a dense source model; this one is {model.config.algorithm!r} "
                         "(upcycle the dense baseline of a study, e.g. a `--algorithm dense` run).")
    return model.config


def _build(cfg, seed: int):
    """A fresh MoETransformer of `cfg`, every random init (routers in layer order) from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoETransformer(cfg)


def upcycle_model(source, algorithm: str, n_experts: int, top_k: int, layers: list[int] | None = None,
                  seed: int = 42, router_init_std: float = 0.02, noise_std: float = 0.0,
                  reinit_fraction: float = 0.0, **options: Any):
    """A copy of the dense MoETransformer `source` whose FFNs in `layers` (default all) are MoE
    layers of `algorithm`: E = n_experts experts of the dense width, top_k of them per token,
    each an exact copy of the block's dense FFN; routers N(0, router_init_std) from `seed`, drawn
    layer by layer (they differ, runs reproduce). Shared-expert algorithms use E - 1 routed copies
    plus the dense FFN as one shared expert (top_k counts it), mixed 0.5/0.5. `options` are MoE
    options (e.g. balance_coef). Everything outside the upcycled FFNs is copied unchanged."""
    cfg = _dense_source(source, "upcycling")
    check_algorithm(algorithm)
    if algorithm == "dense":
        raise ValueError("upcycling into 'dense' changes nothing; choose an MoE algorithm.")
    for name, value in (("noise_std", noise_std), ("router_init_std", router_init_std)):
        if value < 0:
            raise ValueError(f"{name}={value} must be non-negative.")
    if not 0 <= reinit_fraction <= 1:
        raise ValueError(f"reinit_fraction={reinit_fraction} must be between 0 and 1.")
    blocks = sorted(set(range(cfg.n_layers) if layers is None else layers))
    bad = [i for i in blocks if not 0 <= i < cfg.n_layers]
    if bad or not blocks:
        raise ValueError(f"layers {bad or '[]'}: give block indices in 0..{cfg.n_layers - 1}.")
    width = cfg.dense_width
    shared = algorithm in SHARED_ALGORITHMS
    moe_options = {**cfg.moe_options, "router_init_std": router_init_std, **options}
    if shared:
        moe_options.setdefault("shared_scaling", 0.5)
        moe_options.setdefault("routed_scaling", 0.5)
    new_cfg = replace(
        cfg, algorithm=algorithm, n_experts=n_experts, top_k=top_k, expert_dim=width, ffn_dim=width,
        moe_every=1, moe_layers=None if len(blocks) == cfg.n_layers else blocks,
        n_shared=1 if shared else cfg.n_shared, moe_options=moe_options,
    )
    target = _build(new_cfg, seed)
    device = next(source.parameters()).device
    target.to(device)
    skip = tuple(f"blocks.{i}.ffn." for i in blocks)
    state = target.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith(skip):
            state[key].copy_(value)
    generator = torch.Generator().manual_seed(seed)
    for i in blocks:
        dense = source.blocks[i].ffn.experts
        w1, w2 = dense.w1[0].detach(), dense.w2[0].detach()
        w3 = dense.w3[0].detach() if dense.w3 is not None else None
        layer = target.blocks[i].ffn
        copy_into_experts(layer.experts, w1, w2, w3, generator, noise_std, reinit_fraction)
        if layer.shared_experts is not None:
            copy_into_experts(layer.shared_experts, w1, w2, w3)
    return target


def shared_upcycle(source, algorithm: str, n_experts: int, top_k: int, expert_dim: int,
                   n_shared: int | None = None, seed: int = 0):
    """SharedE-Upcyc (paper Fig. 4/9): a fresh `algorithm` (sharede_v2/v3) model whose shared
    experts, and nothing else, start from the dense source's FFN of the same block: its hidden
    units split evenly over the n_shared shared experts, so together they compute the dense FFN
    (n_shared * expert_dim must equal its width). Everything else is random, from `seed`."""
    cfg = _dense_source(source, "SharedE-Upcyc")
    if algorithm not in SHARED_ALGORITHMS:
        raise ValueError(f"SharedE-Upcyc initialises shared experts; {algorithm!r} has none. Use "
                         f"{' or '.join(SHARED_ALGORITHMS)}.")
    n_shared = cfg.n_shared if n_shared is None else n_shared
    if n_shared * expert_dim != cfg.dense_width:
        raise ValueError(f"the dense FFN has width {cfg.dense_width} but {n_shared} shared experts of "
                         f"expert_dim {expert_dim} have {n_shared * expert_dim}; choose expert_dim "
                         f"{cfg.dense_width // max(n_shared, 1)} (or another n_shared) so they match.")
    new_cfg = replace(cfg, algorithm=algorithm, n_experts=n_experts, top_k=top_k,
                      expert_dim=expert_dim, n_shared=n_shared, ffn_dim=None, moe_layers=None)
    target = _build(new_cfg, seed).to(next(source.parameters()).device)
    S, M = n_shared, expert_dim
    with torch.no_grad():
        for src_block, block in zip(source.blocks, target.blocks):
            shared = getattr(block.ffn, "shared_experts", None)
            if shared is None:
                continue
            dense = src_block.ffn.experts
            D = dense.d_model
            # Experts.dense_forward concatenates hidden units expert-major: unit s*M + m.
            shared.w1.copy_(dense.w1[0].view(D, S, M).permute(1, 0, 2))
            shared.w2.copy_(dense.w2[0].view(S, M, D))
            if shared.w3 is not None and dense.w3 is not None:
                shared.w3.copy_(dense.w3[0].view(D, S, M).permute(1, 0, 2))
    return target


@torch.no_grad()
def max_logit_difference(a, b, vocab_size: int, seq_len: int, seed: int = 0) -> float:
    """Largest |logit difference| of two models on a fixed random batch [2, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, seq_len), generator=g)
    device = next(a.parameters()).device
    was = a.training, b.training
    a.eval(), b.eval()
    try:
        diff = (a(tokens.to(device)).logits - b(tokens.to(device)).logits).abs().max()
    finally:
        a.train(was[0]), b.train(was[1])
    return float(diff)


def upcycle_checkpoint(source: str | Path, out: str | Path, algorithm: str, n_experts: int, top_k: int,
                       layers: list[int] | None = None, seed: int = 42, router_init_std: float = 0.02,
                       noise_std: float = 0.0, reinit_fraction: float = 0.0, shared_only: bool = False,
                       expert_dim: int | None = None, n_shared: int | None = None,
                       overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Upcycle a libmoe dense run or checkpoint into the model directory `out` (model.safetensors,
    config.yaml, tokenizer/, upcycle.json), which `libmoe train --init`, `libmoe eval` and
    `libmoe analyze` accept. `shared_only` runs SharedE-Upcyc instead (expert_dim required).
    A transformers source (a local directory or a Hub name) is upcycled by
    `hf_saving.upcycle_transformers` into a directory AutoModelForCausalLM loads.
    Returns upcycle.json's content, including the largest logit difference from the source."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory for the upcycled model.")
    if (out / "config.yaml").is_file() and not overwrite:
        raise ValueError(f"{str(out)!r} already holds a model (config.yaml); pass --overwrite or a "
                         "new --out.")
    check_algorithm(algorithm)  # the arguments before the source model loads
    if n_experts < 1 or not 1 <= top_k <= n_experts:
        raise ValueError(f"--n-experts {n_experts} --top-k {top_k}: give at least one expert and a "
                         "top-k between 1 and the number of experts.")
    hf_source = transformers_source(source)  # a transformers directory, Hub name or such a run
    if hf_source is not None:
        if shared_only:
            raise ValueError("--shared-only (SharedE-Upcyc) needs a libmoe dense run as the source.")
        from .hf_saving import upcycle_transformers  # imports transformers

        return upcycle_transformers(hf_source, out, algorithm, n_experts, top_k, layers=layers,
                                    seed=seed, router_init_std=router_init_std, noise_std=noise_std,
                                    reinit_fraction=reinit_fraction, **options)
    loaded = load_model(source)
    if shared_only:
        if expert_dim is None:
            raise ValueError("SharedE-Upcyc needs --expert-dim (the shared experts' width).")
        model = shared_upcycle(loaded.model, algorithm, n_experts, top_k, expert_dim, n_shared, seed)
    else:
        model = upcycle_model(loaded.model, algorithm, n_experts, top_k, layers, seed, router_init_std,
                              noise_std, reinit_fraction, **options)
    cfg = model.config
    diff = max_logit_difference(loaded.model, model, cfg.vocab_size, min(cfg.max_seq_len, 64))
    save_model_dir(out, model, loaded.config, find_tokenizer(loaded.checkpoint))
    info = {
        "source": str(loaded.checkpoint), "source_step": loaded.step,
        "method": "sharede_upcyc" if shared_only else "upcycle", "algorithm": algorithm,
        "n_experts": n_experts, "top_k": top_k, "layers": layers, "seed": seed,
        "router_init_std": router_init_std, "noise_std": noise_std, "reinit_fraction": reinit_fraction,
        "options": options, "max_abs_logit_diff": diff,
        "exact_at_init": (not shared_only and algorithm in EXACT_AT_INIT and noise_std == 0
                          and reinit_fraction == 0 and options.get("capacity_factor") is None),
    }
    if not shared_only and algorithm in NOT_EXACT_AT_INIT:
        info["why_not_exact"] = NOT_EXACT_AT_INIT[algorithm]
    write_json(out / UPCYCLE_FILE, info)
    return info
