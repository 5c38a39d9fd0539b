"""Files a user keeps: atomic writes, strict JSON, checksums and one-line errors for bad files.

Every results, summary, report and state file libmoe writes goes through `write_text` /
`write_json` (a temporary file in the same directory, fsync'd, then renamed over the target), so
an interrupted write leaves the previous file intact, never a torn one. JSON is strict: a
non-finite float (NaN, inf) is written as ``null``, so every file parses with any JSON reader.
Readers that meet a damaged file raise `CorruptFileError`, a ValueError whose one sentence names
the file and what to do; the CLI prints it without a traceback and exits 2.
This module imports nothing from the rest of libmoe: every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


class CorruptFileError(ValueError):
    """A file libmoe needs exists but cannot be read (truncated, garbage, wrong format)."""

    def __init__(self, path: str | Path, what: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{str(path)!r} is damaged ({what}); {fix}")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically: a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask is process-wide and not thread-safe


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `value` (non-finite floats as null)."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write `value` as strict JSON (non-finite floats as null) to `path` atomically."""
    return write_text(path, dumps(value, indent) + "\n")


def read_json(path: str | Path, fix: str = "rerun the command that wrote it") -> Any:
    """The JSON value in `path`; FileNotFoundError if absent, CorruptFileError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(path, f"not valid JSON: {err}", fix) from None


def read_json_object(path: str | Path, fix: str = "rerun the command that wrote it") -> dict[str, Any]:
    """As `read_json`, and the value must be a JSON object."""
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise CorruptFileError(path, f"a JSON {type(value).__name__}, not an object", fix)
    return value


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
