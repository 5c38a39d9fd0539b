"""Saving and reloading upcycled transformers models (libmoe.upcycle.hf_saving)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from libmoe.models.hf_upcycled import LibMoEUpcycledForCausalLM  # noqa: E402
from libmoe.upcycle.hf import moe_aux_loss  # noqa: E402
from libmoe.upcycle.hf_saving import wrap_upcycled  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             tie_word_embeddings=True)
TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(2))


def source():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL)).eval()


def test_wrapped_model_saves_and_reloads_with_tied_embeddings(tmp_path):
    src = source()
    with torch.no_grad():
        before = src(TOKENS).logits
    wrapped = wrap_upcycled(src, "xmoe", 4, 2, seed=5).eval()
    wrapped.save_pretrained(str(tmp_path / "up"))
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config["model_type"] == "libmoe_upcycled" and config["upcycle_seed"] == 5
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "up"))
    assert isinstance(back, LibMoEUpcycledForCausalLM)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        assert (back(TOKENS).logits - before).abs().max() <= 1e-5
        assert torch.equal(back(TOKENS).logits, wrapped(TOKENS).logits)
    out = back(TOKENS, labels=TOKENS)
    plain = back.model(input_ids=TOKENS, labels=TOKENS).loss
    torch.testing.assert_close(out.loss, plain + moe_aux_loss(back.model))


def test_weights_that_do_not_match_the_saved_spec_are_refused(tmp_path):
    wrap_upcycled(source(), "smoe", 4, 2).save_pretrained(str(tmp_path / "up"))
    config_path = tmp_path / "up" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = 6
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        LibMoEUpcycledForCausalLM.from_pretrained(tmp_path / "up")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LibMoEUpcycledForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_config_reads_gpt2_names_for_the_shape():
    from libmoe.models.hf_upcycled import LibMoEUpcycledConfig

    base = transformers.GPT2Config(n_positions=77, n_embd=16, n_layer=3, n_head=2).to_dict()
    config = LibMoEUpcycledConfig(base=base, upcycle={"algorithm": "smoe"})
    assert (config.max_position_embeddings, config.hidden_size, config.num_hidden_layers) == (77, 16, 3)


def test_sharded_directories_load(tmp_path):
    wrapped = wrap_upcycled(source(), "smoe", 4, 2).eval()
    wrapped.save_pretrained(str(tmp_path / "up"), max_shard_size="20KB")
    assert (tmp_path / "up" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "up" / "model.safetensors").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "up"))
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, wrapped(TOKENS).logits)
