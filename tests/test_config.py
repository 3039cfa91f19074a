"""Strict configs: unknown keys and wrong types fail with a message naming the field."""

from __future__ import annotations

import pytest

from svg_ray.config import ConfigError, flatten, from_dict
from svg_ray.models.autoencoder import AutoencoderConfig, ae_preset
from svg_ray.models.dit import DiTConfig


def test_round_trip() -> None:
    cfg = ae_preset("debug")
    again = AutoencoderConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.decoder.ch_mult == (1, 1, 2, 2, 2)  # lists come back as tuples


def test_unknown_key_names_it() -> None:
    d = ae_preset("debug").to_dict()
    d["decoder"]["chmult"] = [1, 2]
    with pytest.raises(ConfigError, match=r"autoencoder\.decoder.*unknown key.*chmult"):
        AutoencoderConfig.from_dict(d)


def test_wrong_types_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"dit\.depth: expected an integer"):
        from_dict(DiTConfig, {"depth": "28"}, "dit")
    with pytest.raises(ConfigError, match=r"dit\.learn_sigma: expected true/false"):
        from_dict(DiTConfig, {"learn_sigma": 1}, "dit")
    with pytest.raises(ConfigError, match=r"residual\.align.*not one of"):
        AutoencoderConfig.from_dict({"residual": {"align": "sometimes"}})
    assert from_dict(DiTConfig, {"mlp_ratio": 4}, "dit").mlp_ratio == 4.0  # int -> float is fine


def test_validation_in_post_init() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        from_dict(DiTConfig, {"width": 100, "heads": 16}, "dit")
    with pytest.raises(ConfigError, match="multiple of 16"):
        AutoencoderConfig.from_dict({"resolution": 100})


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
