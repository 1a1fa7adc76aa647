"""Report math on hand-made curves, plots checked through matplotlib's objects, report.md contents."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from edsft import report as R
from edsft.storage import get_store

# ---- intervals --------------------------------------------------------------------------------


def test_t_critical_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 30, 31, 45, 100, 1000):
        assert R.t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
    for conf in (0.8, 0.9, 0.99):
        assert R.t_critical(60, conf) == pytest.approx(stats.t.ppf(0.5 + conf / 2, 60), abs=2e-4)
    with pytest.raises(ValueError, match="df=0"):
        R.t_critical(0)


def _results(rows):
    return pd.DataFrame(rows, columns=["selector", "params", "budget", "seed", "exact_match"])


def test_summarize_mean_and_t_interval_by_hand():
    df = _results([("random", "{}", 10, s, v) for s, v in enumerate([0.1, 0.2, 0.3])] + [("random", "{}", 20, 0, 0.5)])
    s = R.summarize(df, "exact_match")
    r10 = s[s.budget == 10].iloc[0]
    assert r10["n"] == 3 and r10["mean"] == pytest.approx(0.2)
    half = 4.3027 * 0.1 / math.sqrt(3)  # std of (0.1, 0.2, 0.3) is 0.1; t_{0.975,2} = 4.3027
    assert (r10["lo"], r10["hi"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    r20 = s[s.budget == 20].iloc[0]  # one seed: no interval
    assert r20["n"] == 1 and math.isnan(r20["lo"]) and math.isnan(r20["hi"])
    with pytest.raises(ValueError, match="metric='bleu'"):
        R.summarize(df, "bleu")


def test_load_results_keeps_finished_trials_only():
    df = pd.DataFrame(
        {
            "selector": ["random", "random"],
            "budget": [1, 2],
            "seed": [0, 0],
            "exact_match": [0.1, None],
            "status": ["TERMINATED", "ERROR"],
        }
    )
    out = R.load_results(df)
    assert len(out) == 1 and out["params"].tolist() == ["{}"]
    with pytest.raises(ValueError, match="missing columns"):
        R.load_results(pd.DataFrame({"x": [1]}))


# ---- random-equivalent budget -------------------------------------------------------------


def test_interpolation_is_linear_in_log_budget():
    b, v = [10, 100, 1000], [0.1, 0.3, 0.5]
    assert R.random_equivalent_budget(b, v, 0.3) == (pytest.approx(100.0), "")
    # halfway between 0.1 and 0.3 in value is halfway in log-budget: sqrt(10 * 100)
    assert R.random_equivalent_budget(b, v, 0.2) == (pytest.approx(math.sqrt(1000)), "")
    assert R.random_equivalent_budget(b, v, 0.45)[0] == pytest.approx(10 ** (2 + 0.75))
    assert R.random_equivalent_budget(b, v, 0.1) == (10.0, "")  # exactly the first point


def test_interpolation_censored_ends():
    b, v = [10, 100, 1000], [0.1, 0.3, 0.5]
    assert R.random_equivalent_budget(b, v, 0.6) == (1000.0, ">")  # above random's best
    assert R.random_equivalent_budget(b, v, 0.05) == (10.0, "<")  # below random's smallest budget


def test_interpolation_uses_running_max_on_non_monotone_curve():
    # random dips at 100 (seed noise): the running max is 0.1, 0.3, 0.3, 0.5
    b, v = [10, 50, 100, 1000], [0.1, 0.3, 0.2, 0.5]
    # 0.25 is first reached between 10 and 50, not in the dip between 50 and 100
    got, bound = R.random_equivalent_budget(b, v, 0.25)
    assert bound == "" and got == pytest.approx(math.exp(math.log(10) + 0.75 * (math.log(50) - math.log(10))))
    # 0.4 lies on the rise from the running max 0.3 (at 100) to 0.5 (at 1000)
    assert R.random_equivalent_budget(b, v, 0.4)[0] == pytest.approx(math.sqrt(100 * 1000))
    # unsorted input gives the same answer
    assert R.random_equivalent_budget(b[::-1], v[::-1], 0.4)[0] == pytest.approx(math.sqrt(100 * 1000))


def test_interpolation_lower_is_better_for_loss():
    b, v = [10, 100], [2.0, 1.0]
    assert R.random_equivalent_budget(b, v, 1.5, higher_better=False)[0] == pytest.approx(math.sqrt(1000))
    assert R.random_equivalent_budget(b, v, 0.5, higher_better=False) == (100.0, ">")
    assert R.higher_is_better("exact_match") and not R.higher_is_better("loss") and not R.higher_is_better("base_loss")


def test_interpolation_rejects_bad_input():
    with pytest.raises(ValueError, match="budgets"):
        R.random_equivalent_budget([0, 10], [0.1, 0.2], 0.15)
    with pytest.raises(ValueError, match="equal length"):
        R.random_equivalent_budget([10], [0.1, 0.2], 0.15)


def _curves(sel_eff: dict[str, float], budgets=(25, 50, 100, 200, 400), seeds=(0, 1, 2), noise=0.0):
    """metric = 0.1 log2(efficiency * B / 25): a selector with efficiency 2 matches random at half the budget."""
    rng = np.random.default_rng(0)
    rows = []
    for sel, eff in sel_eff.items():
        for b in budgets:
            for s in seeds:
                rows.append(
                    dict(
                        trial_id=f"{sel}-b{b}-s{s}",
                        selector=sel,
                        params="{}",
                        budget=b,
                        seed=s,
                        exact_match=0.1 * math.log2(eff * b / 25) + noise * rng.normal(),
                        status="TERMINATED",
                    )
                )
    return pd.DataFrame(rows)


def test_label_efficiency_recovers_known_ratio_and_headline():
    df = _curves({"random": 1.0, "fl": 2.0, "unc": 1.25})
    s = R.summarize(df, "exact_match")
    eff = R.label_efficiency(s, "exact_match")
    fl = eff[eff.label == "fl"].set_index("budget")
    # fl at B equals random at 2B: ratio 0.5 wherever 2B <= 400 (random's largest budget)
    for b in (25, 50, 100, 200):
        assert fl.loc[b, "ratio"] == pytest.approx(0.5) and fl.loc[b, "bound"] == ""
    assert fl.loc[400, "bound"] == ">" and fl.loc[400, "ratio_bound"] == "<" and fl.loc[400, "ratio"] == pytest.approx(1.0)
    unc = eff[eff.label == "unc"].set_index("budget")
    assert unc.loc[100, "ratio"] == pytest.approx(0.8)
    h = R.headline(eff, "exact_match")
    assert h["selector"] == "fl" and h["ratio"] == pytest.approx(0.5) and h["budgets_interpolated"] == 4
    assert "0.50x the labels" in h["text"]
    assert "random" not in set(eff.label)


def test_label_efficiency_worse_than_random_and_below_min():
    df = _curves({"random": 1.0, "bad": 0.5, "great": 64.0})
    eff = R.label_efficiency(R.summarize(df, "exact_match"), "exact_match")
    bad = eff[eff.label == "bad"].set_index("budget")
    assert bad.loc[25, "bound"] == "<" and bad.loc[25, "ratio_bound"] == ">"  # below random's smallest
    assert bad.loc[100, "ratio"] == pytest.approx(2.0)  # needs twice the labels
    h = R.headline(eff, "exact_match")
    assert h["selector"] == "great" and h["bound"] == "<"  # censored everywhere: a bound, said so
    assert "bound" in h["text"]
    with pytest.raises(ValueError, match="random"):
        R.label_efficiency(R.summarize(df[df.selector != "random"], "exact_match"), "exact_match")


def test_params_keep_hybrid_variants_apart():
    df = _curves({"random": 1.0, "hybrid": 2.0}, seeds=(0,))
    h2 = df[df.selector == "hybrid"].copy()
    h2["params"] = json.dumps({"lambda_": 0.7})
    df.loc[df.selector == "hybrid", "params"] = json.dumps({"lambda_": 0.3})
    s = R.summarize(pd.concat([df, h2]), "exact_match")
    assert {"hybrid(lambda_=0.3)", "hybrid(lambda_=0.7)", "random"} == set(s.label)


# ---- plots --------------------------------------------------------------------------------


def test_learning_curve_plot_axes_and_random_style():
    s = R.summarize(_curves({"random": 1.0, "fl": 2.0}, budgets=(10, 50, 200), noise=0.01), "exact_match")
    fig = R.plot_learning_curves(s, "exact_match")
    ax = fig.axes[0]
    assert ax.get_xlabel() and "budget" in ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert ax.get_xscale() == "log"  # 10 -> 200 spans more than 10x
    lines = {l.get_label(): l for l in ax.get_lines()}
    rnd = lines["random"]
    assert rnd.get_linestyle() == "--" and rnd.get_marker() == "o" and matplotlib.colors.to_hex(rnd.get_color()) == "#000000"
    assert lines["fl"].get_linestyle() == "-" and matplotlib.colors.to_hex(lines["fl"].get_color()) != "#000000"
    bands = [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    bars = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    assert len(bands) == 2 and len(bars) == 2  # one band and one set of error bars per selector (3 seeds)
    # each error bar spans the t-interval of its (selector, budget) cell
    fl = s[s.label == "fl"].sort_values("budget")
    segs = [c for c in bars if matplotlib.colors.to_hex(c.get_color()[0]) == matplotlib.colors.to_hex(lines["fl"].get_color())]
    np.testing.assert_allclose([seg[:, 1].min() for seg in segs[0].get_segments()], fl["lo"], rtol=1e-9)
    np.testing.assert_allclose([seg[:, 1].max() for seg in segs[0].get_segments()], fl["hi"], rtol=1e-9)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"random", "fl"}
    matplotlib.pyplot.close(fig)


def test_single_seed_draws_no_band_and_says_so():
    s = R.summarize(_curves({"random": 1.0, "fl": 2.0}, budgets=(10, 20, 40), seeds=(0,)), "exact_match")
    fig = R.plot_learning_curves(s, "exact_match")
    ax = fig.axes[0]
    assert len(ax.collections) == 0 and "no interval" in ax.get_title()
    assert ax.get_xscale() == "linear"  # 10 -> 40 is within 10x
    matplotlib.pyplot.close(fig)
    fig = R.plot_label_efficiency(R.label_efficiency(s, "exact_match"), "exact_match")
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
    matplotlib.pyplot.close(fig)


# ---- report.md ----------------------------------------------------------------------------


def test_build_report_writes_markdown_and_pngs(tmp_path):
    df = _curves({"random": 1.0, "facility_location": 2.0, "uncertainty": 1.25}, noise=0.005)
    df["loss"] = 3.0 - df["exact_match"]
    df = pd.concat(
        [df, pd.DataFrame([dict(trial_id="x", selector="uncertainty", params="{}", budget=25, seed=9, status="ERROR")])]
    )
    run = get_store(tmp_path / "run")
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(df, preserve_index=False))
    run.child("manifest.json").write_json(
        {
            "config": {
                "pool": {"path": "builtin:tasks", "size": 20000},
                "scoring": {"model": "builtin:smollm2-135m"},
                "training": {"lora": True},
                "sweep": {"metric": "exact_match"},
            },
            "versions": {"edsft": "0.1.0", "ray": "2.60.0"},
        }
    )
    out = R.build_report(run)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert out["headline"]["selector"] == "facility_location" and out["headline"]["ratio"] == pytest.approx(0.5, abs=0.05)
    for needle in (
        "builtin:tasks",
        "20000",
        "builtin:smollm2-135m",
        "25, 50, 100, 200, 400",
        "0, 1, 2",
        "exact_match",
        "ray 2.60.0",
        "learning_curve_exact_match.png",
        "learning_curve_loss.png",
        "facility_location reaches random's exact_match",
        "45 finished of 46",
        "ERROR: 1",
        "95% t-interval",
    ):
        assert needle in md, needle
    for p in out["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "report" / "label_efficiency_exact_match.csv").exists()


def test_build_report_without_sweep_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="edsft sweep"):
        R.build_report(get_store(tmp_path))


def test_base_model_line_is_drawn_when_given():
    s = R.summarize(_curves({"random": 1.0}, budgets=(10, 20), seeds=(0,)), "exact_match")
    fig = R.plot_learning_curves(s, "exact_match", base=0.02)
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    assert lines["base model (no finetuning)"].get_linestyle() == ":"
    matplotlib.pyplot.close(fig)


# ---- bootstrap intervals and the headline they allow ------------------------------------------


def test_equivalent_budgets_matches_the_scalar_inversion():
    rng = np.random.default_rng(0)
    b = [10, 50, 100, 1000]
    V = rng.random((200, 4))
    T = rng.random(200) * 1.2 - 0.1
    for hib in (True, False):
        got, code = R.equivalent_budgets(b, V, T, hib)
        for r in range(200):
            want, bound = R.random_equivalent_budget(b, V[r], T[r], hib)
            assert got[r] == pytest.approx(want) and {0: "", 1: ">", -1: "<"}[int(code[r])] == bound


def _per_example_experiment(
    sel_eff: dict[str, float],
    *,
    budgets=(32, 64, 128, 256, 512),
    seeds=(0, 1, 2),
    n_tasks=8,
    per_task=40,
    seed_sd=0.015,
    rng=None,
):
    """Trials and their per-prompt exact match: prompt e of task k is right with probability
    clip(a_k + 0.08 log2(eff * B / 32) + d_e + seed effect), so a selector with efficiency 2 matches
    random with half the labels (B / B_random = 0.5 wherever 2B is inside random's curve)."""
    rng = rng or np.random.default_rng(0)
    a = rng.uniform(0.1, 0.4, size=n_tasks)
    d = rng.normal(0, 0.1, size=(n_tasks, per_task))
    trials, ex = [], []
    for sel, eff in sel_eff.items():
        for b in budgets:
            for s in seeds:
                tid = f"{sel}-b{b}-s{s}"
                shift = rng.normal(0, seed_sd)
                p = np.clip(a[:, None] + 0.08 * math.log2(eff * b / 32) + d + shift, 0, 1)
                hit = (rng.random(p.shape) < p).astype(float)
                trials.append(
                    dict(
                        trial_id=tid,
                        selector=sel,
                        params="{}",
                        budget=b,
                        seed=s,
                        exact_match=hit.mean(axis=1).mean(),
                        status="TERMINATED",
                    )
                )
                for k in range(n_tasks):
                    for e in range(per_task):
                        ex.append((tid, f"t{k}-{e}", f"task{k}", hit[k, e]))
    return pd.DataFrame(trials), pd.DataFrame(ex, columns=["trial_id", "row_id", "task", "exact_match"])


def test_bootstrap_point_values_reproduce_the_macro_metric():
    trials, ex = _per_example_experiment({"random": 1.0, "fl": 2.0}, seeds=(0, 1))
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=50)
    eff = R.label_efficiency(R.summarize(trials, "exact_match"), "exact_match")
    pb = boot["per_budget"].set_index("budget")
    np.testing.assert_allclose(pb["ratio"], eff.set_index("budget")["ratio"], rtol=1e-9)
    assert boot["resampled"] == "seeds and eval prompts" and boot["min_seeds"] == 2


