"""The sweep's grid, concurrency and metric extraction (no Ray needed)."""

from __future__ import annotations

import pytest

from edsft.config import Config, config_from_dict
from edsft.distributed import sweep as S
from edsft.results import METRICS, EvalResult


def _cfg(**sweep) -> Config:
    return config_from_dict({"sweep": sweep})


def test_grid_adds_random_and_expands_params():
    cfg = _cfg(
        selectors=["fl_uncertainty", "uncertainty"],
        budgets=[10, 40],
        seeds=[0, 1],
        params={"fl_uncertainty": {"lambda_": [0.3, 0.7], "metric": "cosine"}, "uncertainty": {"score": "min_margin"}},
    )
    specs, notes = S.expand_grid(cfg)
    assert any("added it" in n for n in notes)
    names = [s["name"] for s in specs]
    assert len(specs) == (1 + 2 + 1) * 2 * 2 and len(set(names)) == len(names)
    assert names[0] == "random-b10-s0" and specs[0]["params"] == {}
    assert "fl_uncertainty-lambda_=0.3,metric=cosine-b40-s1" in names
    assert "uncertainty-score=min_margin-b10-s0" in names
    hy = [s for s in specs if s["selector"] == "fl_uncertainty"]
    assert sorted({s["params"]["lambda_"] for s in hy}) == [0.3, 0.7] and all(s["params"]["metric"] == "cosine" for s in hy)


def test_grid_keeps_random_once_and_rejects_bad_params():
    specs, notes = S.expand_grid(_cfg(selectors=["random", "k_center", "random"], budgets=[5], seeds=[3]))
    assert [s["name"] for s in specs] == ["random-b5-s3", "k_center-b5-s3"] and notes == []
    with pytest.raises(ValueError, match="sweep.params names selectors"):
        S.expand_grid(_cfg(selectors=["random"], params={"k_centre": {"metric": "cosine"}}))  # not a selector
    with pytest.raises(ValueError, match=r"sweep.params.k_center=.*must map"):
        S.expand_grid(_cfg(selectors=["k_center"], params={"k_center": 3}))
    with pytest.raises(ValueError, match="is empty"):
        S.expand_grid(_cfg(selectors=["k_center"], params={"k_center": {"metric": []}}))


def test_trial_name_is_path_safe():
    assert S.trial_name("x", {"inner_params": {"a": 1}}, 5, 0) == "x-inner_params=__a___1_-b5-s0"


def test_trial_config_sets_selection_training_seed_and_output(tmp_path):
    from edsft.storage import get_store

    cfg = _cfg(selectors=["k_center"], budgets=[7], seeds=[2])
    spec = S.expand_grid(cfg)[0][1]
    t = S.trial_config(cfg, spec, get_store(tmp_path / "t"))
    assert (t.selection.name, t.selection.budget, t.selection.seed, t.training.seed) == ("k_center", 7, 2, 2)
    assert t.output.dir == str(tmp_path / "t") and t.evaluation.base_model is False
    # the trial hash ignores where the trial writes but not what it computes
    assert S.trial_hash(t) == S.trial_hash(t.replace(**{"training.storage_path": "/elsewhere"}))
    assert S.trial_hash(t) != S.trial_hash(t.replace(**{"training.lr": 1e-3}))


