"""Upcycling GPT-2 (biased, non-gated Conv1D MLPs) and other biased MLPs exactly, on tiny random
configs built here (no network): in memory, saved and reloaded, and from the command line."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from libmoe.models.hf_upcycled import LibMoEUpcycledForCausalLM  # noqa: E402
from libmoe.upcycle import EXACT_AT_INIT, SHARED_ALGORITHMS  # noqa: E402
from libmoe.upcycle.hf import UpcycledMLP, find_mlps, upcycle_hf_model  # noqa: E402
from libmoe.upcycle.hf_saving import wrap_upcycled  # noqa: E402

VOCAB = 100
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def gpt2_config(**kw):
    return transformers.GPT2Config(**{**dict(n_layer=2, n_embd=32, n_head=4, n_inner=48,
                                              vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                                              eos_token_id=0), **kw})


def randomised(config):
    """A model of `config` whose MLP weights and biases are far from GPT-2's init (zero biases,
    std 0.02), so that a lost or unweighted bias shows in the logits."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0, 0.3)
        model.get_input_embeddings().weight.normal_(0, 0.5)
    return model


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def moe_layers(model):
    return [m.moe for m in model.modules() if isinstance(m, UpcycledMLP)]


def test_gpt2_mlps_are_found_and_attention_is_not():
    model = randomised(gpt2_config())
    assert [n for n, _ in find_mlps(model)] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    upcycle_hf_model(model, "smoe", 4, 2)
    assert [type(b.attn.c_proj).__name__ for b in model.transformer.h] == ["Conv1D", "Conv1D"]
    assert find_mlps(model) == []


@pytest.mark.parametrize("algorithm", EXACT_AT_INIT)
def test_every_exact_algorithm_upcycles_gpt2_exactly(algorithm):
    model = randomised(gpt2_config())
    mlp = model.transformer.h[0].mlp
    c_fc, c_proj = mlp.c_fc.weight.clone(), mlp.c_proj.bias.clone()
    before = logits(model)
    upcycle_hf_model(model, algorithm, n_experts=4, top_k=2)
    assert (logits(model) - before).abs().max() <= 1e-5
    layer = moe_layers(model)[0]
    shared = algorithm in SHARED_ALGORITHMS
    assert layer.experts.n_experts == (3 if shared else 4)  # E - 1 routed + 1 shared
    assert (layer.shared_experts is not None) == shared
    assert torch.equal(layer.experts.w1[2], c_fc) and torch.equal(layer.experts.b2[1], c_proj)
    assert layer.experts.activation.name == "gelu_tanh"


def test_the_copied_biases_carry_the_exactness():
    model = randomised(gpt2_config())
    before = logits(model)
    upcycle_hf_model(model, "sharede_v2", 4, 2)
    with torch.no_grad():
        for layer in moe_layers(model):
            for experts in (layer.experts, layer.shared_experts):
                experts.b2.zero_()
    assert (logits(model) - before).abs().max() > 1e-2


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu"])
def test_gpt2_activations_upcycle_exactly(act):
    model = randomised(gpt2_config(activation_function=act))
    before = logits(model)
    upcycle_hf_model(model, "smoe", 4, 2)
    assert (logits(model) - before).abs().max() <= 1e-5


def test_unsupported_activation_is_refused_before_anything_changes():
    model = randomised(gpt2_config(activation_function="quick_gelu"))
    with pytest.raises(ValueError, match="activation_function 'quick_gelu'"):
        upcycle_hf_model(model, "smoe", 4, 2)
    assert len(find_mlps(model)) == 2


def test_gpt2_keeps_its_mlp_output_dropout():
    model = randomised(gpt2_config(resid_pdrop=0.3))
    upcycle_hf_model(model, "smoe", 4, 2)
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp.dropout, torch.nn.Dropout) and mlp.dropout.p == 0.3
    mlp.train()
    x = torch.randn(64, 32)
    assert (mlp(x) == 0).float().mean() > 0.1  # dropped in training, as GPT2MLP.dropout does


OTHERS = {
    # fc1/fc2 Linear MLPs with biases (Phi-1/2), gelu_new from hidden_act
    "phi": lambda: transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=64),
    # c_fc/c_proj as nn.Linear (GPTBigCode), gelu_pytorch_tanh from activation_function
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                         n_head=4, n_inner=48, n_positions=64),
    # a gated MLP with biases (gate_proj/up_proj/down_proj with mlp_bias)
    "llama_mlp_bias": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32,
                                                       intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       max_position_embeddings=64, mlp_bias=True),
}


@pytest.mark.parametrize("arch", list(OTHERS))
def test_other_biased_mlps_upcycle_exactly(arch):
    model = randomised(OTHERS[arch]())
    before = logits(model)
    upcycle_hf_model(model, "sharede_v3", 4, 2)
    layers = moe_layers(model)
    assert len(layers) == 2 and layers[0].experts.b1 is not None
    assert (logits(model) - before).abs().max() <= 1e-5


def test_gpt2_saves_and_reloads_with_automodel(tmp_path):
    src = randomised(gpt2_config())
    before = logits(src)
    wrapped = wrap_upcycled(src, "sharede_v2", 4, 2, seed=7).eval()
    wrapped.save_pretrained(str(tmp_path / "up"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "up"))
    assert isinstance(back, LibMoEUpcycledForCausalLM)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight  # GPT-2 ties
    assert torch.equal(logits(back), logits(wrapped))
    assert (logits(back) - before).abs().max() <= 1e-5
    assert moe_layers(back.model)[1].shared_experts.b1 is not None


def test_cli_upcycles_a_local_gpt2(tmp_path, hf_tokenizer_dir):
    tok = hf_tokenizer_dir(tmp_path, ["the cat sat on the mat", "a dog ran in the park"] * 50)
    src = randomised(gpt2_config(vocab_size=400))
    src.save_pretrained(str(tmp_path / "gpt2"))
    transformers.AutoTokenizer.from_pretrained(str(tok)).save_pretrained(str(tmp_path / "gpt2"))
    done = subprocess.run([sys.executable, "-m", "libmoe", "upcycle", str(tmp_path / "gpt2"),
                           "--algorithm", "smoe", "--n-experts", "4", "--top-k", "2",
                           "--out", str(tmp_path / "up")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "up" / "upcycle.json").read_text())
    assert info["source_architecture"] == "GPT2LMHeadModel"
    assert info["exact_at_init"] and info["max_abs_logit_diff"] <= 1e-5
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "up"))
    tokens = torch.randint(0, 400, (1, 10))
    with torch.no_grad():
        assert (back(tokens).logits - src(tokens).logits).abs().max() <= 1e-5