def test_bootstrap_interval_covers_the_true_ratio():
    # 40 simulated experiments: the 95% interval at B=64 and B=128 (true ratio 0.5) should cover it
    # in about 95% of them; a broken interval (seeds only, prompts ignored, or too narrow) does not
    rng = np.random.default_rng(1)
    cover, width = {64: 0, 128: 0}, []
    n_exp = 40
    for _ in range(n_exp):
        trials, ex = _per_example_experiment({"random": 1.0, "fl": 2.0}, rng=rng)
        pb = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=400, seed=int(rng.integers(1 << 30)))[
            "per_budget"
        ].set_index("budget")
        for b in cover:
            cover[b] += pb.loc[b, "lo"] <= 0.5 <= pb.loc[b, "hi"]
        width.append(pb.loc[128, "hi"] / pb.loc[128, "lo"])
    for b, c in cover.items():
        assert c / n_exp >= 0.85, (b, c)
    assert np.median(width) > 1.1  # the intervals are not degenerate: they have to work to cover


def test_single_seed_gets_no_headline():
    trials, ex = _per_example_experiment({"random": 1.0, "fl": 4.0}, seeds=(0,))
    eff = R.label_efficiency(R.summarize(trials, "exact_match"), "exact_match")
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=200)
    h = R.significance_headline(boot, "exact_match", eff)
    assert h["selector"] is None and h["ratio"] is None
    assert "no headline" in h["text"] and "single seed" in h["text"]


