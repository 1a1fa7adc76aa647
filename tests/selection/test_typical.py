"""TypiClust and ProbCover: neighbour search and typicality against brute force, a float64 reference
TypiClust on the same clusters, purity delta and ball graph against explicit balls, greedy coverage
against a set-based greedy and the optimum, golden behaviour on blobs with outliers."""

import itertools

import numpy as np
import pytest
from selection_data import blobs

from edsft.selection import knn_distances, select, typicality
from edsft.selection.typical import (
    ProbCover,
    TypiClust,
    ball_graph,
    kmeans_labels,
    max_coverage_greedy,
    purity_delta,
)


def brute_dist(X, metric):
    X = X.astype(np.float64)
    if metric == "cosine":
        U = X / np.linalg.norm(X, axis=1, keepdims=True)
        return np.maximum(1.0 - U @ U.T, 0.0)
    return np.linalg.norm(X[:, None] - X[None], axis=-1)


def brute_typicality(X, k, metric="cosine"):
    D = brute_dist(X, metric)
    np.fill_diagonal(D, np.inf)
    return 1.0 / (np.sort(D, axis=1)[:, :k].mean(axis=1) + 1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_distances_exact_matches_brute_force(metric):
    X, _ = blobs(150, 5, seed=1)
    idx, d = knn_distances(X, 7, metric)
    D = brute_dist(X, metric)
    np.fill_diagonal(D, np.inf)
    np.testing.assert_allclose(d, np.sort(D, axis=1)[:, :7], atol=1e-5)
    assert not (idx == np.arange(150)[:, None]).any()  # never one's own neighbour
    np.testing.assert_allclose(typicality(X, 7, metric), brute_typicality(X, 7, metric), rtol=1e-4)


def test_knn_distances_approximate_path_recalls_neighbours():
    X, _ = blobs(3000, 8, k=12, seed=2)
    idx_a, d_a = knn_distances(X, 10, "cosine", exact_max_n=100)  # forces the inverted-file search
    idx_e, d_e = knn_distances(X, 10, "cosine")
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(idx_a, idx_e)])
    assert recall > 0.9
    assert (d_a >= d_e - 1e-6).all()  # approximate neighbours are never nearer than the true ones
    # typicality ranks almost the same: the densest decile agrees
    ta, te = typicality(X, 10, exact_max_n=100), typicality(X, 10)
    top = lambda t: set(np.argsort(-t)[:300])  # noqa: E731
    assert len(top(ta) & top(te)) / 300 > 0.85


