"""Rows chosen before (multi-round selection): facility location and k-center start from them.

References are written out the slow obvious way (float64, every gain recomputed every step) and
brute force over every subset; the golden picks were checked against them when committed."""

import itertools

import numpy as np
import pytest
from selection_data import blobs, score_table

from edsft.selection import SELECTORS, best_similarity, get_selector, min_distance, objective, select


def _split(n, m, d, seed, k=5):
    """A pool of n rows and m rows chosen before, from the same blobs."""
    X, _ = blobs(n + m, d, k=k, seed=seed)
    return X[:n], X[n:]


def sim64(A, B, metric="cosine", gamma=None):
    A, B = A.astype(np.float64), B.astype(np.float64)
    if metric == "cosine":
        A = A / np.linalg.norm(A, axis=1, keepdims=True)
        B = B / np.linalg.norm(B, axis=1, keepdims=True)
        return np.maximum(A @ B.T, 0.0)
    return np.exp(-gamma * ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1))


def fl_reference(K, cur, budget):
    """Textbook greedy from a starting coverage `cur` (ties -> lowest index)."""
    cur, picks = cur.copy(), []
    for _ in range(budget):
        gains = np.maximum(K - cur[:, None], 0).sum(axis=0)
        gains[picks] = -1
        j = int(np.argmax(gains))
        picks.append(j)
        cur = np.maximum(cur, K[:, j])
    return picks


def fl_value(K, cur, S):
    return np.maximum(cur, K[:, list(S)].max(axis=1)).sum() if len(S) else cur.sum()


@pytest.mark.parametrize("metric", ["cosine", "rbf"])
@pytest.mark.parametrize("seed", range(3))
def test_facility_location_from_the_chosen_set_is_the_textbook_greedy(metric, seed):
    X, X0 = _split(150, 12, 5, seed)
    gamma = 0.05 if metric == "rbf" else None
    params = {"metric": metric, **({"gamma": gamma} if gamma else {})}
    K = sim64(X, X, metric, gamma)
    cur = sim64(X, X0, metric, gamma).max(axis=1)
    ref = fl_reference(K, cur, 15)
    for opt in ("naive", "lazy"):
        res = select("facility_location", 15, embeddings=X, chosen=X0, optimizer=opt, **params)
        assert res.indices.tolist() == ref, opt
        # the objective is f(chosen + picks) over the pool
        assert res.objective == pytest.approx(fl_value(K, cur, ref), rel=1e-4)
        assert objective("facility_location", res.indices, embeddings=X, chosen=X0, **params) == pytest.approx(res.objective)
    # starting from the chosen set changes the picks (else the test would prove nothing)
    assert select("facility_location", 15, embeddings=X, **params).indices.tolist() != ref


def test_facility_location_from_the_chosen_set_golden():
    X, X0 = _split(80, 6, 4, 11, k=4)
    res = select("facility_location", 8, embeddings=X, chosen=X0, optimizer="lazy")
    assert res.indices.tolist() == fl_reference(sim64(X, X), sim64(X, X0).max(axis=1), 8)
    assert res.indices.tolist() == [60, 40, 23, 41, 34, 72, 56, 47]


@pytest.mark.parametrize("seed", range(4))
def test_facility_location_from_the_chosen_set_against_brute_force(seed):
    X, X0 = _split(12, 3, 3, seed, k=3)
    K, cur = sim64(X, X), sim64(X, X0).max(axis=1)
    for budget in (1, 2, 3):
        best = max(fl_value(K, cur, S) for S in itertools.combinations(range(12), budget))
        res = select("facility_location", budget, embeddings=X, chosen=X0, optimizer="naive")
        value = fl_value(K, cur, res.indices)
        assert value >= (1 - 1 / np.e) * best - 1e-9  # the greedy's guarantee on f(chosen + S)
        if budget == 1:  # one greedy step is exact
            assert value == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("sparse", [False, True])
def test_lazy_naive_and_stochastic_agree_from_the_chosen_set(sparse):
    X, X0 = _split(600, 40, 6, 2)
    params = dict(dense_max_n=0 if sparse else 10**9, n_neighbors=12)
    naive = select("facility_location", 50, embeddings=X, chosen=X0, optimizer="naive", **params)
    lazy = select("facility_location", 50, embeddings=X, chosen=X0, optimizer="lazy", **params)
    np.testing.assert_array_equal(naive.indices, lazy.indices)
    np.testing.assert_array_equal(naive.gains, lazy.gains)
    assert np.all(np.diff(naive.gains) <= 0)
    # dense blocks skipping (rows reordered by clustering) sees the same coverage vector: gains are exact
    sto = select("facility_location", 50, embeddings=X, chosen=X0, optimizer="stochastic", epsilon=0.01, **params)
    assert sto.objective >= 0.98 * naive.objective


def test_hybrid_from_the_chosen_set_adds_the_bonus_of_the_picks_only():
    X, X0 = _split(120, 10, 4, 5)
    S = score_table(120, 5)
    res = select("fl_uncertainty", 10, embeddings=X, scores=S, chosen=X0, lambda_=2.0)
    plain = objective("facility_location", res.indices, embeddings=X, chosen=X0)
    u = S["mean_entropy"]
    bonus = 2.0 * ((u[res.indices] - u.min()) / (u.max() - u.min())).sum()
    assert res.objective == pytest.approx(plain + bonus, rel=1e-6)