def test_clearly_better_selector_gets_a_headline_and_a_copy_of_random_does_not():
    # efficiency 4: a quarter of the labels, i.e. +0.16 exact match at every budget
    trials, ex = _per_example_experiment({"random": 1.0, "fl": 4.0, "random_copy": 1.0}, rng=np.random.default_rng(5))
    eff = R.label_efficiency(R.summarize(trials, "exact_match"), "exact_match")
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=1000)
    h = R.significance_headline(boot, "exact_match", eff)
    assert h["selector"] == "fl" and len(h["significant_budgets"]) >= 2 and h["interval"][1] < 1
    assert h["ratio"] == pytest.approx(0.25, abs=0.1)
    assert "fl reaches random's exact_match with fewer labels" in h["text"] and "excluding 1" in h["text"]
    assert "Two seeds per cell" not in h["text"]  # three seeds
    pb = boot["per_budget"]
    copy = pb[pb["label"] == "random_copy"]
    assert (copy["hi"] >= 1).sum() >= 4  # indistinguishable from random nearly everywhere
    # without the better selector the headline says the difference is not significant
    t2, e2 = trials[trials.selector != "fl"], ex[~ex.trial_id.str.startswith("fl-")]
    b2 = R.bootstrap_label_efficiency(t2, "exact_match", e2, n_boot=1000, seed=3)
    if (b2["per_budget"]["hi"] < 1).any():  # a 5% false positive at one budget is possible; then it names it
        pytest.skip("a false positive at one budget in this draw")
    h2 = R.significance_headline(b2, "exact_match")
    assert h2["selector"] is None and "not significant" in h2["text"] and "random_copy" in h2["text"]


