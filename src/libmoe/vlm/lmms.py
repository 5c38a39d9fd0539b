"""lmms-eval integration: the model `libmoe_vlm` and libmoe's local task YAMLs.

    python -m lmms_eval --model libmoe_vlm --model_args pretrained=RUN[,device=cpu,batch_size=8] \\
        --tasks libmoe_synth_mme --include_path "$(libmoe vlm lmms-tasks-path)" --output_path OUT

Registration: lmms-eval (>= 0.7) reads the Python entry-point group ``lmms_eval.models`` when
``lmms_eval.models`` is imported; libmoe's pyproject declares ``libmoe_vlm =
"libmoe.vlm.lmms:lmms_eval_models"``, a callable returning the `ModelManifest` that points at
``libmoe.vlm.lmms.LibMoEVLMLmms``. A checkout whose metadata predates the entry point can use
``python -m libmoe.vlm.lmms ARGS`` (same arguments as ``python -m lmms_eval``), which registers the
model itself, and also exits 1 when an evaluation failed (lmms-eval 0.7.3 logs the error and exits 0).

The adapter (`LibMoEVLMLmms`):
- ``generate_until``: greedy decoding (sampling arguments are ignored with a warning), stopping at
  the tokenizer's end-of-answer tokens, at any ``until`` string (cut off) or after ``max_new_tokens``
  (default 128, model argument ``max_new_tokens``). No KV cache: every step re-runs the prompt, as
  `libmoe.vlm.evaluate.greedy_answers` does, which is cheap for short answers.
- ``loglikelihood``: the summed log-probability of the continuation's tokens after the prompt (<= 0),
  and whether greedy decoding would produce them. The continuation is the answer text (leading white
  space stripped: the run's chat template owns the separator), tokenised like
  `libmoe.vlm.text.answer_ids`, so the values equal `libmoe.vlm.evaluate.answer_logprobs`.
  lmms-eval 0.7.3 turns (float, bool) responses into strings before scoring
  (`unwrap_generation_output`); building the model installs a pass-through for them. Its built-in
  ``multiple_choice`` scoring takes the argmin (it expects the mean losses its own LLaVA returns),
  which inverts choices for a correct log-likelihood: tasks scored with log-likelihoods need their own
  ``process_results`` (as ``libmoe_synth_mme_ll`` has).
- ``generate_until_multi_round``: not supported (NotImplementedError).
- Images come from the task's ``doc_to_visual`` as PIL images and are preprocessed as
  `libmoe.vlm.data.load_image` does (RGB, bicubic resize to the model's pixel size, mean/std 0.5).
  A prompt without ``<image>`` gets one per image in front (LLaVA's convention).

The synthetic tasks read the dataset folder (holding ``mme.json``) given by ``LIBMOE_SYNTH_DIR``;
without it, the dataset the evaluated libmoe_vlm run was trained on (the synthetic one, regenerated
into the cache if missing, or a local folder holding mme.json); otherwise the default synthetic
dataset in the cache (written on first use).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import SIGLIP_MEAN, SIGLIP_STD
from .model import IMAGE_TOKEN
from .saving import load_vlm
from .stages import load_stage_config, resolve_data
from .text import TEMPLATES, _ids, answer_ids, pad_right, prompt_ids

MODEL_NAME = "libmoe_vlm"
CLASS_PATH = "libmoe.vlm.lmms.LibMoEVLMLmms"
SYNTH_ENV = "LIBMOE_SYNTH_DIR"
LMMS_EVAL_VERSION = "0.7.3"  # the version this adapter and its tasks are tested with

_run_data: dict[str, Any] | None = None  # the data section of the run the adapter loaded last


def tasks_path() -> Path:
    """The folder of libmoe's lmms-eval task YAMLs (pass it to ``--include_path``)."""
    return Path(__file__).resolve().parent / "lmms_tasks"


