"""Run configuration: presets from YAML, layers and dotted overrides, coercion, strict errors,
validation, save / load round trip, load_yaml."""

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from libmoe.models.config import ModelConfig
from libmoe.models.run_config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    deep_merge,
    load_yaml,
    parse_override,
    resolve_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "libmoe" / "configs"
PRESET_NAMES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_preset_files_exist():
    assert {"micro", "cpu-tiny", "paper-158m", "paper-679m"} <= set(PRESET_NAMES)


# --------------------------------------------------------------------------------------------
# presets


def test_default_preset_is_micro():
    cfg = resolve_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.preset == "micro"
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (64, 2, 512)
    assert cfg.optim.lr == pytest.approx(3e-3)
    assert cfg.train.max_steps == 50 and cfg.train.batch_size == 8
    assert cfg.data.min_val_tokens == 4096
    # fields the preset does not set keep the dataclass defaults
    assert cfg.model.algorithm == "smoe"
    assert cfg.model.rope_fraction == 0.5
    assert cfg.data.source == "embedded"
    assert cfg.train.seed == 0 and cfg.train.seq_len is None
    assert cfg.optim.no_decay == ["bias", "norm", "embed"]
    assert cfg.seq_len == 64  # train.seq_len None -> model.max_seq_len


def test_cpu_tiny_values_come_from_its_yaml():
    cfg = resolve_config(preset="cpu-tiny")
    assert cfg.preset == "cpu-tiny"
    assert cfg.model.d_model == 128 and cfg.model.n_experts == 16 and cfg.model.top_k == 4
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(2e-3)
    assert cfg.optim.warmup_steps == 30
    assert cfg.data.min_val_tokens == 65536
    assert cfg.train.max_steps == 900 and cfg.train.eval_tokens == 65536
    assert cfg.train.keep_checkpoints == 6
    assert cfg.seq_len == 128


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_matches_its_yaml_file(name):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg = resolve_config(preset=name)
    assert cfg.preset == name
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(got, float):
                assert got == pytest.approx(float(value)), f"{section}.{key}"
            else:
                assert got == value, f"{section}.{key}"


def test_preset_named_by_layer_override_or_argument():
    assert resolve_config(layers=[{"preset": "cpu-tiny"}]).model.d_model == 128
    assert resolve_config(overrides=["preset=cpu-tiny"]).model.d_model == 128
    # the explicit argument wins over the layers' preset key
    cfg = resolve_config(layers=[{"preset": "cpu-tiny"}], preset="micro")
    assert cfg.preset == "micro" and cfg.model.d_model == 64


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown preset 'cpu_tiny'") as err:
        resolve_config(preset="cpu_tiny")
    assert "cpu-tiny" in str(err.value)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config(layers=[{"preset": "nonexistent"}])


# --------------------------------------------------------------------------------------------
# layers and merging


def test_layers_later_wins_and_deep_merge_keeps_preset_fields():
    layers = [
        {"model": {"n_layers": 3}, "optim": {"lr": 0.01}},
        {"model": {"n_layers": 5, "d_model": 96}},
    ]
    before = copy.deepcopy(layers)
    cfg = resolve_config(layers=layers)
    assert cfg.model.n_layers == 5 and cfg.model.d_model == 96
    # every other model field still comes from the micro preset
    assert (cfg.model.vocab_size, cfg.model.n_heads, cfg.model.n_experts) == (512, 2, 8)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.optim.warmup_steps == 5  # preset's, untouched by the optim layer
    assert layers == before  # the caller's dicts are not modified


def test_overrides_win_over_layers():
    cfg = resolve_config(layers=[{"optim": {"lr": 0.01}}], overrides=["optim.lr=5e-3"])
    assert cfg.optim.lr == pytest.approx(0.005)
    cfg = resolve_config(overrides=["train.max_steps=7", "train.max_steps=9"])
    assert cfg.train.max_steps == 9


