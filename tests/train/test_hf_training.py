"""Training upcycled transformers models with libmoe's trainer (libmoe.models.transformers_lm)."""

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from conftest import SHAKESPEARE  # noqa: E402
from libmoe.cli import main  # noqa: E402
from libmoe.models import load_model  # noqa: E402
from libmoe.models.hf_upcycled import LibMoEUpcycledForCausalLM  # noqa: E402
from libmoe.models.transformers_lm import TransformersLM, describe, transformers_source  # noqa: E402
from libmoe.train import resolve_config, train  # noqa: E402
from libmoe.upcycle.hf_saving import upcycle_transformers  # noqa: E402

EVAL_DATA = SHAKESPEARE.parent / "eval"
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture
def upcycled(tmp_path, hf_tokenizer_dir):
    """A tiny Qwen2 with its tokenizer, upcycled into smoe 4 x top-2 at tmp_path/up."""
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    tok_dir = hf_tokenizer_dir(tmp_path, [SHAKESPEARE.read_text()[:20000]])
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    dense = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=512, **SMALL))  # padded vocab
    dense.save_pretrained(str(tmp_path / "dense"))
    tok.save_pretrained(str(tmp_path / "dense"))
    upcycle_transformers(str(tmp_path / "dense"), tmp_path / "up", "smoe", 4, 2)
    return tmp_path / "up"


def config(tmp_path, *extra):
    return resolve_config(overrides=[
        f"data.source={SHAKESPEARE}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=6",
        "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3", "train.seq_len=32",
        "train.batch_size=4", "train.eval_tokens=1024", "train.tensorboard=false",
        "data.probe_tokens=256", *extra], preset="micro")


def test_describe_records_shape_and_upcycling_spec(upcycled):
    model = describe(transformers.AutoConfig.from_pretrained(str(upcycled)))
    assert (model.d_model, model.n_layers, model.n_heads, model.head_dim) == (32, 2, 4, 8)
    assert (model.algorithm, model.n_experts, model.top_k, model.ffn_dim) == ("smoe", 4, 2, 48)


def test_source_detection(upcycled, tmp_path, micro_config):
    assert transformers_source(upcycled) == str(upcycled)
    assert transformers_source("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # a Hub name
    assert transformers_source(tmp_path / "missing") is None
    train(micro_config(steps=2), tmp_path / "native", progress=False)
    assert transformers_source(tmp_path / "native") is None  # libmoe's own model


def test_upcycled_transformers_model_trains_resumes_and_reloads(upcycled, tmp_path):
    cfg = config(tmp_path)
    out = tmp_path / "run"
    first = train(cfg, out, init=upcycled, stop_after=3, progress=False)
    assert first["stopped_early"] and first["algorithm"] == "smoe"
    ckpt = out / "checkpoints" / "step_3"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "libmoe_upcycled"
    trace = json.loads((ckpt / "routing_trace.json").read_text())
    assert trace["layers"] == [0, 1] and trace["algorithm"] == "smoe"
    # The checkpoint is a transformers directory; its weights moved away from the init's.
    back = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt))
    init = transformers.AutoModelForCausalLM.from_pretrained(str(upcycled))
    assert isinstance(back, LibMoEUpcycledForCausalLM)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    router = next(k for k in back.state_dict() if "router" in k)
    assert not torch.equal(back.state_dict()[router], init.state_dict()[router])

    # Resume continues exactly as an uninterrupted run (same losses), from the saved config.
    resumed = train(cfg, out, resume=True, progress=False)
    whole = train(cfg, tmp_path / "whole", init=upcycled, progress=False)
    assert resumed["step"] == whole["step"] == 6
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_balance" in r for r in rows)  # the MoE layers' aux terms are logged

    loaded = load_model(out)
    assert loaded.step == 6 and loaded.config["init"] == str(upcycled)
    tokens = torch.tensor([loaded.tokenizer.encode("To be, or not to be")])
    lm = TransformersLM(loaded.model)
    lm.eval()
    with torch.no_grad():
        assert torch.isfinite(lm(tokens, tokens).loss)


def test_cli_upcycle_train_eval_analyze(upcycled, tmp_path, capsys):
    out = tmp_path / "cli-run"
    base = [f"data.source={SHAKESPEARE}", f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=32",
            "train.batch_size=4", "train.eval_tokens=1024", "train.tensorboard=false",
            "data.probe_tokens=256", "train.eval_every=2", "train.checkpoint_every=2"]
    main(["train", "--init", str(upcycled), "--max-steps", "4", "--out", str(out), *base])
    assert "val_ppl" in capsys.readouterr().out
    main(["eval", str(out), "--tasks", "val_ppl,piqa", "--limit", "8", "--data-dir", str(EVAL_DATA),
          "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 1 < result["results"]["val_ppl"]["ppl"] < 1000
    assert 0 <= result["results"]["piqa"]["acc"] <= 1
    main(["analyze", str(out), "--no-interventions", "--out", str(tmp_path / "analysis")])
    metrics = json.loads((tmp_path / "analysis" / "metrics.json").read_text())
    assert metrics


def test_a_libmoe_config_yaml_is_not_needed_but_a_tokenizer_is(tmp_path):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=100, **SMALL))
    dense.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises((OSError, ValueError)):
        train(config(tmp_path), tmp_path / "run", init=tmp_path / "bare", progress=False)


def test_a_dense_transformers_run_upcycles_and_trains_on(upcycled, tmp_path):
    from libmoe.upcycle import upcycle_checkpoint

    dense_run = tmp_path / "dense-run"
    summary = train(config(tmp_path, "train.max_steps=2"), dense_run, init=upcycled.parent / "dense",
                    progress=False)
    assert summary["algorithm"] == "dense" and summary["params_total"] == summary["params_active"]
    assert not (dense_run / "checkpoints" / "step_2" / "routing_trace.json").exists()
    info = upcycle_checkpoint(dense_run, tmp_path / "up2", "sharede_v2", 4, 2)
    assert info["max_abs_logit_diff"] <= 1e-5 and info["exact_at_init"]
    assert (tmp_path / "up2" / "tokenizer.json").is_file()  # found beside the run
    more = train(config(tmp_path, "train.max_steps=2"), tmp_path / "up2-run", init=tmp_path / "up2",
                 progress=False)
    assert more["algorithm"] == "sharede_v2" and more["params_active"] < more["params_total"]
    # From the command line, the upcycled directory trains on its source run's data by default.
    main(["train", "--init", str(tmp_path / "up2"), "--max-steps", "1", "--out", str(tmp_path / "cli2"),
          "train.eval_every=1", "train.checkpoint_every=1"])
    saved = yaml.safe_load((tmp_path / "cli2" / "config.yaml").read_text())
    assert saved["data"]["source"] == str(SHAKESPEARE) and saved["train"]["seq_len"] == 32
