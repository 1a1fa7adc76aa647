"""benchmarks/label_efficiency.py plans its sweeps as documented (no Ray, nothing runs)."""

from __future__ import annotations

from edsft.distributed.sweep import expand_grid


def _names(le, plan, cfg):
    return [[s["name"] for s in expand_grid(c)[0]] for c in le.sweeps(cfg, plan)]


def test_one_shot_plan_is_one_sweep_per_budget_with_the_budgets_recipe(le, tmp_path):
    (plan,) = le.plans("cpu", pools=("tasks",), selectors=["typiclust"])
    cfg = le.build_config("cpu", "tasks", str(tmp_path))
    configs = le.sweeps(cfg, plan)
    assert [c.sweep.budgets[0] for c in configs] == [32, 64, 128, 256, 512, 1024, 2048]
    assert all(list(c.sweep.rounds) == [1] for c in configs)
    assert [c.training.max_steps for c in configs] == [
        plan.recipe.steps(b, le.global_batch(cfg)) for b in (32, 64, 128, 256, 512, 1024, 2048)
    ]
    assert cfg.training.lora_dropout == 0.0  # the CPU recipe (build_config says why)
    assert le.trial_count(cfg, plan)[0] == 2 * 5 * 3 + 2 * 3


def test_rounds_add_a_sweep_per_selector_budget_and_random_runs_once(le, tmp_path):
    (plan,) = le.plans(
        "cpu", pools=("tasks",), seeds=[0], selectors=["typiclust"], rounds=[2, 4], round_selectors=["uncertainty", "typiclust"]
    )
    assert plan.rounds == (1, 2, 4) and plan.round_selectors == ("uncertainty", "typiclust")
    cfg = le.build_config("cpu", "tasks", str(tmp_path))
    names = _names(le, plan, cfg)
    # B=32: the one-shot sweep, then the rounds sweep (uncertainty is not one-shot elsewhere: its R=1 is here)
    assert names[0] == ["random-b32-s0", "typiclust-b32-s0"]
    assert names[1] == [
        "random-b32-s0",
        "uncertainty-b32-s0",
        "uncertainty-r2-b32-s0",
        "uncertainty-r4-b32-s0",
        "typiclust-b32-s0",
        "typiclust-r2-b32-s0",
        "typiclust-r4-b32-s0",
    ]
    assert len(names) == 5 * 2 + 2  # random's extra budgets have no rounds sweep
    unique = {n for sweep in names for n in sweep}
    assert le.trial_count(cfg, plan)[0] == len(unique) == 5 * (2 + 5) + 2
    # each later round re-scores the pool: the estimate counts it
    assert le.estimate_hours(cfg, plan, 5000, 560) > 5 * le.estimate_hours(
        cfg, le.plans("cpu", ("tasks",), [0], ["typiclust"])[0], 5000, 560
    )


def test_a_random_trial_in_two_sweeps_is_one_result(le):
    import pandas as pd

    a = pd.DataFrame({"trial_id": ["random-b8-s0", "typiclust-b8-s0"], "selector": ["random", "typiclust"]})
    b = pd.DataFrame({"trial_id": ["random-b8-s0", "uncertainty-r2-b8-s0"], "selector": ["random", "uncertainty"]})
    assert le.unique_trials([a, b])["trial_id"].tolist() == ["random-b8-s0", "typiclust-b8-s0", "uncertainty-r2-b8-s0"]
