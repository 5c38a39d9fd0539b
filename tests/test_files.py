"""libmoe.files (atomic writes, strict JSON, one-line errors for damaged files) and libmoe.errors."""

from __future__ import annotations

import json
import math
import os

import pytest

from libmoe import errors, files
from libmoe.files import CorruptFileError


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.md"
    files.write_text(path, "first")
    files.write_text(path, "second")
    assert path.read_text() == "second"
    assert _siblings(path) == ["results.md"]


@pytest.mark.parametrize("fail_at", ["replace", "write"])
def test_a_failed_write_keeps_the_old_file_intact(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "results.json"
    files.write_json(path, {"rows": [1, 2, 3]})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail_at == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(os, "fsync", boom)  # the data is half on its way to the disk
    with pytest.raises(OSError, match="No space left"):
        files.write_json(path, {"rows": []})
    assert path.read_bytes() == before
    assert _siblings(path) == ["results.json"]  # the temporary file was removed


def test_an_interrupt_during_the_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    files.write_json(path, {"step": 10})

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(path, {"step": 11})
    assert files.read_json(path) == {"step": 10}
    assert _siblings(path) == ["summary.json"]


def test_json_is_strict(tmp_path):
    value = {"loss": math.nan, "ppl": math.inf, "low": -math.inf, "ok": 1.5,
             "rows": [math.nan, {"x": (math.inf, 2)}], "n": 3, "name": "NaN"}
    path = files.write_json(tmp_path / "s.json", value)
    text = path.read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert loaded == {"loss": None, "ppl": None, "low": None, "ok": 1.5, "rows": [None, {"x": [None, 2]}],
                      "n": 3, "name": "NaN"}
    assert files.dumps({"a": math.nan}, indent=None) == '{"a": null}'
    assert files.finite_json([1.0, math.nan]) == [1.0, None]


@pytest.mark.parametrize("data, what", [
    (b"{\"rows\": [1, 2", "not valid JSON"),
    (b"\xff\xfe\x00\x01 garbage", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"NaN-ish text", "not valid JSON"),
])
def test_read_json_on_garbage_is_one_line_naming_the_file(tmp_path, data, what):
    path = tmp_path / "results.json"
    path.write_bytes(data)
    with pytest.raises(CorruptFileError) as err:
        files.read_json(path, fix="rerun libmoe eval")
    message = str(err.value)
    assert isinstance(err.value, ValueError) and err.value.path == path
    assert message.startswith(f"{str(path)!r} is damaged ({what}") and message.endswith("; rerun libmoe eval")
    assert "\n" not in message


def test_read_json_missing_and_not_an_object(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.read_json(tmp_path / "missing.json")
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert files.read_json(path) == [1, 2]
    with pytest.raises(CorruptFileError, match=r"is damaged \(a JSON list, not an object\)"):
        files.read_json_object(path)


def test_write_bytes_and_sha256(tmp_path):
    import hashlib

    data = os.urandom(3 << 20)  # more than one read chunk
    path = files.write_bytes(tmp_path / "w.bin", data)
    assert path.read_bytes() == data
    assert files.sha256(path) == hashlib.sha256(data).hexdigest()


def test_exit_codes_and_error_classes():
    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE) == (0, 1, 2)
    assert issubclass(errors.Interrupted, errors.WorkFailed) and issubclass(errors.WorkFailed, RuntimeError)
    assert issubclass(CorruptFileError, ValueError)  # the CLI maps it to exit 2


def test_the_cli_maps_errors_to_exit_codes(monkeypatch, capsys):
    """main(): WorkFailed -> 1, ValueError / FileNotFoundError / CorruptFileError -> 2, each one line
    (a multi-line message is joined), an OSError of the machine -> 1."""
    from libmoe import cli

    def run(exc):
        monkeypatch.setattr(cli, "_cmd_algorithms", lambda args: (_ for _ in ()).throw(exc))
        rc = cli.main(["algorithms"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return rc, err.strip()

    assert run(errors.WorkFailed("2 of 8 runs failed")) == (1, "libmoe: 2 of 8 runs failed")
    assert run(errors.Interrupted("stopped at step 7")) == (1, "libmoe: stopped at step 7")
    assert run(ValueError("bad\n  value")) == (2, "libmoe: error: bad value")
    assert run(FileNotFoundError("'x' does not exist.")) == (2, "libmoe: error: 'x' does not exist.")
    assert run(CorruptFileError("a.json", "truncated", "rerun it"))[0] == 2
    assert run(PermissionError(13, "Permission denied")) == (2, "libmoe: error: [Errno 13] Permission denied")
    assert run(OSError(28, "No space left on device"))[0] == 1


def test_written_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes its temporary file 0600; the written file gets what open() gives."""
    path = files.write_text(tmp_path / "results.md", "x\n")
    plain = tmp_path / "plain.md"
    plain.write_text("x\n")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert path.stat().st_mode & 0o044  # readable by others under the usual umask 022
