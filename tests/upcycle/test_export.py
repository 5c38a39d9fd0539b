"""Exporting upcycled transformers models to transformers' own MoE architectures (libmoe.upcycle.export)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from libmoe.upcycle import export as ex  # noqa: E402
from libmoe.upcycle.export import export_model  # noqa: E402
from libmoe.upcycle.hf import UpcycledMLP  # noqa: E402
from libmoe.upcycle.hf_saving import wrap_upcycled  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama_gelu_tied": lambda: transformers.LlamaConfig(**SMALL, hidden_act="gelu",
                                                        tie_word_embeddings=True),
    "llama_attention_bias": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True),
    "mistral_window": lambda: transformers.MistralConfig(**SMALL, sliding_window=4, head_dim=12),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen2_window": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                                                     max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
    "qwen3_one_head": lambda: transformers.Qwen3Config(**dict(SMALL, num_attention_heads=1,
                                                              num_key_value_heads=1), head_dim=32),
    "llama_mlp_bias": lambda: transformers.LlamaConfig(**SMALL, mlp_bias=True),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=48, vocab_size=100,
                                            n_positions=64),
}
TOKENS = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(7))


def upcycled(arch, algorithm="smoe", layers=None, **options):
    """A tiny random `arch` model upcycled to 4 experts, top-2, with routers and experts perturbed
    so that the experts differ and routing matters (fresh copies would hide mapping mistakes)."""
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    wrapped = wrap_upcycled(source, algorithm, 4, 2, layers=layers, **options).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mlp in (m for m in wrapped.modules() if isinstance(m, UpcycledMLP)):
            for name, p in mlp.moe.named_parameters():
                scale = 1.0 if name.startswith("router") else 0.3 * p.std() if p.std() > 0 else 0.1
                p.add_(torch.randn(p.shape, generator=g) * scale)
            w2 = mlp.moe.experts.w2
            assert not torch.allclose(w2[0], w2[1])
    return wrapped


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


CASES = [  # (source, algorithm, layers, options, target, transformers class)
    ("llama", "smoe", None, {}, "mixtral", "MixtralForCausalLM"),
    ("llama_gelu_tied", "smoe", None, {}, "mixtral", "MixtralForCausalLM"),
    ("llama", "smoe", None, {"temperature": 0.7, "routed_scaling": 1.5}, "mixtral", "MixtralForCausalLM"),
    ("mistral_window", "smoe", None, {}, "mixtral", "MixtralForCausalLM"),
    ("llama", "smoe", [1], {}, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("llama", "sharede_v2", None, {}, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("mistral_window", "sharede_v2", None, {"shared_scaling": 0.3, "routed_scaling": 0.7}, "qwen2_moe",
     "Qwen2MoeForCausalLM"),
    ("qwen2", "sharede_v2", None, {}, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen2_window", "sharede_v2", [0], {}, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen2", "smoe", None, {}, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3", "smoe", None, {}, "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("qwen3", "smoe", [0], {}, "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("qwen3_one_head", "smoe", None, {}, "olmoe", "OlmoeForCausalLM"),
]


@pytest.mark.parametrize("arch,algorithm,layers,options,to,cls", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[4]}{'-partial' if c[2] else ''}" for c in CASES])
def test_exported_models_reload_in_plain_transformers_with_the_same_logits(
        tmp_path, arch, algorithm, layers, options, to, cls):
    wrapped = upcycled(arch, algorithm, layers, **options)
    wrapped.save_pretrained(str(tmp_path / "up"))
    info = export_model(tmp_path / "up", to, tmp_path / "out")
    assert info["target_architecture"] == cls and info["max_abs_logit_diff"] <= 1e-4
    assert json.loads((tmp_path / "out" / "export.json").read_text())["target"] == to
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == to and config["architectures"] == [cls]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(back).__module__.startswith(f"transformers.models.{to}.")
    expected = logits(wrapped)
    assert (logits(back) - expected).abs().max() <= 1e-4
    # Routing matters on this model: the exported one with two experts swapped computes otherwise.
    experts = back.model.layers[info["moe_layers"][0]].mlp.experts
    with torch.no_grad():
        experts.down_proj[[0, 1]] = experts.down_proj[[1, 0]].clone()
    assert (logits(back) - expected).abs().max() > 1e-3


def test_export_folds_scales_and_keeps_dense_layers(tmp_path):
    wrapped = upcycled("qwen2", "sharede_v2", [1], shared_scaling=0.3)
    export_model(wrapped, "qwen2_moe", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["norm_topk_prob"] is True
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 1  # E-1 routed, k-1
    assert config["shared_expert_intermediate_size"] == 48 and config["qkv_bias"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    block = back.model.layers[1].mlp
    assert torch.equal(block.shared_expert_gate.weight, torch.zeros(1, 32))  # sigmoid(0) = 0.5
    shared = wrapped.model.model.layers[1].mlp.moe.shared_experts
    torch.testing.assert_close(block.shared_expert.down_proj.weight, 0.6 * shared.w2[0].t())


def test_a_bf16_model_is_verified_in_fp32_and_saved_in_bf16(tmp_path):
    wrapped = upcycled("qwen3").to(torch.bfloat16)
    info = export_model(wrapped, "qwen3_moe", tmp_path / "out")
    assert info["max_abs_logit_diff"] <= 1e-4
    assert next(wrapped.parameters()).dtype == torch.bfloat16  # the source is left as it was
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert back.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16


REFUSALS = [  # (source, algorithm, layers, options, target, what the message names)
    ("llama", "xmoe", None, {}, "mixtral", "xmoe.*cosines"),
    ("llama", "sigma_moe", None, {}, "qwen2_moe", "sigmoid"),
    ("llama", "smoe", None, {}, "olmoe", "QK-norm.*exactly to: mixtral, qwen2_moe"),
    ("llama", "smoe", None, {}, "qwen3_moe", "QK-norm"),
    ("llama", "sharede_v2", None, {}, "mixtral", "shared experts.*exactly to: qwen2_moe"),
    ("llama", "smoe", [0], {}, "mixtral", r"layers \[1\] keep their dense MLP.*to: qwen2_moe"),
    ("llama", "smoe", None, {"capacity_factor": 1.0}, "mixtral", "capacity_factor"),
    ("llama", "smoe", None, {"n_group": 2, "topk_group": 1}, "mixtral", "group-limited"),
    ("llama_attention_bias", "smoe", None, {}, "mixtral", "attention_bias.*No transformers target"),
    ("qwen2", "smoe", None, {}, "mixtral", "biases.*exactly to: qwen2_moe"),
    ("qwen3", "smoe", None, {}, "olmoe", "each head on its own.*exactly to: qwen3_moe"),
    ("qwen3", "sharede_v2", None, {}, "qwen3_moe", "shared experts.*No transformers target"),
    ("llama_mlp_bias", "smoe", None, {}, "mixtral", "expert biases.*No transformers target"),
    ("phi3", "smoe", None, {}, "mixtral", "Phi3ForCausalLM"),
    ("gpt2", "smoe", None, {}, "qwen2_moe", "GPT2LMHeadModel.*Llama, Mistral, Qwen2, Qwen3"),
]


@pytest.mark.parametrize("arch,algorithm,layers,options,to,match", REFUSALS,
                         ids=[f"{r[0]}-{r[1]}-{r[4]}" for r in REFUSALS])
def test_what_does_not_map_exactly_is_refused_with_the_reason(tmp_path, arch, algorithm, layers,
                                                              options, to, match):
    with pytest.raises(ValueError, match=match):
        export_model(upcycled(arch, algorithm, layers, **options), to, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_router_biases_refused_only_when_they_are_not_zero(tmp_path):
    wrapped = upcycled("llama", "smoe", bias=True, bias_balancing=0.001)
    routers = [m.moe.router for m in wrapped.modules() if isinstance(m, UpcycledMLP)]
    with torch.no_grad():
        for r in routers:
            r.bias.zero_()
    assert ex.differences(wrapped.model, "mixtral") == []  # zero biases change nothing
    routers[0].expert_bias[0] = 0.1
    assert "selection bias" in ex.differences(wrapped.model, "mixtral")[0]
    routers[0].expert_bias.zero_()
    with torch.no_grad():
        routers[1].bias[2] = 0.5
    with pytest.raises(ValueError, match="router bias"):
        export_model(wrapped, "mixtral", tmp_path / "out")


def test_native_libmoe_models_and_unknown_targets_are_refused(tmp_path):
    from libmoe.models import ModelConfig, MoETransformer

    native = MoETransformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, head_dim=8,
                                        n_experts=4, expert_dim=8, top_k=2, max_seq_len=32))
    with pytest.raises(ValueError, match="LayerNorm.*4 of each head's 8.*relu experts.*--to libmoe"):
        export_model(native, "mixtral", tmp_path / "out")
    with pytest.raises(ValueError, match="mixtral, qwen2_moe, qwen3_moe, olmoe"):
        export_model(upcycled("llama"), "deepseek_v3", tmp_path / "out")
    dense = transformers.AutoModelForCausalLM.from_config(ARCHS["llama"]())
    with pytest.raises(ValueError, match="no upcycled MoE layers"):
        export_model(dense, "mixtral", tmp_path / "out")


def test_a_mapping_that_changes_the_logits_is_not_written(tmp_path, monkeypatch):
    original = ex._moe_weights

    def off_by_one_percent(moe, prefix, to):
        state = original(moe, prefix, to)
        state[f"{prefix}experts.down_proj"] = state[f"{prefix}experts.down_proj"] * 1.01
        return state

    monkeypatch.setattr(ex, "_moe_weights", off_by_one_percent)
    with pytest.raises(ValueError, match="differ from the source's by .*nothing was written"):
        export_model(upcycled("llama"), "mixtral", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_run_checkpoint_that_plain_transformers_loads(tmp_path, hf_tokenizer_dir, capsys):
    import subprocess
    import sys

    from libmoe.cli import main

    tok = hf_tokenizer_dir(tmp_path, ["the cat sat on the mat", "a dog ran in the park"] * 50)
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        **dict(SMALL, vocab_size=400)))
    wrapped = wrap_upcycled(source, "smoe", 4, 2).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"  # a run whose checkpoints are transformers dirs
    wrapped.save_pretrained(str(ckpt))
    (ckpt / "checkpoint.json").write_text('{"step": 3}')
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    transformers.AutoTokenizer.from_pretrained(str(tok)).save_pretrained(str(tmp_path / "run" / "tokenizer"))

    assert main(["export", str(tmp_path / "run"), "--to", "mixtral", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "MixtralForCausalLM" in printed and "largest logit difference" in printed
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["source"] == str(ckpt) and info["tokenizer"] and info["max_abs_logit_diff"] <= 1e-4
    assert main(["export", str(tmp_path / "run"), "--to", "olmoe", "--out", str(tmp_path / "o2")]) == 2
    assert "QK-norm" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--to", "mixtral", "--out", str(tmp_path / "out")]) == 2

    tokens = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(3))
    script = ("import sys, torch, transformers\n"
              f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
              f"t = transformers.AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})\n"
              "assert 'libmoe' not in sys.modules, 'libmoe was imported'\n"
              f"torch.save(m(torch.tensor({tokens.tolist()})).logits, {str(tmp_path / 'l.pt')!r})\n"
              "print(type(m).__name__, len(t))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    n_pieces = len(transformers.AutoTokenizer.from_pretrained(str(tok)))
    assert done.stdout.split() == ["MixtralForCausalLM", str(n_pieces)]
    assert (torch.load(tmp_path / "l.pt") - logits(wrapped, tokens)).abs().max() <= 1e-4
