"""What a bench output directory holds and how the bench keeps it safe (docs/bench.md, "Guarantees").

The bench marks what it writes: ``results.json`` carries a ``"libmoe"`` object (the writer and its
version), ``results.md`` starts with a generator comment, ``report.html`` has a generator ``<meta>``,
and ``OUT/.libmoe-bench`` (the manifest) records the SHA-256 of every table and report it wrote.
Before any work `check_out_dir` refuses an ``--out`` that is a file or that holds one of these
output files without the bench's mark (a user's own results.md is never overwritten); outputs of
earlier libmoe versions, recognisable by their layout, are accepted. Every file goes through
`libmoe.files` (atomic, strict JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data import corpus_record, tokenizer_fingerprint
from ..environment import environment_record
from ..files import dumps, read_json, sha256, write_json, write_text
from ..train.rundir import RUN_FILES, remove_entries
from ..version import __version__

MANIFEST = ".libmoe-bench"
OUTPUT_FILES = ("results.json", "results.md", "results.csv", "report.html")
WRITER = "libmoe bench"
MD_MARK = f"<!-- written by {WRITER} {__version__}; rerunning the bench rewrites this file -->"
HTML_MARK = f'<meta name="generator" content="{WRITER} {__version__}">'
# Per-run files of a bench run directory besides a run's own (train.rundir.RUN_FILES, which
# include eval/, analysis/ and traces/): what `--overwrite` may remove from a run it redoes.
RUN_ENTRIES = ("bench_run.json", "bench.log", "bench_config.yaml", "bench_init.json",
               "bench_init_ppl.json", "summary.json")
# results.json's numbers that measure time, speed or memory, not the model: the only ones that
# differ between two runs of the same command on one machine (with their "<key>_std" over seeds).
# Every other number (perplexities, losses, task scores, routing metrics, the findings' estimates
# and intervals) is identical (tests/bench/test_reproducible.py; docs/bench.md).
TIMING_FIELDS = ("elapsed_s", "train_time_s", "tokens_per_s", "step_time_s", "mfu", "peak_mem_mb",
                 "latency_ms")


def writer_stamp() -> dict[str, Any]:
    """results.json's "libmoe" entry: who wrote the file."""
    return {"writer": WRITER, "version": __version__}


def _manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        value = read_json(path)
    except ValueError:
        return {}  # a damaged manifest only loses the hashes; the files' own marks still count
    return value if isinstance(value, dict) else {}


def _record(out: Path, name: str) -> None:
    manifest = _manifest(out)
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    files[name] = sha256(out / name)
    write_json(out / MANIFEST, {"libmoe": writer_stamp(), "files": files})


def start_manifest(out: Path) -> None:
    """Mark `out` as a bench output (before the first run starts)."""
    manifest = _manifest(out)
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    write_json(out / MANIFEST, {"libmoe": writer_stamp(), "files": files})


def write_output_text(out: str | Path, name: str, text: str) -> Path:
    """Write OUT/`name` atomically and record its hash in the manifest."""
    out = Path(out)
    path = write_text(out / name, text)
    _record(out, name)
    return path


def write_output_json(out: str | Path, name: str, value: dict[str, Any]) -> Path:
    """Write OUT/`name` (a bench results.json) as strict JSON with the writer's stamp."""
    value = {"libmoe": writer_stamp(), **{k: v for k, v in value.items() if k != "libmoe"}}
    return write_output_text(out, name, dumps(plain_json(value), indent=1) + "\n")


