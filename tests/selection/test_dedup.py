"""dedup: exact and near-duplicate removal against a brute-force leader rule, never paying twice, the
fill when the budget exceeds the distinct prompts, inner selectors and their objective on the whole pool."""

import numpy as np
import pytest
from selection_data import blobs, score_table

from edsft.selection import SELECTORS, dedup_keep, objective, select


def brute_keep(X, threshold):
    """Leader rule in float64 over all pairs: a row not yet removed is kept and removes its near duplicates."""
    U = X.astype(np.float64) / np.linalg.norm(X, axis=1, keepdims=True)
    C = U @ U.T
    removed = np.zeros(len(X), dtype=bool)
    for i in range(len(X)):
        if removed[i]:
            continue
        removed |= (C[i] >= threshold) & (np.arange(len(X)) > i)
    return np.flatnonzero(~removed)


def pool_with_duplicates(seed=0):
    """150 distinct rows, 40 exact copies of some of them, 30 near copies (cosine ~0.9999) of others."""
    rng = np.random.default_rng(seed)
    X, _ = blobs(150, 16, seed=seed)
    exact = rng.choice(150, 40)
    near = rng.choice(150, 30, replace=False)
    Xn = X[near] + 0.002 * rng.normal(size=(30, 16)).astype(np.float32) * np.linalg.norm(X[near], axis=1, keepdims=True) / 4
    P = np.concatenate([X, X[exact], Xn]).astype(np.float32)
    perm = rng.permutation(len(P))
    return P[perm], perm


@pytest.mark.parametrize("threshold", [0.999, 0.99, 0.95])
def test_keep_matches_brute_force_leader_rule(threshold):
    X, _ = pool_with_duplicates()
    got = dedup_keep(X, threshold, n_neighbors=64)  # enough neighbours to hold every group
    want = brute_keep(X, threshold)
    # float32 similarities may flip pairs within rounding of the threshold; there are none here
    np.testing.assert_array_equal(got, want)


def test_exact_duplicates_only_above_one():
    X, perm = pool_with_duplicates()
    keep = dedup_keep(X, threshold=1.5)
    assert len(keep) == 150 + 30  # the 40 exact copies go, the near copies stay
    assert len(np.unique(X[keep], axis=0)) == len(keep)


def test_dedup_random_never_pays_twice():
    X, _ = pool_with_duplicates(1)
    cos = lambda A: (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (A / np.linalg.norm(A, axis=1, keepdims=True)).T  # noqa: E731
    for seed in range(5):
        res = select("dedup", 120, embeddings=X, seed=seed)
        C = cos(res.indices.size and X[res.indices].astype(np.float64))
        np.fill_diagonal(C, 0)
        assert C.max() < 0.99
    plain = [select("random", 120, embeddings=X, seed=s).indices for s in range(5)]
    assert any((np.fill_diagonal(C := cos(X[p].astype(np.float64)), 0) or C.max()) >= 0.99 for p in plain)


def test_budget_beyond_distinct_rows_fills_with_duplicates():
    X, _ = pool_with_duplicates(2)
    keep = dedup_keep(X, 0.99)
    res = select("dedup", len(keep) + 10, embeddings=X, seed=3)
    assert set(keep.tolist()) <= set(res.indices.tolist())
    assert np.isnan(res.gains[-10:]).all() and len(np.unique(res.indices)) == len(keep) + 10


def test_inner_selector_on_representatives_and_objective_on_whole_pool():
    X, _ = pool_with_duplicates(3)
    S = score_table(len(X))
    keep = dedup_keep(X, 0.99)
    res = select("dedup", 25, embeddings=X, scores=S, inner="facility_location", seed=0)
    inner = select("facility_location", 25, embeddings=X[keep], seed=0)
    np.testing.assert_array_equal(res.indices, keep[inner.indices])
    assert res.objective == pytest.approx(objective("facility_location", res.indices, embeddings=X), rel=1e-6)
    assert res.objective == pytest.approx(objective("dedup", res.indices, embeddings=X, inner="facility_location"), rel=1e-6)
    # score columns follow the kept rows
    unc = select("dedup", 10, embeddings=X, scores=S, inner="uncertainty", inner_params={"score": "min_margin"})
    kept_scores = S["min_margin"][keep]
    assert sorted(S["min_margin"][unc.indices]) == sorted(np.sort(kept_scores)[:10])
    assert SELECTORS["dedup"](inner="uncertainty").score_names() == ("mean_entropy",)
    assert not SELECTORS["dedup"](inner="facility_location").randomized and SELECTORS["dedup"]().randomized


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inner="dedup"), "cannot be nested"),
        (dict(inner="nope"), "inner='nope' is not a selector"),
        (dict(threshold=0.0), "threshold=0.0 must be > 0"),
        (dict(n_neighbors=0), "n_neighbors=0"),
        (dict(inner="k_center", inner_params={"bogus": 1}), r"no parameter\(s\) \['bogus'\]"),
    ],
)
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SELECTORS["dedup"](**kwargs)
