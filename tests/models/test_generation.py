"""Decoding with libmoe's own models: the KV cache, attention masks with left padding, position
ids, explicit attention and its weights, hidden states, and libmoe.models.generation.generate
against the cache-free loop."""

import pytest
import torch

from libmoe.models import ModelConfig, MoETransformer
from libmoe.models.generation import generate, next_token
from libmoe.models.transformer import KVCache
from libmoe.moe import REGISTRY


def model(algorithm="smoe", max_seq_len=32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, head_dim=8,
                      max_seq_len=max_seq_len, algorithm=algorithm, n_experts=4, expert_dim=8, top_k=2,
                      n_shared=1)
    return MoETransformer(cfg).eval()


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


PER_TOKEN = sorted(name for name in REGISTRY if name != "expert_choice")


@pytest.mark.parametrize("algorithm", PER_TOKEN)
def test_decoding_token_by_token_with_the_cache_gives_the_full_forward_logits(algorithm):
    m = model(algorithm)
    assert m.routes_per_token
    with torch.no_grad():
        full = m(TOKENS).logits
        cache = KVCache()
        steps = [m(TOKENS[:, :5], cache=cache).logits]
        for i in range(5, 12):
            steps.append(m(TOKENS[:, i : i + 1], cache=cache).logits)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)


def test_left_padding_with_mask_and_positions_gives_the_unpadded_logits():
    m = model("moe_plus_plus")
    pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), TOKENS[:1, :9]], 1)
    batch = torch.cat([pad, TOKENS[1:, :12]], 0)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = m(batch, attention_mask=mask, position_ids=positions).logits
        alone = m(TOKENS[:1, :9]).logits
        other = m(TOKENS[1:]).logits
    assert torch.isfinite(out).all()  # the padding queries see no real key: still finite
    torch.testing.assert_close(out[:1, 3:], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1:], other, atol=2e-5, rtol=1e-4)


def test_explicit_attention_matches_sdpa_and_returns_weights_and_hidden_states():
    m = model()
    with torch.no_grad():
        sdpa = m(TOKENS)
        eager = m(TOKENS, eager=True, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=2e-5, rtol=1e-4)
    assert sdpa.attentions is None and sdpa.hidden_states is None
    assert len(eager.attentions) == 2 and eager.attentions[0].shape == (2, 2, 12, 12)
    weights = eager.attentions[1]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 12))
    assert float(weights.triu(1).abs().max()) == 0.0  # causal
    assert len(eager.hidden_states) == 3  # embeddings, block 0's output, the final norm's
    torch.testing.assert_close(eager.hidden_states[0], m.embed(TOKENS))
    torch.testing.assert_close(m.head(eager.hidden_states[-1]), eager.logits)


def test_masks_positions_and_lengths_are_checked():
    m = model(max_seq_len=16)
    with pytest.raises(ValueError, match="attention_mask covers 5 positions"):
        m(TOKENS, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="exceed max_seq_len=16"):
        cache = KVCache()
        m(TOKENS, cache=cache)
        m(TOKENS[:, :5], cache=cache)
    with pytest.raises(ValueError, match="position_ids reach 40"):
        m(TOKENS, position_ids=torch.arange(29, 41)[None])


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 3, "temperature": 0.7, "top_k": 20,
                                          "top_p": 0.9}])
def test_generate_with_the_cache_matches_the_cache_free_loop(sampling):
    m = model("sharede_v3", max_seq_len=24)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3]]
    cached = generate(m, prompts, 30, **sampling)  # 5 + 30 > 24: the past-window steps too
    plain = generate(m, prompts, 30, use_cache=False, **sampling)
    assert cached == plain and [len(x) for x in cached] == [30, 30, 30]
    if not sampling:  # a left-padded batch decodes each prompt as it would alone
        assert cached == [generate(m, [p], 30)[0] for p in prompts]
    else:
        assert cached != generate(m, prompts, 30, **{**sampling, "seed": 4})


def test_generate_stops_at_eos_and_at_the_stop_callback():
    m = model()
    [free] = generate(m, [[1, 2, 3]], 10)
    eos = free[3]
    [cut] = generate(m, [[1, 2, 3]], 10, eos_id=eos)
    assert cut == free[: free.index(eos)]
    [stopped] = generate(m, [[1, 2, 3]], 10, stop=lambda row, new: len(new) == 4)
    assert stopped == free[:4]
    assert generate(m, [[1, 2, 3]], 0) == [[]]
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[]], 5)
    with pytest.raises(ValueError, match="temperature=0"):
        generate(m, [[1]], 5, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(m, [[1]], 5, do_sample=True, top_p=1.5)


def test_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert next_token(logits, False).item() == 1
    draws = {next_token(logits, True, top_k=1, generator=torch.Generator().manual_seed(s)).item()
             for s in range(20)}
    assert draws == {1}
    draws = {next_token(logits, True, top_p=0.5, generator=torch.Generator().manual_seed(s)).item()
             for s in range(20)}
    assert draws == {1}  # the most likely token alone holds half the mass
    draws = {next_token(logits, True, top_k=2, generator=torch.Generator().manual_seed(s)).item()
             for s in range(40)}
    assert draws == {1, 2}


def test_routing_across_tokens_decodes_without_the_cache():
    m = model("expert_choice")  # experts pick tokens: a token's routing depends on the others
    assert not m.routes_per_token
    with pytest.raises(ValueError, match="decode without a cache"):
        m(TOKENS, cache=KVCache())
    widths = []
    hook = m.embed.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    try:
        assert generate(m, [[1, 2, 3]], 8) == generate(m, [[1, 2, 3]], 8, use_cache=False)
    finally:
        hook.remove()
    assert widths[:8] == list(range(3, 11))  # every step reads the whole sequence
    torch.manual_seed(0)
    capped = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, head_dim=8,
                                        n_experts=4, expert_dim=8, top_k=2,
                                        moe_options={"capacity_factor": 1.0}))
    assert not capped.routes_per_token