@pytest.mark.parametrize(
    "training, cluster, n, want",
    [
        ({"num_workers": 2, "resources_per_worker": {"CPU": 1}}, {"CPU": 2.0}, 8, 1),
        ({"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}, {"CPU": 2.0}, 8, 1),  # 2 x (1 + 0.001) > 2
        ({"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}, {"CPU": 4.0}, 8, 3),
        ({"num_workers": 1, "resources_per_worker": {"CPU": 1}}, {"CPU": 16.0}, 3, 3),  # capped by the trials
        # one CPU worker trains inside the trial (training.mode auto = local): no sliver on top
        ({"num_workers": 1, "resources_per_worker": {"CPU": 1}}, {"CPU": 2.0}, 8, 2),
        ({"num_workers": 1, "mode": "distributed", "resources_per_worker": {"CPU": 1}}, {"CPU": 2.0}, 8, 1),
        ({"num_workers": 4, "resources_per_worker": {"CPU": 1}}, {"CPU": 2.0}, 8, 1),  # at least 1
        ({"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 2}}, {"CPU": 64.0, "GPU": 8.0}, 20, 8),
        ({"num_workers": 2, "use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 1}}, {"CPU": 34.0, "GPU": 8.0}, 20, 2),
    ],
)
def test_default_max_concurrent_trials(training, cluster, n, want):
    cfg = config_from_dict({"training": training})
    assert S.default_max_concurrent_trials(cfg, cluster, n) == want


def test_explicit_max_concurrent_trials_wins():
    cfg = config_from_dict({"sweep": {"max_concurrent_trials": 3}})
    assert S.default_max_concurrent_trials(cfg, {"CPU": 1.0}, 10) == 3
    assert S.default_max_concurrent_trials(cfg, {"CPU": 1.0}, 2) == 2


def test_eval_result_prefers_macro_and_prefixes_base():
    m = {
        "finetuned": {"exact_match": 0.2, "rouge_l": 0.5, "loss": 1.5, "macro": {"exact_match": 0.25, "rouge_l": 0.55}},
        "base": {"exact_match": 0.1, "loss": 2.0},
    }
    assert EvalResult.from_metrics(m).flat() == {
        "exact_match": 0.25,
        "rouge_l": 0.55,
        "loss": 1.5,
        "base_exact_match": 0.1,
        "base_loss": 2.0,
    }


def test_eval_result_reads_overall_when_macro_lacks_a_metric():
    # the layout build_metrics writes: a variant block is the overall metrics plus "macro"
    m = {
        "n": 4,
        "finetuned": {"exact_match": 0.3, "loss": 1.2, "macro": {"exact_match": 0.35, "loss": None}},
        "base": None,
        "per_task": {},
    }
    assert EvalResult.from_metrics(m).flat() == {"exact_match": 0.35, "loss": 1.2}


def test_eval_result_reads_what_evaluation_writes():
    """From build_metrics' own output, not a hand-written layout."""
    from edsft.training.evaluation import build_metrics

    rows = [
        {
            "row_id": f"r{i}",
            "task": t,
            "variant": v,
            "loss_sum": 2.0 * (i + 1),
            "n_tokens": 2,
            "exact_match": float(i % 2),
            "rouge_l": 0.5,
        }
        for i, t in enumerate(["a", "a", "b"])
        for v in ("base", "finetuned")
    ]
    r = EvalResult.from_metrics(build_metrics(rows))
    assert r.n == 3 and set(r.finetuned) == set(r.base) == set(METRICS)
    assert r.finetuned["exact_match"] == pytest.approx((0.5 + 0.0) / 2)  # macro: task a 0.5, task b 0
    assert r.flat()["base_loss"] == pytest.approx(((1.0 + 2.0) / 2 + 3.0) / 2)  # macro of per-task token-weighted loss


def test_results_columns_and_report_share_one_metric_list():
    from edsft import report

    assert report.METRICS is METRICS
    assert [c for c in S.RESULT_COLUMNS if c in METRICS] == list(METRICS)


def test_params_of_selectors_outside_the_sweep_are_ignored_with_a_note():
    # the default config's sweep.params names selectors a smaller sweep may leave out
    cfg = _cfg(selectors=["random", "k_center"], params={"uncertainty": {"temperature": [1.0]}})
    specs, notes = S.expand_grid(cfg)
    assert {s["selector"] for s in specs} == {"random", "k_center"}
    assert any("uncertainty" in n and "ignored" in n for n in notes)


def test_trial_that_cannot_place_its_trainer_is_refused():
    # 2 workers x 1 CPU on 2 CPUs: the trial's own 0.001 CPU leaves 1.999, the trainer waits forever
    cfg = config_from_dict({"training": {"num_workers": 2, "resources_per_worker": {"CPU": 1}}})
    with pytest.raises(ValueError, match=r"resources_per_worker.CPU <= 0.99"):
        S.check_trial_fits(cfg, {"CPU": 2.0})
    S.check_trial_fits(cfg.replace(**{"training.resources_per_worker": {"CPU": 0.99}}), {"CPU": 2.0})
    # one local worker with both CPUs: the trial is the worker, so it fits; a Ray Train worker does not
    local = config_from_dict({"training": {"num_workers": 1, "resources_per_worker": {"CPU": 2}}})
    S.check_trial_fits(local, {"CPU": 2.0})
    assert S._trial_resources(local) == {"CPU": 2.0}
    with pytest.raises(ValueError, match=r"resources_per_worker.CPU <= 1.99"):
        S.check_trial_fits(local.replace(**{"training.mode": "distributed"}), {"CPU": 2.0})
    gpu = config_from_dict({"training": {"num_workers": 2, "use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}})
    with pytest.raises(ValueError, match="needs 2 GPU"):
        S.check_trial_fits(gpu, {"CPU": 8.0, "GPU": 1.0})


def test_grid_order_is_seed_then_budget_then_selector():
    # a sweep stopped early has every selector at the first budgets: comparable partial results
    specs, _ = S.expand_grid(_cfg(selectors=["random", "k_center"], budgets=[4, 8], seeds=[0, 1]))
    assert [s["name"] for s in specs][:4] == ["random-b4-s0", "k_center-b4-s0", "random-b8-s0", "k_center-b8-s0"]


def test_random_budgets_add_random_only_trials_first_in_each_seed():
    # random's extra budgets are usually the longest trials: started first, the concurrent trials pack better
    cfg = _cfg(selectors=["k_center"], budgets=[16, 64], random_budgets=[128], seeds=[0, 1])
    specs, _ = S.expand_grid(cfg)
    assert [s["name"] for s in specs] == [
        f"{sel}-b{b}-s{seed}"
        for seed in (0, 1)
        for sel, b in (("random", 128), ("random", 16), ("k_center", 16), ("random", 64), ("k_center", 64))
    ]
    # random's params grid applies at its extra budgets too; the other selectors never run there
    cfg = _cfg(selectors=["random", "k_center"], budgets=[8], random_budgets=[32], seeds=[0])
    assert {s["budget"] for s in S.expand_grid(cfg)[0] if s["selector"] == "k_center"} == {8}


def test_default_config_sweeps_a_subset_of_its_selectors():
    from edsft.config import load_config

    # a config's sweep.params may name selectors that a shorter sweep.selectors leaves out
    cfg = load_config(None, ["sweep.selectors=[random, k_center]", "sweep.params={uncertainty: {score: mean_entropy}}"])
    assert set(cfg.sweep.params) - {"random", "k_center"}
    specs, notes = S.expand_grid(cfg)
    assert {s["selector"] for s in specs} == {"random", "k_center"} and any("ignored" in n for n in notes)


# ---- sweep.rounds -------------------------------------------------------------------------


def test_rounds_axis_expands_every_selector_but_random_and_keeps_one_round_names():
    cfg = _cfg(selectors=["random", "uncertainty", "k_center"], budgets=[8, 16], seeds=[0], rounds=[1, 2, 4])
    specs, notes = S.expand_grid(cfg)
    names = [s["name"] for s in specs]
    # per budget: random once, the others at every round count
    assert len(specs) == 2 * (1 + 2 * 3) and len(set(names)) == len(names)
    assert names[:7] == [
        "random-b8-s0",
        "uncertainty-b8-s0",
        "uncertainty-r2-b8-s0",
        "uncertainty-r4-b8-s0",
        "k_center-b8-s0",
        "k_center-r2-b8-s0",
        "k_center-r4-b8-s0",
    ]
    assert {s["rounds"] for s in specs if s["selector"] == "random"} == {1}
    assert any("random runs with one round only" in n and "[2, 4]" in n for n in notes)
    # one round: exactly the names of a sweep without sweep.rounds (existing sweeps resume)
    plain = S.expand_grid(_cfg(selectors=["random", "uncertainty", "k_center"], budgets=[8, 16], seeds=[0]))
    assert [s["name"] for s in plain[0]] == [s["name"] for s in specs if s["rounds"] == 1]
    assert plain[1] == [n for n in notes if "random" not in n] == []
    # rounds without 1: random still runs (one-shot), it is the anchor of every comparison
    only2, _ = S.expand_grid(_cfg(selectors=["uncertainty"], budgets=[8], seeds=[0], rounds=[2]))
    assert [s["name"] for s in only2] == ["random-b8-s0", "uncertainty-r2-b8-s0"]


def test_trial_config_takes_its_round_count_and_splits_its_own_budget(tmp_path):
    from edsft.storage import get_store

    cfg = config_from_dict(
        {"selection": {"budget": 30, "rounds": 3, "round_budgets": [10, 10, 10]}, "sweep": {"budgets": [8], "rounds": [1, 2]}}
    )
    specs, notes = S.expand_grid(cfg)
    assert any("selection.rounds=3 is not used by the sweep" in n for n in notes)
    assert any("selection.round_budgets=[10, 10, 10] is not used by the sweep" in n for n in notes)
    two = next(s for s in specs if s["rounds"] == 2)
    t = S.trial_config(cfg, two, get_store(tmp_path / "t"))
    assert (t.selection.rounds, t.selection.round_budgets, t.selection.batch_sizes) == (2, None, (4, 4))
    one = next(s for s in specs if s["rounds"] == 1 and s["selector"] == two["selector"])
    assert S.trial_config(cfg, one, get_store(tmp_path / "u")).selection.rounds == 1
    # a spec restored from a Tune experiment made before sweep.rounds has no "rounds": one round
    old = {k: v for k, v in one.items() if k != "rounds"}
    assert S.trial_config(cfg, old, get_store(tmp_path / "v")).selection.rounds == 1
    assert S.trial_name("uncertainty", {}, 8, 0, rounds=2) == "uncertainty-r2-b8-s0"


def _finished_trial(run, cfg, spec, stages):
    """A trial folder as run_trial leaves it: its manifest (with its parent link) and result.json."""
    from edsft.compute import stage_compute

    trial = run.child("sweep", "trials", spec["name"])
    trial.child("manifest.json").write_json(
        {
            "config": {},
            "parent": {"run": run.uri, "inherited": ["ingest", "score"]},
            "stages": {
                n: {"state": "done", "wall_s": w, "compute": stage_compute(k, w, {}, None)} for n, (k, w) in stages.items()
            },
        }
    )
    report = {"exact_match": 0.5, "loss": 1.0, "objective": 1.0, "train_steps": 2, "trial_wall_s": 9.0}
    trial.child("result.json").write_json(
        {"trial_hash": S.trial_hash(S.trial_config(cfg, spec, trial)), "spec": spec, "report": report, "metrics": {}}
    )


def test_results_carry_rounds_and_compute_with_the_parent_scoring(tmp_path):
    from edsft.compute import stage_compute
    from edsft.storage import get_store

    cfg = _cfg(selectors=["uncertainty"], budgets=[8], seeds=[0], rounds=[1, 2])
    specs, _ = S.expand_grid(cfg)
    assert [s["name"] for s in specs] == ["random-b8-s0", "uncertainty-b8-s0", "uncertainty-r2-b8-s0"]
    run = get_store(tmp_path / "run")
    run.child("manifest.json").write_json(
        {"stages": {"score": {"state": "done", "wall_s": 40.0, "compute": stage_compute("scoring", 40.0, {}, None)}}}
    )
    base = {"base": {"exact_match": 0.1}, "compute": stage_compute("evaluation", 3.0, {}, None)}
    one_shot = {
        "select": ("selection", 1.0),
        "annotate": (None, 0.5),
        "train": ("training", 20.0),
        "evaluate": ("evaluation", 5.0),
    }
    _finished_trial(run, cfg, specs[0], one_shot)
    _finished_trial(run, cfg, specs[1], one_shot)
    # the multi-round trial's selection stage re-scored and retrained: its own split (the rounds helper's stage)
    two = dict(one_shot, select=("selection", 31.0))
    _finished_trial(run, cfg, specs[2], two)
    table, spent = S._collect(run, cfg, specs, {}, base)
    t = table.to_pandas().set_index("trial_id")
    assert t["rounds"].to_dict() == {"random-b8-s0": 1, "uncertainty-b8-s0": 1, "uncertainty-r2-b8-s0": 2}
    # every trial pays the parent's 40 s of scoring; ingest and annotate are not compute
    assert (t["compute_scoring_s"] == 40.0).all()
    assert t.loc["uncertainty-b8-s0", "compute_total_s"] == 40.0 + 1.0 + 20.0 + 5.0
    assert t.loc["uncertainty-r2-b8-s0", "compute_selection_s"] == 31.0
    assert t.loc["uncertainty-r2-b8-s0", "compute_total_s"] == 96.0
    assert not any(c.startswith("gpu_") for c in table.column_names)  # a CPU sweep: no columns of zeros
    assert [c for c in S.RESULT_COLUMNS if c in table.column_names] == table.column_names
    # the sweep's own compute: the trials' own stages (not the shared scoring) plus the base model's evaluation
    assert spent["compute_s"] == {"scoring": 0.0, "selection": 33.0, "training": 60.0, "evaluation": 18.0}
    # a pending trial has no compute
    run.child("sweep", "trials", specs[2]["name"], "result.json").remove()
    t = S._collect(run, cfg, specs, {}, base)[0].to_pandas().set_index("trial_id")
    assert t.loc["uncertainty-r2-b8-s0", "status"] == "PENDING" and t["compute_total_s"].isna().sum() == 1
