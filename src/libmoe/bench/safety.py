"""What keeps a study's results safe: the checks a bench makes before any work (every run's config
and model, runs in --out made with another config), signal handling (SIGTERM stops a study as Ctrl-C
does; the last files are written with both held off) and the one-line summary of failed runs.
See docs/bench.md, Guarantees."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import read_json
from ..models import config_from_dict
from ..overrides import load_yaml
from ..train import check_config, config_diff

if TYPE_CHECKING:
    from .spec import RunSpec

RUN_FILE = "bench_run.json"
# Keys whose change leaves a run what it was: the vocabulary the tokenizer fixes, where the data
# cache lives (a finished run is then re-evaluated, not refused).
NOT_A_DIFFERENCE = ("model.vocab_size:", "data.cache_dir:")


def saved_row(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN/bench_run.json, or None when absent or unreadable (the run is then redone)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        row = read_json(path)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def check_spec(spec: RunSpec) -> None:
    """Everything about one run that is knowable without data: its config validates and its
    model (every MoE layer's options) builds, on the meta device (no memory, no time)."""
    try:
        nnodes = int((spec.torchrun or {}).get("nnodes") or 1)
        world = spec.nproc * nnodes if spec.launcher in ("torchrun", "slurm") else 1
        check_config(config_from_dict(spec.config), world)
    except ValueError as err:
        raise ValueError(f"run {spec.name}: {err}") from None


def stale_runs(specs: list[RunSpec]) -> list[tuple[RunSpec, list[str]]]:
    """The runs of `specs` whose directory holds a run (started or finished) made with another
    config, each with its differences (``key: old -> new``)."""
    stale = []
    for spec in specs:
        run = Path(spec.run_dir)
        diff: list[str] = []
        saved = run / "config.yaml"
        if saved.is_file():
            try:
                old = load_yaml(saved)
            except ValueError:
                old = None
            if old is None:
                diff = [f"its {saved.name} is unreadable"]
            else:
                diff = [d for d in config_diff(old, spec.config) if not d.startswith(NOT_A_DIFFERENCE)]
        else:
            row = saved_row(run)
            if row and row.get("status") == "ok" and row.get("config_hash") != spec.config_hash:
                diff = [f"config hash {row.get('config_hash')} -> {spec.config_hash}"]
        stamp_file = run / "bench_init.json"
        if spec.prepare and stamp_file.is_file():
            try:
                stamp = read_json(stamp_file)
            except ValueError:
                stamp = None
            wanted = {"source_hash": spec.prepare.get("source_hash"), "upcycle": spec.prepare.get("upcycle")}
            if stamp != wanted:
                diff.append("the source model or upcycling it starts from")
        if diff:
            stale.append((spec, diff))
    return stale


@contextlib.contextmanager
def signals_ignored():
    """SIGTERM and SIGINT held off while a few last files are written (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (how clusters preempt jobs) stops the study as SIGINT does: a KeyboardInterrupt in
    the main thread, outside training; inside training, the trainer's own handler checkpoints and
    raises Interrupted. A SIGINT ignored by the caller (a background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s, handler in old.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def failure_line(results: dict[str, Any], out: str | Path) -> str | None:
    """One line on the failed runs of a finished study (None when every run succeeded): how many
    of how many, which, and where their errors are."""
    failed = results.get("failed") or []
    if not failed:
        return None
    total = results.get("n_runs") or len(results.get("runs") or []) or len(failed)
    names = ", ".join(str(f.get("name")) for f in failed[:4]) + (", ..." if len(failed) > 4 else "")
    return (f"{len(failed)} of {total} bench run(s) failed ({names}); the errors are in "
            f"{Path(out) / 'results.md'} (Failed runs) and each run's {RUN_FILE}; rerunning retries them.")
