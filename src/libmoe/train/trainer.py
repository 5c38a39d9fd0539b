"""The pretraining loop: one function, `train(cfg, out)`, readable top to bottom.

Per optimizer step: draw the global batch (same windows on every process), take this process's
slice, run it in micro-batches (gradient accumulation, DDP gradient sync only on the last), add
every MoE layer's auxiliary loss to the cross-entropy, clip, step AdamW and the schedule. Metrics,
validation, checkpoints (with routing traces of a fixed probe set) at configured intervals.
Resuming restores model, optimizer, schedule, data position and RNG, so a resumed CPU run
reproduces the uninterrupted one's losses exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from ..data.packed import PackedData, SequenceSampler, prepare_data, probe_set, validation_windows
from ..models import MoETransformer, count_parameters
from ..moe import attach_bias_balancing, set_training_progress
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig, config_from_dict
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown, wrap_model
from .hf_model import TransformersLM, load_transformers, transformers_run_config, transformers_source
from .metrics import MetricsLogger, load_summary
from .trace import record_routing, save_trace

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "tokenizer",
             "train_summary.json")


def model_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def flops_per_token(cfg: RunConfig, active_params: int) -> int:
    """Training FLOPs per token: 6 x active non-embedding parameters plus attention's
    12 x layers x heads x head_dim x sequence length (the PaLM appendix B estimate)."""
    m = cfg.model
    return int(6 * (active_params - m.vocab_size * m.d_model)
               + 12 * m.n_layers * m.n_heads * m.head_dim * cfg.seq_len)


def lr_lambda(cfg: RunConfig):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps (multiplier of lr)."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay except for names containing a no_decay pattern."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(s in name for s in cfg.optim.no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr,
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare_run_data(cfg: RunConfig, log=print) -> PackedData:
    """The packed, cached data of a run config (built on first use; `libmoe prepare` runs just
    this, e.g. before a multi-process job on a large stream)."""
    d = cfg.data
    return prepare_data(
        d.source, tokenizer=d.tokenizer, vocab_size=cfg.model.vocab_size, seq_len=cfg.seq_len,
        val_fraction=d.val_fraction, min_val_tokens=d.min_val_tokens,
        max_doc_chars=d.max_doc_chars, split_seed=d.split_seed, shard_tokens=d.shard_tokens,
        max_train_tokens=d.max_train_tokens, tokenizer_chars=d.tokenizer_chars,
        hub=d.hub or None, cache_dir=d.cache_dir, log=log,
    )


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a directory that holds another run unless told what to do."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory.")
    if (out / "config.yaml").is_file() and not (resume or overwrite):
        raise ValueError(
            f"{str(out)!r} already holds a run (config.yaml); pass --resume to continue it or "
            "--overwrite to replace it."
        )


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, keyed by parameter name, on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, opt, options=options))


def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int, info: DistInfo,
             autocast, per_window: bool = False) -> float | tuple[float, list[float]]:
    """Mean next-token cross-entropy over `windows` [n, L+1], split over processes (padded so
    every process runs the same number of forwards, as FSDP requires). With `per_window`, also
    each window's mean cross-entropy in window order (the unit of the findings' bootstrap)."""
    was_training = model.training
    model.eval()
    n = len(windows)
    per_rank = math.ceil(n / info.world_size)
    mine = torch.arange(info.rank * per_rank, (info.rank + 1) * per_rank)
    total = torch.zeros(2, dtype=torch.float64)
    each = torch.zeros(per_rank * info.world_size, dtype=torch.float64) if per_window else None
    for start in range(0, per_rank, batch_size):
        idx = mine[start : start + batch_size]
        valid = idx < n
        batch = windows[idx.clamp(max=n - 1)].to(info.device)
        with autocast():
            logits = model(batch[:, :-1]).logits
        ce = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        total[0] += float((ce.sum(1).cpu() * valid).sum())
        total[1] += float(valid.sum()) * ce.shape[1]
        if each is not None:
            each[idx] = ce.double().mean(1).cpu() * valid
    all_reduce_sum(total, info)
    model.train(was_training)
    loss = float(total[0] / total[1])
    if each is None:
        return loss
    all_reduce_sum(each, info)  # each window is filled by exactly one process
    return loss, each[:n].tolist()


class _Window:
    """Sums since the last metrics row, kept on the device (no host sync per step): LM loss, aux
    loss and terms, per-layer selection counts; `row` reduces them over processes."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.steps = 0
        self.loss: torch.Tensor | float = 0.0
        self.aux_loss: torch.Tensor | float = 0.0
        self.aux: dict[str, torch.Tensor] = {}
        self.counts: list[torch.Tensor] = []
        self.elapsed = 0.0  # seconds in training steps (evaluation and checkpoints excluded)

    def add(self, output, weight: float) -> None:
        with torch.no_grad():
            self.loss = self.loss + output.loss.detach().double() * weight
            self.aux_loss = self.aux_loss + output.aux_loss.detach().double() * weight
            for name, value in output.aux.items():
                self.aux[name] = self.aux.get(name, 0.0) + value.detach().double() * weight
            if not self.counts:
                self.counts = [torch.zeros(r.probs.shape[-1], dtype=torch.float64,
                                           device=r.probs.device) for r in output.routing]
            for c, r in zip(self.counts, output.routing):
                ids = r.topk_idx.reshape(-1)
                c += torch.bincount(ids[ids >= 0], minlength=c.numel())

    def row(self, step: int, tokens_per_step: int) -> dict[str, Any]:
        elapsed = self.elapsed
        device = self.info.device
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                             for v in [self.loss, self.aux_loss, *self.aux.values()]])
        stats = all_reduce_sum(stats, self.info).cpu() / (self.info.world_size * self.steps)
        row = {"step": step, "loss": float(stats[0]), "aux_loss": float(stats[1])}
        row.update({f"aux_{name}": float(v) for name, v in zip(self.aux, stats[2:])})
        row["tokens_per_s"] = self.steps * tokens_per_step / elapsed
        row["step_time_s"] = elapsed / self.steps
        row["load"] = [{"layer": l, **load_summary(all_reduce_sum(c, self.info).cpu())}
                       for l, c in enumerate(self.counts)]
        return row


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train `cfg` into run directory `out`; returns the final summary (also train_summary.json).

    resume: continue from the newest checkpoint in `out`; overwrite: replace a run found there;
    stop_after: stop after that step with a checkpoint, as if interrupted (for tests and to split
    long runs); progress: force the progress bar on or off (default: on for a terminal);
    init: start from the weights of this model directory, run or checkpoint (e.g. an upcycled
    model) instead of a random init; its model config and tokenizer must be the run's. A
    transformers causal LM (directory or Hub name, e.g. `libmoe upcycle`'s output for a Hub
    model) is trained as it is, with its own tokenizer; see libmoe.train.hf_model."""
    out = Path(out)
    init = init if init is not None else cfg.init
    if init is None and resume and (out / "config.yaml").is_file():  # the run keeps its init
        init = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("init")
    hf = False  # whether the model trained is a transformers model (libmoe.train.hf_model)
    if init is not None:
        source = transformers_source(init)
        hf = source is not None
        init = source or str(init)
        cfg = transformers_run_config(cfg, init) if hf else replace(cfg, init=init)
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, out, info, resume, overwrite, stop_after, progress, init, hf)
    finally:
        shutdown(info)


def _init_weights(init: str | Path, cfg: RunConfig, tokenizer_hash: str) -> dict[str, torch.Tensor]:
    """The state dict of model directory `init`, checked against the run's model and tokenizer."""
    from ..data.packed import tokenizer_fingerprint
    from ..models.loading import _find_tokenizer, resolve_checkpoint

    path = resolve_checkpoint(init)
    saved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    if saved.get("model") is None:
        raise ValueError(f"--init {str(init)!r} has no libmoe config.yaml beside its weights.")
    if model_hash(replace(cfg, model=type(cfg.model)(**saved["model"]))) != model_hash(cfg):
        diff = "; ".join(_config_diff(saved["model"], cfg.model.to_dict()))
        raise ValueError(f"--init {str(init)!r} holds a different model than this config ({diff}); "
                         "leave the model section to the init directory's config.")
    if tokenizer_fingerprint(_find_tokenizer(path)) != tokenizer_hash:
        raise ValueError(f"--init {str(init)!r} was trained with another tokenizer than this run's data "
                         "(data.source or data.tokenizer differ); use the init directory's data config.")
    return load_file(str(path / "model.safetensors"))


