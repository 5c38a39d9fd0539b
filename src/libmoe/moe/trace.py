"""Routing traces: what every MoE layer chose for a labelled token stream, and the recorder that
captures them from any model holding libmoe MoE layers. Training writes them beside each
checkpoint (`libmoe.train.trace`), analysis reads them (`libmoe.analysis`); both import them
from here, beside the routing records they store.

On-disk format (stable; checkpoints carry one, `libmoe analyze` reads and writes it):
- ``routing_trace.safetensors``: for each MoE layer l (0.. in depth order among MoE layers)
  ``layer<l>.topk_idx`` [N, k] int64 slot ids sorted by weight (descending; -1 pads rows of
  expert-choice routing), ``layer<l>.topk_weight`` [N, k] float32 normalised weights,
  ``layer<l>.probs`` [N, R] float32 router probabilities; per token ``tokens`` [N] int64,
  ``domain`` [N] int64 (the token's label: an index into the JSON's ``domains``) and
  ``position`` [N] int64 (position in its sequence).
- ``routing_trace.json``: ``step``, ``algorithm``, ``n_experts``, ``top_k``, ``n_slots`` (R of each
  layer), ``layers`` (the model block index of each MoE layer), ``domains`` (label names),
  ``n_tokens`` and, when not corpus domains, ``label_kind`` (e.g. ``"task"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..files import CorruptFileError, read_json_object, sha256, write_bytes, write_json
from .layer import MoELayer

# A trace's two files (in a checkpoint directory): the routing tensors and their metadata.
TRACE_TENSORS = "routing_trace.safetensors"
TRACE_META = "routing_trace.json"


@dataclass
class Trace:
    """One routing trace: per MoE layer ``topk_idx`` [N, k], ``topk_weight`` [N, k], ``probs``
    [N, R]; per token ``tokens``, ``position``, ``label`` [N]; ``labels`` names the label ids."""

    topk_idx: list[Tensor]
    topk_weight: list[Tensor]
    probs: list[Tensor]
    tokens: Tensor
    position: Tensor
    label: Tensor
    labels: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.topk_idx)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    def n_slots(self, layer: int) -> int:
        return int(self.probs[layer].shape[-1])

    def select(self, mask: Tensor) -> Trace:
        """The tokens where the boolean `mask` [N] is true."""
        return replace(
            self,
            topk_idx=[t[mask] for t in self.topk_idx],
            topk_weight=[t[mask] for t in self.topk_weight],
            probs=[t[mask] for t in self.probs],
            tokens=self.tokens[mask], position=self.position[mask], label=self.label[mask],
            meta=dict(self.meta, n_tokens=int(mask.sum())),
        )

    def by_label(self) -> dict[str, Trace]:
        """{label name: the trace of its tokens} for every label with at least one token."""
        out = {}
        for i, name in enumerate(self.labels):
            mask = self.label == i
            if bool(mask.any()):
                out[name] = self.select(mask)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write routing_trace.safetensors and routing_trace.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for l in range(self.n_layers):
            tensors[f"layer{l}.topk_idx"] = self.topk_idx[l].long()
            tensors[f"layer{l}.topk_weight"] = self.topk_weight[l].float()
            tensors[f"layer{l}.probs"] = self.probs[l].float()
        tensors.update(tokens=self.tokens.long(), domain=self.label.long(), position=self.position.long())
        write_bytes(directory / TRACE_TENSORS, save({k: v.contiguous() for k, v in tensors.items()}))
        meta = dict(self.meta, n_slots=[self.n_slots(l) for l in range(self.n_layers)],
                    domains=list(self.labels), n_tokens=self.n_tokens)
        write_json(directory / TRACE_META, meta)
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace from a directory holding routing_trace.* (or the .safetensors file)."""
        path = Path(path)
        directory = path.parent if path.suffix == ".safetensors" else path
        if not (directory / TRACE_TENSORS).is_file():
            raise FileNotFoundError(f"no routing trace in {directory} (expected {TRACE_TENSORS} and "
                                    f"{TRACE_META}, as checkpoints and `libmoe analyze` write them).")
        fix = damaged_trace_fix(directory)
        _verify_checksums(directory, fix)
        try:
            tensors = load_file(str(directory / TRACE_TENSORS))
        except Exception:  # noqa: BLE001  safetensors' own error, OSError: a truncated file
            raise CorruptFileError(directory / TRACE_TENSORS, "truncated or not a safetensors file",
                                   fix) from None
        meta = read_json_object(directory / TRACE_META, fix)
        n = sum(1 for k in tensors if k.endswith(".topk_idx"))
        try:
            trace = cls(
                topk_idx=[tensors[f"layer{l}.topk_idx"] for l in range(n)],
                topk_weight=[tensors[f"layer{l}.topk_weight"] for l in range(n)],
                probs=[tensors[f"layer{l}.probs"] for l in range(n)],
                tokens=tensors["tokens"], position=tensors["position"], label=tensors["domain"],
                labels=[str(d) for d in meta.get("domains") or []], meta=meta,
            )
        except KeyError as err:
            raise CorruptFileError(directory / TRACE_TENSORS, f"it lacks the tensor {err}", fix) from None
        except TypeError:
            raise CorruptFileError(directory / TRACE_META, "its domains are not a list of names",
                                   fix) from None
        sizes = {int(t.shape[0]) for t in (*trace.topk_idx, *trace.topk_weight, *trace.probs,
                                          trace.tokens, trace.position, trace.label)}
        if n == 0 or len(sizes) != 1:
            raise CorruptFileError(directory / TRACE_TENSORS, "its layers and tokens do not line up",
                                   fix)
        return trace