def test_resolving_does_not_leak_between_calls():
    resolve_config(overrides=["model.d_model=96"], preset="micro")
    assert resolve_config(preset="micro").model.d_model == 64


def test_hub_options_are_replaced_not_merged():
    cfg = resolve_config(layers=[
        {"data": {"hub": {"split": "train", "max_documents": 5}}},
        {"data": {"hub": {"split": "validation"}}},
    ])
    assert cfg.data.hub == {"split": "validation"}


def test_deep_merge_semantics():
    base = {"a": {"x": 1, "y": {"p": 1}}, "b": 2, "hub": {"k": 1}}
    snapshot = copy.deepcopy(base)
    out = deep_merge(base, {"a": {"y": {"q": 2}}, "b": {"new": 1}, "c": 3, "hub": {"j": 2}})
    assert out == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": {"new": 1}, "c": 3, "hub": {"j": 2}}
    assert base == snapshot
    assert deep_merge({"a": {"x": 1}}, {"a": 5}) == {"a": 5}


# --------------------------------------------------------------------------------------------
# dotted overrides: YAML parsing and type coercion


def test_parse_override_nests_and_parses_yaml():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_override("optim.no_decay=[bias, norm]") == {"optim": {"no_decay": ["bias", "norm"]}}
    assert parse_override("data.source=a=b") == {"data": {"source": "a=b"}}  # split at the first '='
    assert parse_override(" train.seed =4") == {"train": {"seed": 4}}
    assert parse_override("data.tokenizer=") == {"data": {"tokenizer": ""}}
    assert parse_override("data.hub={split: train, max_documents: 10}") == {
        "data": {"hub": {"split": "train", "max_documents": 10}}}


def test_lr_in_exponent_notation_is_a_float():
    assert yaml.safe_load("1e-3") == "1e-3"  # PyYAML reads this as a string ...
    cfg = resolve_config(overrides=["optim.lr=1e-3"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 0.001  # ... the config does not


@pytest.mark.parametrize("override, section, key, expected", [
    ("train.micro_batch_size=null", "train", "micro_batch_size", None),
    ("train.micro_batch_size=4", "train", "micro_batch_size", 4),
    ("train.eval_tokens=None", "train", "eval_tokens", None),
    ("train.seq_len=none", "train", "seq_len", None),
    ("data.cache_dir=null", "data", "cache_dir", None),
    ("data.cache_dir=/tmp/x", "data", "cache_dir", "/tmp/x"),
    ("optim.no_decay=[bias]", "optim", "no_decay", ["bias"]),
    ("optim.no_decay=[]", "optim", "no_decay", []),
    ("optim.no_decay=[1, 2]", "optim", "no_decay", ["1", "2"]),
    ("optim.betas=[0.8, 0.9]", "optim", "betas", [0.8, 0.9]),
    ("train.tensorboard=false", "train", "tensorboard", False),
    ("train.tensorboard=true", "train", "tensorboard", True),
    ("train.tensorboard=no", "train", "tensorboard", False),
    ("train.max_steps=2e3", "train", "max_steps", 2000),
    ("train.max_steps=12.0", "train", "max_steps", 12),
    ("model.rope_fraction=1", "model", "rope_fraction", 1.0),
    ("optim.grad_clip=0", "optim", "grad_clip", 0.0),
    ("data.source=123", "data", "source", "123"),
    ("model.algorithm=dense", "model", "algorithm", "dense"),
    ("data.hub={split: train}", "data", "hub", {"split": "train"}),
])
def test_override_coercion(override, section, key, expected):
    got = getattr(getattr(resolve_config(overrides=[override]), section), key)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=abc", r"train.max_steps='abc' is not a valid int"),
    ("train.max_steps=2.5", r"train.max_steps=2.5 is not a valid int"),
    ("train.max_steps=1.5e0", r"train.max_steps=1.5 is not a valid int"),  # not truncated to 1
    ("train.seed=1e-3", r"train.seed=0.001 is not a valid int"),  # not truncated to 0
    ("train.max_steps=null", r"train.max_steps=None is not a valid int"),
    ("train.batch_size=true", r"train.batch_size=True is not a valid int"),
    ("optim.lr=true", r"optim.lr=True is not a valid float"),
    ("optim.lr=fast", r"optim.lr='fast' is not a valid float"),
    ("train.tensorboard=maybe", r"train.tensorboard='maybe' is not a valid bool"),
    ("train.precision=[bf16]", r"is not a valid str"),
    ("data.source=null", r"data.source=None is not a valid str"),  # not the string 'None'
    ("optim.no_decay=bias", r"optim.no_decay='bias' must be a list"),
    ("optim.betas=0.9", r"must be a list"),
    ("data.hub=3", r"data.hub=3 must be a mapping"),
])
def test_wrong_types_are_errors_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(overrides=[override])