def _train(cfg: RunConfig, out: Path, info: DistInfo, resume: bool, overwrite: bool,
           stop_after: int | None, progress: bool | None, init: str | Path | None,
           hf: bool) -> dict[str, Any]:
    say = print if info.is_main else (lambda *_: None)
    check_run_dir(out, resume, overwrite)
    tc = cfg.train
    world = info.world_size
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the "
                         f"{world} processes.")
    local = tc.batch_size // world
    micro = tc.micro_batch_size or local
    if local % micro:
        raise ValueError(f"train.micro_batch_size={micro} must divide the per-process batch {local}.")
    accum = local // micro
    seq_len = cfg.seq_len
    if seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}.")

    # Data: rank 0 builds the cache, the others then read it.
    data = prepare_run_data(cfg, say) if info.is_main else None
    barrier(info)
    if data is None:
        data = prepare_run_data(cfg, say)
    vocab = data.meta["vocab_size"]
    if cfg.data.tokenizer != "train" and vocab != cfg.model.vocab_size and not hf:
        say(f"model: vocab_size set to the tokenizer's {vocab}")
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size}; raise model.vocab_size.")

    # Checked before anything is written to `out`; a resumed run continues from its own checkpoint.
    ckpt_path = latest_checkpoint(out) if resume else None
    init_state = None
    if init is not None and ckpt_path is None and not hf:
        init_state = _init_weights(init, cfg, data.tokenizer_hash)
    ckpt = None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        saved_cfg = ckpt["info"].get("model_config", {})
        if ckpt["info"].get("model_hash") != model_hash(cfg):
            diff = "; ".join(_config_diff(saved_cfg, cfg.model.to_dict())) or "unknown"
            raise ValueError(f"cannot resume {str(ckpt_path)!r} with a different model config "
                             f"({diff}); use the saved config or a new --out.")
        if ckpt["info"].get("tokenizer_hash") != data.tokenizer_hash:
            raise ValueError(f"cannot resume {str(ckpt_path)!r}: its tokenizer differs from the "
                             "one prepared for this config (data source or tokenizer changed).")
    elif resume:
        say(f"resume: no checkpoint in {out}, starting from step 0")

    if info.is_main:
        if overwrite and not resume:  # only now that data and config are known to be good
            for name in RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        shutil.copytree(data.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    barrier(info)

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if hf:  # a transformers model: from the newest checkpoint (a transformers directory) or init
        raw = TransformersLM(load_transformers(ckpt_path if ckpt is not None else init))
        if ckpt is None:
            say(f"init: transformers model {init}")
    else:
        raw = MoETransformer(cfg.model)
    total_params, active_params = count_parameters(raw)
    if ckpt is not None and not hf:
        raw.load_state_dict(ckpt["model"])
    elif init_state is not None:
        raw.load_state_dict(init_state)
        say(f"init: weights from {init}")
    raw.to(info.device)
    model = wrap_model(raw, info, tc.parallel)
    opt = build_optimizer(model, cfg)
    attach_bias_balancing(raw, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = SequenceSampler(data.train, seq_len, seed=tc.seed)
    step = 0
    earlier_time = 0.0  # seconds of training before a resume, so train_time_s covers the whole run
    if ckpt is not None:
        _load_optimizer(model, opt, ckpt["optimizer"])
        state = ckpt["state"]
        sched.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        step = state["step"]
        earlier_time = state.get("elapsed_s", 0.0)
        say(f"resume: continuing from {ckpt_path} (step {step})")
        del ckpt

    if step >= tc.max_steps and (out / "train_summary.json").is_file():
        say(f"resume: {out} already finished its {tc.max_steps} steps")
        return dict(json.loads((out / "train_summary.json").read_text()), rank=info.rank)

    amp_dtype = resolve_precision(tc.precision, info.device)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(info.device.type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
    val_windows = validation_windows(data.val, seq_len, tc.eval_tokens)
    probe_tokens, probe_domain = probe_set(data.val, data.val_domain, cfg.data.probe_tokens, seq_len)
    fpt = flops_per_token(cfg, active_params)
    say(f"model: {cfg.model.algorithm}, {total_params / 1e6:.2f}M parameters "
        f"({active_params / 1e6:.2f}M active), {fpt / 1e6:.1f} MFLOPs/token; "
        f"{world} process(es) on {info.device}, batch {tc.batch_size} x {seq_len} tokens "
        f"({accum} micro-batch(es) of {micro} per process), "
        f"{'fp32' if amp_dtype is None else amp_dtype}")
    logger = MetricsLogger(out, tc.max_steps, step, enabled=info.is_main,
                           tensorboard=tc.tensorboard, progress=progress)
    info_json = {"model_hash": model_hash(cfg), "tokenizer_hash": data.tokenizer_hash,
                 "model_config": cfg.model.to_dict(), "algorithm": cfg.model.algorithm}
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    extra_files = {"config.yaml": config_text}
    if hf:  # each checkpoint is also a transformers directory
        extra_files["config.json"] = raw.config_json()

    def checkpoint(step: int) -> None:
        model_state, opt_state = _state_dicts(model, opt)
        if hf:
            model_state = raw.export_state(model_state)
        trainer_state = {"step": step, "scheduler": sched.state_dict(),
                         "data": sampler.state_dict(), "rng": _rng_state(),
                         "elapsed_s": earlier_time + time.perf_counter() - start_time}
        # Every process runs the probe forward (FSDP/DDP collectives); rank 0 writes.
        if info.is_main:
            path = save_checkpoint(
                out, step, model_state, opt_state, trainer_state, info_json,
                extra_files=extra_files, keep=tc.keep_checkpoints,
                before_rename=lambda tmp: save_trace(tmp, raw, probe_tokens, probe_domain,
                                                     data.domains, step, run=model),
            )
            logger.message(f"step {step}: checkpoint {path}")
        else:
            record_routing(model, probe_tokens)
        barrier(info)

    def validate(step: int) -> float:
        val_loss = evaluate(model, val_windows, micro, info, autocast)
        logger.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    window = _Window(info)
    start_time = time.perf_counter()
    val_loss = float("nan")
    model.train()
    stopped_early = False
    while step < tc.max_steps:
        t_step = time.perf_counter()
        set_training_progress(raw, step / tc.max_steps)
        rows = sampler.next_batch(tc.batch_size)[info.rank * local : (info.rank + 1) * local]
        for i in range(accum):
            batch = rows[i * micro : (i + 1) * micro].to(info.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if info.enabled and tc.parallel == "ddp" and i < accum - 1:
                sync = model.no_sync()  # gradients are all-reduced on the last micro-batch only
            with sync:
                with autocast():
                    output = model(batch[:, :-1], batch[:, 1:])
                loss = (output.loss + output.aux_loss) / accum
                scaler.scale(loss).backward()
            window.add(output, 1 / accum)
        scaler.unscale_(opt)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = sched.get_last_lr()[0]
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window.steps += 1
        window.elapsed += time.perf_counter() - t_step

        if step % tc.log_every == 0 or step == tc.max_steps:
            row = window.row(step, tc.batch_size * seq_len)
            row.update({"lr": lr, "grad_norm": float(grad_norm), "flops_per_token": fpt})
            logger.log(row)
            window = _Window(info)
        if step % tc.eval_every == 0 or step == tc.max_steps:
            val_loss = validate(step)
        stop = stop_after is not None and step >= stop_after and step < tc.max_steps
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop:
            checkpoint(step)
        if stop:
            logger.message(f"stopped after step {step} (--stop-after); continue with --resume")
            stopped_early = True
            break
    logger.close()
    summary = {
        "step": step, "max_steps": tc.max_steps, "stopped_early": stopped_early,
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)) if val_loss == val_loss else None,
        "train_time_s": earlier_time + time.perf_counter() - start_time,
        "peak_mem_mb": peak_memory_mb(info.device),
        "params_total": total_params, "params_active": active_params,
        "algorithm": cfg.model.algorithm, "rank": info.rank,
    }
    if info.is_main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no run (no config.yaml).")
    return config_from_dict(yaml.safe_load(path.read_text()))
