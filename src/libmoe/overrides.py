"""Dotted ``section.key=value`` overrides, parsed and checked one way for every command.

`parse_override` turns one argument into a nested dict (the value parsed as YAML, with YAML 1.1's
exponent-without-dot numbers such as ``1e-4`` read as numbers); `check_keys` validates a nested dict
against the dotted keys a command accepts and raises a ValueError naming the unknown key and its
nearest valid ones. `libmoe train`, `vlm train`, `bench`, `eval` and `analyze` all go through here.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml


def did_you_mean(name: Any, valid) -> str:
    """' Did you mean a, b?' for the valid names closest to `name`, or '' when none is close."""
    near = difflib.get_close_matches(str(name), list(valid), n=3)
    return f" Did you mean {', '.join(near)}?" if near else ""


def parse_value(raw: str) -> Any:
    """A command-line value parsed as YAML; a string that reads as a number becomes one."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}, the value parsed as YAML."""
    key, sep, raw = str(item).partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3).")
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part.strip(), {})
    node[parts[-1].strip()] = parse_value(raw)
    return out


def dotted(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested dict."""
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            keys += dotted(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def check_keys(values: dict[str, Any], valid: list[str], what: str = "config key",
               open_sections: tuple[str, ...] = ()) -> None:
    """Raise ValueError for the first dotted key of `values` that is not in `valid` (a key below a
    valid section prefix in `open_sections`, such as a mapping of free options, is accepted)."""
    valid_set = set(valid)
    for key in dotted(values):
        if key in valid_set or any(key.startswith(s + ".") for s in open_sections):
            continue
        if any(v.startswith(key + ".") for v in valid_set):  # an empty section: fine
            continue
        raise ValueError(f"unknown {what} {key!r}.{did_you_mean(key, valid)}")
