"""Text generation with a KV cache, for libmoe's own models and the transformers models libmoe
trains (`TransformersLM`), without transformers' `generate`: what `libmoe generate` and the
evaluator's `generate_until` use.

    from libmoe.models import load_model
    from libmoe.models.generation import generate
    loaded = load_model("runs/smoe")
    [ids] = generate(loaded.model, [loaded.tokenizer.encode("To be")], max_new_tokens=64)

`generate(model, prompts, max_new_tokens)` decodes a batch of token-id prompts, left-padded to one
length (attention mask and position ids as transformers builds them), greedily or by sampling
(`do_sample` with `temperature`, `top_k`, `top_p`, and a `seed` or torch.Generator for repeatable
draws). The prompts are read once; each later step feeds the one new token per row and reuses the
cached keys and values. A row stops at `eos_id` or when `stop(row, new_ids)` says so; the call
stops when every row has. Past the model's window (max_seq_len) each step re-reads the last
max_seq_len tokens without a cache, as a cache-free loop would. `use_cache=False` is that
cache-free loop throughout: the reference the cached path must agree with, and the path of
models whose routing looks across tokens (expert choice, capacity factors: routes_per_token).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..moe import routes_per_token
from .transformer import KVCache, MoETransformer


def new_cache(model: nn.Module):
    """An empty cache for `model`: its own `new_cache()` (TransformersLM's), transformers'
    DynamicCache for a transformers model, else libmoe's KVCache."""
    make = getattr(model, "new_cache", None)
    if callable(make):
        return make()
    if _is_transformers(model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    return KVCache()


def supports_cache(model: nn.Module) -> bool:
    """Whether `model` decodes with a cache: libmoe's MoETransformer, TransformersLM and
    transformers' models do, unless their routing looks across tokens (routes_per_token)."""
    return ((isinstance(model, MoETransformer) or callable(getattr(model, "new_cache", None))
             or _is_transformers(model)) and routes_per_token(model))


def _is_transformers(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") and hasattr(model, "can_generate")


def cache_argument(model: nn.Module) -> str:
    """The name `model`'s forward takes the cache by: `cache` (libmoe; transformers 5.2x), else
    `past_key_values` (earlier transformers models)."""
    if _is_transformers(model) and "cache" not in inspect.signature(model.forward).parameters:
        return "past_key_values"
    return "cache"


def model_window(model: nn.Module, default: int | None = None) -> int:
    """The longest input `model` takes: libmoe's max_seq_len (TransformersLM's too), or a
    transformers config's n_positions / max_position_embeddings / n_ctx (lm-evaluation-harness's
    order), else `default` (None: an error)."""
    config = getattr(model, "config", None)
    for attr in ("max_seq_len", "n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise ValueError(f"{type(model).__name__} names no window (max_seq_len); pass window=.")
    return default


def next_token(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The next token of each row of `logits` [B, V]: the argmax, or a draw from the softmax at
    `temperature` restricted to the `top_k` most likely tokens and to the smallest set whose
    probability reaches `top_p` (always at least the most likely token)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                   max_new_tokens: int) -> None:
    """Refuse arguments that cannot generate, before any model work."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 0.")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be above 0 when sampling (for greedy "
                             "decoding leave sampling off).")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1.")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1].")


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, eos_id: int | None = None, pad_id: int = 0,
             stop: Callable[[int, list[int]], bool] | None = None, window: int | None = None,
             use_cache: bool = True) -> list[list[int]]:
    """The new token ids of each prompt (see the module docstring); the eos token, when reached,
    ends a row's list without being part of it. `window` (at most the model's max_seq_len) is
    how many positions a step may read."""
    check_sampling(do_sample, temperature, top_k, top_p, max_new_tokens)
    use_cache = use_cache and routes_per_token(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's BOS or EOS).")
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    window = min(window or model_window(model), model_window(model, default=window))
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, L - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, L - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = len({len(p) for p in prompts}) > 1
    cache_name = cache_argument(model)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    cache = None  # holds the keys and values of every column of ids but the last
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            N = ids.shape[1]
            if cache is not None and window >= N:
                start = N - 1
            else:  # the first step, no cache, or past the window: read (the last window of) ids
                start = max(0, N - window)
                cache = new_cache(model) if use_cache and window >= N else None
            seen = 0 if cache is not None else start  # the mask covers the cached columns too
            logits = _forward(model, ids[:, start:], mask[:, seen:], cache, cache_name, padded)
            step = next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator).tolist()
            for row, t in enumerate(step):
                if done[row]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[row] = True
                    continue
                new[row].append(t)
                if stop is not None and stop(row, new[row]):
                    done[row] = True
            if all(done):
                break
            token = torch.tensor([pad_id if d else t for d, t in zip(done, step)], device=device)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    finally:
        model.train(was_training)
    return new


def _forward(model: nn.Module, ids: Tensor, mask: Tensor, cache, cache_name: str,
             padded: bool) -> Tensor:
    """The logits of `ids`, the columns after those `cache` holds; `mask` covers both."""
    kwargs = {} if cache is None else {cache_name: cache}
    if padded:  # transformers' convention: positions count the real tokens only
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    return model(ids, **kwargs).logits
