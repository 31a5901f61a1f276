"""Typed configs: presets, YAML files, dotted overrides and readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from columnformer.config import (
    ConfigError,
    RunConfig,
    build_config,
    config_to_dict,
    deep_merge,
    load_config,
    parse_override,
)
from columnformer.factory import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    cfg = build_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.sheet.width == 64 and cfg.train.epochs == 30 and cfg.preset is None


def test_overrides_are_typed_and_applied():
    cfg = build_config(
        overrides=["train.epochs=5", "model.sheet.steps=6", "optim.lr=1e-3", "model.sheet.recurrent=false",
                   "model.geometry.shape=[2, 3]", "train.threads=null", "name=my run"]
    )
    assert cfg.train.epochs == 5
    assert cfg.model.sheet.steps == 6
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.sheet.recurrent is False
    assert cfg.model.geometry.shape == (2, 3)
    assert cfg.train.threads is None
    assert cfg.name == "my run"


def test_later_override_wins_and_overrides_beat_the_raw_dict():
    cfg = build_config({"train": {"epochs": 7, "batch_size": 8}}, ["train.epochs=2", "train.epochs=3"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 8


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("model.sheet.foo=1", "model.sheet.foo", ["width", "steps", "attn_bias", "wiring_p"]),
        ("trian.epochs=5", "trian", ["model", "data", "optim", "train"]),
        ("train.epoch=5", "train.epoch", ["epochs", "batch_size"]),
        ("model.geometry.kindd=grid", "model.geometry.kindd", ["kind", "shape", "layers"]),
    ],
)
def test_unknown_key_names_the_key_and_allowed_keys(override, key, allowed):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=[override])
    msg = str(info.value)
    assert f"unknown config key '{key}'" in msg
    assert "allowed keys here" in msg
    for a in allowed:
        assert a in msg


@pytest.mark.parametrize(
    "override,key",
    [("train.epochs=abc", "train.epochs"), ("model.sheet.width=[1, 2]", "model.sheet.width"),
     ("optim.lr=fast", "optim.lr"), ("model.sheet.recurrent=maybe", "model.sheet.recurrent")],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        build_config(overrides=[override])


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["model.pool=max"])
    msg = str(info.value)
    assert "model.pool" in msg and "'avg'" in msg and "'spatial'" in msg and "max" in msg


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.epochs=0", "train.epochs"),
        ("optim.lr=-1", "optim.lr"),
        ("model.sheet.heads=3", "divisible by heads=3"),
        ("model.sheet.attn_bias=gauss", "model.sheet.attn_bias"),
        ("train.precision=fp64", "train.precision"),
    ],
)
def test_bad_values_raise_config_error(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        build_config(overrides=[override])


def test_combination_errors_are_config_errors():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_config(overrides=["train.precision=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="time_embed"):
        build_config(overrides=["model.sheet.time_embed=true", "model.sheet.recurrent=false"])


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["train.epochs=0", "model.sheet.bogus=1"])
    assert "train.epochs" in str(info.value) and "model.sheet.bogus" in str(info.value)


# ------------------------------------------------------------------ presets
def test_preset_merging_with_override():
    cfg = build_config({"preset": "digits"}, ["model.sheet.steps=2"])
    assert cfg.preset == "digits"
    assert cfg.model.sheet.steps == 2  # overridden
    # everything else comes from the preset
    assert cfg.model.sheet.time_embed is True
    assert cfg.model.geometry.kind == "stacked"
    assert cfg.model.geometry.layers == [(4, 4), (4, 4), (4, 4)]
    assert cfg.model.patch == 2
    model = build_model(cfg.model)
    assert model.sheet.time_embed.shape == (2, 64)
    assert count_parameters(model) == 518_218 - 2 * 64  # two fewer time-embedding rows


def test_preset_given_as_override_and_nested_merge():
    cfg = build_config({"model": {"sheet": {"width": 32}}}, ["preset=digits-vit"])
    assert cfg.model.sheet.width == 32  # the file's model section beats the preset
    assert cfg.model.sheet.heads == 4 and cfg.model.sheet.value_proj is True  # kept from the preset
    assert cfg.model.input_area == "all"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'.*digits"):
        build_config({"preset": "tiny"})


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    upd = {"a": {"b": 3}}
    out = deep_merge(base, upd)
    assert out == {"a": {"b": 3, "c": [1]}, "d": 2}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 2}


# ------------------------------------------------------------------ files
def test_load_config_file_with_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("name: filetest\npreset: digits\ntrain:\n  epochs: 9\n  batch_size: 16\nmodel:\n  sheet:\n    steps: 3\n")
    cfg = load_config(f, ["train.epochs=2"])
    assert cfg.name == "filetest"
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 16
    assert cfg.model.sheet.steps == 3 and cfg.model.sheet.width == 64
    # round trip through a plain dict
    assert build_config(config_to_dict(cfg)) == cfg


def test_empty_file_gives_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(f) == build_config()
    assert load_config(None, ["train.epochs=4"]).train.epochs == 4


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_file_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_unknown_key_in_file_is_named(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate.*allowed keys here: lr"):
        load_config(f)


def test_shipped_digits_config_loads():
    path = REPO / "configs" / "digits.yaml"
    if not path.is_file():
        pytest.skip("configs/digits.yaml not present")
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    build_model(cfg.model)


# ------------------------------------------------------------------ malformed overrides
@pytest.mark.parametrize(
    "item,match",
    [
        ("train.epochs", "not of the form key=value"),
        ("=5", "empty key"),
        ("train..epochs=5", "empty key"),
        ("train.=5", "empty key"),
        ("train.epochs=[1, 2", "cannot parse value"),
    ],
)
def test_malformed_override(item, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides=[item])


def test_override_through_a_value_is_not_a_section():
    with pytest.raises(ConfigError, match="'name' is not a section"):
        build_config(overrides=["name=foo", "name.x=1"])


def test_parse_override_values():
    assert parse_override("a.b.c=3") == (["a", "b", "c"], 3)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=a=b") == (["x"], "a=b")


def test_file_that_is_not_a_mapping_with_overrides(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f, ["train.epochs=5"])
