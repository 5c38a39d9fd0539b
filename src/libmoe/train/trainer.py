"""The pretraining loop: `train(cfg, out)`, readable top to bottom.

Setup: the checkpoint to resume from, the data, the run directory, the model, optimizer and
schedule (restored when resuming). Then per optimizer step (`TrainRun.train_step`): draw the
global batch (same windows on every process), take this process's slice, run it in micro-batches
(gradient accumulation, DDP gradient sync only on the last), add every MoE layer's auxiliary loss
to the cross-entropy, clip, step AdamW and the schedule. Metrics, validation and checkpoints (with
routing traces of a fixed probe set) at configured intervals. Resuming restores model, optimizer,
schedule, data position and RNG, so a resumed CPU run reproduces the uninterrupted one's losses
exactly.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch import nn

from ..data.packed import PackedData, SequenceSampler, probe_set, tokenizer_fingerprint, validation_windows
from ..devices import DistInfo, tune_cpu_allocator
from ..errors import Interrupted
from ..files import read_json_object, write_json, write_text
from ..models import MoETransformer, count_parameters, find_tokenizer, list_checkpoints, resolve_checkpoint
from ..models.run_config import RunConfig, load_yaml, prepare_run_data
from ..models.transformers_lm import (
    TransformersLM,
    load_transformers,
    transformers_run_config,
    transformers_source,
)
from ..moe import attach_bias_balancing
from .checkpoint import agreed_checkpoint
from .distributed import (
    DATA_TIMEOUT,
    StepVote,
    barrier,
    cpu_group,
    init_distributed,
    long_wait_group,
    shutdown,
    wrap_model,
)
from .expert_parallel import check_expert_parallel, shard_model, slice_expert_state
from .loop import TrainRun
from .metrics import MetricsLogger, StepWindow, read_metrics
from .optim import (
    apply_optim_settings,
    autocast_factory,
    build_optimizer,
    load_optimizer_state,
    lr_lambda,
    resolve_precision,
    set_rng_state,
)
from .rundir import (
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
from .throughput import run_peak_flops

__all__ = ["check_config", "flops_per_token", "peak_memory_mb", "train", "train_loop"]


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
    if info.device.type == "cpu":
        tune_cpu_allocator()  # steps stop page-faulting their activations in (devices.py)
    try:
        return _train(cfg, out, info, resume, overwrite, stop_after, progress, init, hf,
                      allow_config_change)
    finally:
        shutdown(info)


def _train(cfg: RunConfig, out: Path, info: DistInfo, resume: bool | str, overwrite: bool,
           stop_after: int | None, progress: bool | None, init: str | Path | None,
           hf: bool, allow_config_change: bool) -> dict[str, Any]:
    say = print if info.is_main else (lambda *_: None)
    tc = cfg.train
    local, micro, accum = check_config(cfg, info.world_size, hf)
    flags = cpu_group(info)  # small host-side agreements: the resume step, the preemption vote

    # Setup, checked before anything is written to `out`: the checkpoint, the data, the init weights.
    resumed = resume_point(cfg, out, info, flags, resume, allow_config_change, say)
    data, cfg = run_data(cfg, info, hf, say)
    init_state = None
    if init is not None and resumed is None and not hf:
        init_state = init_weights(init, cfg, data.tokenizer_hash)
    if resumed is not None:
        check_resume_fits(resumed, cfg, data)
    write_run_dir(out, cfg, data, resumed, overwrite, info, say, flags)

    # The model, optimizer, schedule and data position (restored when resuming).
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    raw, total_params, active_params = build_model(cfg, info, hf, init, resumed, init_state, say)
    shard_model(raw, cfg, info)  # train.expert_parallel: this rank's experts, left out of DDP
    if tc.compile:  # each block's body, before DDP/FSDP2 wrap it (torchtitan's order)
        raw.compile_blocks()
    model = wrap_model(raw, info, tc.parallel, resolve_precision(tc.precision, info.device))
    opt = build_optimizer(model, cfg)
    attach_bias_balancing(raw, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = SequenceSampler(data.train, cfg.seq_len, seed=tc.seed)
    step, saved_step, earlier_time = 0, None, 0.0
    identity = (resumed.ckpt["info"].get("run_hash") if resumed else None) or run_hash(cfg)
    if resumed is not None:  # the identity is kept across --allow-config-change
        step, earlier_time = restore(resumed, model, opt, sched, sampler, cfg)
        saved_step = step
        say(f"resume: continuing from {resumed.path} (step {step})")
        resumed = None  # frees the checkpoint's tensors
    if step >= tc.max_steps and (out / "train_summary.json").is_file():
        say(f"resume: {out} already finished its {tc.max_steps} steps")
        return dict(read_json_object(out / "train_summary.json"), rank=info.rank)
    run = start_run(cfg, out, info, data, raw, model, opt, sched, sampler, (local, micro, accum), identity,
                    active_params, hf, step, saved_step, earlier_time)
    run.flags = flags  # rank 0's checkpoint writes are waited for on the CPU group
    run.peak_flops = run_peak_flops(tc.peak_flops, info.device, resolve_precision(tc.precision, info.device))
    say(f"model: {cfg.model.algorithm}, {total_params / 1e6:.2f}M parameters "
        f"({active_params / 1e6:.2f}M active), {run.flops_per_token / 1e6:.1f} MFLOPs/token; "
        f"{info.world_size} process(es) on {info.device}, batch {tc.batch_size} x {cfg.seq_len} tokens "
        f"({accum} micro-batch(es) of {micro} per process), {run.precision_name}")

    val_loss, stopped_early = train_loop(run, flags, stop_after, progress)
    summary = {
        "step": run.step, "max_steps": tc.max_steps, "stopped_early": stopped_early,
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)) if val_loss == val_loss else None,
        "train_time_s": run.elapsed(), "peak_mem_mb": peak_memory_mb(info.device),
        "params_total": total_params, "params_active": active_params,
        "algorithm": cfg.model.algorithm, "rank": info.rank,
    }
    if info.is_main:
        write_json(out / "train_summary.json", summary)
    return summary


def train_loop(run: TrainRun, flags, stop_after: int | None, progress: bool | None) -> tuple[float, bool]:
    """Train `run` to train.max_steps (or `stop_after`, or a signal): the step, then at their
    intervals the metrics row, validation and a checkpoint. Returns (the last validation loss,
    whether it stopped early at `stop_after`); a signal writes a checkpoint and raises Interrupted."""
    cfg, info = run.cfg, run.info
    tc = cfg.train
    run.logger = MetricsLogger(run.out, tc.max_steps, run.step, enabled=info.is_main,
                               tensorboard=tc.tensorboard, progress=progress)
    window = StepWindow(info)
    run.start_time = time.perf_counter()
    val_loss = float("nan")
    run.model.train()
    stopped_early = False
    with contextlib.ExitStack() as stack:
        stack.callback(run.logger.close)
        signals = stack.enter_context(StopSignals())
        vote = StepVote(info, flags)  # the signal flag, agreed without blocking a step
        stack.callback(vote.close)
        while run.step < tc.max_steps:
            lr, grad_norm = run.train_step(window)
            step = run.step
            if step % tc.log_every == 0 or step == tc.max_steps:
                run.log_window(window, lr, grad_norm)
                window = StepWindow(info)
            if step % tc.eval_every == 0 or step == tc.max_steps:
                with window.paused():  # not training time (tokens/s, MFU)
                    val_loss = run.validate()
            stop = stop_after is not None and step >= stop_after and step < tc.max_steps
            # Every process stops at the same step: the signal flag is agreed on each step (the
            # answer arrives one step late, so the reduction overlaps the next step's compute).
            interrupted = vote.poll(signals.name is not None) and step < tc.max_steps
            if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop or interrupted:
                with window.paused():
                    path = run.checkpoint()
            if interrupted:
                raise Interrupted(f"interrupted by {signals.name or 'a signal to another process'} at "
                                  f"step {step}; checkpoint written to {path}; continue with --resume.")
            if stop:
                run.logger.message(f"stopped after step {step} (--stop-after); continue with --resume")
                stopped_early = True
                break
    return val_loss, stopped_early


# --- setup: what `_train` calls before the loop ---------------------------------------------


@dataclass
class Resumed:
    """The checkpoint a run continues from: its directory, contents (`load_checkpoint`) and the
    guarded settings the resumed config changes (--allow-config-change)."""

    path: Path
    ckpt: dict[str, Any]
    changes: list[str]


def resume_point(cfg: RunConfig, out: Path, info: DistInfo, group, resume: bool | str,
                 allow_config_change: bool, say) -> Resumed | None:
    """The newest intact checkpoint of the run in `out` that every process agrees on, when
    resuming and there is one, with the settings it may not change checked (before any data is
    prepared or anything written)."""
    if resume and list_checkpoints(out):
        read_metrics(out / "metrics.jsonl")  # a damaged row (not a torn last line) is refused now
        path, ckpt = agreed_checkpoint(out, info, group, say)
        changes = resume_changes(saved_config(path, out), cfg, ckpt["state"]["step"], allow_config_change)
        return Resumed(path, ckpt, changes)
    if resume:
        say(f"resume: no checkpoint in {out}, starting from step 0")
    return None


def run_data(cfg: RunConfig, info: DistInfo, hf: bool, say) -> tuple[PackedData, RunConfig]:
    """The run's packed data (rank 0 builds the cache, the others then read it), and `cfg` with
    model.vocab_size set to a given tokenizer's."""
    # Rank 0 may tokenise for hours (6.5B tokens for paper-158m). The others wait in a barrier of
    # a gloo group with a day's timeout (DATA_TIMEOUT), never in the default group, whose NCCL
    # watchdog ends the job after 10 minutes. Chosen over polling for a completion marker on
    # disk: when rank 0 fails its process exits, which closes its gloo connections, so the others
    # fail at once with the cause below (and torchrun stops the job) rather than polling until a
    # timeout or a failure marker rank 0 may never write (killed for memory); and it works
    # whether or not the nodes share the cache directory (where they do not, each process builds
    # its own copy after rank 0, and the second barrier waits for that too).
    wait = long_wait_group(info)
    data = None
    if info.is_main:
        if info.enabled:
            hours = DATA_TIMEOUT.total_seconds() / 3600
            say(f"data: rank 0 prepares the data; the other {info.world_size - 1} process(es) wait for it "
                f"(at most {hours:g} h; `libmoe prepare` beforehand takes this out of the job)")
        data = prepare_run_data(cfg, say)
    _wait_for_data(info, wait, "rank 0 to prepare the data")
    if data is None:
        data = prepare_run_data(cfg, say)
    _wait_for_data(info, wait, "every process to open the data")
    if wait is not None:
        dist.destroy_process_group(wait)
    vocab = data.meta["vocab_size"]
    if cfg.data.tokenizer != "train" and vocab != cfg.model.vocab_size and not hf:
        say(f"model: vocab_size set to the tokenizer's {vocab}")
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size}; raise model.vocab_size.")
    return data, cfg