def reference_typiclust(X, budget, labels, k_max=20, min_size=5, metric="cosine"):
    """The paper's loop in float64 with explicit per-cluster distance matrices."""
    ids, sizes = np.unique(labels, return_counts=True)
    order = [int(ids[i]) for i in np.lexsort((ids, -sizes))]
    big = [c for c in order if (labels == c).sum() > min_size]
    small = [c for c in order if (labels == c).sum() <= min_size]
    left = {c: list(np.flatnonzero(labels == c)) for c in order}
    picks = []
    for group in (big, small):
        while len(picks) < budget and any(left[c] for c in group):
            for c in [c for c in group if left[c]]:
                if len(picks) == budget:
                    break
                rows = np.array(left[c])
                k = max(1, min(k_max, len(rows) // 2))
                t = brute_typicality(X[rows], k, metric) if len(rows) > 1 else np.ones(1)
                j = int(np.argmax(t))
                picks.append(int(rows[j]))
                left[c].remove(rows[j])
    return picks


@pytest.mark.parametrize("budget, seed", [(6, 0), (13, 1), (40, 2)])
def test_typiclust_matches_reference_on_the_same_clusters(budget, seed):
    X, _ = blobs(240, 6, k=5, seed=seed)
    labels = kmeans_labels(X, min(budget, 500), "cosine", seed)
    ref = reference_typiclust(X, budget, labels)
    got = select("typiclust", budget, embeddings=X, seed=seed)
    assert got.indices.tolist() == ref


def test_typiclust_picks_dense_centres_not_outliers():
    # 5 tight blobs of 60 plus 8 isolated far-away points: k-center spends its budget on the outliers,
    # TypiClust picks the centre of each blob
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 6)) * 10
    X = np.concatenate([centers[i] + rng.normal(size=(60, 6)) * 0.5 for i in range(5)] + [rng.normal(size=(8, 6)) * 60]).astype(
        np.float32
    )
    outliers = set(range(300, 308))
    typ = select("typiclust", 5, embeddings=X, metric="euclidean", seed=0)
    kc = select("k_center", 5, embeddings=X, seed=0)
    assert not outliers & set(typ.indices.tolist())
    assert len(outliers & set(kc.indices.tolist())) >= 3
    assert sorted(i // 60 for i in typ.indices) == [0, 1, 2, 3, 4]  # one per blob
    for i in typ.indices:  # ... and it is that blob's most typical point
        b = i // 60
        t = brute_typicality(X[b * 60 : (b + 1) * 60], 20, "euclidean")
        assert i - b * 60 == int(np.argmax(t))


def test_typiclust_cluster_order_drops_small_clusters_until_needed():
    labels = np.array([0] * 3 + [1] * 10 + [2] * 7 + [3] * 10)
    big, small = TypiClust().cluster_order(labels)
    assert big == [1, 3, 2] and small == [0]
    res = select("typiclust", 30, embeddings=blobs(30, 3, seed=0)[0], seed=0)
    assert sorted(res.indices.tolist()) == list(range(30))  # the whole pool when asked for it


# ---- ProbCover ----------------------------------------------------------------------------


def brute_purity(D, labels, delta):
    balls = D <= delta
    return np.mean([(labels[balls[i]] == labels[i]).all() for i in range(len(D))])


@pytest.mark.parametrize("metric, alpha", [("cosine", 0.95), ("euclidean", 0.9), ("euclidean", 0.5)])
def test_purity_delta_is_the_largest_pure_enough_radius(metric, alpha):
    X, _ = blobs(200, 4, k=4, seed=3, spread=2.0)
    labels = kmeans_labels(X, 6, metric, 0)
    delta = purity_delta(X, labels, alpha, metric)
    D = brute_dist(X, metric)
    assert brute_purity(D, labels, delta) >= alpha
    assert brute_purity(D, labels, delta + 1e-5) < alpha  # any larger radius is too impure


def test_purity_delta_approximate_path_agrees():
    X, _ = blobs(2000, 6, k=8, seed=4)
    labels = kmeans_labels(X, 20, "cosine", 0)
    exact = purity_delta(X, labels, 0.95, "cosine")
    approx = purity_delta(X, labels, 0.95, "cosine", exact_max_n=100, n_neighbors=50)
    assert approx == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ball_graph_matches_explicit_balls(metric):
    X, _ = blobs(120, 3, seed=5)
    D = brute_dist(X, metric)
    delta = float(np.quantile(D, 0.1))
    G = ball_graph(X, delta, metric).toarray()
    want = D <= delta
    np.fill_diagonal(want, True)
    # float32 vs float64 may disagree only for pairs within rounding of the cut
    differ = G != want
    assert np.all(np.abs(D[differ] - delta) < 1e-5)
    assert (G == G.T).all()
    approx = ball_graph(X, delta, metric, exact_max_n=10, n_neighbors=20).toarray()
    assert (approx <= G | (np.abs(D - delta) < 1e-5)).all()  # the k-NN cut only ever drops edges


def set_greedy(balls, budget, prio):
    covered, picks = set(), []
    for _ in range(budget):
        gains = [(len(balls[j] - covered), prio[j], j) for j in range(len(balls)) if j not in picks]
        g, _, j = max(gains)
        if g == 0:
            break
        picks.append(j)
        covered |= balls[j]
    return picks, covered


@pytest.mark.parametrize("seed", range(4))
def test_max_coverage_greedy_matches_set_greedy_and_bound(seed):
    X, _ = blobs(14, 2, k=3, seed=seed, spread=2.0)
    D = brute_dist(X, "euclidean")
    G = ball_graph(X, float(np.quantile(D, 0.15)), "euclidean")
    balls = [set(G.indices[G.indptr[i] : G.indptr[i + 1]].tolist()) for i in range(14)]
    prio = np.random.default_rng(seed).permutation(14)
    for budget in (1, 2, 3):
        picks, gains, covered = max_coverage_greedy(G, budget, seed)
        ref, ref_cov = set_greedy(balls, budget, prio)
        assert picks.tolist()[: len(ref)] == ref and covered == len(ref_cov)
        assert gains.sum() == covered
        opt = max(len(set().union(*(balls[j] for j in S))) for S in itertools.combinations(range(14), budget))
        assert covered >= (1 - (1 - 1 / budget) ** budget) * opt - 1e-9


def test_probcover_one_pick_per_blob_then_random_fill():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 5)) * 20
    X = np.concatenate([centers[i] + rng.normal(size=(50, 5)) for i in range(4)]).astype(np.float32)
    res = select("probcover", 4, embeddings=X, metric="euclidean", delta=6.0, seed=0)
    assert sorted(i // 50 for i in res.indices) == [0, 1, 2, 3]
    assert res.objective == pytest.approx(1.0) and res.gains.sum() == 200
    more = select("probcover", 7, embeddings=X, metric="euclidean", delta=6.0, seed=0)
    assert more.indices[:4].tolist() == res.indices.tolist() and (more.gains[4:] == 0).all()
    assert more.objective == pytest.approx(ProbCover(metric="euclidean", delta=6.0).objective(more.indices, X))


def test_probcover_purity_delta_on_blobs_covers_more_than_random():
    X, _ = blobs(600, 8, k=10, seed=6)
    pc = ProbCover()
    res = pc.select(20, X, seed=0)
    rnd = select("random", 20, embeddings=X, seed=0)
    assert res.objective > pc.objective(rnd.indices, X)
    assert np.isfinite(pc.resolve_delta(X, 20)) and pc.resolve_delta(X, 20) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(delta=-1.0), "delta=-1.0 must be > 0"),
        (dict(alpha=1.0), "alpha=1.0 must be in"),
        (dict(n_clusters=1), "n_clusters=1"),
        (dict(metric="rbf"), "metric='rbf' is not valid"),
        (dict(n_neighbors=0), "n_neighbors=0"),
    ],
)
def test_probcover_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbCover(**kwargs)
    if "n_neighbors" in kwargs or "metric" in kwargs:
        with pytest.raises(ValueError, match=match):
            TypiClust(**kwargs)


def test_approximate_paths_pick_like_the_exact_ones():
    # the k-NN (inverted-file) paths that large pools take, forced on a small pool
    X, lab = blobs(1500, 8, k=6, seed=7)
    exact = select("typiclust", 6, embeddings=X, seed=0)
    approx = select("typiclust", 6, embeddings=X, seed=0, exact_max_n=50)
    assert sorted(lab[exact.indices]) == sorted(lab[approx.indices])  # the same blobs ...
    t = typicality(X, 20)
    assert np.median(t[approx.indices]) >= 0.95 * np.median(t[exact.indices])  # ... and as typical rows
    pe = ProbCover(n_neighbors=100, n_clusters=6)
    pa = ProbCover(n_neighbors=100, n_clusters=6, exact_max_n=50)
    ce = pe.select(12, X, seed=0).objective
    ca = pa.select(12, X, seed=0).objective
    assert (
        ce > 0.1
        and ca == pytest.approx(ce, abs=0.02)
        and pe.resolve_delta(X, 12) == pytest.approx(pa.resolve_delta(X, 12), rel=0.1)
    )
