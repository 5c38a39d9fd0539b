"""Run kinds: how `libmoe analyze` recognises a run and analyses it, without analysis knowing any
model family. The language-model kind (`libmoe train`, upcycled and Hub models) is built in
(`libmoe.analysis.lm`) and is the fallback; another family registers its own kind, e.g. the VLM
(`libmoe.vlm.analysis.VLM_RUN_KIND`: held-out images by subtask as the probe set, MME scoring for
the interventions).

A kind registers in one of two ways:

- from Python, `register_run_kind(kind)` (`import libmoe.vlm` registers the VLM's);
- as an entry point, so `libmoe analyze RUN` and `libmoe.analysis.analyze_run` find it without the
  caller importing the package that provides it::

      [project.entry-points."libmoe.run_kinds"]
      vlm = "libmoe.vlm.analysis:VLM_RUN_KIND"

  Entry points are loaded on the first lookup (`find_run_kind`), once.

A kind's `analyze` composes the shared pieces (`libmoe.analysis`: `run_traces`,
`training_dynamics`, `metrics.trace_metrics`, `run_interventions` over any model whose MoE layers
it finds and the kind's own evaluation function, `write_figures_and_report`). A run whose
config.yaml declares a `kind` that no registered kind recognises is refused with the known kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from ..overrides import did_you_mean

RUN_KINDS_GROUP = "libmoe.run_kinds"  # the entry-point group of run kinds other packages provide
DEFAULT_KIND = "lm"  # what a run whose config.yaml declares no `kind` is


@dataclass(frozen=True)
class AnalysisOptions:
    """What `analyze_run` was asked for; a kind uses the options that apply to it (a VLM run has
    no --tasks or --val-tokens, for instance)."""

    tasks: tuple[str, ...] = ()
    data_dir: str | Path | None = None
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    interventions: bool | list[str] = True
    val_tokens: int | str = "run"
    init_std: dict | None = None
    figures: bool = True
    log: Callable[[str], None] | None = None


@dataclass(frozen=True)
class RunKind:
    """A family of runs `libmoe analyze` can analyse: `detect(path)` says whether a run (or
    checkpoint) directory is one; `analyze(run, out, options)` writes OUT (default RUN/analysis:
    metrics.json, figures, report.html) and returns the metrics dict."""

    name: str
    detect: Callable[[Path], bool]
    analyze: Callable[[Path, Path | None, AnalysisOptions], dict[str, Any]]
    description: str = ""


_KINDS: dict[str, RunKind] = {}
_entry_points_loaded = False


def register_run_kind(kind: RunKind) -> RunKind:
    """Add `kind` to the kinds `find_run_kind` tries (in registration order). Registering the same
    kind again is a no-op; another kind under a taken name is refused."""
    if not isinstance(kind, RunKind):
        raise TypeError(f"register_run_kind takes a RunKind, not {type(kind).__name__}.")
    known = _KINDS.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"run kind {kind.name!r} is registered already.")
    _KINDS[kind.name] = kind
    return kind


class RunKindError(ValueError):
    """A declared run kind could not be loaded (one line: the entry point, the error; exit 2)."""


def load_entry_points() -> None:
    """Register the kinds other packages declare in the `libmoe.run_kinds` entry-point group, once
    they all load; a broken one is a RunKindError at every lookup until it is fixed (never a kind
    that silently goes missing)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=RUN_KINDS_GROUP):
        try:
            kind = ep.load()
        except Exception as err:  # a broken plugin is named, not a bare traceback from its import
            raise RunKindError(f"the run kind {ep.name!r} ({ep.value}, entry-point group "
                               f"{RUN_KINDS_GROUP}) failed to load: {err}") from err
        register_run_kind(kind)
    _entry_points_loaded = True


def run_kinds() -> dict[str, RunKind]:
    """{name: kind} of every registered kind, entry points included."""
    load_entry_points()
    return dict(_KINDS)


def declared_kind(path: str | Path) -> str | None:
    """The `kind` a run's config.yaml declares (None when it has none or cannot be read: the kind's
    own loading names a damaged file)."""
    cfg = Path(path) / "config.yaml"
    try:
        data = yaml.safe_load(cfg.read_text()) if cfg.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return str(kind) if kind is not None else None


def find_run_kind(path: str | Path, default: RunKind) -> RunKind:
    """The first registered kind that recognises `path`, else `default` (the language-model kind);
    ValueError when the run declares a kind nobody registered."""
    path = Path(path)
    for kind in run_kinds().values():
        if kind is not default and kind.detect(path):
            return kind
    declared = declared_kind(path)
    if declared not in (None, default.name):
        known = sorted({default.name, *_KINDS})
        raise ValueError(f"{path} is a {declared!r} run and no analysis of that kind is registered."
                         f"{did_you_mean(declared, known)} Known kinds: {', '.join(known)}; install the "
                         f"package that provides it (entry-point group {RUN_KINDS_GROUP}) or import it "
                         "first.")
    return default
