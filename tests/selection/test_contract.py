"""Every registered selector honours the SelectionResult contract."""

import numpy as np
import pytest

from edsft.selection import (
    SELECTORS,
    ByTask,
    Distribution,
    PoolGamma,
    ScoreRange,
    SelectionResult,
    Selector,
    TaskConfidence,
    TwoRound,
    default_gamma,
    objective,
    select,
)

NAMES = sorted(SELECTORS)


def test_registry_lists_every_family():
    assert {
        "random",
        "uncertainty",
        "k_center",
        "uncertain_k_center",
        "facility_location",
        "fl_uncertainty",
        "task_balanced",
        "greedi",
    } <= set(SELECTORS)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name, pool):
    X, S, T = pool
    res = select(name, 25, embeddings=X, scores=S, tasks=T, seed=0)
    assert isinstance(res, SelectionResult)
    assert res.indices.dtype == np.int64 and res.indices.shape == (25,)
    assert len(np.unique(res.indices)) == 25
    assert res.indices.min() >= 0 and res.indices.max() < len(X)
    assert res.gains.dtype == np.float64 and res.gains.shape == (25,)
    again = select(name, 25, embeddings=X, scores=S, tasks=T, seed=0)
    np.testing.assert_array_equal(res.indices, again.indices)
    other = select(name, 25, embeddings=X, scores=S, tasks=T, seed=1)
    if SELECTORS[name]().randomized:
        assert not np.array_equal(res.indices, other.indices)
    else:
        np.testing.assert_array_equal(res.indices, other.indices)
    if not np.isnan(res.objective):
        # the standalone objective (what the distributed stage calls) agrees with the selector's own
        val = objective(name, res.indices, embeddings=X, scores=S, tasks=T)
        assert val == pytest.approx(res.objective, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_budget_equal_to_pool_takes_everything(name, pool):
    X, S, T = pool
    X, S, T = X[:40], {k: v[:40] for k, v in S.items()}, T[:40]
    res = select(name, 40, embeddings=X, scores=S, tasks=T, seed=0)
    assert sorted(res.indices.tolist()) == list(range(40))


def test_budget_over_pool_caps_when_allowed(pool):
    X, S, T = pool
    res = select("k_center", 10_000, embeddings=X, allow_budget_over_pool=True)
    assert len(res.indices) == len(X)


def test_class_and_function_agree(pool):
    X, S, T = pool
    a = SELECTORS["facility_location"](metric="cosine", optimizer="lazy").select(30, X, S, T, 0)
    b = select("facility_location", 30, embeddings=X, scores=S, tasks=T, metric="cosine", optimizer="lazy")
    np.testing.assert_array_equal(a.indices, b.indices)


# -- the distributed contract (edsft.selection.base): what the map-reduce stage relies on -----------
def _blocks(n, k=3):
    return np.array_split(np.arange(n), k)


def test_statistics_merged_over_blocks_equal_the_whole_pool(pool):
    X, S, T = pool
    stats = [
        PoolGamma(),
        ScoreRange("min_margin"),
        ByTask(ScoreRange("mean_entropy")),
        TaskConfidence("mean_entropy", None, (float(S["mean_entropy"].min()), float(S["mean_entropy"].max()))),
    ]
    for st in stats:
        parts = [st.partial(X[b], {k: v[b] for k, v in S.items()}, T[b]) for b in _blocks(len(X))]
        merged = parts[0]
        for part in parts[1:]:
            merged = st.merge(merged, part)
        whole, got = st.of(X, S, T), st.value(merged)
        if isinstance(whole, dict):
            assert sorted(whole) == sorted(got)
            whole, got = [whole[k] for k in sorted(whole)], [got[k] for k in sorted(got)]
        np.testing.assert_allclose(np.array(got, dtype=float), np.array(whole, dtype=float), rtol=1e-12)
    assert PoolGamma().of(X, None, None) == default_gamma(X)  # one block: numpy's var, bit for bit


def test_with_globals_binds_statistics_not_hyperparameters(pool):
    X, S, T = pool
    fl = SELECTORS["facility_location"](metric="euclidean")
    assert set(fl.pool_statistics()) == {"gamma"} and dict(fl.globals) == {}
    bound = fl.with_globals({"gamma": 0.02})
    assert bound == fl and bound.globals["gamma"] == 0.02 and dict(fl.globals) == {}  # a copy; fl unchanged
    assert bound.unbound_statistics() == {}
    # a bound statistic is used instead of the rows' own: the same as passing gamma as a hyperparameter
    np.testing.assert_array_equal(
        bound.select(20, X).indices, SELECTORS["facility_location"](metric="euclidean", gamma=0.02).select(20, X).indices
    )
    assert not np.array_equal(bound.select(20, X).indices, fl.select(20, X).indices)
    # task_balanced's confidence needs the score's range first: a second statistic once the first is bound
    tb = SELECTORS["task_balanced"]()
    assert set(tb.pool_statistics()) == {"score_range"}
    assert set(tb.bound_to(X, S, T).globals) == {"score_range", "task_confidence"}


@pytest.mark.parametrize("name", NAMES)
def test_every_selector_has_a_distribution_and_two_round_objectives_split_over_shards(name, pool):
    X, S, T = pool
    sel = SELECTORS[name]()
    plan = sel.distribution()
    assert isinstance(plan, Distribution) and isinstance(plan.selector, Selector)
    if not isinstance(plan, TwoRound):
        return
    runner = plan.selector.bound_to(X, S, T)  # the pool's statistics, as the partition map computes them
    idx = select(name, 25, embeddings=X, scores=S, tasks=T, seed=0).indices
    parts = (
        [
            runner.shard_objective(X[b], {k: v[b] for k, v in S.items()}, X[idx], {k: v[idx] for k, v in S.items()})
            for b in _blocks(len(X))
        ]
        if runner.combine
        else [0.0]
    )
    total = {"sum": sum, "max": max, None: sum}[runner.combine](parts)
    total += runner.chosen_objective(X[idx], {k: v[idx] for k, v in S.items()})
    # float32 similarities: a block of rows rounds its GEMM a little differently from the whole pool
    assert total == pytest.approx(runner.objective(idx, embeddings=X, scores=S, tasks=T), rel=1e-6)
