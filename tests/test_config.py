"""The run config: pyproject defaults and the validator agree, and bad values name their key and range."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig, parse_node_config, parse_run_config
from common.method_config import SECTIONS

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_defaults_match_the_validator() -> None:
    """`flwr run` uses pyproject's defaults, `run_simulation` the model's: they must be the same values."""
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(defaults).as_flat_dict() == RunConfig().as_flat_dict()
    sections = {f"{name}-{k}": v for name, section in SECTIONS.items() if section
                for k, v in section().model_dump(by_alias=True).items()}
    assert set(defaults) == set(RunConfig().as_flat_dict()) | set(sections)
    assert {k: defaults[k] for k in sections} == sections, "a method section's default differs from pyproject's"


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_every_method_parses_with_the_defaults(method: str) -> None:
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    cfg = parse_run_config({**defaults, "method": method})
    section = SECTIONS[method]
    assert cfg.options == (section() if section else cfg.options)
    assert parse_run_config(cfg.as_flat_dict()).as_flat_dict() == cfg.as_flat_dict()  # round trip


def test_a_key_of_another_method_is_an_error_naming_it() -> None:
    """`method=fedavg fedprox-mu=0.1` used to train FedProx silently; now it names the key and its method."""
    with pytest.raises(ConfigError) as err:
        parse_run_config({"method": "fedavg", "fedprox-mu": 0.1, "rcsr-router": "uniform"})
    assert "'fedprox-mu'" in str(err.value) and "method 'fedprox'" in str(err.value)
    assert "'rcsr-router'" in str(err.value)
    assert parse_run_config({"method": "fedprox", "fedprox-mu": 0.1}).options.mu == 0.1
    assert parse_run_config({"method": "fedavg", "fedprox-mu": 0.01}).method == "fedavg"  # its default: harmless


def test_a_bad_section_value_names_the_prefixed_key() -> None:
    with pytest.raises(ConfigError, match="'rcsr-router'"):
        parse_run_config({"method": "rcsr", "rcsr-router": "magic"})
    with pytest.raises(ConfigError, match="'fedprox-mu'"):
        parse_run_config({"method": "fedprox", "fedprox-mu": 0.0})
    with pytest.raises(ConfigError, match="'rcsr-no-such-knob'"):
        parse_run_config({"method": "rcsr", "rcsr-no-such-knob": 1})


def test_unknown_method_lists_the_registry() -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({"method": "fedsomething"})
    assert "'method'" in str(err.value) and all(name in str(err.value) for name in SECTIONS)


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


def test_no_common_key_looks_like_a_method_section_key() -> None:
    """Section keys are found by their `<method>-` prefix: a common key with such a prefix (`local-epochs`, if
    `local` ever gets a section) would be taken from the common config."""
    sectioned = [name for name, section in SECTIONS.items() if section]
    assert not [k for k in RunConfig().model_dump(by_alias=True) if any(k.startswith(f"{n}-") for n in sectioned)]
