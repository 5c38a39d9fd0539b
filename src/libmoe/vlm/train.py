"""The three VLM stages (the paper's Appendix B.1): PT trains the connector only (the vision tower
and the LM frozen), PFT trains everything, VIT upcycles the PFT model's vision MLPs and connector
into MoE layers and trains everything.

    libmoe vlm train --stage pt  --preset cpu-tiny --out runs/vlm-pt
    libmoe vlm train --stage pft --init runs/vlm-pt  --out runs/vlm-pft
    libmoe vlm train --stage vit --init runs/vlm-pft --algorithm smoe --out runs/vlm-smoe

Each stage writes a standard run directory: ``config.yaml`` (the resolved config, ``kind: vlm``),
``metrics.jsonl`` (loss, every aux term, lr, grad norm, throughput, per-layer load), TensorBoard
events, ``checkpoints/step_N/`` (``model.safetensors``, ``vlm.json``, the tokenizer, optimizer and
trainer state for an exact resume, and for MoE models a routing trace of held-out images labelled
by subtask) and ``eval/results.json`` (held-out accuracy at the end). VIT checkpoints at 20, 40,
60, 80 and 100% of its steps by default, so change-rate curves come for free. A rerun of the same
command resumes from the newest checkpoint; a different config in the same directory is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..devices import check_device
from ..errors import Interrupted, WorkFailed
from ..files import CorruptFileError, write_json, write_text
from ..models import latest_checkpoint, list_checkpoints, newest_intact_checkpoint
from ..overrides import load_yaml
from ..train.checkpoint import save_checkpoint
from ..train.metrics import MetricsLogger, load_summary
from ..train.rundir import RUN_FILES, remove_entries
from ..train.stops import StopSignals
from .data import cached_image, probe_images
from .evaluate import evaluate_vlm
from .model import LibMoEVLM, build_vlm, load_state, model_state
from .saving import load_vlm, save_vlm
from .stages import (
    CONFIG_FILE,
    config_hash,
    stage_config,
    stage_records,
)
from .text import conversation_texts, encode_conversation, load_tokenizer, pad_right, word_tokenizer
from .trace import record_vlm_trace
from .upcycle import upcycle_vlm

__all__ = ["Batch", "StageRun", "build_stage_model", "make_batch", "setup_stage", "train_stage"]


# -- batches ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A training batch: right-padded ids, labels (-100 where not trained on) and mask [B, L], the
    images [N, 3, S, S] in text order (None without images), and the number of real tokens."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    n_tokens: int


def make_batch(items: list[tuple[list[int], list[int], str | None]], pad_id: int, size: int) -> Batch:
    """Right-padded ids/labels and the images (in text order) of encoded records."""
    ids, mask = pad_right([i for i, _, _ in items], pad_id)
    labels, _ = pad_right([lab for _, lab, _ in items], -100)
    images = [cached_image(img, size) for _, _, img in items if img is not None]
    return Batch(ids, labels, mask, torch.stack(images) if images else None, int(mask.sum()))


# -- the stage -------------------------------------------------------------------------------------
def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _device(name: str) -> torch.device:
    """`--device`: auto (cuda when present, else cpu) or a device this machine has (else ValueError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name))


def _autocast(precision: str, device: torch.device):
    if precision in ("bf16", "auto") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_stage_model(cfg: dict[str, Any], records: list[dict], folder, log) -> tuple[LibMoEVLM, Any]:
    """The stage's starting model and tokenizer: the --init run's final model (upcycled for VIT) or,
    without --init, the preset's models (Hub weights where the preset names them)."""
    if cfg["init"]:
        model, tokenizer, _ = load_vlm(cfg["init"])
        log(f"starting from {cfg['init']}")
    else:
        if cfg["tokenizer"] == "words":
            texts = conversation_texts(records)
            if isinstance(folder, Path):  # the held-out questions too, so evaluation has no unknown word
                for name in ("pt.json", "instruct.json", "mme.json", "open.json"):
                    if (folder / name).is_file():
                        rows = json.loads((folder / name).read_text())
                        texts += conversation_texts(rows) + [str(r.get(k, "")) for r in rows
                                                            for k in ("question", "answer")]
            tokenizer = word_tokenizer(texts)
        else:
            tokenizer = load_tokenizer(cfg["tokenizer"])
        model = build_vlm(cfg["model"], tokenizer, pretrained=True)
        if cfg["stage"] != "pt":
            log(f"--stage {cfg['stage']} without --init: starting from the preset's base models "
                "(the paper runs PT first)")
    if cfg["stage"] == "vit":
        moe = dict(cfg["moe"])
        upcycle_vlm(model, cfg["algorithm"], **moe)
        log(f"upcycled to {cfg['algorithm']}: {len(model.moe_layers())} MoE layers, "
            f"{moe.get('n_experts', 6)} experts, top-{moe.get('top_k', 3)}")
    return model, tokenizer


