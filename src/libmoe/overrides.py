"""Dotted ``section.key=value`` overrides and config files, parsed and checked one way for every command.

`parse_override` turns one argument into a nested dict (the value parsed as YAML, with YAML 1.1's
exponent-without-dot numbers such as ``1e-4`` read as numbers); `check_keys` validates a nested dict
against the dotted keys a command accepts and raises a ValueError naming the unknown key and its
nearest valid ones; `load_yaml` reads a config file or says in one line why it cannot.
`libmoe train`, `prepare`, `bench`, `analyze init-std` and `vlm train` all go through here.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from .files import CorruptFileError

# A number as people type it: 3, -2, 0.5, .5, 1e-4, 2.5E+3 (YAML 1.1 reads the exponent forms
# without a dot as strings; words such as "nan" or "inf" stay strings, YAML's .nan/.inf are floats).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def did_you_mean(name: Any, valid) -> str:
    """' Did you mean a, b?' for the valid names closest to `name` (as a whole, else by its last
    dotted part, so `checkpoint_every` finds `train.checkpoint_at`), or '' when none is close."""
    valid = [str(v) for v in valid]
    name = str(name)
    near = difflib.get_close_matches(name, valid, n=3)
    if not near:
        tails: dict[str, list[str]] = {}
        for v in valid:
            tails.setdefault(v.rsplit(".", 1)[-1], []).append(v)
        for tail in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=3):
            near += tails[tail]
        near = near[:3]
    return f" Did you mean {', '.join(near)}?" if near else ""


def _numbers(value: Any) -> Any:
    """`value` with every string that reads as a number (see _NUMBER) turned into one."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def parse_value(raw: str) -> Any:
    """A command-line value parsed as YAML (``[a, b]`` a list, ``{k: v}`` a mapping, ``null``
    None); a string that reads as a number becomes one; text YAML cannot parse stays text; an
    empty value is ''."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return raw  # not YAML (e.g. "a: b: c"; "2020-13-45" fails as a date): the text itself
    return _numbers(value)


def split_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); a ValueError for anything else."""
    key, sep, raw = str(item).partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3).")
    return parts, parse_value(raw)


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (`parse_value`)."""
    parts, value = split_override(item)
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def leaves(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of the leaves of a nested dict (an empty mapping is a leaf)."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out += leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def lookup(values: Any, key: str) -> Any:
    """The value at dotted `key` ("model.moe_options") through nested mappings, or None where any
    part is missing."""
    for part in key.split("."):
        if not hasattr(values, "keys") or part not in values:
            return None
        values = values[part]
    return values


def dotted(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested dict."""
    return [key for key, _ in leaves(values, prefix)]


def check_keys(values: dict[str, Any], valid: list[str], what: str = "config key",
               open_sections: tuple[str, ...] = ()) -> None:
    """Raise ValueError for the first dotted key of `values` that is not in `valid` (a key below a
    valid section prefix in `open_sections`, such as a mapping of free options, is accepted; a
    section given an empty mapping is accepted, given anything else is refused)."""
    valid = [str(v) for v in valid]
    valid_set = set(valid)
    for key, value in leaves(values):
        if any(key.startswith(s + ".") for s in open_sections):
            continue
        below = sorted(v for v in valid_set if v.startswith(key + "."))
        if below or key in open_sections:  # a section: a mapping, never a value
            if value == {}:
                continue
            example = below[0] if below else f"{key}.NAME"
            raise ValueError(f"{key!r} is a section, not a value: set its keys (e.g. {example}=...), "
                             f"not {key}={value!r}.")
        if key in valid_set:
            continue
        raise ValueError(f"unknown {what} {key!r}.{key_hint(key, valid)}")


def key_hint(key: str, valid: list[str]) -> str:
    """' Did you mean ...?' for the dotted `key`: near matches within its section when that section
    has valid keys (else ' Valid keys of SECTION: ...'), otherwise among all valid keys."""
    valid = [str(v) for v in valid]
    section, _, name = key.rpartition(".")
    mine = sorted({v[len(section) + 1:].split(".")[0] for v in valid if v.startswith(section + ".")}) \
        if section else []
    if not mine:
        return did_you_mean(key, valid)
    near = difflib.get_close_matches(name, mine, n=3)
    if near:
        return f" Did you mean {', '.join(f'{section}.{n}' for n in near)}?"
    return f" Valid keys of {section}: {', '.join(mine)}."


def load_yaml(path: str | Path, what: str = "config file", fix: str | None = None) -> dict[str, Any]:
    """The mapping in the YAML file `path` ({} when empty); FileNotFoundError when absent, a
    one-line ValueError naming the file when it is not a YAML mapping with text keys. With `fix`
    (a file libmoe wrote, such as a run's config.yaml), that error is a CorruptFileError saying
    what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")

    def refuse(problem: str, message: str) -> ValueError:
        if fix is not None:
            return CorruptFileError(path, problem, fix)
        return ValueError(f"{what} {str(path)!r} {message}")

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise refuse("not UTF-8 text", "is not UTF-8 text; give a YAML file.") from None
    except yaml.YAMLError as err:
        problem = f"not valid YAML ({_yaml_problem(err)})"
        raise refuse(problem, f"is {problem}.") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # e.g. a date 2020-13-45
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problem = f"not valid YAML ({first})"
        raise refuse(problem, f"is {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise refuse(f"a YAML {kind}, not a mapping of sections",
                     f"must hold a mapping of sections, not a {kind}.")
    bad = _non_text_key(data)
    if bad is not None:
        raise refuse(f"the key {bad!r} is not text",
                     f"has the key {bad!r}, which is not text; keys are names such as optim or lr.")
    return data


def _non_text_key(values: dict, depth: int = 0) -> Any:
    for key, value in values.items():
        if not isinstance(key, str):
            return key
        if isinstance(value, dict) and depth < 50:
            bad = _non_text_key(value, depth + 1)
            if bad is not None:
                return bad
    return None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """YAML's error in one line: 'line L, column C: PROBLEM'."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or type(err).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())
