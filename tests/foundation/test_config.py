from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from edsft.config import DEFAULT_CONFIG_PATH, Config, ConfigError, config_from_dict, config_hash, load_config

ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_required_configs_are_shipped():
    names = {p.name for p in JOB_CONFIGS}
    assert {"quickstart.yaml", "smoke.yaml"} <= names


def test_jobs_quickstart_is_the_embedded_default():
    assert (ROOT / "jobs/configs/quickstart.yaml").read_text() == DEFAULT_CONFIG_PATH.read_text()
    assert load_config() == load_config(ROOT / "jobs/configs/quickstart.yaml")


def test_overrides_are_typed():
    cfg = load_config(None, ["selection.budget=500", "training.lr=1e-4", "sweep.budgets=[10, 20]",
                             "training.max_steps=null", "selection.params={metric: euclidean}", "pool.path=/x.jsonl"])
    assert cfg.selection.budget == 500
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.sweep.budgets == (10, 20)
    assert cfg.training.max_steps is None
    assert cfg.selection.params == {"metric": "euclidean"}
    assert cfg.pool.path == "/x.jsonl"


def test_errors_are_collected_and_name_field_value_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["selection.budget=0", "training.backend=jax", "selection.nmae=x", "pool.max_bad_fraction=2"])
    msgs = e.value.problems
    assert "selection.budget=0 must be >= 1" in msgs
    assert any("training.backend='jax'" in m and "deepspeed" in m for m in msgs)
    assert any("selection.nmae" in m and "did you mean 'selection.name'" in m for m in msgs)
    assert any("pool.max_bad_fraction=2" in m and "<= 1" in m for m in msgs)
    assert len(msgs) == 4


def test_unknown_section_and_bad_types():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"selectoin": {"budget": 3}, "training": {"lr": "fast", "lora": "yes"}})
    text = str(e.value)
    assert "did you mean 'selection'" in text
    assert "training.lr='fast' must be a number" in text
    assert "training.lora='yes' must be true or false" in text


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["selection.budget"])
    with pytest.raises(ConfigError, match="needs a section"):
        load_config(None, ["budget=3"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("pool: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_config_is_frozen_and_hash_is_stable():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.selection.budget = 3  # type: ignore[misc]
    assert config_hash(cfg) == config_hash(load_config())
    other = cfg.replace(**{"selection.budget": 7})
    assert other.selection.budget == 7
    assert config_hash(cfg, ("pool",)) == config_hash(other, ("pool",))
    assert config_hash(cfg, ("selection",)) != config_hash(other, ("selection",))


def test_round_trip_through_yaml():
    from edsft.config import to_yaml

    cfg = load_config(ROOT / "jobs/configs/smoke.yaml")
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