def _trainable(model: LibMoEVLM, stage: str) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(stage != "pt")
    if stage == "pt":
        for p in model.connector.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class StageRun:
    """Everything one stage run trains with, from `setup_stage`; `start`, `elapsed` and `rng` move
    on as it trains (or come from the checkpoint it resumes)."""

    cfg: dict[str, Any]
    out: Path
    device: torch.device
    folder: Path | str
    model: LibMoEVLM
    tokenizer: Any
    encoded: list[tuple[list[int], list[int], str | None]]  # (ids, labels, image) per record
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    batch_size: int
    steps_per_epoch: int
    total: int
    warmup: int
    checkpoint_steps: list[int]
    rng: random.Random
    start: int = 0
    elapsed: float = 0.0


def setup_stage(stage: str, out: Path, preset: str, data: str | None, init: str | None,
                algorithm: str | None, max_steps: int | None, overrides: list[str], device: str,
                overwrite: bool, log: Callable[[str], None]) -> StageRun:
    """Resolve and check the stage's config and run directory, then build the starting model, the
    encoded records and the optimizer."""
    cfg = stage_config(stage, preset, data, init, algorithm, max_steps, overrides)
    dev = _device(device)  # a device this machine lacks is refused before the run directory exists
    _check_run_dir(out, cfg, overwrite)
    tcfg = cfg["train"]
    records, folder = stage_records(cfg, log)
    torch.manual_seed(int(tcfg["seed"]))  # the new weights (a PT model, VIT's upcycled noise) come from
    # the run's seed, not from whatever drew random numbers before (e.g. writing the synthetic data)
    model, tokenizer = build_stage_model(cfg, records, folder, log)
    model.to(dev)
    template = "plain" if stage == "pt" else cfg["template"]
    encoded = [(*encode_conversation(tokenizer, r["conversations"], template, model.n_image_tokens,
                                     cfg["max_length"]), r.get("image")) for r in records]
    bs = int(tcfg["batch_size"])
    steps_per_epoch = max(1, len(encoded) // bs)
    total = int(tcfg["max_steps"] or steps_per_epoch * int(tcfg.get("epochs") or 1))
    params = _trainable(model, stage)
    opt = torch.optim.AdamW(params, lr=float(tcfg["lr"]), betas=tuple(tcfg["betas"]),
                            weight_decay=float(tcfg["weight_decay"]))
    run = StageRun(cfg, out, dev, folder, model, tokenizer, encoded, params, opt, bs, steps_per_epoch, total,
                   warmup=int(round(float(tcfg["warmup_ratio"]) * total)),
                   checkpoint_steps=sorted({max(1, round(f * total)) for f in tcfg["checkpoint_at"]}),
                   rng=random.Random(int(tcfg["seed"])))
    torch.manual_seed(int(tcfg["seed"]))
    return run


def resume_stage(run: StageRun, log: Callable[[str], None]) -> None:
    """Continue from the newest intact checkpoint, if any (a damaged newer one is named and skipped):
    weights, optimizer, step, train time and both random states."""
    if not list_checkpoints(run.out):
        return
    latest, ck = newest_intact_checkpoint(run.out, log)
    load_state(run.model, ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    state = ck["state"]
    run.start, run.elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
    run.rng.setstate(_tuple_state(state["python_rng"]))
    torch.set_rng_state(state["torch_rng"])
    log(f"resuming {run.out} from step {run.start}")


def train_step(run: StageRun, batch: Batch, step: int):
    """One optimizer step on `batch` (learning rate of `step`); (the model's output, the gradient
    norm). A non-finite loss or gradient stops the run before the update (WorkFailed)."""
    tcfg = run.cfg["train"]
    for g in run.opt.param_groups:
        g["lr"] = float(tcfg["lr"]) * _lr_factor(step, run.total, run.warmup, float(tcfg["min_lr_ratio"]))
    t0 = time.perf_counter()
    dev = run.device
    with _autocast(run.cfg["precision"], dev):
        pixels = None if batch.pixel_values is None else batch.pixel_values.to(dev)
        result = run.model(batch.input_ids.to(dev), pixels, batch.attention_mask.to(dev),
                           batch.labels.to(dev))
    loss_value = float(result.loss.detach())
    if not math.isfinite(loss_value):  # stop before the update: no NaN weights, no NaN checkpoint
        raise WorkFailed(_non_finite(run.out, step + 1, f"the loss is {loss_value}", tcfg))
    run.opt.zero_grad(set_to_none=True)
    result.loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, float(tcfg["grad_clip"]))
    if not math.isfinite(float(gnorm)):
        raise WorkFailed(_non_finite(run.out, step + 1, f"the gradient norm is {float(gnorm)}", tcfg))
    run.opt.step()
    run.elapsed += time.perf_counter() - t0
    return result, gnorm


class StepMeter:
    """What metrics.jsonl logs between two log steps: the mean loss, tokens per second and each MoE
    layer's expert load."""

    def __init__(self, model: LibMoEVLM):
        self.layers = model.moe_layers()
        self.counts = [torch.zeros(m.moe.router.n_slots if hasattr(m.moe.router, "n_slots")
                                   else m.moe.n_experts) for m in self.layers]
        self.t_log, self.tokens, self.window = time.perf_counter(), 0, []

    def add(self, batch: Batch, result) -> None:
        self.tokens += batch.n_tokens
        self.window.append(float(result.ce.detach()))
        for c, m in zip(self.counts, self.layers):
            if m.routing is not None:
                idx = m.routing.topk_idx.reshape(-1).cpu()
                c += torch.bincount(idx[idx >= 0], minlength=c.numel())[: c.numel()].float()

    def row(self, done: int, result, gnorm, run: StageRun) -> dict[str, Any]:
        """The metrics.jsonl row of step `done`; the window starts again."""
        now = time.perf_counter()
        row = {"step": done, "loss": sum(self.window) / len(self.window),
               "aux_loss": float(result.aux_loss.detach()) if result.aux_loss is not None else 0.0,
               **{f"aux_{k}": float(v) for k, v in result.aux.items()},
               "lr": run.opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
               "tokens_per_s": self.tokens / max(1e-9, now - self.t_log),
               "step_time_s": (now - self.t_log) / len(self.window), "elapsed_s": run.elapsed}
        if self.layers:
            row["load"] = [{"layer": i, **load_summary(c)} for i, c in enumerate(self.counts)]
            for c in self.counts:
                c.zero_()
        self.t_log, self.tokens, self.window = now, 0, []
        return row


def train_stage(stage: str, out: str | Path, preset: str = "cpu-tiny", data: str | None = None,
                init: str | None = None, algorithm: str | None = None, max_steps: int | None = None,
                overrides: list[str] = (), device: str = "auto", overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage into `out` (resuming it if interrupted); returns its summary."""
    out = Path(out)
    run = setup_stage(stage, out, preset, data, init, algorithm, max_steps, overrides, device, overwrite, log)
    resume_stage(run, log)
    cfg, tcfg, model, total = run.cfg, run.cfg["train"], run.model, run.total
    write_text(out / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
    n_total = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in run.params)
    log(f"vlm {stage}: {n_total / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), "
        f"{len(run.encoded):,} records, {total} steps of {run.batch_size}, {model.n_image_tokens} image "
        "tokens per image")
    probe = probe_images(run.folder, model.pixel_size, int(tcfg["probe_per_subtask"])) \
        if model.moe_layers() else None
    logger = MetricsLogger(out, total, run.start, tensorboard=bool(tcfg["tensorboard"]))
    order: list[int] = []
    model.train()
    meter = StepMeter(model)
    with contextlib.ExitStack() as stack:
        stack.callback(logger.close)
        signals = stack.enter_context(StopSignals())  # SIGTERM/SIGINT: checkpoint this step, stop
        for step in range(run.start, total):
            epoch, pos = step // run.steps_per_epoch, step % run.steps_per_epoch
            if pos == 0 or not order:
                order = list(range(len(run.encoded)))
                random.Random(int(tcfg["seed"]) * 1000003 + epoch).shuffle(order)
            chosen = order[pos * run.batch_size:(pos + 1) * run.batch_size]
            batch = make_batch([run.encoded[i] for i in chosen], run.tokenizer.pad_token_id, model.pixel_size)
            result, gnorm = train_step(run, batch, step)
            meter.add(batch, result)
            done = step + 1
            if done % int(tcfg["log_every"]) == 0 or done == total:
                logger.log(meter.row(done, result, gnorm, run))
            interrupted = signals.name is not None and done < total
            if done in run.checkpoint_steps or interrupted:
                if not all(bool(torch.isfinite(p).all()) for p in run.params):
                    raise WorkFailed(_non_finite(out, done, "the weights are not finite", tcfg))
                _save(out, done, model, run.tokenizer, run.opt, cfg, run.rng, run.elapsed, probe)
            if interrupted:
                raise Interrupted(f"interrupted by {signals.name} at step {done} of {out}; checkpoint "
                                  f"written to {out / 'checkpoints' / f'step_{done}'}; rerun the same "
                                  "command to continue.")
    summary = {"stage": stage, "steps": total, "train_time_s": round(run.elapsed, 2), "out": str(out)}
    summary.update(evaluate_at_end(run, log))
    write_json(out / "summary.json", summary, indent=1)
    return summary


def evaluate_at_end(run: StageRun, log: Callable[[str], None]) -> dict[str, Any]:
    """With train.eval_at_end and a held-out MME split: synth_mme of the final model into
    OUT/eval/results.json; its summary entry ({} otherwise)."""
    folder = run.folder
    held_out = isinstance(folder, Path) and (folder / "mme.json").is_file()
    if not (run.cfg["train"].get("eval_at_end") and held_out):
        return {}
    results = evaluate_vlm(run.model.eval(), run.tokenizer, run.cfg["template"], folder, ["synth_mme"],
                           subtasks=run.cfg["data"].get("subtasks"))
    write_json(run.out / "eval" / "results.json", {"results": results, "step": run.total}, indent=1)
    mme = results["synth_mme"]
    log(f"held-out synth_mme: acc {mme['acc']:.3f}, acc+ {mme['acc_plus']:.3f} (chance 0.5 / 0.25)")
    return {"synth_mme": {"acc": mme["acc"], "acc_plus": mme["acc_plus"]}}


def _non_finite(out: Path, step: int, what: str, tcfg: dict[str, Any]) -> str:
    """The one line of a stage stopped by a non-finite value (nothing of the step is saved)."""
    last = latest_checkpoint(out)
    kept = f"the last checkpoint ({last.name}) is kept" if last is not None else "no checkpoint was written"
    return (f"training stopped at step {step} of {out}: {what} (train.lr={tcfg['lr']}); {kept}; lower "
            "train.lr or check the data, then rerun with --overwrite.")


def _tuple_state(state):
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state


def _save(out, step, model, tokenizer, opt, cfg, rng, elapsed, probe) -> None:
    def extras(tmp: Path) -> None:
        save_vlm(model, tokenizer, tmp, extra={"stage": cfg["stage"], "step": step})
        if probe is not None:
            record_vlm_trace(model, *probe, step=step).save(tmp)
        model.train()

    state = {"step": step, "elapsed_s": elapsed, "python_rng": rng.getstate(),
             "torch_rng": torch.get_rng_state()}
    save_checkpoint(out, step, model_state(model), opt.state_dict(), state,
                    {"kind": "vlm", "stage": cfg["stage"], "config_hash": config_hash(cfg)},
                    extra_files={CONFIG_FILE: yaml.safe_dump(cfg, sort_keys=False)},
                    keep=len(cfg["train"]["checkpoint_at"]) + 1, before_rename=extras)


def _check_run_dir(out: Path, cfg: dict[str, Any], overwrite: bool) -> None:
    path = out / CONFIG_FILE
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        return
    if overwrite:  # every file of the old run (a run directory's and the stage's summary), not yours
        remove_entries(out, (*RUN_FILES, "summary.json"))
        return
    try:
        old = load_yaml(path, "run config")
    except ValueError as err:
        raise CorruptFileError(path, str(err).split(" is ", 1)[-1].rstrip("."),
                               "use another --out, or --overwrite to start over") from None
    if config_hash(old) != config_hash(cfg):
        diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
        raise ValueError(f"{out} holds a run with another config (differs in: {', '.join(diff)}); "
                         "use another --out, or --overwrite to start over.")
