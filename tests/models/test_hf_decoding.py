"""libmoe's transformers classes as transformers users meet them: the flat config (standard names,
libmoe aliases, old nested files), LibMoEModel / LibMoEForCausalLM decoding with transformers'
DynamicCache, left padding, every `generate` mode against the cache-free path and libmoe's own
generate, embeddings get/set/resize, both weight layouts; and the upcycled classes likewise."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from libmoe.models import ModelConfig, MoETransformer  # noqa: E402
from libmoe.models.config import PRESETS, model_config  # noqa: E402
from libmoe.models.generation import generate  # noqa: E402
from libmoe.models.hf import LibMoEConfig, LibMoEForCausalLM, LibMoEModel, to_hf  # noqa: E402
from libmoe.moe import REGISTRY  # noqa: E402

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=12, max_position_embeddings=64,
             eos_token_id=2, pad_token_id=0, bos_token_id=1)


def lm(algorithm="smoe", **overrides):
    torch.manual_seed(0)
    return LibMoEForCausalLM(LibMoEConfig(**{**SMALL, "algorithm": algorithm, **overrides})).eval()


def prompt(batch=2, length=7, seed=1):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_config_is_flat_default_constructible_and_takes_libmoe_names_too():
    default = LibMoEConfig()
    assert default.model_config() == ModelConfig()  # libmoe's defaults
    config = LibMoEConfig(d_model=48, n_experts=6, num_experts_per_tok=3, expert_dim=16, hidden_act="swiglu",
                          router_aux_loss_coef=0.02, moe_options={"z_coef": 0.001})
    assert (config.hidden_size, config.num_experts, config.num_local_experts) == (48, 6, 6)
    cfg = config.model_config()
    assert (cfg.d_model, cfg.n_experts, cfg.top_k, cfg.expert_dim) == (48, 6, 3, 16)
    assert cfg.moe_options == {"z_coef": 0.001, "activation": "swiglu", "balance_coef": 0.02}
    saved = json.loads(config.to_json_string())
    assert saved["hidden_size"] == 48 and "libmoe" not in saved and "d_model" not in saved
    assert LibMoEConfig.from_dict(saved).model_config() == cfg
    with pytest.raises(ValueError, match="n_shared=2 must be below top_k=2"):
        LibMoEConfig(algorithm="sharede_v2", num_experts_per_tok=2)
    with pytest.raises(ValueError, match="unknown MoE algorithm .nope."):
        LibMoEConfig(algorithm="nope")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_algorithm_round_trips_through_the_config(preset):
    for algorithm in sorted(REGISTRY):
        cfg = model_config(preset, algorithm)
        again = LibMoEConfig.from_model_config(cfg).model_config()
        assert again.to_dict() == cfg.to_dict(), algorithm


def test_an_old_nested_config_json_loads(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, head_dim=8, n_experts=4,
                      expert_dim=8, top_k=2, algorithm="xmoe", moe_options={"temperature": 0.5})
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "libmoe", "libmoe": cfg.to_dict(), "vocab_size": 50, "hidden_size": 16,
        "eos_token_id": 2}))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, LibMoEConfig) and config.model_config() == cfg
    assert config.hidden_size == 16 and config.algorithm == "xmoe" and config.eos_token_id == 2


def test_the_cache_left_padding_and_logits_to_keep_give_the_full_forward_logits():
    m = lm("moe_plus_plus")
    ids = prompt(length=9)
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        first = m(ids[:, :6], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert type(cache).__name__ == "DynamicCache" and cache.get_seq_length() == 6
        rest = m(ids[:, 6:], cache=cache).logits
        torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, atol=2e-5, rtol=1e-4)
        last = m(ids, logits_to_keep=1).logits
        torch.testing.assert_close(last, full[:, -1:])
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = m(padded, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(out[:, 3:], full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "beam_sample", "assisted"])
def test_every_generate_mode_agrees_with_the_cache_free_path(mode):
    m = lm("sharede_v3", num_shared_experts=1)
    ids = prompt(batch=1 if mode == "assisted" else 2)
    modes = {"greedy": {}, "sample": {"do_sample": True, "top_k": 10}, "beam": {"num_beams": 3},
             "beam_sample": {"num_beams": 2, "do_sample": True},
             "assisted": {"assistant_model": lm("sharede_v3", num_shared_experts=1, num_experts=4)}}
    results = []
    for use_cache in (True, False):
        kwargs = modes[mode] if use_cache else {k: v for k, v in modes[mode].items()
                                                 if k != "assistant_model"}  # the reference: greedy
        torch.manual_seed(5)
        results.append(m.generate(ids, max_new_tokens=8, min_new_tokens=8, use_cache=use_cache, **kwargs))
    assert results[0].shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(results[0], results[1])


def test_batched_left_padded_generation_matches_each_prompt_alone_and_libmoe_generate():
    m = lm()
    a, b = prompt(1, 7, seed=2), prompt(1, 4, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = m.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    alone = m.generate(b, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out[1, 7:], alone[0, 4:])
    core = m.to_libmoe()
    assert generate(core, [a[0].tolist(), b[0].tolist()], 6) == [out[0, 7:].tolist(), out[1, 7:].tolist()]


def test_outputs_hidden_states_attentions_and_router_logits():
    m = lm()
    ids = prompt()
    out = m(ids, output_hidden_states=True, output_attentions=True, output_router_logits=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 7, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 7, 7)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (14, 8)
    assert out.aux_loss > 0 and len(out.routing) == 2
    assert m(ids).attentions is None
    m.config._attn_implementation = "eager"
    torch.testing.assert_close(m(ids).logits, out.logits, atol=2e-5, rtol=1e-4)
    as_tuple = m(ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_embeddings_get_set_and_resize():
    m = lm()
    assert m.get_input_embeddings() is m.model.embed and m.get_output_embeddings() is m.lm_head
    m.resize_token_embeddings(120)
    assert m.config.vocab_size == 120 and m.lm_head.weight.shape == (120, 32)
    assert m(torch.tensor([[119, 3]])).logits.shape == (1, 2, 120)
    new = torch.nn.Embedding(120, 32)
    m.set_input_embeddings(new)
    assert m.model.embed is new
    tied = lm(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed.weight


def test_both_weight_layouts_load(tmp_path):
    core = MoETransformer(LibMoEConfig(**SMALL).model_config()).eval()
    ids = prompt()
    with torch.no_grad():
        expected = core(ids).logits
    hf = to_hf(core)
    hf.save_pretrained(str(tmp_path / "hf"))  # transformers' layout: model.embed..., lm_head
    keys = set(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert {"hidden_size", "num_experts", "num_experts_per_tok", "algorithm"} <= keys
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    base = transformers.AutoModel.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(base, LibMoEModel)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected)
        assert torch.equal(hf.lm_head(base(ids).last_hidden_state), expected)
    from safetensors.torch import save_file  # libmoe's layout: embed..., head.weight (also old saves)

    (tmp_path / "libmoe").mkdir()
    save_file(dict(core.state_dict()), str(tmp_path / "libmoe" / "model.safetensors"))
    (tmp_path / "libmoe" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    for cls in (transformers.AutoModelForCausalLM, LibMoEForCausalLM):
        with torch.no_grad():
            assert torch.equal(cls.from_pretrained(str(tmp_path / "libmoe")).eval()(ids).logits, expected)
    shared = back.to_libmoe()
    assert shared.head.weight is back.lm_head.weight and isinstance(shared, MoETransformer)


def test_expert_choice_generates_without_a_cache():
    m = lm("expert_choice")
    assert m.generation_config.use_cache is False
    ids = prompt()
    with pytest.raises(ValueError, match="decode without a cache"):
        m(ids, cache=transformers.DynamicCache(config=m.config))
    assert m(ids).cache is None  # use_cache defaults off for it
    out = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    again = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, again)


def upcycled():
    from libmoe.upcycle.hf_saving import wrap_upcycled

    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0))
    return wrap_upcycled(source, "smoe", 4, 2).eval()


def test_the_upcycled_config_is_flat_and_old_nested_files_load(tmp_path):
    from libmoe.models.hf_upcycled import LibMoEUpcycledConfig

    default = LibMoEUpcycledConfig()
    assert default.base_config().model_type == "llama" and default.num_experts == 8
    m = upcycled()
    m.save_pretrained(str(tmp_path / "up"))
    saved = json.loads((tmp_path / "up" / "config.json").read_text())
    assert saved["base_model_type"] == "llama" and saved["num_experts"] == 4
    assert saved["num_experts_per_tok"] == 2 and saved["hidden_size"] == 32 and "upcycle" not in saved
    config = LibMoEUpcycledConfig.from_pretrained(str(tmp_path / "up"))
    assert config.upcycle["n_experts"] == 4 and config.base_config().intermediate_size == 48
    nested = LibMoEUpcycledConfig(base={"model_type": "llama", "hidden_size": 32, "vocab_size": 99,
                                        "num_hidden_layers": 2, "num_attention_heads": 4},
                                  upcycle={"algorithm": "xmoe", "n_experts": 6, "top_k": 2})
    assert (nested.algorithm, nested.num_experts, nested.hidden_size) == ("xmoe", 6, 32)


def test_the_upcycled_model_generates_with_the_cache_and_left_padding():
    m = upcycled()
    ids = prompt()
    cached = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    plain = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :5]], 1)
    mask = torch.ones_like(padded)
    mask[0, :2] = 0
    out = m.generate(padded, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    alone = m.generate(ids[1:, :5], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, 7:], alone[0, 5:])


def test_inputs_embeds_stand_in_for_input_ids_in_forward_and_generate():
    m = lm()
    ids = prompt()
    embeds = m.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(m(inputs_embeds=embeds).logits, m(ids).logits)
    from_ids = m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    from_embeds = m.generate(inputs_embeds=embeds, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])  # generate returns the new tokens only
    with pytest.raises(ValueError, match="exactly one of tokens and inputs_embeds"):
        m(ids, inputs_embeds=embeds)


def test_libmoe_generate_runs_transformers_models_libmoe_trains_with_their_cache():
    from libmoe.models import TransformersLM

    model = TransformersLM(upcycled())
    prompts = [prompt(1, 6, seed=4)[0].tolist(), prompt(1, 3, seed=5)[0].tolist()]
    cached = generate(model, prompts, 8)
    assert cached == generate(model, prompts, 8, use_cache=False)
    assert type(model.new_cache()).__name__ == "DynamicCache"
    direct = model.lm.generate(torch.tensor([prompts[0]]), max_new_tokens=8, min_new_tokens=8,
                               do_sample=False)
    assert cached[0] == direct[0, 6:].tolist()
