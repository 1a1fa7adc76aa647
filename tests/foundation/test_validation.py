"""Config values that used to pass validation and then broke or silently changed a run (issue 14 item 7).

Each case must give a clear error (the field, the value, the fix) and exit 2 through the CLI before
any stage has written anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edsft.cli import main
from edsft.config import Config, ConfigError, config_to_dict, load_config
from edsft.validate import check_config, config_problems, param_grid, sweep_metrics

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
SHIPPED = sorted((ROOT / "jobs" / "configs").glob("*.yaml")) + sorted((ROOT / "edsft" / "configs").glob("*.yaml"))

# (overrides, text every case's message must contain: the field=value and the fix)
CASES = {
    "bad_fraction_negative": (["pool.max_bad_fraction=-1"], "pool.max_bad_fraction=-1.0 must be >= 0"),
    "bad_fraction_nan": (["pool.max_bad_fraction=nan"], "pool.max_bad_fraction=nan must be a finite number"),
    "lr_nan": (["training.lr=nan"], "training.lr=nan must be a finite number"),
    "lr_inf": (["training.lr=inf"], "training.lr=inf must be a finite number"),
    "epochs_inf": (["training.epochs=inf"], "training.epochs=inf must be a finite number"),
    "num_cpus_negative": (["ray.num_cpus=-4"], "ray.num_cpus=-4 must be >= 1, or null"),
    "checkpoints_to_keep_0": (["training.checkpoints_to_keep=0"], "training.checkpoints_to_keep=0 must be >= 1, or null"),
    "max_examples_negative": (["evaluation.max_examples=-1"], "evaluation.max_examples=-1 must be >= 1, or null"),
    "output_dir_empty": (["output.dir=''"], "output.dir='' is empty: name a local folder or an s3:// prefix"),
    "output_dir_null": (["output.dir="], "output.dir=null is empty: name a local folder"),
    "selection_name_unknown": (
        ["selection.name=facility_locaton"],
        "selection.name='facility_locaton' is not a selector: did you mean 'facility_location'?",
    ),
    "selection_params_unknown": (["selection.params={metrc: cosine}"], "has no parameter(s) ['metrc']"),
    "selection_params_bad_value": (
        ["selection.params={metric: manhattan}"],
        "selection.params={'metric': 'manhattan'} does not fit selector 'facility_location': metric=",
    ),
    "selection_params_kappa": (["selection.params={kappa: 0}"], "selection.params.kappa=0 must be an integer >= 1"),
    "sweep_selector_unknown": (
        ["sweep.selectors=[random, k_centre]"],
        "sweep.selectors contains 'k_centre', which is not a selector: did you mean 'k_center'?",
    ),
    "sweep_params_bad_value": (
        ["sweep.params={facility_location: {optimizer: [lazy, fast]}}"],
        "sweep.params.facility_location={'optimizer': 'fast'} does not fit selector 'facility_location'",
    ),
    "sweep_params_unknown_selector": (
        ["sweep.params={k_centre: {metric: cosine}}"],
        "sweep.params names 'k_centre', which is not a selector: did you mean 'k_center'?",
    ),
    "sweep_params_empty_grid": (
        ["sweep.params={facility_location: {metric: []}}"],
        "sweep.params.facility_location.metric=[] is empty",
    ),
    "sweep_seeds_not_integers": (["sweep.seeds=[a]"], "sweep.seeds=['a'] has entry 'a', which must be an integer"),
    "sweep_seeds_negative": (["sweep.seeds=[-1]"], "sweep.seeds=[-1] has entry -1, which must be >= 0"),
    "sweep_seeds_empty": (["sweep.seeds=[]"], "sweep.seeds=[] is empty: give at least one seed"),
    "sweep_budgets_repeated": (["sweep.budgets=[8, 8]"], "sweep.budgets=[8, 8] repeats [8]: list each value once"),
    "sweep_rounds_over_budget": (
        ["sweep.rounds=[1, 8]", "sweep.budgets=[4, 16]"],
        "sweep.rounds=[1, 8] has [8] rounds but sweep.budgets has [4]: each round picks >= 1 row",
    ),
    "sweep_metric_unknown": (
        ["sweep.metric=exact"],
        "sweep.metric='exact' is not a metric of the report: did you mean 'exact_match'?",
    ),
    "rounds_with_export": (
        ["selection.rounds=2", "annotation.mode=export"],
        "selection.rounds=2 with annotation.mode='export': every round but the last trains on its annotated batch",
    ),
    "rounds_continue_without_lora": (
        ["selection.rounds=2", "selection.round_training=continue", "training.lora=false"],
        "selection.round_training='continue' continues the last round's LoRA adapter: set training.lora=true",
    ),
}


def _problems(overrides: list[str]) -> list[str]:
    """Every problem of the smoke config with these overrides, from both validation layers."""
    try:
        cfg = load_config(SMOKE, overrides)
    except ConfigError as e:
        return e.problems
    return config_problems(cfg)


@pytest.mark.parametrize("overrides,expected", CASES.values(), ids=CASES.keys())
def test_bad_value_is_one_clear_problem(overrides, expected):
    problems = _problems(overrides)
    assert len(problems) == 1, problems
    assert expected in problems[0]


@pytest.mark.parametrize("overrides,expected", CASES.values(), ids=CASES.keys())
def test_cli_exits_2_before_any_stage_runs(overrides, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a relative output.dir (or a stage run by mistake) would write here
    assert main(["run", "--config", str(SMOKE), f"output.dir={tmp_path / 'run'}", *overrides]) == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no stage wrote anything: no run folder, no pool.parquet


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_passes_the_registry_checks(path):
    check_config(load_config(path))


# Every float field of the tree (their defaults are floats), e.g. training.lr, scoring.cpus_per_actor.
FLOAT_FIELDS = [f"{s}.{k}" for s, sec in config_to_dict(Config()).items() for k, v in sec.items() if isinstance(v, float)]


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf"])
def test_every_float_field_rejects_non_finite_values(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert [p for p in e.value.problems if p.startswith(f"{key}=") and "must be a finite number" in p], e.value.problems


def test_float_fields_are_found():
    assert {"training.lr", "training.epochs", "pool.max_bad_fraction", "scoring.cpus_per_actor"} <= set(FLOAT_FIELDS)


def test_non_finite_entries_of_a_float_mapping_are_rejected():
    with pytest.raises(
        ConfigError, match=r"training.resources_per_worker=\{'CPU': nan\} maps 'CPU' to nan, which must be a finite number"
    ):
        load_config(None, ["training.resources_per_worker={CPU: .nan}"])


def test_problems_from_several_fields_are_collected():
    problems = _problems(["selection.name=kcenter", "sweep.selectors=[random, fl]", "sweep.metric=acc"])
    assert len(problems) == 3
    assert any(p.startswith("selection.name='kcenter'") for p in problems)
    assert any(p.startswith("sweep.selectors contains 'fl'") for p in problems)
    assert any(p.startswith("sweep.metric='acc'") for p in problems)


def test_a_bad_selection_params_is_reported_once_not_again_for_its_sweep_trials():
    problems = _problems(["selection.params={epsilon: 2}"])
    assert problems == ["selection.params={'epsilon': 2} does not fit selector 'facility_location': epsilon=2 must be in (0, 1)"]


def test_registry_checks_accept_what_the_stages_accept():
    # kappa steers the map-reduce for any selector, and is greedi's own parameter
    assert _problems(["selection.params={kappa: 3}"]) == []
    assert _problems(["selection.name=greedi", "selection.params={kappa: 3, m: 2}"]) == []
    assert _problems(["sweep.metric=base_loss", "sweep.selectors=[k_center]", "sweep.params={random: {}}"]) == []
    assert sweep_metrics() == ("exact_match", "rouge_l", "loss", "base_exact_match", "base_rouge_l", "base_loss")


def test_param_grid_expands_lists_and_keeps_scalars():
    assert param_grid("facility_location", None) == [{}]
    grid = param_grid("facility_location", {"metric": ["cosine", "rbf"], "lambda_": 0.5})
    assert grid == [{"lambda_": 0.5, "metric": "cosine"}, {"lambda_": 0.5, "metric": "rbf"}]
    with pytest.raises(ValueError, match="must map parameter names"):
        param_grid("facility_location", [1])
