"""libmoe.overrides: one parser and key validator for every command's section.key=value arguments."""

from __future__ import annotations

import math

import pytest

from libmoe import overrides
from libmoe.overrides import check_keys, did_you_mean, key_hint, load_yaml, parse_override, parse_value


@pytest.mark.parametrize("raw, expected", [
    ("1e-4", 1e-4), ("3", 3), ("-2", -2), ("0.5", 0.5), (".5", 0.5), ("2.5E+3", 2500.0), ("08", 8),
    (".inf", math.inf), ("true", True), ("null", None), ("", ""), ("  ", ""),
    ("[1e-3, 2, a]", [1e-3, 2, "a"]), ("{a: 1e3}", {"a": 1000.0}), ("hf:NAME", "hf:NAME"),
    ("a: b: c", "a: b: c"),  # not YAML: the text itself
    ("2020-13-45", "2020-13-45"),  # YAML's date parser fails on it: the text, not a ValueError
    ("nan", "nan"), ("inf", "inf"),  # words stay words (YAML's .nan / .inf are the floats)
])
def test_parse_value(raw, expected):
    assert parse_value(raw) == expected
    assert type(parse_value(raw)) is type(expected)


def test_parse_override_nests_and_strips():
    assert parse_override("optim.lr=1e-3") == {"optim": {"lr": 1e-3}}
    assert parse_override(" model . moe_options.temperature = 2") == {
        "model": {"moe_options": {"temperature": 2}}}
    assert parse_override("a=x=y") == {"a": "x=y"}  # the first = splits


@pytest.mark.parametrize("item", ["optim.lr", "=3", "a..b=1", ".a=1", "a.=1", "", " = "])
def test_malformed_overrides_are_one_line_value_errors(item):
    with pytest.raises(ValueError, match=r"must look like section\.key=value") as err:
        parse_override(item)
    assert "\n" not in str(err.value)


VALID = ["train.lr", "train.max_steps", "train.checkpoint_at", "moe.top_k", "moe.n_experts",
         "model.connector"]


def test_check_keys_accepts_valid_keys_open_sections_and_empty_sections():
    check_keys({"train": {"lr": 1.0}, "moe": {"top_k": 2}}, VALID)
    check_keys({"moe": {"options": {"anything": 1}}}, VALID, open_sections=("moe.options",))
    check_keys({"train": {}}, VALID)  # an empty mapping for a section changes nothing


@pytest.mark.parametrize("values, message", [
    ({"train": {"max_step": 1}}, r"unknown config key 'train.max_step'\. Did you mean train\.max_steps\?"),
    ({"moe": {"topk": 1}}, r"'moe\.topk'\. Did you mean moe\.top_k\?"),
    ({"checkpoint_every": 2}, r"'checkpoint_every'\. Did you mean train\.checkpoint_at\?"),  # by last part
    ({"train": {"bogus_key": 5}},
     r"'train\.bogus_key'\. Valid keys of train: checkpoint_at, lr, max_steps\."),
    ({"trian": {"lr": 5}}, r"'trian\.lr'\. Did you mean train\.lr"),
    ({"train": 5}, r"'train' is a section, not a value: set its keys \(e\.g\. train\.checkpoint_at=\.\.\.\)"),
    ({"moe": {"options": 3}}, r"'moe\.options' is a section"),
    ({"model": {"connector": {"x": 1}}}, r"unknown config key 'model\.connector\.x'"),
])
def test_check_keys_refuses_with_a_near_match(values, message):
    with pytest.raises(ValueError, match=message) as err:
        check_keys(values, VALID, open_sections=("moe.options",))
    assert "\n" not in str(err.value)


def test_did_you_mean_and_key_hint():
    assert did_you_mean("smoe", ["smoe", "xmoe"]).startswith(" Did you mean smoe")
    assert did_you_mean("zzzz", ["smoe"]) == ""
    assert key_hint("train.lr", ["model.dim"]) == ""


def test_load_yaml(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 1.0e-3\n")
    assert load_yaml(good) == {"optim": {"lr": 1e-3}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    cases = {"a: b: c\n": r"not valid YAML \(line 1, column 5: mapping values are not allowed here\)",
             "- 1\n- 2\n": r"must hold a mapping of sections, not a list",
             "when: 2020-13-45\n": r"not valid YAML \(month must be in 1\.\.12\)",
             "1: 2\n": r"has the key 1, which is not text",
             "optim: {lr: [1, 2}\n": r"not valid YAML \(line 1"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            load_yaml(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_yaml(binary)


def test_train_config_parse_override_is_the_shared_one():
    from libmoe.models import run_config as config

    assert config.parse_override("optim.lr=1e-4") == overrides.parse_override("optim.lr=1e-4")
    assert config.parse_override("a.b=[1e-3]") == {"a": {"b": [1e-3]}}
