"""Upcycling transformers decoder models in memory (libmoe.upcycle.hf), on tiny random configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from libmoe.analysis import RoutingRecorder  # noqa: E402
from libmoe.upcycle import EXACT_AT_INIT  # noqa: E402
from libmoe.upcycle.hf import UpcycledMLP, find_mlps, moe_aux_loss, upcycle_hf_model  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0),
    "llama_gelu_tied": lambda: transformers.LlamaConfig(**SMALL, hidden_act="gelu",
                                                        tie_word_embeddings=True),
}


def tiny(arch):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()


TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_upcycled_architectures_reproduce_their_logits(arch):
    model = tiny(arch)
    before = logits(model)
    upcycle_hf_model(model, "smoe", n_experts=4, top_k=2)
    assert len([m for m in model.modules() if isinstance(m, UpcycledMLP)]) == 2
    assert (logits(model) - before).abs().max() <= 1e-5
    assert moe_aux_loss(model).item() > 0  # the balance terms of the last forward


@pytest.mark.parametrize("algorithm", [a for a in EXACT_AT_INIT if a != "smoe"])
def test_every_exact_algorithm_upcycles_a_llama_exactly(algorithm):
    model = tiny("llama")
    before = logits(model)
    upcycle_hf_model(model, algorithm, n_experts=4, top_k=2)
    assert (logits(model) - before).abs().max() <= 1e-5


def test_only_chosen_layers_routers_differ_and_routing_is_recordable():
    model = tiny("qwen2")
    upcycle_hf_model(model, "smoe", 4, 2, layers=[1], seed=3)
    assert [type(m).__name__ for _, m in find_mlps(model)] == ["Qwen2MLP"]  # the one left dense
    again = upcycle_hf_model(tiny("qwen2"), "smoe", 4, 2, seed=3)
    w = [m.moe.router.weight for m in again.modules() if isinstance(m, UpcycledMLP)]
    assert not torch.equal(w[0], w[1])
    same_seed = upcycle_hf_model(tiny("qwen2"), "smoe", 4, 2, seed=3)
    w2 = [m.moe.router.weight for m in same_seed.modules() if isinstance(m, UpcycledMLP)]
    assert all(torch.equal(a, b) for a, b in zip(w, w2))  # runs reproduce
    with RoutingRecorder(again) as rec:
        rec.record(TOKENS)
    trace = rec.trace()
    assert trace.n_layers == 2 and trace.n_tokens == TOKENS.numel()


def test_unknown_mlps_and_activations_are_refused():
    gptj = transformers.AutoModelForCausalLM.from_config(transformers.GPTJConfig(
        n_layer=1, n_embd=32, n_head=4, rotary_dim=4, vocab_size=100, n_positions=64))
    with pytest.raises(ValueError, match="no MLP"):  # fc_in/fc_out is not a structure found here
        upcycle_hf_model(gptj, "smoe", 4, 2)
    model = tiny("llama")
    model.config.hidden_act = "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="hidden_act"):
        upcycle_hf_model(model, "smoe", 4, 2)


def test_cli_upcycles_a_local_llama_which_automodel_eval_and_analyze_load(tmp_path, hf_tokenizer_dir):
    import json
    import subprocess
    import sys
    from pathlib import Path

    eval_dir = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
    if not (eval_dir / "piqa.validation.jsonl").is_file():
        pytest.skip("../shared/data/eval not present")
    tok = hf_tokenizer_dir(tmp_path, ["the cat sat on the mat", "a dog ran in the park"] * 50)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(SMALL, vocab_size=400))
    src = transformers.AutoModelForCausalLM.from_config(config)
    src.save_pretrained(str(tmp_path / "llama"))
    transformers.AutoTokenizer.from_pretrained(str(tok)).save_pretrained(str(tmp_path / "llama"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "libmoe", *args], capture_output=True, text=True)

    done = cli("upcycle", str(tmp_path / "llama"), "--algorithm", "sharede_v2", "--n-experts", "4",
               "--top-k", "2", "--out", str(tmp_path / "up"))
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "up" / "upcycle.json").read_text())
    assert info["exact_at_init"] and info["max_abs_logit_diff"] <= 1e-5
    assert info["source_architecture"] == "LlamaForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "up"))
    assert type(back).__name__ == "LibMoEUpcycledForCausalLM"
    tokens = torch.randint(0, 400, (1, 10))
    with torch.no_grad():
        assert (back(tokens).logits - src.eval()(tokens).logits).abs().max() <= 1e-5
    evaluated = cli("eval", str(tmp_path / "up"), "--tasks", "piqa", "--data-dir", str(eval_dir),
                    "--limit", "3", "--out", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["piqa"]["n"] == 3
    analysed = cli("analyze", str(tmp_path / "up"), "--tasks", "piqa", "--data-dir", str(eval_dir),
                   "--limit", "3", "--out", str(tmp_path / "an"))
    assert analysed.returncode == 0, analysed.stderr
    metrics = json.loads((tmp_path / "an" / "metrics.json").read_text())
    assert set(metrics["eae"]) == {"0", "1"} and "piqa/acc" in metrics["droptop"]["baseline"]