def _wait_for_data(info: DistInfo, group, what: str) -> None:
    """The data barrier, with its failure named: a rank that failed or timed out."""
    try:
        barrier(info, group)
    except RuntimeError as err:  # DistBackendError: a peer closed its connection, or the timeout
        hours = DATA_TIMEOUT.total_seconds() / 3600
        raise RuntimeError(f"stopped waiting for {what}: a process failed (see its error above; rank 0 "
                           f"reports a data error first) or it took longer than {hours:g} h (prepare the "
                           f"data beforehand with `libmoe prepare`); {err}".strip()) from err


def init_weights(init: str | Path, cfg: RunConfig, tokenizer_hash: str) -> dict[str, torch.Tensor]:
    """The state dict of model directory `init`, checked against the run's model and tokenizer."""
    path = resolve_checkpoint(init)
    saved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    if saved.get("model") is None:
        raise ValueError(f"--init {str(init)!r} has no libmoe config.yaml beside its weights.")
    weights = load_file(str(path / "model.safetensors"))
    # a model saved before MoE++'s slot counts scaled with E records none: read them off its tensors
    shapes = {k: v.shape for k, v in weights.items()}
    saved_model = type(cfg.model)(**saved["model"]).with_saved_layout(shapes)
    if model_hash(replace(cfg, model=saved_model)) != model_hash(cfg):
        diff = "; ".join(config_diff(saved_model.to_dict(), cfg.model.to_dict()))
        raise ValueError(f"--init {str(init)!r} holds a different model than this config ({diff}); "
                         "leave the model section to the init directory's config.")
    if tokenizer_fingerprint(find_tokenizer(path)) != tokenizer_hash:
        raise ValueError(f"--init {str(init)!r} was trained with another tokenizer than this run's data "
                         "(data.source or data.tokenizer differ); use the init directory's data config.")
    return weights