def _verify_checksums(directory: Path, fix: str) -> None:
    """In a checkpoint directory, compare the trace files with the checksums its checkpoint.json
    records (a damaged checkpoint.json is left to the model loader to report)."""
    try:
        files = read_json_object(directory / "checkpoint.json").get("files")
    except (FileNotFoundError, ValueError):
        return
    if not isinstance(files, dict):
        return
    for name in (TRACE_TENSORS, TRACE_META):
        file = directory / name
        if isinstance(files.get(name), str) and file.is_file() and sha256(file) != files[name]:
            raise CorruptFileError(file, "it does not match the checksum its "
                                   "checkpoint.json records", fix)


def damaged_trace_fix(directory: Path) -> str:
    """What to do about a damaged routing trace in `directory`."""
    return (f"move {str(directory / 'routing_trace')!r}.* away to analyse without this step (the "
            "final model's trace is then recorded again), or rerun training")


def trace_meta(directory: str | Path) -> dict[str, Any]:
    """A trace's routing_trace.json (step, algorithm, run_hash, ...) without loading its tensors."""
    directory = Path(directory)
    return read_json_object(directory / TRACE_META, damaged_trace_fix(directory))


def check_one_run(traces: list[tuple[int, Path]], where: str | Path) -> None:
    """Refuse (ValueError, one line) traces that come from different runs: differing "run_hash"
    (traces without one, from before it was recorded, are accepted) or a different algorithm or
    MoE layout, as traces left behind by an earlier run in the same directory would be."""
    first: dict[str, tuple[Any, Path]] = {}
    keys = ("run_hash", "algorithm", "n_experts", "top_k", "n_slots", "layers")
    for _, directory in traces:
        meta = trace_meta(directory)
        for key in keys:
            value = meta.get(key)
            if value is None:
                continue
            if key not in first:
                first[key] = (value, directory)
            elif first[key][0] != value:
                value0, dir0 = first[key]
                raise ValueError(
                    f"{str(where)!r} holds routing traces of different runs: {dir0} has {key} "
                    f"{value0!r} but {directory} has {value!r}; rerun training into a fresh directory "
                    "(libmoe train --overwrite or a new --out), or move the stale traces away.")


def routed_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of `model`, in module order (none for a dense model)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _input_tokens(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("tokens"), kwargs.get("idx")):
        if isinstance(value, Tensor) and not value.is_floating_point():
            return value
    return None


