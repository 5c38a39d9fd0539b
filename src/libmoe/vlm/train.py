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
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..errors import Interrupted, WorkFailed
from ..files import CorruptFileError, write_json, write_text
from ..overrides import did_you_mean, load_yaml
from .model import LibMoEVLM, build_vlm, load_vlm, model_state, save_vlm
from .presets import STAGES, apply_overrides, load_vlm_preset

CONFIG_FILE = "config.yaml"
STAGE_FILES = {"pt": "pt.json", "pft": "instruct.json", "vit": "instruct.json"}
INIT_STAGE = {"pft": ("pt", "pft"), "vit": ("pft",)}  # the stages an --init run may be (pft from
# pft: trained on, e.g. the dense baseline of a VIT comparison)
DEFAULT_CHECKPOINTS = {"pt": [1.0], "pft": [1.0], "vit": [0.2, 0.4, 0.6, 0.8, 1.0]}
TRAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 32, "max_steps": None, "epochs": 1, "warmup_ratio": 0.03,
                  "min_lr_ratio": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "grad_clip": 1.0,
                  "seed": 0, "log_every": 10, "checkpoint_at": None, "probe_per_subtask": 16,
                  "eval_at_end": True, "tensorboard": True}


def cache_dir() -> Path:
    return Path(os.environ.get("LIBMOE_CACHE", Path.home() / ".cache" / "libmoe"))


# -- config ----------------------------------------------------------------------------------------
def stage_config(stage: str, preset: str = "cpu-tiny", data: str | None = None, init: str | None = None,
                 algorithm: str | None = None, max_steps: int | None = None,
                 overrides: list[str] = ()) -> dict[str, Any]:
    """The resolved config of one stage run (what config.yaml holds)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}.{did_you_mean(stage, STAGES)} Valid: {', '.join(STAGES)}.")
    if init is not None:
        init_cfg = _init_config(init, stage)
        preset = init_cfg["preset"]
    p = load_vlm_preset(preset)
    cfg: dict[str, Any] = {"kind": "vlm", "stage": stage, "preset": preset,
                           "init": str(Path(init).resolve()) if init else None,
                           "algorithm": None, "model": p["model"], "tokenizer": p.get("tokenizer", "words"),
                           "template": p.get("template", "simple"), "max_length": p.get("max_length", 2048),
                           "precision": p.get("precision", "auto"), "data": _data_section(p, stage),
                           "moe": p.get("moe") or {},
                           "train": {**TRAIN_DEFAULTS, **(p.get("stages") or {}).get(stage, {})}}
    if init is not None:  # the same data and tokenizer as the stage before, unless told otherwise
        cfg["data"] = {**init_cfg["data"], "file": STAGE_FILES[stage]} if init_cfg["data"].get(
            "source") == "synth" or "file" in init_cfg["data"] else cfg["data"]
        cfg["model"], cfg["tokenizer"] = init_cfg["model"], init_cfg["tokenizer"]
        cfg["template"], cfg["max_length"] = init_cfg["template"], init_cfg["max_length"]
    if data is not None:
        cfg["data"] = {"source": str(data), "file": None if Path(data).is_file() else STAGE_FILES[stage]}
    apply_overrides(cfg, list(overrides), check=True)  # an unknown key fails here, before any work
    if max_steps is not None:
        cfg["train"]["max_steps"] = int(max_steps)
    _check_train(cfg["train"])
    if stage == "vit":
        from ..moe.layer import check_algorithm

        if algorithm is None:
            raise ValueError("the vit stage needs --algorithm (e.g. smoe, xmoe, sharede_v2).")
        check_algorithm(algorithm)
        if algorithm == "dense":
            raise ValueError("--algorithm dense has no router: the dense baseline of a VIT comparison is "
                             "`--stage pft --init PFT_RUN` continued for the same steps.")
        cfg["algorithm"] = algorithm
    elif algorithm not in (None, "dense"):
        raise ValueError(f"--algorithm {algorithm}: MoE layers are built in the vit stage only (the paper's "
                         f"PT and PFT are dense); drop --algorithm for --stage {stage}.")
    if cfg["train"]["checkpoint_at"] is None:
        cfg["train"]["checkpoint_at"] = DEFAULT_CHECKPOINTS[stage]
    return cfg


def _check_train(tcfg: dict[str, Any]) -> None:
    """The stage's hyperparameters are numbers in range (a NaN loss hours later is the alternative)."""
    def number(key, low, high=math.inf, integer=False, allow_none=False, low_open=False):
        value = tcfg.get(key)
        if value is None and allow_none:
            return
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
            raise ValueError(f"train.{key}={value!r} is not valid; it must be {kind} {bound}.")

    number("lr", 0.0, low_open=True)
    number("batch_size", 1, integer=True)
    number("max_steps", 1, integer=True, allow_none=True)
    number("epochs", 1, integer=True, allow_none=True)
    number("warmup_ratio", 0.0, 1.0)
    number("min_lr_ratio", 0.0, 1.0)
    number("weight_decay", 0.0)
    number("grad_clip", 0.0, low_open=True)
    number("log_every", 1, integer=True)
    number("probe_per_subtask", 1, integer=True)
    betas = tcfg.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"train.betas={betas!r} is not valid; it must be two numbers in [0, 1), "
                         "e.g. train.betas=[0.9,0.999].")
    at = tcfg.get("checkpoint_at")
    if at is not None and not (isinstance(at, list) and at and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in at)):
        raise ValueError(f"train.checkpoint_at={at!r} is not valid; it must be a list of fractions of the "
                         "steps in (0, 1], e.g. train.checkpoint_at=[0.5,1.0].")


