from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from edsft.config import DEFAULT_CONFIG_PATH, Config, ConfigError, config_from_dict, config_hash, load_config

ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
# every YAML edsft ships: the job configs and the embedded default(s) inside the package
SHIPPED_CONFIGS = sorted(
    p for d in ("jobs/configs", "edsft/configs") for ext in ("yaml", "yml") for p in (ROOT / d).glob(f"*.{ext}")
)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_and_validates(path):
    from edsft.distributed.sweep import expand_grid
    from edsft.validate import check_config

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    check_config(cfg)  # selector names and params, sweep grid, metric: what `edsft run` checks before any stage
    if cfg.sweep.enabled:
        specs, _ = expand_grid(cfg)
        assert specs and {s["selector"] for s in specs} >= {"random"}


def test_shipped_configs_are_found():
    names = {str(p.relative_to(ROOT)) for p in SHIPPED_CONFIGS}
    assert {"jobs/configs/quickstart.yaml", "jobs/configs/smoke.yaml", "edsft/configs/quickstart.yaml"} <= names


def test_quickstart_is_the_demo_the_readme_describes():
    """Random vs facility location (the default selector) on the MiniLM embedding, 3 seeds (intervals,
    and no "two seeds: indicative" caveat), random also beyond the selector's largest budget (each
    selector budget has a random-equivalent inside random's curve), loss."""
    from edsft.config import SelectionConfig
    from edsft.distributed.sweep import expand_grid

    cfg = load_config()
    assert cfg.sweep.enabled and cfg.sweep.metric == "loss" and len(cfg.sweep.seeds) >= 3
    assert set(cfg.sweep.selectors) == {"random", "facility_location"}
    assert cfg.selection.name == "facility_location" == SelectionConfig().name  # the demo shows the default
    assert cfg.selection.embedding == "embedding_encoder"
    assert cfg.scoring.encoder == "builtin:minilm"
    assert min(cfg.sweep.random_budgets) > max(cfg.sweep.budgets)
    specs, _ = expand_grid(cfg)
    random_budgets = {s["budget"] for s in specs if s["selector"] == "random"}
    selector_budgets = {s["budget"] for s in specs if s["selector"] == "facility_location"}
    assert random_budgets == set(cfg.sweep.budgets) | set(cfg.sweep.random_budgets)
    assert selector_budgets == set(cfg.sweep.budgets)
    assert len(specs) == len(cfg.sweep.seeds) * (2 * len(cfg.sweep.budgets) + len(cfg.sweep.random_budgets))


def test_sweep_random_budgets_are_validated():
    cfg = load_config(None, ["sweep.budgets=[16, 64]", "sweep.random_budgets=[128, 256]"])
    assert cfg.sweep.random_budgets == (128, 256) and load_config().sweep.random_budgets
    assert config_from_dict({}).sweep.random_budgets == ()  # none unless asked for
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sweep.budgets=[16, 64]", "sweep.random_budgets=[64, 0, 0]"])
    msg = str(e.value)
    assert "sweep.random_budgets=[64, 0, 0] has entry 0, which must be >= 1" in msg
    assert "sweep.random_budgets=[64, 0, 0] repeats [0]: list each value once" in msg
    assert "repeats [64] from sweep.budgets=[16, 64]: random runs at every sweep.budgets entry already" in msg
    with pytest.raises(ConfigError, match=r"sweep.random_budgets=\[64, 128\] repeats \[64\] from sweep.budgets=\[16, 64\]"):
        load_config(None, ["sweep.budgets=[16, 64]", "sweep.random_budgets=[64, 128]"])


def test_required_configs_are_shipped():
    names = {p.name for p in JOB_CONFIGS}
    assert {"quickstart.yaml", "smoke.yaml"} <= names


def test_jobs_quickstart_is_the_embedded_default():
    assert (ROOT / "jobs/configs/quickstart.yaml").read_text() == DEFAULT_CONFIG_PATH.read_text()
    assert load_config() == load_config(ROOT / "jobs/configs/quickstart.yaml")


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "selection.budget=500",
            "training.lr=1e-4",
            "sweep.budgets=[10, 20]",
            "training.max_steps=null",
            "selection.params={metric: euclidean}",
            "pool.path=/x.jsonl",
        ],
    )
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


# ---- every rule sits on its field: walk the tree and check each declared rule is enforced ----


def _fields():
    """(key, annotation, dataclass field) for every field of every section."""
    import typing

    for section, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", hints[f.name], f