def lmms_eval_models():
    """The ``lmms_eval.models`` entry point: the manifest of `libmoe_vlm` (the adapter class itself is
    built only when lmms-eval asks for it)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Register `libmoe_vlm` with the running lmms-eval (for when the entry point is not installed)."""
    from lmms_eval import models

    for manifest in lmms_eval_models():
        models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
        models.AVAILABLE_SIMPLE_MODELS.setdefault(manifest.model_id, CLASS_PATH)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synth_dir() -> Path:
    """The synthetic dataset folder the libmoe_synth_* tasks read (see the module docstring)."""
    env = os.environ.get(SYNTH_ENV, "").strip()
    if env:
        folder = Path(env).expanduser()
        where = f"{SYNTH_ENV}={env}"
    else:
        data = dict(_run_data or {})
        source = str(data.get("source", "synth"))
        if _run_data and source == "synth":
            folder, where = Path(resolve_data(data, log=_log)), "the run's synthetic dataset"
        elif _run_data and (Path(source) / "mme.json").is_file():
            folder, where = Path(source), "the run's dataset folder"
        else:
            folder, where = Path(resolve_data({"source": "synth"}, log=_log)), "the default synthetic dataset"
    if not (folder / "mme.json").is_file():
        raise FileNotFoundError(f"{where}: {folder / 'mme.json'} does not exist (write the dataset with "
                                f"`libmoe vlm data synth --out DIR` and set {SYNTH_ENV}=DIR).")
    return folder


def image_tensor(image, size: int, mean=None, std=None):
    """A PIL image as `libmoe.vlm.data.load_image` returns a file: float32 [3, size, size], RGB,
    bicubic-resized, ``(x - mean) / std`` (SigLIP's 0.5 / 0.5 by default)."""
    from PIL import Image  # optional ([vlm]): only image inputs need it

    im = image.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(SIGLIP_MEAN if mean is None else mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SIGLIP_STD if std is None else std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


# -- upstream fixes --------------------------------------------------------------------------------
def _is_loglikelihood_response(x) -> bool:
    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], float | int)
            and not isinstance(x[0], bool) and isinstance(x[1], bool))


def patch_lmms_eval() -> None:
    """Two fixes to lmms-eval 0.7.3's evaluator (idempotent; called when the model is built):
    - it passes every response through `unwrap_generation_output`, which turns a loglikelihood
      (float, bool) into the string "(-1.2, False)" and so breaks every loglikelihood /
      multiple_choice task: such tuples now pass unchanged;
    - `simple_evaluate` imports ``filelock._api``, which filelock 4 no longer has (ModuleNotFoundError
      before any task runs): with filelock >= 4 that step (a cross-class singleton patch for
      filelock 3.16+) is skipped."""
    try:
        import lmms_eval.evaluator as ev
    except ImportError:  # pragma: no cover - only called with lmms-eval installed
        return
    reentrant = getattr(ev, "_enable_reentrant_filelocks", None)
    if reentrant is not None and not getattr(reentrant, "_patched", False):
        try:
            has_api = importlib.util.find_spec("filelock._api") is not None
        except ImportError:
            has_api = False
        if not has_api:
            reentrant._patched = True  # lmms-eval's own "already done" flag
    original = getattr(ev, "unwrap_generation_output", None)
    if original is None or getattr(original, "_libmoe_passthrough", False):
        return

    def unwrap_generation_output(output):
        if _is_loglikelihood_response(output):
            return output, None
        return original(output)

    unwrap_generation_output._libmoe_passthrough = True
    ev.unwrap_generation_output = unwrap_generation_output


# -- the adapter -----------------------------------------------------------------------------------
def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, list | tuple):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]


