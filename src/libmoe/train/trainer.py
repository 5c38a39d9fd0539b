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
import math
import random
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..data.packed import SequenceSampler, probe_set, tokenizer_fingerprint, validation_windows
from ..errors import Interrupted
from ..eval.perplexity import validation_loss
from ..files import read_json_object, write_json, write_text
from ..models import MoETransformer, count_parameters, find_tokenizer, resolve_checkpoint
from ..models.run_config import RunConfig, load_run_config, load_yaml, prepare_run_data
from ..models.transformers_lm import (
    TransformersLM,
    load_transformers,
    transformers_run_config,
    transformers_source,
)
from ..moe import attach_bias_balancing, set_training_progress
from .checkpoint import agreed_checkpoint, list_checkpoints, save_checkpoint
from .distributed import (
    DistInfo,
    StepVote,
    all_reduce_sum,
    barrier,
    cpu_group,
    init_distributed,
    shutdown,
    wrap_model,
)
from .metrics import MetricsLogger, load_summary, read_metrics
from .rundir import (
    RUN_FILES,
    check_resumable,
    check_run_dir,
    clear_run,
    config_diff,
    model_hash,
    record_config_change,
    resume_changes,
    run_hash,
    saved_config,
)
from .stops import FiniteGuard, StopSignals
from .trace import record_routing, save_trace

__all__ = ["RUN_FILES", "check_config", "check_run_dir", "evaluate", "load_run_config", "model_hash",
           "prepare_run_data", "run_hash", "train"]

evaluate = validation_loss  # its name here before it moved to libmoe.eval.perplexity


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


def check_config(cfg: RunConfig, world_size: int = 1, hf: bool = False) -> tuple[int, int, int]:
    """Everything about `cfg` knowable without data, checked before any work: batch divisibility,
    sequence length and the model itself (built on the meta device, so no memory is used).
    Returns (sequences per process, micro-batch size, micro-batches per step)."""
    tc = cfg.train
    if tc.batch_size % world_size:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the "
                         f"{world_size} processes.")
    local = tc.batch_size // world_size
    micro = tc.micro_batch_size or local
    if local % micro:
        raise ValueError(f"train.micro_batch_size={micro} must divide the per-process batch {local}.")
    if cfg.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}.")
    if not hf:
        with torch.device("meta"):
            MoETransformer(cfg.model)  # every model and MoE option error, before the data is built
    return local, micro, local // micro