def test_significantly_worse_selector_is_named_never_called_not_significant():
    # efficiency 0.25: four times the labels; where the interval lies above 1 the headline says so
    trials, ex = _per_example_experiment({"random": 1.0, "bad": 0.25}, rng=np.random.default_rng(7))
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=1000)
    h = R.significance_headline(boot, "exact_match")
    pb = boot["per_budget"]
    worse = sorted(int(b) for b in pb[pb["lo"] > 1]["budget"])
    assert len(worse) >= 3 and h["selector"] is None and h["worse_budgets"] == {"bad": worse}
    assert "significantly MORE labels than random (interval above 1): bad at B=" in h["text"]
    unclear = pb[(pb["lo"] <= 1) & (pb["hi"] >= 1)]
    assert ("not significant" in h["text"]) == (len(unclear) > 0)
    for b in worse:
        assert f"B={b}: " in h["text"]


def _demo_shaped(sel_eff: dict[str, float], rng) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The quickstart's grid: selectors at B=16 and 64, random also at 128, two seeds."""
    trials, ex = _per_example_experiment(sel_eff, budgets=(16, 64, 128), seeds=(0, 1), rng=rng)
    drop = set(trials[(trials.selector != "random") & (trials.budget == 128)].trial_id)
    return trials[~trials.trial_id.isin(drop)], ex[~ex.trial_id.isin(drop)]