class _LibMoEVLMAdapter:
    """The body of `LibMoEVLMLmms` (which adds lmms-eval's `lmms` base class when lmms-eval is
    imported). Model arguments: ``pretrained`` (a run or checkpoint directory), ``device`` (default
    cuda if available, else cpu), ``batch_size`` (default 1), ``max_new_tokens`` (default 128),
    ``template`` (default the run's config.yaml), ``dtype`` (float32 as saved, or bfloat16 / float16)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, max_new_tokens: int = 128, template: str | None = None,
                 dtype: str | None = None, **kwargs) -> None:
        super().__init__()
        global _run_data
        unknown = {k: v for k, v in kwargs.items() if v is not None}
        if unknown:
            _log(f"libmoe_vlm: ignoring model arguments {sorted(unknown)}")
        if not pretrained:
            raise ValueError("libmoe_vlm needs --model_args pretrained=RUN (a libmoe vlm run or checkpoint).")
        path = Path(str(pretrained)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"libmoe_vlm: pretrained={pretrained}: no such run or checkpoint.")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model, self._tokenizer, self.meta = load_vlm(path, device=self._device)
        if dtype:
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"libmoe_vlm: dtype={dtype!r}; choose float32, bfloat16 or float16.")
            self._model.to(getattr(torch, dtype))
        cfg_dir = path if (path / "config.yaml").is_file() else path.parent.parent
        cfg = load_stage_config(cfg_dir) if (cfg_dir / "config.yaml").is_file() else {}
        self.template = template or cfg.get("template", "simple")
        _run_data = cfg.get("data")
        try:
            self.batch_size = max(1, int(batch_size)) if batch_size is not None else 1
        except (TypeError, ValueError):  # "auto": no memory probing here
            _log(f"libmoe_vlm: batch_size={batch_size!r} is not a number; using 1")
            self.batch_size = 1
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = getattr(self._model.lm.config, "max_position_embeddings", None)
        # the end-of-answer tokens of `greedy_answers` (whose "<|end|>" is <unk> in a word vocabulary)
        stop = {self._tokenizer.eos_token_id, self._tokenizer.convert_tokens_to_ids("<|end|>")}
        self.stop_ids = stop - {None}
        self._warned: set[str] = set()
        patch_lmms_eval()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that ``--model_args`` win over the command line's ``--batch_size`` /
        ``--device`` (lmms-eval 0.7.3 always passes ``--batch_size``, default 1, so
        ``--model_args ...,batch_size=N`` would otherwise fail with "multiple values")."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- properties lmms-eval reads --
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_sizes(self) -> dict:
        return {}

    # -- prompts and images --
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log(f"libmoe_vlm: {msg}")

    def _doc_visuals(self, doc_to_visual, task, split, doc_id) -> tuple[Any, list]:
        doc = self.task_dict[task][split][doc_id]
        visuals = _flatten(doc_to_visual(doc)) if doc_to_visual is not None else []
        for v in visuals:
            if not hasattr(v, "convert"):
                raise NotImplementedError(f"libmoe_vlm takes images only; task {task!r} gave a "
                                          f"{type(v).__name__} ({str(v)[:80]!r}).")
        return doc, visuals

    def _prompt(self, context: str, n_images: int) -> list[int]:
        """Ids of the prompt: the run's template around `context`, `n_images` expanded <image>s."""
        n_tok = self._model.n_image_tokens
        found = context.count(IMAGE_TOKEN)
        if n_images == 0:
            if found:
                raise ValueError(f"the prompt holds {found} {IMAGE_TOKEN} but the task gave no image.")
            if self.template == "plain":
                return _ids(self._tokenizer, context, 0)
            return _ids(self._tokenizer, TEMPLATES[self.template][0].format(q=context), 0)
        if found == 0 and n_images > 1:
            context = "\n".join([IMAGE_TOKEN] * n_images) + "\n" + context
        elif found not in (0, n_images):
            raise ValueError(f"the prompt holds {found} {IMAGE_TOKEN} but the task gave {n_images} images.")
        return prompt_ids(self._tokenizer, context, self.template, n_tok)

    def _pixels(self, images: list):
        if not images:
            return None
        size = self._model.pixel_size
        dtype = next(self._model.parameters()).dtype
        return torch.stack([image_tensor(im, size) for im in images]).to(self._device, dtype)

    def _forward(self, seqs: list[list[int]], images: list):
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        ids, mask = pad_right(seqs, pad)
        with torch.no_grad():
            return self._model(ids.to(self._device), self._pixels(images), mask.to(self._device)).logits

    # -- lmms API --
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, is it the greedy continuation) per request."""
        items = []
        for req in requests:
            args = req.args
            if len(args) == 2:  # acc_mutual_info's unconditional requests: (context, continuation)
                context, target, visuals = args[0], args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = args[:6]
                doc, visuals = self._doc_visuals(doc_to_visual, task, split, doc_id)
                if callable(target):
                    target = target(doc)
            if isinstance(target, list | tuple):
                target = target[0]
            cont = answer_ids(self._tokenizer, str(target).lstrip(), self.template)
            if not cont:
                raise ValueError(f"continuation {target!r} has no tokens.")
            items.append((self._prompt(str(context), len(visuals)), cont, visuals))
        out: list[tuple[float, bool]] = []
        self._model.eval()
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            logits = self._forward([p + a for p, a, _ in chunk], [v for *_, vs in chunk for v in vs])
            logp = F.log_softmax(logits.float(), dim=-1)
            for b, (p, a, _) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(a), device=logp.device)
                tgt = torch.tensor(a, device=logp.device)
                ll = float(logp[b, pos, tgt].sum())
                greedy = bool((logp[b, pos].argmax(-1) == tgt).all())
                out.append((ll, greedy))
        return out

    def _gen_settings(self, gen_kwargs: dict | None) -> tuple[list[str], int]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
        max_new = int(gen_kwargs.pop("max_new_tokens", None) or self.max_new_tokens)
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            self._warn_once("sample", "sampling is not supported; decoding greedily")
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            self._warn_once("beams", "beam search is not supported; decoding greedily")
        return until, max_new

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut at the first `until` string, at most `max_new_tokens` tokens."""
        rows = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            _, visuals = self._doc_visuals(doc_to_visual, task, split, doc_id)
            until, max_new = self._gen_settings(gen_kwargs)
            rows.append((self._prompt(str(context), len(visuals)), visuals, until, max_new))
        self._model.eval()
        answers: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            answers += self._generate(rows[start : start + self.batch_size])
        return answers

    def _generate(self, rows: list[tuple[list[int], list, list[str], int]]) -> list[str]:
        seqs = [list(p) for p, *_ in rows]
        new: list[list[int]] = [[] for _ in rows]
        texts = ["" for _ in rows]
        active = list(range(len(rows)))
        for b, (p, _, _, max_new) in enumerate(rows):
            if max_new <= 0 or (self.max_length and len(p) >= self.max_length):
                active.remove(b)
        while active:
            logits = self._forward([seqs[b] for b in active], [v for b in active for v in rows[b][1]])
            still = []
            for i, b in enumerate(active):
                tok = int(logits[i, len(seqs[b]) - 1].argmax())
                if tok in self.stop_ids:
                    continue
                new[b].append(tok)
                seqs[b].append(tok)
                texts[b] = self._tokenizer.decode(new[b], skip_special_tokens=True)
                until, max_new = rows[b][2], rows[b][3]
                cut = min((texts[b].find(u) for u in until if u in texts[b]), default=-1)
                if cut >= 0:
                    texts[b] = texts[b][:cut]
                    continue
                if len(new[b]) >= max_new or (self.max_length and len(seqs[b]) >= self.max_length):
                    continue
                still.append(b)
            active = still
        return texts

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("libmoe_vlm does not support multi-round generation "
                                  "(generate_until_multi_round tasks); use single-turn generate_until tasks.")