class RoutingRecorder:
    """Capture the routing of every token a libmoe model (or any model holding MoE layers) sees.

        with RoutingRecorder(model, labels=["news", "code"]) as rec:
            rec.set_labels(0)            # label of the tokens of the next forward calls
            model(tokens)                # [B, L] token ids; every MoE layer's routing is kept
            rec.record(more_tokens, labels=1, mask=keep)   # or: run the model here, in eval mode
        trace = rec.trace(step=900)

    It reads the `routing` record each MoE layer returns (forward hooks, removed on exit), so it
    works inside DDP/FSDP wrappers and transformers models built from libmoe layers.
    `mask` [B, L] (bool) keeps only some tokens (e.g. a task's continuation, not its padding).
    """

    def __init__(self, model: nn.Module, labels: list[str] | None = None):
        self.model, self.labels = model, list(labels or ["all"])
        self.layers = routed_layers(model)
        self._hooks: list[Any] = []
        self._label: Tensor | int = 0
        self._mask: Tensor | None = None
        self._keep: Tensor | None = None  # which tokens of the current forward are kept
        self.parts: dict[str, list[Tensor]] = {"tokens": [], "position": [], "label": []}
        self.routing: list[dict[str, list[Tensor]]] = [
            {"topk_idx": [], "topk_weight": [], "probs": []} for _ in self.layers
        ]

    def __enter__(self) -> RoutingRecorder:
        if not self.layers:
            raise ValueError("the model has no MoE layers to record (a dense model has no routing).")
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_hook(self._layer_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def set_labels(self, labels: int | str | Tensor, mask: Tensor | None = None) -> None:
        """Label (an id, a name in `labels`, or ids [B] / [B, L]) and optional keep-mask [B, L]
        of the tokens of the following forward calls."""
        if isinstance(labels, str):
            if labels not in self.labels:
                self.labels.append(labels)
            labels = self.labels.index(labels)
        self._label, self._mask = labels, mask

    @torch.no_grad()
    def record(self, tokens: Tensor, labels: int | str | Tensor = 0, mask: Tensor | None = None,
               batch_size: int = 16) -> None:
        """Run the model (eval mode, no grad) over tokens [n, L] in batches and record them."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        per_row = isinstance(labels, Tensor) and labels.dim() > 0
        try:
            for s in range(0, len(tokens), batch_size):
                sl = slice(s, s + batch_size)
                self.set_labels(labels[sl] if per_row else labels, None if mask is None else mask[sl])
                self.model(tokens[sl].to(device))
        finally:
            self.model.train(was_training)
            self.set_labels(0)

    def _pre_hook(self, module, args, kwargs):
        tokens = _input_tokens(args, kwargs)
        if tokens is None:
            raise ValueError("RoutingRecorder needs the model's token ids as its first argument "
                             "(or input_ids=/tokens=) to label what it records.")
        tokens = tokens.detach().cpu()
        if tokens.dim() == 1:
            tokens = tokens[None]
        B, L = tokens.shape
        label = torch.as_tensor(self._label, dtype=torch.long)
        label = (label.view(B, 1) if label.dim() == 1 else label).expand(B, L)
        mask = torch.ones(B, L, dtype=torch.bool) if self._mask is None else self._mask.bool().cpu()
        self._keep = mask.reshape(-1)
        self.parts["tokens"].append(tokens[mask])
        self.parts["position"].append(torch.arange(L).expand(B, L)[mask])
        self.parts["label"].append(label[mask])

    def _layer_hook(self, i: int):
        def hook(module, args, output):
            routing = output.routing
            keep = self._keep
            if keep is None or keep.numel() != routing.topk_idx.shape[0]:
                raise ValueError("a recorded MoE layer saw a different number of tokens than the "
                                 "model's input; record whole-model forward calls only.")
            store = self.routing[i]
            store["topk_idx"].append(routing.topk_idx.detach().cpu()[keep])
            store["topk_weight"].append(routing.topk_weight.detach().float().cpu()[keep])
            store["probs"].append(routing.probs.detach().float().cpu()[keep])
        return hook

    def trace(self, step: int | None = None, **meta: Any) -> Trace:
        """The recorded tokens as a Trace (meta: step, algorithm, layout, plus `meta`)."""
        if not self.parts["tokens"]:
            raise ValueError("nothing was recorded: call the model inside the `with` block.")
        cat = lambda parts: torch.cat(parts) if parts else torch.empty(0)  # noqa: E731
        first = self.layers[0]
        model = self.model.module if hasattr(self.model, "module") else self.model
        cfg = getattr(model, "config", None)
        blocks = getattr(model, "blocks", None)
        ids = {id(m) for m in self.layers}  # the blocks holding the recorded MoE layers
        layer_blocks = ([i for i, b in enumerate(blocks) if any(id(m) in ids for m in b.modules())]
                        if blocks else list(range(len(self.layers))))
        info = {"step": step, "algorithm": getattr(cfg, "algorithm", first.algorithm),
                "n_experts": first.n_experts, "top_k": first.top_k, "layers": layer_blocks, **meta}
        return Trace(
            topk_idx=[cat(r["topk_idx"]) for r in self.routing],
            topk_weight=[cat(r["topk_weight"]) for r in self.routing],
            probs=[cat(r["probs"]) for r in self.routing],
            tokens=cat(self.parts["tokens"]), position=cat(self.parts["position"]),
            label=cat(self.parts["label"]), labels=list(self.labels), meta=info,
        )


def list_traces(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, directory)] of every routing trace a run kept, in step order: those beside its
    checkpoints and those of pruned checkpoints (RUN/traces/step_N)."""
    found: dict[int, Path] = {}
    for sub in ("traces", "checkpoints"):  # a checkpoint's own copy wins
        root = Path(run_dir) / sub
        if not root.is_dir():
            continue
        for path in root.glob("step_*"):
            suffix = path.name[len("step_"):]
            if suffix.isdigit() and (path / TRACE_TENSORS).is_file():
                found[int(suffix)] = path
    return sorted(found.items())