def check_resume_fits(resumed: Resumed, cfg: RunConfig, data: PackedData) -> None:
    """Refuse to resume a checkpoint of another model config or tokenizer."""
    info = resumed.ckpt["info"]
    if info.get("model_hash") != model_hash(cfg):
        diff = "; ".join(config_diff(info.get("model_config", {}), cfg.model.to_dict())) or "unknown"
        raise ValueError(f"cannot resume {str(resumed.path)!r} with a different model config "
                         f"({diff}); use the saved config or a new --out.")
    if info.get("tokenizer_hash") != data.tokenizer_hash:
        raise ValueError(f"cannot resume {str(resumed.path)!r}: its tokenizer differs from the "
                         "one prepared for this config (data source or tokenizer changed).")


def write_run_dir(out: Path, cfg: RunConfig, data: PackedData, resumed: Resumed | None,
                  overwrite: bool, info: DistInfo, say, group=None) -> None:
    """Everything is checked: only now is `out` written (an old run in it removed with
    --overwrite, unless resuming it): config.yaml, tokenizer/ and the recorded config changes."""
    if info.is_main:
        if overwrite and resumed is None:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        shutil.copytree(data.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
        if resumed is not None and resumed.changes:
            step = resumed.ckpt["state"]["step"]
            record_config_change(out, step, resumed.changes)
            say(f"resume: settings changed at step {step}: {'; '.join(resumed.changes)}")
    barrier(info, group)  # host work of rank 0: the others wait on the CPU group


def build_model(cfg: RunConfig, info: DistInfo, hf: bool, init: str | Path | None,
                resumed: Resumed | None, init_state: dict[str, torch.Tensor] | None,
                say) -> tuple[nn.Module, int, int]:
    """The model on this process's device, with the resumed or initial weights; (model, total
    parameters, active parameters)."""
    if hf:  # a transformers model: from the newest checkpoint (a transformers directory) or init
        raw = TransformersLM(load_transformers(resumed.path if resumed is not None else init))
        if resumed is None:
            say(f"init: transformers model {init}")
    else:
        raw = MoETransformer(cfg.model)
    total, active = count_parameters(raw)
    if resumed is not None and not hf:
        raw.load_state_dict(resumed.ckpt["model"])
    elif init_state is not None:
        raw.load_state_dict(init_state)
        say(f"init: weights from {init}")
    return raw.to(info.device), total, active


def restore(resumed: Resumed, model: nn.Module, opt: torch.optim.Optimizer, sched, sampler: SequenceSampler,
            cfg: RunConfig) -> tuple[int, float]:
    """Optimizer, schedule (with the config's settings, if they changed), data position and RNG
    from the checkpoint; returns (its step, the seconds trained before it)."""
    weight_decay = [group["weight_decay"] for group in opt.param_groups]
    load_optimizer_state(model, opt, slice_expert_state(model, resumed.ckpt["optimizer"]))
    state = resumed.ckpt["state"]
    sched.load_state_dict(state["scheduler"])
    if resumed.changes:
        apply_optim_settings(opt, sched, cfg, weight_decay)
    sampler.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return state["step"], state.get("elapsed_s", 0.0)


def start_run(cfg: RunConfig, out: Path, info: DistInfo, data: PackedData, raw: nn.Module, model: nn.Module,
              opt: torch.optim.Optimizer, sched, sampler: SequenceSampler, batching: tuple[int, int, int],
              identity: str, active_params: int, hf: bool, step: int, saved_step: int | None,
              earlier_time: float) -> TrainRun:
    """The TrainRun of a set-up model: precision, validation windows, the probe set traced at each
    checkpoint, what checkpoint.json records and the divergence guard."""
    local, micro, accum = batching
    amp_dtype = resolve_precision(cfg.train.precision, info.device)
    val_windows = validation_windows(data.val, cfg.seq_len, cfg.train.eval_tokens)
    probe_tokens, probe_domain = probe_set(data.val, data.val_domain, cfg.data.probe_tokens, cfg.seq_len)
    checkpoint_info = {"model_hash": model_hash(cfg), "tokenizer_hash": data.tokenizer_hash,
                       "run_hash": identity, "model_config": cfg.model.to_dict(),
                       "algorithm": cfg.model.algorithm}
    extra_files = {"config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)}
    if hf:  # each checkpoint is also a transformers directory
        extra_files["config.json"] = raw.config_json()
    return TrainRun(
        cfg=cfg, out=out, info=info, data=data, raw=raw, model=model, opt=opt, sched=sched, sampler=sampler,
        scaler=torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16),
        autocast=autocast_factory(amp_dtype, info.device), local=local, micro=micro, accum=accum,
        val_windows=val_windows, probe_tokens=probe_tokens, probe_domain=probe_domain, identity=identity,
        checkpoint_info=checkpoint_info, extra_files=extra_files, guard=FiniteGuard(info, cfg),
        flops_per_token=flops_per_token(cfg, active_params), hf=hf, step=step, saved_step=saved_step,
        earlier_time=earlier_time, precision_name="fp32" if amp_dtype is None else str(amp_dtype),
    )


# --- sizes and limits --------------------------------------------------------------------


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
    check_expert_parallel(cfg, world_size, hf)
    check_compile(cfg, world_size, hf)
    return local, micro, local // micro


def check_compile(cfg: RunConfig, world_size: int = 1, hf: bool = False) -> None:
    """Refuse train.compile where it cannot run: a transformers model (libmoe compiles its own
    blocks), and FSDP in bf16/fp16, whose fp32 router units put an FSDP hook inside each block's
    graph that dynamo cannot trace (DDP, or FSDP in fp32, compile)."""
    tc = cfg.train
    if not tc.compile:
        return
    if hf:
        raise ValueError("train.compile compiles libmoe's MoETransformer blocks; set train.compile=false "
                         "for a transformers model.")
    low = tc.precision in ("bf16", "fp16") or (tc.precision == "auto" and tc.device != "cpu"
                                                 and torch.cuda.is_available())
    if world_size > 1 and tc.parallel == "fsdp" and low:
        raise ValueError(f"train.compile with train.parallel=fsdp runs in fp32 only (precision "
                         f"{tc.precision!r}: FSDP's fp32 router units cannot be traced inside a compiled "
                         "block); use train.parallel=ddp, train.precision=fp32 or train.compile=false.")


def flops_per_token(cfg: RunConfig, active_params: int) -> int:
    """Training FLOPs per token: 6 x active non-embedding parameters plus attention's
    12 x layers x heads x head_dim x sequence length (the PaLM appendix B estimate)."""
    m = cfg.model
    return int(6 * (active_params - m.vocab_size * m.d_model)
               + 12 * m.n_layers * m.n_heads * m.head_dim * cfg.seq_len)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