def plain_json(value: Any) -> Any:
    """`value` with what JSON cannot hold (paths, numpy scalars) as text."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def _is_ours(out: Path, name: str, hashes: dict[str, Any]) -> bool:
    """Whether OUT/`name` is as the bench (or `libmoe findings`) last wrote it: its hash in the
    manifest when one is recorded (a file edited since, e.g. notes appended to results.md, is the
    user's now), else its mark or an earlier libmoe version's layout."""
    path = out / name
    if hashes.get(name):
        return hashes[name] == sha256(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if name == "results.json":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        if not isinstance(value, dict):
            return False
        stamp = value.get("libmoe")
        legacy = {"preset", "rows", "runs"} <= set(value)  # written before the stamp existed
        return (isinstance(stamp, dict) and stamp.get("writer") == WRITER) or legacy
    if name == "results.md":
        return text.startswith(f"<!-- written by {WRITER}") or text.startswith("# libmoe bench")
    if name == "report.html":
        head = text[:4000]
        return f'<meta name="generator" content="{WRITER}' in head or "<title>libmoe bench" in head
    if name == "results.csv":
        first = text.split("\n", 1)[0].rstrip("\r")
        return first.startswith("algorithm,status,seeds,") or (first.startswith("Algorithm,")
                                                              and first.endswith("AVG Rank↓"))
    return False


def check_out_dir(out: str | Path) -> None:
    """Refuse an `--out` that is a file, or that holds a results/report file the bench did not
    write (ValueError, one line; nothing is touched)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory.")
    if not out.is_dir():
        return
    hashes = _manifest(out).get("files")
    hashes = hashes if isinstance(hashes, dict) else {}
    foreign = [n for n in OUTPUT_FILES if (out / n).exists() and not ((out / n).is_file()
                                                                      and _is_ours(out, n, hashes))]
    if foreign:
        raise ValueError(f"--out {str(out)!r} holds {', '.join(foreign)} that libmoe bench did not write; "
                         "give a new --out or move those files away (the bench never overwrites them).")


def remove_outputs(out: str | Path) -> None:
    """Remove the study-level files of an earlier bench in `out` (its tables, report and
    cross-run analysis; `check_out_dir` has made sure they are the bench's)."""
    out = Path(out)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("metrics.json", "figures"):
        path = out / "analysis" / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    with contextlib.suppress(OSError):
        (out / "analysis").rmdir()


def remove_run(run_dir: str | Path) -> None:
    """Remove what libmoe wrote in one run directory (the trainer's files and the bench's);
    anything else is left where it is, and the directory goes when it is empty."""
    run = Path(run_dir)
    remove_entries(run, (*RUN_FILES, *RUN_ENTRIES))
    with contextlib.suppress(OSError):
        run.rmdir()


def machine_info() -> dict[str, Any]:
    """results.json's "machine": Python, torch, CPUs and threads, platform, and the GPU if any."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def without_timings(value: Any) -> Any:
    """`value` (results.json's content, or any part of it) without TIMING_FIELDS and their
    "<key>_std" at any depth: what two runs of the same command on one machine give identically."""
    timing = set(TIMING_FIELDS) | {f"{k}_std" for k in TIMING_FIELDS}
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in timing}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def environment_info(config: dict[str, Any] | None, run_dirs: list[str | Path],
                     job_threads: list[int] | None = None) -> dict[str, Any]:
    """results.json's "environment" (`libmoe.environment.environment_record`): this machine and
    its software, the runs' threads (`job_threads`), and the data the runs read: the corpus's
    record (content hash; `libmoe.data.corpus_record`) of the run config's data.source, read again
    here, and the hash of the tokenizer the first of `run_dirs` that has one trained with. A
    regime whose runs have no data.source (vlm) records no corpus; a source that cannot be read
    now records its error instead of a hash."""
    data = (config or {}).get("data")
    data = data if isinstance(data, dict) else {}
    corpus = None
    if data.get("source"):
        try:
            corpus = corpus_record(str(data["source"]), data.get("hub") or None)
        except (OSError, ValueError) as err:  # e.g. a corpus directory moved since the runs trained
            corpus = {"source": str(data["source"]), "hash": None, "error": f"{type(err).__name__}: {err}"}
    tokenizer = None
    for run in run_dirs:
        path = Path(run) / "tokenizer"
        if path.is_dir() and any(path.iterdir()):
            tokenizer = {"source": data.get("tokenizer"), "hash": tokenizer_fingerprint(path)}
            break
    return environment_record(corpus, tokenizer, job_threads)