def test_demo_shaped_sweep_headline_gives_each_cell_and_says_not_significant():
    trials, ex = _demo_shaped({"random": 1.0, "typiclust": 1.0}, np.random.default_rng(3))
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=1000)
    pb = boot["per_budget"].set_index("budget")
    assert sorted(pb.index) == [16, 64] and sorted(boot["random_curve"]) == [16, 64, 128]
    assert ((pb["lo"] <= 1) & (pb["hi"] >= 1)).all()  # a copy of random: every interval includes 1
    h = R.significance_headline(boot, "exact_match")
    assert h["selector"] is None and h["worse_budgets"] == {}
    cells = ", ".join(
        f"B={b}: {pb.loc[b, 'ratio_bound']}{pb.loc[b, 'ratio']:.2f}x {R.format_interval(pb.loc[b])}" for b in (16, 64)
    )
    # at random's smallest budget the upper end is the bound "random needs fewer than 16", not a 1.00
    assert pb.loc[16, "ratio_bound"] == ">" and pb.loc[16, "hi_bound"] == ">" and pb.loc[16, "lo_bound"] == ""
    assert "at these budgets" in h["text"] and f"not significant (interval includes 1): typiclust at {cells}" in h["text"]
    assert "MORE" not in h["text"] and "fewer labels at" not in h["text"]
    assert h["text"].endswith("confirm with >= 3 seeds (sweep.seeds=[0, 1, 2]).")  # two seeds: indicative only


def test_worse_than_random_at_randoms_smallest_budget_in_every_resample_is_significant():
    # efficiency 0.25 at B=16, random's smallest budget: random needs fewer than 16 labels in every resample,
    # so B / B_random > 1 throughout (a bound of exactly 1, strictly exceeded); at 64 random needs about 16
    trials, ex = _demo_shaped({"random": 1.0, "typiclust": 0.25}, np.random.default_rng(5))
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=1000)
    pb = boot["per_budget"].set_index("budget")
    assert pb.loc[16, "ratio_bound"] == ">" and pb.loc[16, "censored"] == 1.0 and pb.loc[16, "lo"] > 1
    h = R.significance_headline(boot, "exact_match")
    assert h["worse_budgets"] == {"typiclust": [16, 64]} and "not significant" not in h["text"]
    assert "significantly MORE labels than random (interval above 1): typiclust at B=16: >1.00x [>1.00, >1.00]" in h["text"]
    assert "a bound, the selector's value lies beyond random's measured curve" in h["text"]
    assert pb.loc[16, "lo_bound"] == pb.loc[16, "hi_bound"] == ">"  # both ends are the bound, strictly exceeded
    assert "| typiclust | >1.00 [>1.00, >1.00] **>1** |" in R.interval_table(boot)


def test_a_measured_end_a_hair_from_1_gets_a_third_decimal():
    row = {"lo": 0.9213, "hi": 0.9981, "lo_bound": "", "hi_bound": ""}
    assert R.format_interval(row) == "[0.92, 0.998]"  # excludes 1: it must not print as 1.00
    assert R.format_interval({**row, "hi": 1.0}) == "[0.92, 1.00]"
    assert R.format_interval({**row, "hi": 1.0004}) == "[0.92, 1.000]"
    assert R.format_interval({**row, "hi": float(np.nextafter(1.0, 2.0)), "hi_bound": ">"}) == "[0.92, >1.00]"


