"""Fuzz tests (hypothesis): the config/override parsers and the data and results loaders, fed random
strings, random YAML/JSON and random bytes. The only allowed outcomes are success or one clear line:
a ValueError (CorruptFileError included) or FileNotFoundError whose message is one non-empty line.
Any other exception (KeyError, TypeError, AttributeError, a YAML or JSON error escaping) is a bug:
the CLI would print a traceback for it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libmoe.models.run_config import RunConfig, config_from_dict
from libmoe.overrides import check_keys, load_yaml, parse_override, parse_value
from libmoe.train import resolve_config

# A fixed seed and a modest budget keep the file at about 15 s; LIBMOE_FUZZ_EXAMPLES=2000 explores more.
EXAMPLES = int(os.environ.get("LIBMOE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 60, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_line(fn, *args, **kwargs):
    """Run fn; success or ValueError/FileNotFoundError with a one-line message. Returns the error."""
    try:
        fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        assert message.strip(), f"{type(err).__name__} with an empty message"
        assert "\n" not in message, f"a multi-line message: {message!r}"
        assert "weights_only=False" not in message
        return err
    return None


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="libmoe-fuzz-") as d:
        yield Path(d)


def _fresh(scratch: Path) -> Path:
    """A new empty directory under `scratch` (hypothesis reuses the fixture across examples)."""
    return Path(tempfile.mkdtemp(dir=scratch))


# -- values --------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=12)
SECTIONS = ["model", "train", "optim", "data", "eval", "preset", "out", "init", "moe_options"]
keys = st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10))


def _run_config_keys() -> list[str]:
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], prefix + f.name + ".")

    return list(walk(RunConfig))


RUN_KEYS = _run_config_keys()
LEAF_KEYS = [k for k in RUN_KEYS if not any(o.startswith(k + ".") for o in RUN_KEYS)]
raw_values = st.one_of(st.text(max_size=16), st.sampled_from(
    ["1e-4", ".inf", "-.inf", ".nan", "null", "", "[1, 2]", "{a: 1}", "true", "0", "-1", "1.5", "[",
     "a: b: c", "2020-13-45", "!!python/object:os.system", "0x10", "1_000", "~", "[[[]]]", "'x'"]))
override_items = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(LEAF_KEYS + RUN_KEYS), raw_values),
    st.builds(lambda k, v: f"{k}={v}", st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True),
              raw_values),
)


# -- (a) the config and override parsers ---------------------------------------------------------------
@FUZZ
@given(st.text(max_size=40))
def test_parse_value_never_raises(raw):
    parse_value(raw)


@FUZZ
@given(st.lists(override_items, max_size=3))
def test_overrides_through_the_run_config(items):
    for item in items:
        one_line(parse_override, item)
    one_line(resolve_config, overrides=items, preset="micro")


@FUZZ
@given(st.dictionaries(keys, json_values, max_size=5))
def test_config_dicts_through_the_run_config(values):
    one_line(resolve_config, [values], preset="micro")
    one_line(config_from_dict, values)


@FUZZ
@given(st.one_of(st.dictionaries(keys, json_values, max_size=5).map(
    lambda d: yaml.safe_dump(d, allow_unicode=True)), json_values.map(json.dumps), st.text(max_size=80)))
def test_config_files_through_load_yaml_and_resolve(scratch, text):
    path = _fresh(scratch) / "config.yaml"
    path.write_text(text, encoding="utf-8")
    if one_line(load_yaml, path) is None:
        one_line(resolve_config, [load_yaml(path)], preset="micro")


@FUZZ
@given(st.binary(max_size=200))
def test_config_files_of_random_bytes(scratch, data):
    path = _fresh(scratch) / "config.yaml"
    path.write_bytes(data)
    if one_line(load_yaml, path) is None:
        one_line(config_from_dict, load_yaml(path))


@FUZZ
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4),
       st.lists(st.sampled_from(["a", "a.b", "b.c.d", "x"]), max_size=4))
def test_check_keys(values, valid):
    one_line(check_keys, values, valid, "key", ("x",))


VLM_KEYS = None


def _vlm_keys():
    global VLM_KEYS
    if VLM_KEYS is None:
        from libmoe.vlm.presets import valid_keys
        from libmoe.vlm.stages import stage_config

        VLM_KEYS = valid_keys(stage_config("pt", "cpu-smoke"))
    return VLM_KEYS


vlm_items = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from([
        "train.lr", "train.batch_size", "train.betas", "train.checkpoint_at", "moe.top_k", "data.subtasks",
        "model.vision.hidden_size", "stage", "train", "moe.options", "train.max_steps", "kind"]), raw_values),
    st.builds(lambda k, v: f"{k}={v}", st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True),
              raw_values),
)


@FUZZ
@given(st.lists(vlm_items, max_size=3))
def test_vlm_overrides(items):
    from libmoe.vlm.stages import stage_config

    one_line(stage_config, "pt", "cpu-smoke", overrides=items)


@FUZZ
@given(st.binary(max_size=200))
def test_vlm_run_config_of_random_bytes(scratch, data):
    from libmoe.vlm.stages import load_stage_config

    run = _fresh(scratch)
    (run / "config.yaml").write_bytes(data)
    one_line(load_stage_config, run)


# -- (b) data and results loaders ----------------------------------------------------------------------
# Shaped like the real files, so the loaders get past their first check: an eval results.json
# ({"results": {task: {metric: value}}, "config": {...}}) and a bench results.json ({"runs": [...]}).
metric_maps = st.dictionaries(st.sampled_from(["acc", "acc,none", "acc_norm,none", "ppl", "acc_stderr,none"]),
                              json_values, max_size=3)
eval_results = st.fixed_dictionaries(
    {"results": st.dictionaries(st.text(max_size=8), st.one_of(metric_maps, json_values), max_size=3)},
    optional={"config": st.one_of(json_values, st.fixed_dictionaries(
        {}, optional={"model": json_values, "model_args": json_values}))})
run_entries = st.fixed_dictionaries({"status": st.sampled_from(["ok", "failed"])}, optional={
    "name": json_values, "algorithm": json_values, "seed": json_values, "run": json_values,
    "ppl": json_values})
bench_results = st.fixed_dictionaries({"runs": st.lists(st.one_of(run_entries, json_values), max_size=3)},
                                      optional={"algorithms": json_values, "studies": json_values,
                                                "regime": json_values, "rows": json_values,
                                                "preset": json_values, "seeds": json_values})
files_content = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                          eval_results.map(lambda v: json.dumps(v).encode()),
                          bench_results.map(lambda v: json.dumps(v).encode()))


@FUZZ
@given(files_content)
def test_eval_results_loader(scratch, data):
    from libmoe.eval.table import read_results

    path = _fresh(scratch) / "results.json"
    path.write_bytes(data)
    one_line(read_results, path)


@FUZZ
@given(files_content)
def test_findings_bench_loader(scratch, data):
    from libmoe.findings.inputs import Bench

    bench = _fresh(scratch)
    (bench / "results.json").write_bytes(data)

    def load():
        b = Bench(bench)
        b.by_algorithm()
        b.studies  # noqa: B018

    one_line(load)


# Found by this file with LIBMOE_FUZZ_EXAMPLES=400: Bench (libmoe.findings.inputs) raised other than
# ValueError on these results.json contents; read_bench_results now checks the fields' types.
BENCH_CRASHES = [
    {"runs": [{"status": "ok", "seed": [None]}]},  # TypeError: int() of a list (Run.__init__)
    {"runs": [{"status": "ok", "seed": 1e400}]},  # OverflowError: int() of infinity (Run.__init__)
    {"runs": [{"status": "ok", "run": {"a" * 300: 1}}]},  # OSError: file name too long (Run.__init__)
    {"runs": [], "algorithms": 1},  # TypeError: list(1) (Bench.by_algorithm)
    {"runs": [], "studies": []},  # AttributeError: [].get (Bench.studies)
]


@pytest.mark.parametrize("results", BENCH_CRASHES, ids=lambda r: json.dumps(r)[:40])
def test_findings_bench_loader_known_inputs(scratch, results):
    from libmoe.findings.inputs import Bench

    bench = _fresh(scratch)
    (bench / "results.json").write_text(json.dumps(results))

    def load():
        b = Bench(bench)
        b.by_algorithm()
        b.studies  # noqa: B018

    one_line(load)


metrics_lines = st.lists(st.one_of(
    st.builds(lambda s, loss: json.dumps({"step": s, "loss": loss}), st.integers(0, 20), st.floats()),
    json_values.map(json.dumps), st.text(max_size=20)), max_size=6)


@FUZZ
@given(st.one_of(metrics_lines.map(lambda ls: "\n".join(ls).encode()), st.binary(max_size=200)),
       st.integers(0, 20))
def test_metrics_jsonl(scratch, data, step):
    from libmoe.train.metrics import truncate_metrics

    path = _fresh(scratch) / "metrics.jsonl"
    path.write_bytes(data)
    one_line(truncate_metrics, path, step)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".txt", ".jsonl"]))
def test_corpus_files(scratch, data, suffix):
    from libmoe.data.corpus import load_corpus

    path = _fresh(scratch) / f"data{suffix}"
    path.write_bytes(data)
    one_line(load_corpus, str(path))


record = st.one_of(json_values,
                   st.fixed_dictionaries({"text": json_values}, optional={"domain": json_values}))
jsonl_records = st.lists(record.map(json.dumps), min_size=1, max_size=4).map(
    lambda ls: "\n".join(ls).encode())


@FUZZ
@given(jsonl_records)
def test_corpus_jsonl_records(scratch, data):
    from libmoe.data.corpus import load_corpus

    path = _fresh(scratch) / "data.jsonl"
    path.write_bytes(data)
    one_line(load_corpus, str(path))


@FUZZ
@given(st.one_of(st.none(), st.binary(max_size=300)),
       st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode())))
def test_libmoe_tokenizer_directory(scratch, model, meta):
    """A libmoe tokenizer directory (tokenizer.model + its tokenizer.json) with random contents; without
    tokenizer.model the directory is read as a Hugging Face one."""
    from libmoe.data.tokenizer import load_tokenizer

    directory = _fresh(scratch)
    if model is not None:
        (directory / "tokenizer.model").write_bytes(model)
    (directory / "tokenizer.json").write_bytes(meta)
    one_line(load_tokenizer, directory)