# --------------------------------------------------------------------------------------------
# strict keys


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'") as err:
        resolve_config(overrides=["optim.lrr=1"])
    assert "Did you mean" in str(err.value) and "optim.lr" in str(err.value)

    with pytest.raises(ValueError, match=r"unknown config key 'modle'") as err:
        resolve_config(overrides=["modle.d_model=3"])
    assert "Did you mean model" in str(err.value)

    with pytest.raises(ValueError, match=r"unknown config key 'train.max_step'") as err:
        resolve_config(layers=[{"train": {"max_step": 5}}])
    assert "train.max_steps" in str(err.value)

    with pytest.raises(ValueError, match=r"unknown config key 'train.foo'"):
        resolve_config(overrides=["train.foo.bar=1"])


def test_unknown_key_far_from_everything_has_no_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'zzzzqqq'\.$"):
        resolve_config(overrides=["zzzzqqq=1"])


def test_override_without_equals_sign():
    with pytest.raises(ValueError, match=r"override 'optim.lr' must look like section.key=value"):
        resolve_config(overrides=["optim.lr"])


@pytest.mark.parametrize("layer, section", [
    ({"model": 3}, "model"),
    ({"train": [1, 2]}, "train"),
    ({"optim": "fast"}, "optim"),
    ({"data": None}, "data"),
])
def test_section_given_a_scalar(layer, section):
    with pytest.raises(ValueError, match=rf"config section '{section}' must be a mapping"):
        resolve_config(layers=[layer])


def test_section_given_a_scalar_by_override():
    with pytest.raises(ValueError, match=r"config section 'model' must be a mapping, not 3"):
        resolve_config(overrides=["model=3"])


# --------------------------------------------------------------------------------------------
# validation in __post_init__


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp8", r"train.precision='fp8' is not valid; choose one of auto, fp32, bf16, fp16"),
    ("train.parallel=tp", r"train.parallel='tp' is not valid"),
    ("data.val_fraction=0.7", r"data.val_fraction=0.7 must be below 0.5"),
    ("data.val_fraction=0.5", r"must be below 0.5"),
    ("data.val_fraction=-0.1", r"data.val_fraction=-0.1 is not valid"),
    ("data.min_val_tokens=0", r"data.min_val_tokens=0 is not valid"),
    ("data.shard_tokens=0", r"data.shard_tokens=0 is not valid"),
    ("train.max_steps=0", r"train.max_steps=0 is not valid; it must be an integer >= 1"),
    ("train.micro_batch_size=0", r"train.micro_batch_size=0 is not valid"),
    ("train.seq_len=-4", r"train.seq_len=-4 is not valid"),
    ("optim.lr=-1", r"optim.lr=-1.0 is not valid"),
    ("optim.warmup_steps=-1", r"optim.warmup_steps=-1 is not valid"),
    ("optim.betas=[0.9]", r"optim.betas=\[0.9\] must be two numbers"),
    ("model.d_model=0", r"d_model=0 is not valid"),
])
def test_invalid_values_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(overrides=[override])