@pytest.mark.parametrize("seed", range(20))
def test_interval_end_is_marked_a_bound_exactly_when_censored_resamples_decide_it(seed):
    # brute force: an end is a bound iff pushing the censored resamples further out moves it
    rng = np.random.default_rng(seed)
    n, q = int(rng.integers(20, 400)), 0.025
    below = rng.choice([0.0, 0.01, 0.02, 0.03, 0.2, 0.97, 0.98, 1.0])  # share censored below / above
    above = (1 - below) * rng.choice([0.0, 0.01, 0.03, 0.5, 1.0])
    code = rng.choice([1, 0, -1], size=n, p=[below, 1 - below - above, above])
    values = rng.uniform(0.5, 2.0, size=n)
    ratio = np.where(code == 1, np.nextafter(0.5, 0), np.where(code == -1, np.nextafter(2.0, np.inf), values))
    pushed = np.where(code == 1, 0.1, np.where(code == -1, 10.0, values))
    marks = R._endpoint_bounds(code, q)
    for p_, mark in zip((q, 1 - q), marks):
        moved = np.quantile(pushed, p_) != np.quantile(ratio, p_)
        assert bool(mark) == moved, (p_, mark, int((code == 1).sum()), int((code == -1).sum()), n)
        pos = p_ * (n - 1)
        mixed = math.floor(pos) < (code == 1).sum() and math.ceil(pos) >= n - (code == -1).sum()
        if mark and not mixed:  # (between a "<" and a ">" resample it is no value either way; marked "<")
            assert mark == ("<" if np.quantile(pushed, p_) < np.quantile(ratio, p_) else ">")


def test_demo_shaped_sweep_with_a_clear_winner_names_its_budgets():
    # efficiency 4 at B=16 and 64 is inside random's curve because random also ran at 128 (64 x 4 = 256 is
    # beyond it: a bound there, counted at B / 128 = 0.5, which still excludes 1)
    trials, ex = _demo_shaped({"random": 1.0, "typiclust": 4.0}, np.random.default_rng(4))
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=1000)
    h = R.significance_headline(boot, "exact_match")
    pb = boot["per_budget"].set_index("budget")
    wins = sorted(int(b) for b in pb.index[pb["hi"] < 1])
    assert h["selector"] == "typiclust" and h["significant_budgets"] == wins and len(wins) >= 1
    assert "typiclust reaches random's exact_match with fewer labels at" in h["text"]


def test_loss_bootstrap_is_token_weighted_and_lower_is_better():
    rng = np.random.default_rng(2)
    trials, ex = [], []
    for sel, eff in (("random", 1.0), ("fl", 2.0)):
        for b in (32, 64, 128, 256):
            for s in (0, 1, 2):
                tid = f"{sel}-b{b}-s{s}"
                n_tok = rng.integers(5, 30, size=60)
                per_tok = 3.0 - 0.3 * math.log2(eff * b / 32) + rng.normal(0, 0.05)
                loss_sum = n_tok * (per_tok + rng.normal(0, 0.2, size=60))
                tasks = np.repeat(["a", "b", "c"], 20)
                macro = np.mean([loss_sum[tasks == t].sum() / n_tok[tasks == t].sum() for t in "abc"])
                trials.append(dict(trial_id=tid, selector=sel, params="{}", budget=b, seed=s, loss=macro))
                ex += [(tid, f"r{i}", tasks[i], loss_sum[i], n_tok[i]) for i in range(60)]
    trials = pd.DataFrame(trials)
    ex = pd.DataFrame(ex, columns=["trial_id", "row_id", "task", "loss_sum", "n_tokens"])
    boot = R.bootstrap_label_efficiency(trials, "loss", ex, n_boot=300)
    eff = R.label_efficiency(R.summarize(trials, "loss"), "loss")
    pb = boot["per_budget"].set_index("budget")
    np.testing.assert_allclose(pb["ratio"], eff.set_index("budget")["ratio"], rtol=1e-9)  # macro of token-weighted
    assert pb.loc[64, "ratio"] == pytest.approx(0.5, abs=0.1) and pb.loc[64, "hi"] < 1