_CLASS = None


def _build_class():
    global _CLASS
    if _CLASS is None:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as e:
            raise ImportError(f"libmoe.vlm.lmms.LibMoEVLMLmms needs lmms-eval: pip install --no-deps "
                              f"lmms-eval=={LMMS_EVAL_VERSION} && pip install 'libmoe[lmms-runtime]' "
                              "(docs/vlm.md, section lmms-eval)") from e
        _CLASS = type("LibMoEVLMLmms", (_LibMoEVLMAdapter, lmms),
                      {"__module__": __name__, "__qualname__": "LibMoEVLMLmms",
                       "__doc__": "lmms-eval model `libmoe_vlm`. " + (_LibMoEVLMAdapter.__doc__ or "")})
    return _CLASS


def __getattr__(name: str):
    # LibMoEVLMLmms subclasses lmms-eval's `lmms`: built on first access so that importing this
    # module (tasks_path, the entry point) never needs lmms-eval.
    if name == "LibMoEVLMLmms":
        return _build_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- launcher ----------------------------------------------------------------------------------------
def main(argv: Iterable[str] | None = None) -> int:
    """``python -m libmoe.vlm.lmms ARGS``: lmms-eval's command line with `libmoe_vlm` registered;
    returns 1 when an evaluation raised or produced no results (lmms-eval itself exits 0)."""
    import lmms_eval.__main__ as lmms_main

    register()
    argv = list(sys.argv[1:] if argv is None else argv)
    outcomes: list[bool] = []
    single = lmms_main.cli_evaluate_single

    def cli_evaluate_single(args=None):
        try:
            results, samples = single(args)
        except BaseException:
            outcomes.append(False)
            raise
        outcomes.append(results is not None)
        return results, samples

    lmms_main.cli_evaluate_single = cli_evaluate_single
    saved = sys.argv
    sys.argv = ["lmms-eval", *argv]
    try:
        from lmms_eval.cli.dispatch import main as dispatch

        dispatch()
    except SystemExit as e:  # listing commands (--tasks list) exit on purpose
        if e.code not in (None, 0):
            return int(e.code) if isinstance(e.code, int) else 1
        return 0 if all(outcomes) else 1
    finally:
        sys.argv = saved
        lmms_main.cli_evaluate_single = single
    if not outcomes or not all(outcomes):
        _log("libmoe.vlm.lmms: the evaluation failed (see the error above); exit status 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