def _apply_optim_settings(opt: torch.optim.Optimizer, sched, cfg: RunConfig,
                          weight_decay: list[float]) -> None:
    """Put the config's optimizer settings into a restored optimizer and schedule (loading a
    checkpoint restores the saved lr, betas, eps and weight decay), for --allow-config-change."""
    factor = lr_lambda(cfg)(sched.last_epoch)
    for group, wd in zip(opt.param_groups, weight_decay):
        group.update(initial_lr=cfg.optim.lr, lr=cfg.optim.lr * factor, weight_decay=wd,
                     betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched.base_lrs = [cfg.optim.lr] * len(opt.param_groups)
    sched._last_lr = [group["lr"] for group in opt.param_groups]


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, keyed by parameter name, on every rank."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, opt, options=options))


def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
    init: str | Path | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Train `cfg` into run directory `out`; returns the final summary (also train_summary.json).

    resume: True continues the run in `out` from its newest intact checkpoint (a ValueError when
    there is none); "auto" continues it when it has a checkpoint and starts it otherwise (the bench);
    overwrite: replace a run found there (all of RUN_FILES, once everything is checked);
    allow_config_change: let a resumed run change guarded settings (optim.*, data.*, batch size,
    schedule length, seq_len, seed), recorded in RUN/config_changes.jsonl; stop_after: stop after
    that step with a checkpoint, as if interrupted (for tests and to split long runs); progress:
    force the progress bar on or off (default: on for a terminal); init: start from the weights
    of this model directory, run or checkpoint (e.g. an upcycled model) instead of a random init;
    its model config and tokenizer must be the run's. A transformers causal LM (directory or Hub
    name, e.g. `libmoe upcycle`'s output for a Hub model) is trained as it is, with its own
    tokenizer; see libmoe.models.transformers_lm.

    Failures: bad settings raise ValueError before any data is prepared or anything is written;
    a non-finite loss raises WorkFailed without writing a checkpoint; SIGTERM/SIGINT write a
    checkpoint at the current step and raise Interrupted (continue with resume=True)."""
    out = Path(out)
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume={resume!r} must be True, False or 'auto'.")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after {stop_after} must be a step of at least 1.")
    check_run_dir(out, resume, overwrite)
    if resume is True:
        check_resumable(out)
    init = init if init is not None else cfg.init
    if init is None and resume and (out / "config.yaml").is_file():  # the run keeps its init
        init = load_yaml(out / "config.yaml").get("init")
    hf = False  # whether the model trained is a transformers model (libmoe.models.transformers_lm)
    if init is not None:
        source = transformers_source(init)
        hf = source is not None
        init = source or str(init)
        cfg = transformers_run_config(cfg, init) if hf else replace(cfg, init=init)
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, out, info, resume, overwrite, stop_after, progress, init, hf,
                      allow_config_change)
    finally:
        shutdown(info)


def _init_weights(init: str | Path, cfg: RunConfig, tokenizer_hash: str) -> dict[str, torch.Tensor]:
    """The state dict of model directory `init`, checked against the run's model and tokenizer."""
    path = resolve_checkpoint(init)
    saved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    if saved.get("model") is None:
        raise ValueError(f"--init {str(init)!r} has no libmoe config.yaml beside its weights.")
    if model_hash(replace(cfg, model=type(cfg.model)(**saved["model"]))) != model_hash(cfg):
        diff = "; ".join(config_diff(saved["model"], cfg.model.to_dict()))
        raise ValueError(f"--init {str(init)!r} holds a different model than this config ({diff}); "
                         "leave the model section to the init directory's config.")
    if tokenizer_fingerprint(find_tokenizer(path)) != tokenizer_hash:
        raise ValueError(f"--init {str(init)!r} was trained with another tokenizer than this run's data "
                         "(data.source or data.tokenizer differ); use the init directory's data config.")
    return load_file(str(path / "model.safetensors"))


def _train(cfg: RunConfig, out: Path, info: DistInfo, resume: bool | str, overwrite: bool,
           stop_after: int | None, progress: bool | None, init: str | Path | None,
           hf: bool, allow_config_change: bool) -> dict[str, Any]:
    say = print if info.is_main else (lambda *_: None)
    tc = cfg.train
    world = info.world_size
    local, micro, accum = check_config(cfg, world, hf)
    seq_len = cfg.seq_len

    flags = cpu_group(info)  # small host-side agreements: the resume step, the preemption vote
    # A resumed run: its newest intact checkpoint, and the settings it may not change. Checked
    # before the data are prepared and before anything is written to `out`.
    ckpt_path, ckpt, changes = None, None, []
    if resume and list_checkpoints(out):
        read_metrics(out / "metrics.jsonl")  # a damaged row (not a torn last line) is refused now
        ckpt_path, ckpt = agreed_checkpoint(out, info, flags, say)
        changes = resume_changes(saved_config(ckpt_path, out), cfg, ckpt["state"]["step"],
                                 allow_config_change)
    elif resume:
        say(f"resume: no checkpoint in {out}, starting from step 0")

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

    init_state = None
    if init is not None and ckpt is None and not hf:
        init_state = _init_weights(init, cfg, data.tokenizer_hash)
    resumed_identity = ckpt["info"].get("run_hash") if ckpt is not None else None
    if ckpt is not None:
        saved_cfg = ckpt["info"].get("model_config", {})
        if ckpt["info"].get("model_hash") != model_hash(cfg):
            diff = "; ".join(config_diff(saved_cfg, cfg.model.to_dict())) or "unknown"
            raise ValueError(f"cannot resume {str(ckpt_path)!r} with a different model config "
                             f"({diff}); use the saved config or a new --out.")
        if ckpt["info"].get("tokenizer_hash") != data.tokenizer_hash:
            raise ValueError(f"cannot resume {str(ckpt_path)!r}: its tokenizer differs from the "
                             "one prepared for this config (data source or tokenizer changed).")

    # Everything is checked: only now is `out` written (and an old run in it removed).
    if info.is_main:
        if overwrite and not (resume and ckpt is not None):
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        shutil.copytree(data.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
        if changes:
            record_config_change(out, ckpt["state"]["step"], changes)
            say(f"resume: settings changed at step {ckpt['state']['step']}: {'; '.join(changes)}")
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
    saved_step = None  # the step of the newest checkpoint written or resumed from
    earlier_time = 0.0  # seconds of training before a resume, so train_time_s covers the whole run
    if ckpt is not None:
        weight_decay = [group["weight_decay"] for group in opt.param_groups]
        _load_optimizer(model, opt, ckpt["optimizer"])
        state = ckpt["state"]
        sched.load_state_dict(state["scheduler"])
        if changes:
            _apply_optim_settings(opt, sched, cfg, weight_decay)
        sampler.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        step = saved_step = state["step"]
        earlier_time = state.get("elapsed_s", 0.0)
        say(f"resume: continuing from {ckpt_path} (step {step})")
        del ckpt

    if step >= tc.max_steps and (out / "train_summary.json").is_file():
        say(f"resume: {out} already finished its {tc.max_steps} steps")
        return dict(read_json_object(out / "train_summary.json"), rank=info.rank)

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
    identity = resumed_identity or run_hash(cfg)  # kept across --allow-config-change
    info_json = {"model_hash": model_hash(cfg), "tokenizer_hash": data.tokenizer_hash,
                 "run_hash": identity, "model_config": cfg.model.to_dict(),
                 "algorithm": cfg.model.algorithm}
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    extra_files = {"config.yaml": config_text}
    if hf:  # each checkpoint is also a transformers directory
        extra_files["config.json"] = raw.config_json()
    guard = FiniteGuard(info, cfg)

    def checkpoint(step: int) -> Path:
        guard.check(step, model, saved_step)  # never a checkpoint of diverged weights
        model_state, opt_state = _state_dicts(model, opt)
        if hf:
            model_state = raw.export_state(model_state)
        trainer_state = {"step": step, "scheduler": sched.state_dict(),
                         "data": sampler.state_dict(), "rng": _rng_state(),
                         "elapsed_s": earlier_time + time.perf_counter() - start_time}
        # Every process runs the probe forward (FSDP/DDP collectives); rank 0 writes.
        path = out / "checkpoints" / f"step_{step}"
        if info.is_main:
            path = save_checkpoint(
                out, step, model_state, opt_state, trainer_state, info_json,
                extra_files=extra_files, keep=tc.keep_checkpoints,
                before_rename=lambda tmp: save_trace(tmp, raw, probe_tokens, probe_domain,
                                                     data.domains, step, run=model, run_hash=identity),
            )
            logger.message(f"step {step}: checkpoint {path}")
        else:
            record_routing(model, probe_tokens)
        barrier(info)
        return path

    def validate(step: int) -> float:
        guard.check(step, saved=saved_step)
        val_loss = validation_loss(model, val_windows, micro, info, autocast)
        logger.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    logger = MetricsLogger(out, tc.max_steps, step, enabled=info.is_main,
                           tensorboard=tc.tensorboard, progress=progress)
    window = _Window(info)
    start_time = time.perf_counter()
    val_loss = float("nan")
    model.train()
    stopped_early = False
    with contextlib.ExitStack() as stack:
        stack.callback(logger.close)
        signals = stack.enter_context(StopSignals())
        vote = StepVote(info, flags)  # the signal flag, agreed without blocking a step
        stack.callback(vote.close)
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
            # A loss scaler skips steps with overflowing gradients itself; otherwise they diverge.
            guard.update(step, window.loss, window.aux_loss,
                         *(() if scaler.is_enabled() else (grad_norm,)))

            if step % tc.log_every == 0 or step == tc.max_steps:
                row = window.row(step, tc.batch_size * seq_len)
                row.update({"lr": lr, "grad_norm": float(grad_norm), "flops_per_token": fpt})
                logger.log(row)
                guard.check(step, saved=saved_step)
                window = _Window(info)
            if step % tc.eval_every == 0 or step == tc.max_steps:
                val_loss = validate(step)
            stop = stop_after is not None and step >= stop_after and step < tc.max_steps
            # Every process stops at the same step: the signal flag is agreed on each step (the
            # answer arrives one step late, so the reduction overlaps the next step's compute).
            interrupted = vote.poll(signals.name is not None) and step < tc.max_steps
            if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop or interrupted:
                path = checkpoint(step)
                saved_step = step
            if interrupted:
                raise Interrupted(f"interrupted by {signals.name or 'a signal to another process'} at "
                                  f"step {step}; checkpoint written to {path}; continue with --resume.")
            if stop:
                logger.message(f"stopped after step {step} (--stop-after); continue with --resume")
                stopped_early = True
                break
    summary = {
        "step": step, "max_steps": tc.max_steps, "stopped_early": stopped_early,
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)) if val_loss == val_loss else None,
        "train_time_s": earlier_time + time.perf_counter() - start_time,
        "peak_mem_mb": peak_memory_mb(info.device),
        "params_total": total_params, "params_active": active_params,
        "algorithm": cfg.model.algorithm, "rank": info.rank,
    }
    if info.is_main:
        write_json(out / "train_summary.json", summary)
    return summary
