"""Loading trained models back from run and checkpoint directories."""

import pytest
import torch

from libmoe.models import load_model, resolve_checkpoint
from libmoe.train import train


def test_loads_the_newest_checkpoint_with_its_tokenizer(micro_config, tmp_path):
    cfg = micro_config("train.checkpoint_every=2", steps=4)
    train(cfg, tmp_path / "run", progress=False)
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 4 and loaded.checkpoint.name == "step_4"
    assert loaded.config["model"]["algorithm"] == "smoe" and not loaded.model.training
    older = load_model(tmp_path / "run" / "checkpoints" / "step_2")
    assert older.step == 2
    text = "First Citizen: Before we proceed any further, hear me speak."
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        a, b = loaded.model(ids, ids).loss, older.model(ids, ids).loss
    assert torch.isfinite(a) and not torch.equal(a, b)  # different weights, same architecture


def test_not_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is not a libmoe model"):
        resolve_checkpoint(tmp_path / "plain")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("preset: micro\n")
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        resolve_checkpoint(tmp_path / "fresh")


def test_a_transformers_directory_loads_with_its_tokenizer(tmp_path, hf_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    texts = ["First Citizen: Before we proceed any further, hear me speak."] * 20
    tok_dir = hf_tokenizer_dir(tmp_path, texts)
    config = transformers.GPT2Config(vocab_size=400, n_positions=48, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    gpt2.save_pretrained(tmp_path / "exported")
    transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path / "exported")
    loaded = load_model(tmp_path / "exported")
    assert loaded.step is None and loaded.config == {} and not loaded.model.training
    ids = torch.tensor([loaded.tokenizer.encode(texts[0])])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, gpt2(ids).logits)
    from libmoe.eval import LMScorer

    assert LMScorer(loaded.model, loaded.tokenizer).max_length == 48  # n_positions