def test_model_level_validation_runs():
    with pytest.raises(ValueError, match="n_shared=2 must be below top_k=2"):
        resolve_config(overrides=["model.algorithm=sharede_v2", "model.n_shared=2"])
    with pytest.raises(ValueError):
        resolve_config(overrides=["model.algorithm=not_an_algorithm"])
    # boundary values that are allowed
    cfg = resolve_config(overrides=["data.val_fraction=0.0", "optim.grad_clip=0", "optim.lr=0"])
    assert cfg.data.val_fraction == 0.0 and cfg.optim.grad_clip == 0.0


def test_sections_are_typed_dataclasses():
    cfg = resolve_config()
    assert isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.optim, OptimConfig)
    assert isinstance(cfg.train, TrainConfig)
    # direct construction validates too
    with pytest.raises(ValueError, match="must be below 0.5"):
        DataConfig(val_fraction=0.9)


# --------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("preset", ["micro", "cpu-tiny", "paper-158m"])
def test_save_then_load_round_trips(tmp_path, preset):
    cfg = resolve_config(preset=preset, overrides=[
        "optim.lr=1e-3", "optim.eps=1e-10", "train.micro_batch_size=null", "train.seq_len=32",
        "optim.no_decay=[bias]", "train.tensorboard=false", "data.hub={split: train, n: 3}",
        "data.cache_dir=/tmp/cache", "model.moe_options={temperature: 0.5}", "train.seed=7",
    ])
    path = tmp_path / "config.yaml"
    cfg.save(path)
    loaded = config_from_dict(yaml.safe_load(path.read_text()))
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.preset == preset
    assert loaded.optim.eps == 1e-10 and isinstance(loaded.optim.eps, float)
    assert loaded.seq_len == 32
    # the file is plain YAML holding every section and field
    raw = yaml.safe_load(path.read_text())
    assert list(raw) == ["preset", "model", "data", "optim", "train", "init"]
    assert set(raw["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_config_from_dict_is_strict_and_uses_dataclass_defaults():
    cfg = config_from_dict({"train": {"max_steps": 3}})
    assert cfg.train.max_steps == 3
    assert cfg.model == ModelConfig()  # no preset applied here
    with pytest.raises(ValueError, match="unknown config key 'train.max_stepz'"):
        config_from_dict({"train": {"max_stepz": 3}})
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        config_from_dict({"train": {"precision": "fp8"}})


# --------------------------------------------------------------------------------------------
# load_yaml


def test_load_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path)  # a directory is not a config file

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_yaml(bad)

    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_yaml(listy)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_yaml(scalar)

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert load_yaml(empty) == {}

    good = tmp_path / "good.yaml"
    good.write_text("preset: cpu-tiny\nmodel:\n  n_layers: 3\noptim:\n  lr: 1e-3\n")
    layer = load_yaml(str(good))
    assert layer == {"preset": "cpu-tiny", "model": {"n_layers": 3}, "optim": {"lr": "1e-3"}}
    cfg = resolve_config(layers=[layer])
    assert cfg.preset == "cpu-tiny"
    assert cfg.model.n_layers == 3 and cfg.model.d_model == 128
    assert cfg.optim.lr == 0.001


def test_a_local_source_drops_the_presets_hub_options():
    """paper-158m reads SlimPajama with Hub options; choosing a local source drops them (they would
    be refused for it), while Hub options the user gives are kept and checked."""
    cfg = resolve_config([{"data": {"source": "embedded"}}], preset="paper-158m")
    assert cfg.data.source == "embedded" and cfg.data.hub == {}
    assert resolve_config(preset="paper-158m").data.hub == {"max_documents": None}
    hub = resolve_config([{"data": {"source": "hf:x/y", "hub": {"split": "train"}}}], preset="paper-158m")
    assert hub.data.hub["split"] == "train"
    kept = resolve_config(overrides=["data.source=embedded", "data.hub.split=train"], preset="paper-158m")
    assert kept.data.hub["split"] == "train"
