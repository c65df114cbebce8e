"""The run config: pyproject defaults and the validator agree, and bad values name their key and range."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig, parse_node_config, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_defaults_match_the_validator() -> None:
    """`flwr run` uses pyproject's defaults, `run_simulation` the model's: they must be the same values."""
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(defaults).as_flat_dict() == RunConfig().as_flat_dict()
    assert set(defaults) == set(RunConfig().as_flat_dict())


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("hash-bits", 20, "16, 32, 64 or 128"),
    ("lr", -1.0, "greater than 0"),
    ("fraction-train", 1.5, "less than or equal to 1"),
    ("num-server-rounds", 0, "greater than or equal to 1"),
    ("no-such-key", 1, "Extra inputs"),
])
def test_bad_values_name_the_key_and_the_range(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert f"'{key}'" in str(err.value) and fragment in str(err.value)


def test_node_config_partition_must_be_below_count() -> None:
    assert parse_node_config({"partition-id": 1, "num-partitions": 2, "extra": "ok"}).partition_id == 1
    with pytest.raises(ConfigError, match="partition-id"):
        parse_node_config({"partition-id": 2, "num-partitions": 2})