def k_center_reference(X, X0, budget, metric="euclidean"):
    X, X0 = X.astype(np.float64), X0.astype(np.float64)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        X0 = X0 / np.linalg.norm(X0, axis=1, keepdims=True)
        dist = lambda z: np.maximum(1.0 - X @ z, 0.0)  # noqa: E731
    else:
        dist = lambda z: np.linalg.norm(X - z, axis=1)  # noqa: E731
    mind = np.min([dist(z) for z in X0], axis=0)
    picks = []
    for _ in range(budget):
        j = int(np.argmax(np.where(np.isin(np.arange(len(X)), picks), -1, mind)))
        picks.append(j)
        mind = np.minimum(mind, dist(X[j]))
    return picks, mind.max()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_k_center_from_the_chosen_set_is_the_textbook_loop(metric):
    X, X0 = _split(200, 9, 5, 8)
    res = select("k_center", 12, embeddings=X, chosen=X0, metric=metric, seed=3)
    ref, radius = k_center_reference(X, X0, 12, metric)
    assert res.indices.tolist() == ref
    assert res.objective == pytest.approx(radius, rel=1e-4, abs=1e-5)
    assert objective("k_center", res.indices, embeddings=X, chosen=X0, metric=metric) == pytest.approx(res.objective, rel=1e-5)
    # the first pick is the row farthest from the chosen set (no random first center), whatever the seed
    assert res.gains[0] == pytest.approx(min_distance(X, X0, metric).max(), rel=1e-4)
    again = select("k_center", 12, embeddings=X, chosen=X0, metric=metric, seed=99)
    np.testing.assert_array_equal(res.indices, again.indices)
    golden = {
        "euclidean": [97, 90, 138, 126, 93, 12, 191, 133, 122, 168, 65, 116],
        "cosine": [97, 126, 110, 185, 90, 22, 187, 93, 65, 12, 122, 191],
    }
    assert ref == golden[metric]


def test_k_center_from_the_chosen_set_equals_initial_positions_on_the_joined_pool():
    X, X0 = _split(30_000, 50, 8, 4)  # blocked traversal (n >= 20k)
    res = select("k_center", 20, embeddings=X, chosen=X0)
    joined = np.concatenate([X, X0])
    ref = select("k_center", 20, embeddings=joined, initial=tuple(range(len(X), len(joined))))
    np.testing.assert_array_equal(res.indices, ref.indices)
    assert res.objective == pytest.approx(ref.objective, rel=1e-6)


def test_k_center_from_the_chosen_set_against_brute_force():
    X, X0 = _split(12, 2, 2, 1, k=3)
    for budget in (1, 2, 3):
        opt = min(
            np.r_[min_distance(X, np.concatenate([X0, X[list(S)]]))].max() for S in itertools.combinations(range(12), budget)
        )
        res = select("k_center", budget, embeddings=X, chosen=X0)
        assert res.objective <= 2 * opt + 1e-5


def test_composites_pass_the_chosen_set_to_their_inner_selector(pool):
    X, S, T = pool
    X0 = blobs(20, 8, seed=77)[0]
    fl = select("facility_location", 12, embeddings=X, chosen=X0)
    g = select("greedi", 12, embeddings=X, chosen=X0, m=1)
    np.testing.assert_array_equal(fl.indices, g.indices)
    assert g.objective == pytest.approx(fl.objective)
    d = select("dedup", 12, embeddings=X, chosen=X0, inner="facility_location", threshold=2.0)  # exact duplicates only
    np.testing.assert_array_equal(d.indices, fl.indices)
    tb = get_selector("task_balanced", inner="k_center").with_chosen(X0)
    assert tb.uses_chosen and np.array_equal(tb._inner().chosen, X0)
    res = tb.select(12, X, S, T)
    ref = get_selector("task_balanced", inner="k_center").select(12, X, S, T)
    assert res.indices.tolist() != ref.indices.tolist()


def test_selectors_without_a_chosen_set_ignore_it(pool):
    X, S, T = pool
    X0 = blobs(20, 8, seed=77)[0]
    for name in ("random", "uncertainty", "typiclust", "probcover"):
        assert not SELECTORS[name].uses_chosen
        a = select(name, 10, embeddings=X, scores=S, tasks=T, seed=1)
        b = select(name, 10, embeddings=X, scores=S, tasks=T, seed=1, chosen=X0)
        np.testing.assert_array_equal(a.indices, b.indices)


def test_chosen_embeddings_must_match_the_pool():
    from edsft.errors import UserError

    X, X0 = _split(50, 5, 4, 0)
    with pytest.raises(UserError, match="dimensions"):
        select("facility_location", 3, embeddings=X, chosen=X0[:, :3])
    with pytest.raises(UserError, match="NaN"):
        select("k_center", 3, embeddings=X, chosen=np.full((2, 4), np.nan))
    # an empty chosen set is no chosen set
    np.testing.assert_array_equal(
        select("facility_location", 3, embeddings=X, chosen=np.zeros((0, 4))).indices,
        select("facility_location", 3, embeddings=X).indices,
    )
    assert best_similarity(X, X0).shape == (50,)
