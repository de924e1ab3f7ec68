"""QuantSpec validation and module checks."""

from __future__ import annotations

import pytest

from rqat_deploy.errors import ConfigError, ShapeError
from rqat_deploy.quant.spec import QuantSpec


def test_defaults_and_derived_fields() -> None:
    s = QuantSpec()
    assert (s.bits, s.grid, s.group_size, s.qmax, s.block_size) == (2, "uniform", 128, 3, 128)
    k = QuantSpec(bits=3, grid="kquant")
    assert (k.qmax, k.block_size, k.gguf_type) == (7, 256, "Q3_K")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"bits": 5}, "bits must be one of"),
        ({"grid": "unifrom"}, "did you mean 'uniform'"),
        ({"grid": "kquant", "bits": 4}, "use --grid uniform for 4 bits"),
        ({"group_size": 100}, "power of two"),
        ({"group_size": 8}, "power of two"),
        ({"exclude": "lm_head"}, "sequence of module-name patterns"),
    ],
)
def test_invalid_fields_raise_clear_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantSpec(**kw)


def test_spec_is_frozen() -> None:
    with pytest.raises(Exception):
        QuantSpec().bits = 3  # type: ignore[misc]


def test_from_dict_rejects_unknown_keys_with_hint() -> None:
    assert QuantSpec.from_dict({"bits": 3, "exclude": ["*.down_proj"]}) == QuantSpec(bits=3, exclude=("*.down_proj",))
    with pytest.raises(ConfigError, match="did you mean 'group_size'"):
        QuantSpec.from_dict({"group_sise": 64})


def test_check_module_names_module_size_and_fix() -> None:
    QuantSpec(group_size=64).check_module("ok", 192)
    with pytest.raises(ShapeError, match=r"'model.layers.3.mlp.down_proj' has in_features=320.*--group-size 64.*--exclude"):
        QuantSpec(group_size=128).check_module("model.layers.3.mlp.down_proj", 320)
    with pytest.raises(ShapeError, match=r"blocks of 256.*--grid uniform"):
        QuantSpec(grid="kquant").check_module("x", 384)


def test_exclude_patterns() -> None:
    s = QuantSpec(exclude=("*.down_proj", "model.layers.0.*"))
    assert s.is_excluded("model.layers.5.mlp.down_proj")
    assert s.is_excluded("model.layers.0.self_attn.q_proj")
    assert not s.is_excluded("model.layers.1.self_attn.q_proj")