def test_build_report_resamples_prompts_from_the_trials_predictions(tmp_path):
    trials, ex = _per_example_experiment({"random": 1.0, "facility_location": 2.0}, budgets=(32, 64, 128), seeds=(0, 1))
    run = get_store(tmp_path / "run")
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(trials, preserve_index=False))
    for tid, g in ex.groupby("trial_id"):  # what evaluate_models writes next to each trial's metrics.json
        rows = [
            dict(row_id=r.row_id, task=r.task, variant=v, exact_match=r.exact_match, loss_sum=1.0, n_tokens=2)
            for r in g.itertuples()
            for v in ("base", "finetuned")
        ]
        run.child("sweep", "trials", tid, "predictions.jsonl").write_jsonl(rows)
    out = R.build_report(run)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "seeds and eval prompts" in md and "geometric mean" in md
    assert (tmp_path / "run" / "report" / "label_efficiency_intervals_exact_match.csv").exists()
    assert out["headline"]["resampled"] == "seeds and eval prompts"
    one = trials[trials.seed == 0]
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(one, preserve_index=False))
    out = R.build_report(run)
    assert out["headline"]["selector"] is None and "no headline" in out["headline"]["text"]
    assert "no headline" in (tmp_path / "run" / "report" / "report.md").read_text()


def test_flat_random_curve_gives_no_ratio_and_no_claim():
    # exact match 0 everywhere (a model that learned nothing): ties, not "random needs fewer labels"
    trials, ex = _per_example_experiment({"random": 1.0, "fl": 2.0}, budgets=(8, 16, 32), seeds=(0, 1))
    trials["exact_match"] = 0.0
    ex["exact_match"] = 0.0
    boot = R.bootstrap_label_efficiency(trials, "exact_match", ex, n_boot=100)
    assert boot["flat"] and boot["per_budget"]["ratio"].isna().all()
    h = R.significance_headline(boot, "exact_match")
    assert h["selector"] is None and "does not change across its budgets" in h["text"]
    assert "n/a" in R.interval_table(boot)


def test_flat_random_curve_report_says_no_ratio(tmp_path):
    df = _curves({"random": 1.0, "fl": 2.0}, budgets=(8, 16, 32), seeds=(0, 1))
    df["exact_match"] = 0.0
    eff = R.label_efficiency(R.summarize(df, "exact_match"), "exact_match")
    assert eff["ratio"].isna().all() and set(eff["bound"]) == {"flat"}
    run = get_store(tmp_path / "run")
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(df, preserve_index=False))
    out = R.build_report(run)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert out["headline"]["selector"] is None and "random's curve is flat" in md and "2.00x" not in md


# ---- one-shot vs multi-round: curves per (selector, rounds), compute ---------------------------


def _design_results():
    """random, uncertainty (one round) and uncertainty with 2 rounds, 2 seeds, no noise: uncertainty-2
    matches random at twice its budget (B / B_random = 0.5) and costs 2.5x its one-round design."""
    rows = []
    for sel, rounds, eff, cost in [("random", 1, 1.0, 100.0), ("uncertainty", 1, 1.25, 100.0), ("uncertainty", 2, 2.0, 250.0)]:
        for b in (25, 50, 100):
            for s in (0, 1):
                rows.append(
                    dict(
                        trial_id=f"{sel}-r{rounds}-b{b}-s{s}",
                        selector=sel,
                        params="{}",
                        rounds=rounds,
                        budget=b,
                        seed=s,
                        exact_match=0.1 * math.log2(eff * b / 25),
                        status="TERMINATED",
                        compute_scoring_s=10.0 * rounds,
                        compute_selection_s=1.0,
                        compute_training_s=cost * b / 25 - 10.0 * rounds - 1.0 - 4.0 * s,
                        compute_evaluation_s=4.0 * s,
                        compute_total_s=cost * b / 25,  # the sum of the four
                    )
                )
    return pd.DataFrame(rows)


def test_curves_are_per_selector_and_round_count():
    s = R.summarize(_design_results(), "exact_match")
    assert sorted(s.label.unique()) == ["random", "uncertainty", "uncertainty, 2 rounds"]
    assert s[s.label == "uncertainty, 2 rounds"]["rounds"].unique().tolist() == [2]
    fig = R.plot_learning_curves(s, "exact_match")
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    one, two = lines["uncertainty"], lines["uncertainty, 2 rounds"]
    assert one.get_color() == two.get_color() and one.get_linestyle() == "-" and two.get_linestyle() == "-."
    assert matplotlib.colors.to_hex(lines["random"].get_color()) == "#000000"
    matplotlib.pyplot.close(fig)
    # random is the reference at one round only, and 2-round variants are compared with it like any selector
    eff = R.label_efficiency(s, "exact_match").set_index(["label", "budget"])
    assert eff.loc[("uncertainty, 2 rounds", 25), "ratio"] == pytest.approx(0.5)
    assert eff.loc[("uncertainty", 50), "ratio"] == pytest.approx(0.8)


