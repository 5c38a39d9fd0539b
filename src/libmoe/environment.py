"""What decides a run's numbers besides its config, recorded so that two outputs can be compared.

On one machine libmoe is deterministic: the same command gives the same numbers (the bench's
micro preset run twice from empty caches gives identical results.json numbers; tested). Across
machines it is not: another CPU's float kernels (another vector instruction set, another number
of threads, another BLAS) round differently, training takes another path from the first step on,
and the final perplexities differ by 1-3% at the default bench's scale, the size of a second
seed's spread. Other Python or torch versions do the same, and another corpus or tokenizer
changes what is measured altogether (the embedded corpus is the installed Python's own
documentation and standard library, so each Python version trains on other text).

`environment_record(...)` collects what decides the numbers across machines: the software
(Python, torch with its CUDA and cuDNN, numpy, sentencepiece, libmoe's version and, run from a
git checkout, its commit), the machine (OS, CPU model and vector instruction set, GPUs), the
threads, the float settings (deterministic algorithms, TF32, matmul precision), and, given by the
caller, the data (the corpus's content hash, the tokenizer's hash). `compare_environments(this,
other)` lists the fields in which two records differ and says in one sentence what that means for
comparing their numbers; a record that is missing (an output of an older libmoe) makes the
comparison unknown. `libmoe bench` writes the record into results.json (`"environment"`);
`libmoe bench --compare` and `libmoe findings --compare` compare two outputs (docs/bench.md,
"Comparing numbers across machines").
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .version import __version__

__all__ = ["ENVIRONMENT_FIELDS", "IGNORED_CONFIG", "compare_environments", "comparison_lines",
           "comparison_rows", "corpus_note", "cpu_model", "environment_record", "environment_rows",
           "environment_summary", "field_value", "libmoe_commit"]

# (key in the record, dotted for nested entries; label; kind). The kinds say what a difference
# means: "data" changes what is measured, the others how the same computation is rounded.
ENVIRONMENT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("corpus.hash", "corpus hash", "data"),
    ("corpus.stream", "corpus stream (Hub dataset and options)", "data"),
    ("tokenizer.hash", "tokenizer hash", "data"),
    ("libmoe", "libmoe version", "software"),
    ("libmoe_commit", "libmoe commit", "software"),
    ("libmoe_modified", "libmoe source modified since its commit", "software"),
    ("python", "Python", "software"),
    ("torch", "torch", "software"),
    ("cuda", "CUDA", "software"),
    ("cudnn", "cuDNN", "software"),
    ("numpy", "numpy", "software"),
    ("sentencepiece", "sentencepiece", "software"),
    ("os", "OS", "machine"),
    ("arch", "architecture", "machine"),
    ("cpu", "CPU model", "machine"),
    ("cpu_capability", "CPU instruction set torch uses", "machine"),
    ("gpus", "GPUs", "machine"),
    ("cpus", "CPU cores", "threads"),
    ("torch_threads", "torch threads", "threads"),
    ("job_threads", "threads per training job", "threads"),
    ("determinism.deterministic_algorithms", "torch deterministic algorithms", "settings"),
    ("determinism.float32_matmul_precision", "float32 matmul precision", "settings"),
    ("determinism.tf32_matmul", "TF32 matmul", "settings"),
    ("determinism.tf32_cudnn", "TF32 cuDNN", "settings"),
    ("determinism.cudnn_deterministic", "cuDNN deterministic", "settings"),
    ("determinism.cudnn_benchmark", "cuDNN benchmark", "settings"),
)

# Run-config keys that change where files go or what is logged, never a number: left out when two
# outputs' configs are compared.
IGNORED_CONFIG = ("data.cache_dir", "data.num_proc", "train.tensorboard", "train.log_every",
                  "train.keep_checkpoints", "train.peak_flops")

# The measured size of a machine's effect (issue 22: the README's default bench on two machines).
MACHINE_SPREAD = "1-3%"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo; macOS: sysctl; else `platform.processor()`),
    None when none can be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                return value.strip()
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5, check=False)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
    return platform.processor() or None


def libmoe_commit() -> tuple[str | None, bool | None]:
    """(commit, modified) of the git checkout libmoe runs from: its HEAD and whether the package's
    files differ from it (tracked changes or new files); (None, None) for an installed package or
    when git cannot tell (no git, a timeout: a few seconds at most)."""
    package = Path(__file__).resolve().parent
    root = package.parent.parent if package.parent.name == "src" else package.parent
    if not (root / ".git").exists():
        return None, None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
        if head.returncode != 0 or not head.stdout.strip():
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", str(package)],
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None, None
    modified = None if status.returncode != 0 else any(
        line and not line.rstrip().endswith(".pyc") for line in status.stdout.splitlines())
    return head.stdout.strip(), modified


def _gpus() -> list[str]:
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return ["Apple MPS"]
    return []


def _determinism() -> dict[str, Any]:
    """The float settings of this process that change results (TF32 only matters on a GPU)."""
    with warnings.catch_warnings():  # newer torch deprecates allow_tf32 in favour of fp32_precision
        warnings.simplefilter("ignore")
        return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
                "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def environment_record(corpus: dict[str, Any] | None = None, tokenizer: dict[str, Any] | None = None,
                       job_threads: list[int] | None = None, commit: bool = True) -> dict[str, Any]:
    """What decides this process's numbers besides the config (see the module docstring), as
    plain JSON values. `corpus` / `tokenizer`: the data's records (`libmoe.data.corpus_record`,
    {"hash": tokenizer_fingerprint}); `job_threads`: the torch threads of each training job when
    they run elsewhere (the bench's workers); `commit`: look up libmoe's git commit."""
    cpu_capability = None
    with contextlib.suppress(AttributeError, RuntimeError):
        cpu_capability = torch.backends.cpu.get_cpu_capability()
    commit_id, modified = libmoe_commit() if commit else (None, None)
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {
        "corpus": corpus, "tokenizer": tokenizer,
        "libmoe": __version__, "libmoe_commit": commit_id, "libmoe_modified": modified,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": cuda, "cudnn": cudnn,
        "numpy": _package_version("numpy"), "sentencepiece": _package_version("sentencepiece"),
        "os": platform.platform(), "arch": platform.machine(), "cpu": cpu_model(),
        "cpu_capability": cpu_capability, "gpus": _gpus(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "job_threads": sorted(set(job_threads)) if job_threads else [torch.get_num_threads()],
        "determinism": _determinism(),
    }


def field_value(record: dict[str, Any] | None, key: str) -> Any:
    """The value at a dotted `key` of a record (None where any part is missing)."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _show(value: Any, key: str = "") -> str:
    if isinstance(value, str) and key.endswith(("hash", "commit")):
        return value[:16]  # enough to tell two apart; the record keeps the whole
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def compare_environments(this: dict[str, Any] | None, other: dict[str, Any] | None,
                         other_name: str = "the other output",
                         configs: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Whether two environment records (results.json's "environment"; None for an output written
    before libmoe recorded one) differ, and what that means for their numbers:
    {"known", "same", "differences": [{"field", "label", "kind", "this", "other"}], "summary"}.
    `configs`: the two outputs' run configs (results.json's "config"), compared key by key too
    (but for IGNORED_CONFIG): a changed config changes the numbers on any machine."""
    # a record whose making failed ({"error": ...}) tells as little as none
    this = this if isinstance(this, dict) and "error" not in this else None
    other = other if isinstance(other, dict) and "error" not in other else None
    if not isinstance(this, dict) or not isinstance(other, dict):
        missing = "this output has" if not isinstance(this, dict) else f"{other_name} has"
        if not isinstance(this, dict) and not isinstance(other, dict):
            missing = f"this output and {other_name} have"
        return {"known": False, "same": None, "differences": [], "other": other_name,
                "summary": f"unknown: {missing} no environment record (written by a libmoe older "
                "than the record), so whether they ran on the same machine, software and data is not "
                f"known; treat them as different machines: numbers differ by about {MACHINE_SPREAD} "
                "from that alone, so compare verdicts, not digits."}
    differences = []
    for key, label, kind in ENVIRONMENT_FIELDS:
        a, b = field_value(this, key), field_value(other, key)
        if a != b:
            differences.append({"field": key, "label": label, "kind": kind, "this": _show(a, key),
                                "other": _show(b, key)})
    if configs is not None:
        a, b = (_flat(c) if isinstance(c, dict) else {} for c in configs)
        for key in sorted(set(a) | set(b)):
            if key not in IGNORED_CONFIG and a.get(key) != b.get(key):
                differences.append({"field": f"config.{key}", "label": f"config {key}", "kind": "config",
                                    "this": _show(a.get(key)), "other": _show(b.get(key))})
    return {"known": True, "same": not differences, "differences": differences, "other": other_name,
            "summary": _summary(differences, this, other)}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _summary(differences: list[dict[str, Any]], this: dict[str, Any], other: dict[str, Any]) -> str:
    if not differences:
        return ("same data, config, software, machine and float settings: the numbers should be "
                "identical (libmoe is deterministic on one machine); a difference points to something "
                "not recorded here.")
    by_kind: dict[str, list[str]] = {}
    for d in differences:
        by_kind.setdefault(d["kind"], []).append(d["label"])

    def listed(kinds: tuple[str, ...]) -> str:
        return ", ".join(label for k in kinds for label in by_kind.get(k, []))

    if "data" in by_kind:
        embedded = [r.get("corpus", {}).get("python") for r in (this, other)
                    if isinstance(r.get("corpus"), dict) and r["corpus"].get("source") == "embedded"]
        why = (" (the embedded corpus is each Python's own documentation and standard library: "
               f"Python {' vs '.join(str(p) for p in embedded)})" if len(embedded) == 2
               and embedded[0] != embedded[1] else "")
        return (f"the two outputs trained on different data ({listed(('data',))}){why}: their numbers "
                "measure different text and are not comparable; compare verdicts at most.")
    if "config" in by_kind:
        return (f"the two outputs were made with different configs ({listed(('config',))}): their "
                "numbers differ for that reason alone; compare verdicts, not digits.")
    return (f"the two outputs were made on different machines, software or thread counts "
            f"({listed(('software', 'machine', 'threads', 'settings'))}): differences of about "
            f"{MACHINE_SPREAD} in perplexity are expected from float rounding alone (as large as a "
            "second seed's spread), so a one-seed difference smaller than the seed spread means "
            "nothing; compare verdicts, not digits.")


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    """A comparison as text lines: the summary, then "label: this vs other" per difference."""
    lines = [f"compared with {comparison.get('other')}: {comparison.get('summary')}"]
    lines += [f"  {d['label']}: {d['this']} vs {d['other']}" for d in comparison.get("differences") or []]
    return lines


def environment_summary(record: dict[str, Any] | None) -> str:
    """One line on an environment record: the data (corpus and tokenizer hashes, and for the
    embedded corpus the Python it came from), the software and the machine."""
    if not isinstance(record, dict):
        return "environment: not recorded (an output of an older libmoe)"
    corpus = record.get("corpus") if isinstance(record.get("corpus"), dict) else {}
    tokenizer = record.get("tokenizer") if isinstance(record.get("tokenizer"), dict) else {}
    if corpus.get("hash"):
        origin = f" from Python {corpus['python']}" if corpus.get("source") == "embedded" else ""
        data = f"corpus {corpus.get('source')}{origin} sha256:{corpus['hash'][:12]}"
    elif corpus.get("stream"):
        data = f"corpus {corpus.get('source')} (a stream, not hashed)"
    else:
        data = "corpus not recorded"
    if tokenizer.get("hash"):
        data += f", tokenizer {tokenizer['hash'][:12]}"
    commit = record.get("libmoe_commit")
    version_text = f"libmoe {record.get('libmoe')}" + (
        f" ({commit[:10]}{', modified' if record.get('libmoe_modified') else ''})" if commit else "")
    device = ", ".join(record.get("gpus") or []) or f"{record.get('cpu') or 'unknown CPU'}" + (
        f" ({record['cpu_capability']})" if record.get("cpu_capability") else "")
    threads = record.get("job_threads") or [record.get("torch_threads")]
    return (f"{data}; Python {record.get('python')}, torch {record.get('torch')}, {version_text}; "
            f"{device}, {'/'.join(str(t) for t in threads)} thread(s) per run")


def corpus_note(record: dict[str, Any] | None) -> str | None:
    """One sentence on the corpus the numbers come from (its hash, and for the embedded corpus
    the Python whose text it is), for a table's header; None when not recorded."""
    corpus = (record or {}).get("corpus") if isinstance(record, dict) else None
    if not isinstance(corpus, dict):
        return None
    if corpus.get("hash") and corpus.get("source") == "embedded":
        return (f"Corpus: the embedded corpus of Python {corpus.get('python')} (its documentation and "
                f"standard library; sha256 {corpus['hash'][:16]}). Another Python version's embedded "
                "corpus is other text, so its numbers are not comparable with these.")
    if corpus.get("hash"):
        return f"Corpus: {corpus.get('source')} (sha256 {corpus['hash'][:16]})."
    if corpus.get("stream"):
        return f"Corpus: {corpus.get('source')}, a stream (identified by name and options, not hashed)."
    return f"Corpus: {corpus.get('source')} (not hashed: {corpus.get('error', 'unknown')})."


def environment_rows(record: dict[str, Any] | None) -> list[list[str]]:
    """An environment record as a header row and rows of two cells (what, value) for a table."""
    head = ["Environment", "Value"]
    if not isinstance(record, dict):
        return [head, ["(not recorded)", "an output of a libmoe older than the record"]]
    rows = []
    corpus = record.get("corpus")
    if isinstance(corpus, dict):
        rows.append(["Corpus", _corpus_cell(corpus) if corpus.get("hash") else corpus_note(record) or "—"])
    tokenizer = record.get("tokenizer")
    if isinstance(tokenizer, dict):
        kind = tokenizer.get("source")
        kind = "trained on the training split" if kind == "train" else kind
        rows.append(["Tokenizer", f"{kind + '; ' if kind else ''}hash {tokenizer.get('hash')}"])
    commit = record.get("libmoe_commit")
    libmoe = f"libmoe {record.get('libmoe')}"
    if commit:
        libmoe += f" (commit {commit[:12]}{', modified' if record.get('libmoe_modified') else ''})"
    names = (("cuda", "CUDA"), ("cudnn", "cuDNN"), ("numpy", "numpy"), ("sentencepiece", "sentencepiece"))
    software = [f"Python {record.get('python')}", f"torch {record.get('torch')}"]
    software += [f"{name} {record[key]}" for key, name in names if record.get(key)]
    rows.append(["Software", ", ".join([*software, libmoe])])
    cpu = record.get("cpu") or "unknown CPU"
    if record.get("cpu_capability"):
        cpu += f" ({record['cpu_capability']})"
    rows.append(["Machine", f"{cpu}, {record.get('cpus')} cores; GPUs: {_show(record.get('gpus'))}; "
                 f"{record.get('os')}"])
    threads = record.get("job_threads")
    per_run = f"{'/'.join(str(t) for t in threads)} per run" if threads else "per run: unknown"
    rows.append(["Threads", f"{per_run} (torch threads of the process that wrote this: "
                 f"{record.get('torch_threads')})"])
    settings = record.get("determinism")
    if isinstance(settings, dict):
        shown = [f"{label.removeprefix('torch ')}: {_show(field_value(record, key))}"
                 for key, label, kind in ENVIRONMENT_FIELDS if kind == "settings"]
        rows.append(["Float settings", ", ".join(shown)])
    return [head, *rows]


def _corpus_cell(corpus: dict[str, Any]) -> str:
    origin = (f" (Python {corpus.get('python')}'s documentation and standard library)"
              if corpus.get("source") == "embedded" else "")
    size = ""
    if isinstance(corpus.get("documents"), int) and isinstance(corpus.get("chars"), int):
        size = f", {corpus['documents']:,} documents, {corpus['chars']:,} characters"
    return f"{corpus.get('source')}{origin}{size}; sha256 {corpus['hash']}"


def comparison_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """A comparison's differences as a header row and rows (field, this output, the other)."""
    rows = [[d["label"], d["this"], d["other"]] for d in comparison.get("differences") or []]
    return [["Differs", "This output", str(comparison.get("other"))], *rows]