LITERAL_FIELDS = [(key, tp) for key, tp, _ in _fields() if getattr(tp, "__origin__", None) is typing.Literal]
BOUNDED_FIELDS = [(key, f.metadata) for key, _, f in _fields() if {"ge", "le"} & set(f.metadata)]


def test_the_rule_tables_are_found():
    keys = {k for k, _ in LITERAL_FIELDS}
    assert {"pool.format", "scoring.generation", "training.backend", "training.schedule", "selection.mode"} <= keys
    assert len(BOUNDED_FIELDS) >= 40


@pytest.mark.parametrize("key,tp", LITERAL_FIELDS, ids=[k for k, _ in LITERAL_FIELDS])
def test_every_choice_field_takes_its_choices_and_names_them_otherwise(key, tp):
    from edsft.config import choices

    assert choices(key) == typing.get_args(tp)
    for value in choices(key):  # (annotations_path: mode=import needs one)
        cfg = load_config(None, [f"{key}={value}", "annotation.annotations_path=a.jsonl"])
        assert getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) == value
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=bogus"])
    assert e.value.problems == [f"{key}='bogus' is not one of {list(choices(key))}: pick one of them"]


@pytest.mark.parametrize("key,meta", BOUNDED_FIELDS, ids=[k for k, _ in BOUNDED_FIELDS])
def test_every_declared_bound_is_enforced(key, meta):
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    for bound, beyond, word in (("ge", -1, ">="), ("le", 1, "<=")):
        if bound not in meta:
            continue
        bad = meta[bound] + beyond
        if isinstance(default, (tuple, list)):
            value, shown = f"[{bad}]", f"has entry {bad!r}, which must be {word} {meta[bound]:g}"
        elif isinstance(default, dict):
            value, shown = f"{{CPU: {bad}}}", f"maps 'CPU' to {float(bad)!r}, which must be {word} {meta[bound]:g}"
        else:
            value, shown = str(bad), f"must be {word} {meta[bound]:g}"
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"])
        assert any(p.startswith(f"{key}=") and shown in p for p in e.value.problems), e.value.problems


def test_a_section_built_in_code_checks_itself():
    from edsft.config import ScoringConfig, TrainingConfig

    with pytest.raises(ConfigError, match="scoring.batch_size=0 must be >= 1"):
        ScoringConfig(batch_size=0)
    with pytest.raises(ConfigError, match="training.lr=nan must be a finite number"):
        dataclasses.replace(load_config().training, lr=float("nan"))
    assert TrainingConfig(lr=1).lr == 1.0 and isinstance(TrainingConfig(lr=1).lr, float)


def test_lists_become_typed_tuples_and_round_trip():
    from edsft.config import config_to_dict

    cfg = load_config(None, ["training.lora_target_modules=[q_proj, v_proj]", "sweep.budgets=[8.0, 16]"])
    assert cfg.training.lora_target_modules == ("q_proj", "v_proj")
    assert cfg.sweep.budgets == (8, 16) and all(type(b) is int for b in cfg.sweep.budgets)
    assert load_config().training.lora_target_modules == "all-linear"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"training.lora_target_modules=5 must be a string or a list of strings"):
        load_config(None, ["training.lora_target_modules=5"])


def test_exponents_without_a_dot_parse_as_floats():
    cfg = load_config(None, ["training.lr=3e-5", "training.weight_decay=1E-2"])
    assert cfg.training.lr == pytest.approx(3e-5) and cfg.training.weight_decay == pytest.approx(1e-2)


def test_fields_added_later_leave_the_hash_alone_at_their_default():
    """A run folder made before selection.rounds existed stays up to date: at its default a
    hash-neutral field is not part of the hash, and any other value is."""
    from edsft.config import HASH_NEUTRAL_DEFAULTS, config_hash, config_to_dict

    cfg = Config()
    old = config_to_dict(cfg)
    for section, name in HASH_NEUTRAL_DEFAULTS:
        del old[section][name]  # what config_to_dict gave before the field existed
    assert config_hash(cfg) == config_hash(old)
    assert config_hash(cfg, ("selection",)) == config_hash({"selection": old["selection"]})
    assert config_hash(cfg.replace(**{"selection.rounds": 2})) != config_hash(cfg)
    assert config_hash(cfg.replace(**{"sweep.rounds": [1, 2]})) != config_hash(cfg)
    assert config_hash(cfg.replace(**{"sweep.random_budgets": [400]})) != config_hash(cfg)