def _data_section(preset: dict[str, Any], stage: str) -> dict[str, Any]:
    data = dict(preset.get("data") or {"source": "synth"})
    if stage in data and isinstance(data[stage], str):  # per-stage Hub names (the paper preset)
        return {"source": data[stage], "file": None}
    data.pop("pt", None), data.pop("pft", None), data.pop("vit", None)
    data.setdefault("source", "synth")
    data["file"] = STAGE_FILES[stage]
    return data


def _init_config(init: str | Path, stage: str) -> dict[str, Any]:
    path = Path(init)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--init {init}: not a libmoe vlm run (no {CONFIG_FILE}).")
    cfg = load_yaml(cfg_path, "--init run's config")
    if cfg.get("kind") != "vlm":
        raise ValueError(f"--init {init} is not a VLM run (train one with `libmoe vlm train`).")
    want = INIT_STAGE.get(stage)
    if want is None:
        raise ValueError(f"--stage {stage} starts from the preset's base models; it takes no --init.")
    if cfg.get("stage") not in want:
        raise ValueError(f"--init {init} is a {cfg.get('stage')} run; --stage {stage} starts from a "
                         f"{' or '.join(want)} run.")
    return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- data ------------------------------------------------------------------------------------------
def resolve_data(data: dict[str, Any], log: Callable[[str], None] = print) -> Path | str:
    """The dataset folder (the synthetic one is generated into the cache once) or a Hub name."""
    source = data.get("source", "synth")
    if source != "synth":
        return source if not Path(source).exists() else Path(source)
    from .synth import VERSION, write_synth_dataset

    args = {k: data[k] for k in ("n_per_task", "n_test_per_task", "image_size", "seed", "multi_turn")
            if k in data}
    key = hashlib.sha256(json.dumps({**args, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / "vlm-synth" / key
    if not (folder / "dataset.json").is_file():
        log(f"writing the synthetic multimodal dataset to {folder}")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        write_synth_dataset(tmp, **args, log=log)
        try:  # written aside and renamed, so a concurrent run never reads a half-written dataset
            tmp.replace(folder)
        except OSError:  # another process finished first: use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stage_records(cfg: dict[str, Any], log: Callable[[str], None] = print) -> tuple[list[dict], Path | str]:
    from .data import load_conversations

    folder = resolve_data(cfg["data"], log)
    records = load_conversations(folder, file=cfg["data"].get("file"))
    keep = cfg["data"].get("subtasks")
    if keep:
        records = [r for r in records if r.get("subtask") in set(keep)]
        if not records:
            raise ValueError(f"data.subtasks={keep}: no record of those subtasks in {folder}.")
    return records, folder


@lru_cache(maxsize=65536)
def _image(path: str, size: int) -> Tensor:
    from .data import load_image

    return load_image(path, size)


@dataclass
class Batch:
    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    n_tokens: int


def make_batch(items: list[tuple[list[int], list[int], str | None]], pad_id: int, size: int) -> Batch:
    """Right-padded ids/labels and the images (in text order) of encoded records."""
    from .text import pad_right

    ids, mask = pad_right([i for i, _, _ in items], pad_id)
    labels, _ = pad_right([lab for _, lab, _ in items], -100)
    images = [_image(img, size) for _, _, img in items if img is not None]
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
    from ..devices import check_device

    return torch.device(check_device(name))


def _autocast(precision: str, device: torch.device):
    import contextlib

    if precision in ("bf16", "auto") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_stage_model(cfg: dict[str, Any], records: list[dict], folder, log) -> tuple[LibMoEVLM, Any]:
    """The stage's starting model and tokenizer: the --init run's final model (upcycled for VIT) or,
    without --init, the preset's models (Hub weights where the preset names them)."""
    from .text import conversation_texts, load_tokenizer, word_tokenizer

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
        from .upcycle import upcycle_vlm

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


def probe_images(folder, size: int, per_subtask: int) -> tuple[Tensor, Tensor, list[str]] | None:
    """Held-out images (the MME split), up to `per_subtask` per category, for routing traces."""
    if not isinstance(folder, Path) or not (folder / "mme.json").is_file():
        return None
    from .data import load_mme

    rows, seen, counts = load_mme(folder / "mme.json"), set(), {}
    chosen: list[tuple[str, str]] = []
    for r in rows:
        cat = r["category"]
        if r["image"] in seen or counts.get(cat, 0) >= per_subtask:
            continue
        seen.add(r["image"])
        counts[cat] = counts.get(cat, 0) + 1
        chosen.append((r["image"], cat))
    names = sorted(counts)
    pixels = torch.stack([_image(img, size) for img, _ in chosen])
    labels = torch.tensor([names.index(c) for _, c in chosen])
    return pixels, labels, names


def train_stage(stage: str, out: str | Path, preset: str = "cpu-tiny", data: str | None = None,
                init: str | None = None, algorithm: str | None = None, max_steps: int | None = None,
                overrides: list[str] = (), device: str = "auto", overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage into `out` (resuming it if interrupted); returns its summary."""
    from ..train.checkpoint import list_checkpoints, newest_intact_checkpoint, save_checkpoint
    from ..train.metrics import MetricsLogger, load_summary
    from ..train.stops import StopSignals

    cfg = stage_config(stage, preset, data, init, algorithm, max_steps, overrides)
    dev = _device(device)  # a device this machine lacks is refused before the run directory exists
    out = Path(out)
    _check_run_dir(out, cfg, overwrite)
    tcfg = cfg["train"]
    records, folder = stage_records(cfg, log)
    torch.manual_seed(int(tcfg["seed"]))  # the new weights (a PT model, VIT's upcycled noise) come from
    # the run's seed, not from whatever drew random numbers before (e.g. writing the synthetic data)
    model, tokenizer = build_stage_model(cfg, records, folder, log)
    model.to(dev)
    from .text import encode_conversation

    size, n_img = model.pixel_size, model.n_image_tokens
    template = "plain" if stage == "pt" else cfg["template"]
    encoded = [(*encode_conversation(tokenizer, r["conversations"], template, n_img, cfg["max_length"]),
                r.get("image")) for r in records]
    bs = int(tcfg["batch_size"])
    steps_per_epoch = max(1, len(encoded) // bs)
    total = int(tcfg["max_steps"] or steps_per_epoch * int(tcfg.get("epochs") or 1))
    warmup = int(round(float(tcfg["warmup_ratio"]) * total))
    params = _trainable(model, stage)
    opt = torch.optim.AdamW(params, lr=float(tcfg["lr"]), betas=tuple(tcfg["betas"]),
                            weight_decay=float(tcfg["weight_decay"]))
    ckpt_steps = sorted({max(1, round(f * total)) for f in tcfg["checkpoint_at"]})
    start, elapsed = 0, 0.0
    rng = random.Random(int(tcfg["seed"]))
    torch.manual_seed(int(tcfg["seed"]))
    if list_checkpoints(out):  # the newest intact one: a damaged newer one is named and skipped
        latest, ck = newest_intact_checkpoint(out, log)
        from .model import load_state

        load_state(model, ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        start, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        rng.setstate(_tuple_state(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        log(f"resuming {out} from step {start}")
    write_text(out / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
    n_total = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in params)
    log(f"vlm {stage}: {n_total / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), "
        f"{len(encoded):,} records, {total} steps of {bs}, {n_img} image tokens per image")
    probe = probe_images(folder, size, int(tcfg["probe_per_subtask"])) if model.moe_layers() else None
    logger = MetricsLogger(out, total, start, tensorboard=bool(tcfg["tensorboard"]))
    order: list[int] = []
    epoch_of = lambda step: step // steps_per_epoch  # noqa: E731
    model.train()
    layers = model.moe_layers()
    counts = [torch.zeros(m.moe.router.n_slots if hasattr(m.moe.router, "n_slots") else m.moe.n_experts)
              for m in layers]
    t_log, tokens_since, window = time.perf_counter(), 0, []
    with contextlib.ExitStack() as stack:
        stack.callback(logger.close)
        signals = stack.enter_context(StopSignals())  # SIGTERM/SIGINT: checkpoint this step, stop
        for step in range(start, total):
            e, pos = epoch_of(step), step % steps_per_epoch
            if pos == 0 or not order:
                order = list(range(len(encoded)))
                random.Random(int(tcfg["seed"]) * 1000003 + e).shuffle(order)
            chosen = order[pos * bs:(pos + 1) * bs]
            batch = make_batch([encoded[i] for i in chosen], tokenizer.pad_token_id, size)
            for g in opt.param_groups:
                g["lr"] = float(tcfg["lr"]) * _lr_factor(step, total, warmup, float(tcfg["min_lr_ratio"]))
            t0 = time.perf_counter()
            with _autocast(cfg["precision"], dev):
                pixels = None if batch.pixel_values is None else batch.pixel_values.to(dev)
                result = model(batch.input_ids.to(dev), pixels, batch.attention_mask.to(dev),
                               batch.labels.to(dev))
            loss_value = float(result.loss.detach())
            if not math.isfinite(loss_value):  # stop before the update: no NaN weights, no NaN checkpoint
                raise WorkFailed(_non_finite(out, step + 1, f"the loss is {loss_value}", tcfg))
            opt.zero_grad(set_to_none=True)
            result.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, float(tcfg["grad_clip"]))
            if not math.isfinite(float(gnorm)):
                raise WorkFailed(_non_finite(out, step + 1, f"the gradient norm is {float(gnorm)}", tcfg))
            opt.step()
            elapsed += time.perf_counter() - t0
            tokens_since += batch.n_tokens
            window.append(float(result.ce.detach()))
            for c, m in zip(counts, layers):
                if m.routing is not None:
                    idx = m.routing.topk_idx.reshape(-1).cpu()
                    c += torch.bincount(idx[idx >= 0], minlength=c.numel())[: c.numel()].float()
            done = step + 1
            if done % int(tcfg["log_every"]) == 0 or done == total:
                now = time.perf_counter()
                row = {"step": done, "loss": sum(window) / len(window),
                       "aux_loss": float(result.aux_loss.detach()) if result.aux_loss is not None else 0.0,
                       **{f"aux_{k}": float(v) for k, v in result.aux.items()},
                       "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                       "tokens_per_s": tokens_since / max(1e-9, now - t_log),
                       "step_time_s": (now - t_log) / len(window), "elapsed_s": elapsed}
                if layers:
                    row["load"] = [{"layer": i, **load_summary(c)} for i, c in enumerate(counts)]
                    for c in counts:
                        c.zero_()
                logger.log(row)
                t_log, tokens_since, window = now, 0, []
            interrupted = signals.name is not None and done < total
            if done in ckpt_steps or interrupted:
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise WorkFailed(_non_finite(out, done, "the weights are not finite", tcfg))
                _save(out, done, model, tokenizer, opt, cfg, rng, elapsed, probe, save_checkpoint)
            if interrupted:
                raise Interrupted(f"interrupted by {signals.name} at step {done} of {out}; checkpoint "
                                  f"written to {out / 'checkpoints' / f'step_{done}'}; rerun the same "
                                  "command to continue.")
    summary = {"stage": stage, "steps": total, "train_time_s": round(elapsed, 2), "out": str(out)}
    if tcfg.get("eval_at_end") and isinstance(folder, Path) and (folder / "mme.json").is_file():
        from .evaluate import evaluate_vlm

        tasks = ["synth_mme"]
        results = evaluate_vlm(model.eval(), tokenizer, cfg["template"], folder, tasks,
                               subtasks=cfg["data"].get("subtasks"))
        write_json(out / "eval" / "results.json", {"results": results, "step": total}, indent=1)
        mme = results["synth_mme"]
        log(f"held-out synth_mme: acc {mme['acc']:.3f}, acc+ {mme['acc_plus']:.3f} (chance 0.5 / 0.25)")
        summary["synth_mme"] = {"acc": mme["acc"], "acc_plus": mme["acc_plus"]}
    write_json(out / "summary.json", summary, indent=1)
    return summary


def _non_finite(out: Path, step: int, what: str, tcfg: dict[str, Any]) -> str:
    """The one line of a stage stopped by a non-finite value (nothing of the step is saved)."""
    from ..train.checkpoint import latest_checkpoint

    last = latest_checkpoint(out)
    kept = f"the last checkpoint ({last.name}) is kept" if last is not None else "no checkpoint was written"
    return (f"training stopped at step {step} of {out}: {what} (train.lr={tcfg['lr']}); {kept}; lower "
            "train.lr or check the data, then rerun with --overwrite.")


def _tuple_state(state):
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state


def _save(out, step, model, tokenizer, opt, cfg, rng, elapsed, probe, save_checkpoint) -> None:
    def extras(tmp: Path) -> None:
        save_vlm(model, tokenizer, tmp, extra={"stage": cfg["stage"], "step": step})
        if probe is not None:
            from .trace import record_vlm_trace

            record_vlm_trace(model, *probe, step=step).save(tmp)
        model.train()

    state = {"step": step, "elapsed_s": elapsed, "python_rng": rng.getstate(),
             "torch_rng": torch.get_rng_state()}
    save_checkpoint(out, step, model_state(model), opt.state_dict(), state,
                    {"kind": "vlm", "stage": cfg["stage"], "config_hash": config_hash(cfg)},
                    extra_files={CONFIG_FILE: yaml.safe_dump(cfg, sort_keys=False)},
                    keep=len(cfg["train"]["checkpoint_at"]) + 1, before_rename=extras)


def _check_run_dir(out: Path, cfg: dict[str, Any], overwrite: bool) -> None:
    from ..train.rundir import RUN_FILES, remove_entries

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


def load_stage_config(run: str | Path) -> dict[str, Any]:
    """A VLM run's config.yaml; FileNotFoundError / a one-line ValueError naming the file."""
    return load_yaml(Path(run) / CONFIG_FILE, "VLM run config")

