"""The training loop end to end on the micro preset: metrics, checkpoints, traces, exact resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from libmoe.models import MoETransformer
from libmoe.moe import ALGORITHMS
from libmoe.moe.trace import list_traces
from libmoe.train import latest_checkpoint, list_checkpoints, load_checkpoint, train
from libmoe.train.optim import build_optimizer, lr_lambda
from libmoe.train.trainer import flops_per_token


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows(run)]


def test_run_writes_metrics_checkpoints_and_summary(micro_config, tmp_path):
    cfg = micro_config("train.keep_checkpoints=2", steps=12)
    summary = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert summary["step"] == 12 and not summary["stopped_early"]
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]))
    assert summary["peak_mem_mb"] > 10 and summary["params_active"] < summary["params_total"]
    train_rows = [r for r in rows(run) if "loss" in r]
    val_rows = [r for r in rows(run) if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert [r["step"] for r in val_rows] == [4, 8, 12]
    first = train_rows[0]
    for key in ("loss", "aux_loss", "aux_balance", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                "flops_per_token", "load"):
        assert key in first, key
    assert math.log(cfg.model.vocab_size) - 1 < first["loss"] < math.log(cfg.model.vocab_size) + 1
    assert train_rows[-1]["loss"] < first["loss"] - 0.3  # it learns
    # Balance loss of 2 layers, alpha 0.01: near 0.02 when balanced; aux_loss is the weighted sum.
    assert first["aux_loss"] == pytest.approx(0.01 * first["aux_balance"], rel=1e-5)
    assert len(first["load"]) == cfg.model.n_layers
    for layer in first["load"]:
        assert 0 <= layer["min_frac"] <= 1 / 8 <= layer["max_frac"] <= 1
        assert 0 < layer["entropy"] <= 1 and layer["dead"] >= 0
    # keep-last-2, each complete, no temporary directories left behind
    assert [p.name for p in list_checkpoints(run)] == ["step_8", "step_12"]
    assert not list((run / "checkpoints").glob(".tmp*"))
    # the pruned checkpoint's routing trace is kept for the analysis of routing over training
    assert sorted(p.name for p in (run / "traces").iterdir()) == ["step_4"]
    assert [step for step, _ in list_traces(run)] == [4, 8, 12]
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.model").is_file()
    assert json.loads((run / "train_summary.json").read_text())["step"] == 12


def test_lr_schedule_warmup_then_cosine_to_floor(micro_config):
    cfg = micro_config("optim.warmup_steps=4", "optim.min_lr_ratio=0.1", steps=24)
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_weight_decay_groups(micro_config):
    cfg = micro_config()
    model = MoETransformer(cfg.model)
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert "embed.weight" in no_decay and "blocks.0.norm1.weight" in no_decay
    assert "head.weight" in decay and "blocks.0.ffn.experts.w1" in decay
    assert decay | no_decay == set(names.values())


def test_flops_per_token_formula(micro_config):
    cfg = micro_config()
    m = cfg.model
    active = 100_000
    expected = 6 * (active - m.vocab_size * m.d_model) + 12 * m.n_layers * m.n_heads * m.head_dim * 64
    assert flops_per_token(cfg, active) == expected


@pytest.mark.parametrize("algorithm,options", [
    ("perturbed_cosine", []),  # random noise in the router: RNG state must be restored
    ("smoe", ["model.moe_options={bias_balancing: 0.01}"]),  # bias buffers + optimizer hook
])
def test_resume_reproduces_uninterrupted_losses_exactly(micro_config, tmp_path, algorithm, options):
    cfg = micro_config(*options, algorithm=algorithm, steps=8)
    train(cfg, tmp_path / "full", progress=False)
    stopped = train(cfg, tmp_path / "split", stop_after=3, progress=False)
    assert stopped["stopped_early"] and stopped["step"] == 3
    assert latest_checkpoint(tmp_path / "split").name == "step_3"
    train(cfg, tmp_path / "split", resume=True, progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bitwise, not approximately
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_8" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "step_8" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_the_full_batch(micro_config, tmp_path):
    full = train(micro_config(steps=3), tmp_path / "a", progress=False)
    accum = train(micro_config("train.micro_batch_size=2", steps=3), tmp_path / "b", progress=False)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    for (sa, xa, va), (sb, xb, vb) in zip(la, lb):
        assert sa == sb
        for a, b in ((xa, xb), (va, vb)):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-4)
    assert full["val_loss"] == pytest.approx(accum["val_loss"], rel=1e-4)


def test_routing_trace_matches_the_checkpointed_model(micro_config, tmp_path):
    cfg = micro_config("data.probe_tokens=256", steps=4)
    train(cfg, tmp_path / "run", progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    meta = json.loads((ckpt / "routing_trace.json").read_text())
    trace = load_file(str(ckpt / "routing_trace.safetensors"))
    assert meta["step"] == 4 and meta["n_experts"] == 8 and meta["top_k"] == 2
    assert meta["domains"] == ["tinyshakespeare"] and meta["layers"] == [0, 1]
    n = meta["n_tokens"]
    assert n == 256 and trace["tokens"].shape == (n,) and trace["domain"].shape == (n,)
    assert trace["position"].max() < cfg.seq_len
    model = MoETransformer(cfg.model)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    model.eval()
    length = int(trace["position"].max()) + 1
    with torch.no_grad():
        out = model(trace["tokens"].view(-1, length))
    for l, routing in enumerate(out.routing):
        assert torch.equal(trace[f"layer{l}.topk_idx"], routing.topk_idx)
        torch.testing.assert_close(trace[f"layer{l}.probs"], routing.probs)
        w = trace[f"layer{l}.topk_weight"]
        assert torch.all(w[:, :-1] >= w[:, 1:])  # sorted by weight, descending
        torch.testing.assert_close(w.sum(-1), torch.ones(n))


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_algorithm_trains_and_every_parameter_gets_a_gradient(micro_config, algorithm):
    from libmoe.data.packed import SequenceSampler, prepare_data

    cfg = micro_config(algorithm=algorithm)
    data = prepare_data(cfg.data.source, vocab_size=cfg.model.vocab_size, seq_len=cfg.seq_len,
                        min_val_tokens=cfg.data.min_val_tokens, cache_dir=cfg.data.cache_dir,
                        log=lambda _: None)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    batch = SequenceSampler(data.train, cfg.seq_len).next_batch(4)
    out = model(batch[:, :-1], batch[:, 1:])
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs every parameter in the graph
    assert torch.isfinite(out.loss)


def test_out_dir_with_a_run_is_refused_then_overwritten(micro_config, tmp_path):
    cfg = micro_config(steps=2)
    train(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    train(micro_config(steps=1), tmp_path / "run", overwrite=True, progress=False)
    assert [r["step"] for r in rows(tmp_path / "run") if "loss" in r] == [1]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_1"]


def test_resume_refuses_a_different_model_or_tokenizer(micro_config, tmp_path):
    train(micro_config(steps=2), tmp_path / "run", progress=False)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ValueError, match=r"different model config \(n_layers: 2 -> 3\)"):
        train(micro_config("model.n_layers=3", steps=2), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match=r"change settings.*data.max_doc_chars: 50000 -> 20000"):
        train(micro_config("data.max_doc_chars=20000", steps=2), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="tokenizer differs"):  # even when changes are allowed
        train(micro_config("data.max_doc_chars=20000", steps=2), tmp_path / "run", resume=True,
              allow_config_change=True)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_resume_auto_starts_a_run_without_checkpoint(micro_config, tmp_path):
    with pytest.raises(ValueError, match="no run in .* to resume"):
        train(micro_config(steps=2), tmp_path / "new", resume=True, progress=False)
    assert not (tmp_path / "new").exists()
    summary = train(micro_config(steps=2), tmp_path / "new", resume="auto", progress=False)
    assert summary["step"] == 2


def test_hugging_face_tokenizer_sets_the_vocabulary(micro_config, tmp_path, hf_tokenizer_dir):
    cfg = micro_config()
    path = hf_tokenizer_dir(tmp_path, [Path(cfg.data.source).read_text()[:200_000]])
    cfg = micro_config(f"data.tokenizer={path}", "model.vocab_size=8000", steps=2)
    train(cfg, tmp_path / "run", progress=False)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "vocab_size: 400" in saved
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_tensorboard_and_progress_bar(micro_config, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = micro_config("train.tensorboard=true", steps=3)
    train(cfg, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "step" in err  # tqdm's bar on stderr
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "lr", "grad_norm", "val/loss", "aux/balance", "load/layer0/entropy"} <= set(tags)
    logged = [e.value for e in events.Scalars("loss")]
    expected = [r["loss"] for r in rows(tmp_path / "run") if "loss" in r]
    assert logged == pytest.approx(expected)


def test_bf16_autocast_on_cpu_trains(micro_config, tmp_path):
    summary = train(micro_config("train.precision=bf16", steps=2), tmp_path / "run", progress=False)
    assert math.isfinite(summary["val_loss"])
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_2" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in saved.items() if v.is_floating_point())
