"""libmoe models as transformers models (libmoe.models.hf): Auto registration after `import libmoe`,
logits, the labels loss, save_pretrained round trips, and `libmoe export`."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from libmoe.models import ModelConfig, MoETransformer, load_model  # noqa: E402
from libmoe.models.loading import save_model_dir  # noqa: E402


def model(algorithm="smoe"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, head_dim=8, max_seq_len=16,
                      algorithm=algorithm, n_experts=4, expert_dim=8, top_k=2)
    return MoETransformer(cfg).eval()


def model_dir(tmp_path, m):
    (tmp_path / "tok").mkdir(exist_ok=True)
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"placeholder")
    return save_model_dir(tmp_path / "dir", m, {"preset": "micro"}, tmp_path / "tok")


TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))


def test_a_fresh_interpreter_loads_the_directory_with_automodel_after_import_libmoe(tmp_path):
    m = model("tc_moe")  # non-persistent router buffers (slot offsets) must come back right
    directory = model_dir(tmp_path, m)
    with torch.no_grad():
        expected = m(TOKENS).logits
    torch.save({"tokens": TOKENS, "logits": expected}, tmp_path / "ref.pt")
    script = f"""
import torch, libmoe
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(directory)!r})
ref = torch.load({str(tmp_path / "ref.pt")!r})
with torch.no_grad():
    diff = (m(ref["tokens"]).logits - ref["logits"]).abs().max().item()
print(type(m).__name__, diff)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    name, diff = done.stdout.split()[-2:]
    assert name == "LibMoEForCausalLM" and float(diff) == 0.0
    assert json.loads((directory / "config.json").read_text())["model_type"] == "libmoe"
    import yaml

    saved = yaml.safe_load((directory / "config.yaml").read_text())  # what libmoe reads
    assert ModelConfig(**saved["model"]) == m.config


def test_labels_give_the_shifted_cross_entropy_plus_the_aux_loss(tmp_path):
    from libmoe.models.hf import to_hf

    m = model()
    hf = to_hf(m).eval()
    out = hf(TOKENS, labels=TOKENS)
    ref = m(TOKENS)
    ce = F.cross_entropy(ref.logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ce + ref.aux_loss)
    assert len(out.routing) == 2 and out.aux_loss.item() > 0


def test_save_pretrained_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    from libmoe.models.hf import to_hf

    m = model("moe_plus_plus")  # eta: a non-persistent buffer of its routers
    to_hf(m).save_pretrained(str(tmp_path / "hf"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, m(TOKENS).logits)


def test_export_cli_writes_an_automodel_directory(micro_config, tmp_path):
    from libmoe.train import train

    train(micro_config(steps=2), tmp_path / "run", progress=False)
    done = subprocess.run([sys.executable, "-m", "libmoe", "export", str(tmp_path / "run"), "--out",
                           str(tmp_path / "hf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    run = load_model(tmp_path / "run")
    tokens = torch.randint(0, run.model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, run.model(tokens).logits)
    again = load_model(tmp_path / "hf")  # and libmoe reads it as its own model directory
    assert again.model.config == run.model.config
    # a model saved by transformers itself (e.g. after HF fine-tuning) loads as the MoETransformer
    hf.save_pretrained(str(tmp_path / "saved"))
    (tmp_path / "saved" / "tokenizer.model").write_bytes((tmp_path / "run" / "tokenizer" / "tokenizer.model")
                                                         .read_bytes())
    saved = load_model(tmp_path / "saved")
    assert isinstance(saved.model, MoETransformer) and saved.step is None
    with torch.no_grad():
        assert torch.equal(saved.model(tokens).logits, run.model(tokens).logits)


def test_importing_the_classes_first_registers_both_without_a_word():
    """libmoe.models.hf imports transformers' Auto classes, which fires libmoe's registration hook
    mid-import: the upcycled module must not need the half-imported hf module."""
    script = ("import libmoe\nimport libmoe.models.hf\nfrom transformers import AutoConfig\n"
              "print(AutoConfig.for_model('libmoe_upcycled').model_type)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "libmoe_upcycled" and "could not register" not in done.stderr


def test_the_old_cache_name_is_taken_and_warns_where_transformers_renamed_it():
    from libmoe.models.hf_compat import CACHE_FIELD, old_cache_name

    cache = object()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert old_cache_name(cache) is cache and old_cache_name(None) is None
    renamed = CACHE_FIELD == "cache"  # transformers 5.2x: `cache`; earlier 5.x: `past_key_values`
    assert [str(w.message).startswith("`past_key_values` is deprecated") for w in caught] == (
        [True] if renamed else [])