def test_compute_against_one_shot_and_labels_against_random_by_hand():
    res = _design_results()
    csum = R.compute_summary(res).set_index(["label", "budget"])
    # means over seeds 0 and 1: evaluation 4 s x (0 + 1) / 2
    assert csum.loc[("uncertainty, 2 rounds", 50), "compute_total_s"] == 500.0
    assert csum.loc[("uncertainty, 2 rounds", 50), "compute_scoring_s"] == 20.0
    assert csum.loc[("uncertainty, 2 rounds", 50), "compute_evaluation_s"] == 2.0
    assert csum.loc[("uncertainty, 2 rounds", 50), "vs_one_shot"] == pytest.approx(2.5)  # 500 / 200
    assert csum.loc[("uncertainty", 50), "vs_one_shot"] == 1.0 and csum.loc[("uncertainty", 50), "n"] == 2
    boot = R.bootstrap_label_efficiency(res, "exact_match", n_boot=200)
    table = R.design_table(R.compute_summary(res), boot)
    assert "| 25 | random | 1 | 1 (the reference) | 100.0 | 1 (one-shot) |" in table
    assert "| 25 | uncertainty | 1 | 0.80 [0.80, 0.80] **<1** | 100.0 | 1 (one-shot) |" in table
    assert "| 50 | uncertainty | 2 | 0.50 [0.50, 0.50] **<1** | 500.0 | 2.50x |" in table
    # at B=100 (random's largest budget) uncertainty-2 is beyond random's best in every resample: random
    # needs more than 100 labels, so B / B_random < 1 strictly - a bound, and one that excludes 1
    assert "| 100 | uncertainty | 2 | <1.00 [<1.00, <1.00] **<1** | 1000.0 | 2.50x |" in table
    # without a one-round trial of that selector there is nothing to compare with
    alone = R.compute_summary(res[~((res.selector == "uncertainty") & (res.rounds == 1))])
    assert "- (no one-round trial)" in R.design_table(alone, None) and np.isnan(alone["vs_one_shot"].iloc[-1])
    md = R.compute_table(R.compute_summary(res))
    assert "| uncertainty, 2 rounds | 50 | 2 | 20.0 | 1.0 | 477.0 | 2.0 | 500.0 |" in md and "GPU" not in md


def test_metric_vs_compute_plot_is_log_x_at_the_mean_compute():
    fig = R.plot_metric_vs_compute(_design_results(), "exact_match")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "compute" in ax.get_xlabel() and ax.get_ylabel()
    lines = {l.get_label(): l for l in ax.get_lines()}
    x, y = lines["uncertainty, 2 rounds"].get_data()
    assert list(x) == [250.0, 500.0, 1000.0]
    np.testing.assert_allclose(y, [0.1 * math.log2(2 * b / 25) for b in (25, 50, 100)])
    assert lines["uncertainty"].get_color() == lines["uncertainty, 2 rounds"].get_color()
    matplotlib.pyplot.close(fig)


def test_one_shot_report_is_todays_plus_the_compute_section(tmp_path):
    df = _curves({"random": 1.0, "facility_location": 2.0}, budgets=(25, 50, 100), noise=0.005)
    texts = {}
    for name, frame in [("plain", df), ("compute", df.assign(compute_training_s=30.0, compute_total_s=40.0 + df.budget))]:
        run = get_store(tmp_path / name)
        run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(frame, preserve_index=False))
        R.build_report(run)
        texts[name] = (tmp_path / name / "report" / "report.md").read_text().replace(str(tmp_path / name), "RUN")
    assert "## Compute" not in texts["plain"] and "rounds" not in texts["plain"] and "vs compute" not in texts["plain"]
    head, _, section = texts["compute"].partition("## Compute\n")
    assert head == texts["plain"]  # nothing else changed
    assert "| facility_location | 50 | 3 | - | - | 30.0 | - | 90.0 |" in section
    assert (tmp_path / "compute" / "report" / "compute.csv").exists()


def test_report_of_a_sweep_with_rounds(tmp_path):
    run = get_store(tmp_path / "run")
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(_design_results(), preserve_index=False))
    out = R.build_report(run, metrics=["exact_match"])
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    for needle in (
        "| rounds | 1, 2 (1: the one-shot design) |",
        "| selectors | random; uncertainty; uncertainty, 2 rounds |",
        "compute spent against the same selector's one-round design",
        "| 50 | uncertainty | 2 | 0.50 [0.50, 0.50] **<1** | 500.0 | 2.50x |",
        "![exact_match vs compute](metric_vs_compute_exact_match.png)",
        "## Compute",
    ):
        assert needle in md, needle
    assert any(p.endswith("metric_vs_compute_exact_match.png") for p in out["plots"])
    assert out["headline"]["selector"] == "uncertainty, 2 rounds"
