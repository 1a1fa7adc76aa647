"""Typicality selectors for small budgets: TypiClust and ProbCover.

At a few labels per family, diversity alone buys outliers (k-center's farthest points, the rare corners
facility location covers); both methods here buy *typical* points instead, dense points that stand for
many others:

- ``typiclust`` (Hacohen, Dekel & Weinshall, ICML 2022): k-means into min(budget, max_clusters) clusters;
  clusters larger than `min_cluster_size` in decreasing size, round robin; from each, the unpicked row
  of highest typicality *within its cluster*, typicality(x) = 1 / mean distance of x to its k nearest
  neighbours (k = min(n_neighbors, cluster size // 2), recomputed without the rows already picked).
  The k-means seed is the selection's seed (the paper's source of randomness across repetitions).
- ``probcover`` (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022): the delta-ball graph (an edge
  i -> j when dist(i, j) <= delta), then greedy maximum coverage: each pick is the row whose ball holds
  the most not-yet-covered rows (ties: a seeded random order, not the lowest index). Once everything is
  covered the remaining picks are seeded-random. delta by the paper's purity heuristic: k-means
  pseudo-labels, a ball is pure when all its rows share its centre's label, delta = the largest radius
  with at least `alpha` of the balls pure. The paper uses as many clusters as classes; a pool of prompts
  has no classes, so n_clusters defaults to the budget (the TypiClust choice) capped at max_clusters.
  The k-means of the purity heuristic uses a fixed seed, so delta (and the objective, the covered
  fraction of the pool) depends on the pool and the budget only.

Scaling: exact chunked distances up to `exact_max_n` rows (a cluster, for TypiClust; the pool, for
ProbCover); above, neighbours come from similarity.knn_graph (inverted-file approximation) and their
distances are recomputed exactly. ProbCover's ball graph is then the k-NN graph cut at delta, so a
ball holds at most `n_neighbors` rows (dense regions saturate: the approximation to keep in mind).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .base import SelectionResult, Selector, check_choice, register
from .similarity import DIST_METRICS, _rows_per_chunk, cell_labels, default_gamma, dist_block, knn_graph, prepare

EXACT_MAX_N = 20_000  # exact O(n^2 d) neighbour search up to here, as knn_graph does


# --------------------------------------------------------------------------------------------
# Nearest neighbours with true distances
# --------------------------------------------------------------------------------------------


def _to_distance(block: np.ndarray, metric: str) -> np.ndarray:
    # dist_block gives 1 - cos, or SQUARED euclidean
    return np.sqrt(block) if metric == "euclidean" else block


def knn_distances(X, k: int, metric: str = "cosine", *, exact_max_n: int = EXACT_MAX_N, seed: int = 0):
    """(indices, distances) of every row's k nearest OTHER rows, int64 / float64 (n, k), nearest first.

    Distances are cosine distances (1 - cos) or euclidean (not squared). Exact in row chunks up to
    `exact_max_n` rows; above, the neighbour sets come from knn_graph's approximation (seeded) and only
    their distances are exact. k is capped at n - 1.
    """
    A, a_sq = prepare(X, metric)
    n = len(A)
    k = int(min(k, n - 1))
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0))
    if n <= exact_max_n:
        idx = np.empty((n, k), dtype=np.int64)
        step = _rows_per_chunk(n)
        for s in range(0, n, step):
            D = dist_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], A, a_sq, metric)
            D[np.arange(len(D)), np.arange(s, s + len(D))] = np.inf  # not one's own neighbour
            idx[s : s + step] = np.argpartition(D, k - 1, axis=1)[:, :k]
    else:
        sim = "rbf" if metric == "euclidean" else "cosine"  # rbf ranks neighbours like euclidean distance
        G = knn_graph(X, k + 1, sim, default_gamma(X) if sim == "rbf" else None, seed=seed)
        cols = G.indices.reshape(n, k + 1)
        vals = np.asarray(G.data, dtype=np.int32).reshape(n, k + 1)
        vals[cols == np.arange(n)[:, None]] = -1  # drop self (always in its own list)
        idx = np.take_along_axis(cols, np.argsort(-vals, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    # exact distances to the chosen neighbours, float64, sorted nearest first
    diff = A[idx].astype(np.float64)
    if metric == "cosine":
        d = np.maximum(1.0 - np.einsum("nkd,nd->nk", diff, A.astype(np.float64)), 0.0)
    else:
        d = np.sqrt(((diff - A[:, None, :].astype(np.float64)) ** 2).sum(axis=2))
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(d, order, axis=1)


def typicality(X, k: int = 20, metric: str = "cosine", *, exact_max_n: int = EXACT_MAX_N, seed: int = 0) -> np.ndarray:
    """1 / (mean distance to the k nearest other rows + 1e-5), float64 (n,). One row alone: 1.0."""
    if len(X) < 2:
        return np.ones(len(X))
    _, d = knn_distances(X, k, metric, exact_max_n=exact_max_n, seed=seed)
    return 1.0 / (d.mean(axis=1) + 1e-5)


def kmeans_labels(X, n_clusters: int, metric: str, seed: int) -> np.ndarray:
    """Seeded k-means cluster of every row (similarity.cell_labels on rows prepared for `metric`)."""
    A, _ = prepare(X, metric)
    return cell_labels(A, n_clusters, seed)


def _check_common(metric, n_neighbors, max_clusters, exact_max_n):
    check_choice("metric", metric, DIST_METRICS)
    for name, v in (("n_neighbors", n_neighbors), ("max_clusters", max_clusters), ("exact_max_n", exact_max_n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")


# --------------------------------------------------------------------------------------------
# TypiClust
# --------------------------------------------------------------------------------------------


@register("typiclust")
@dataclass(frozen=True)
class TypiClust(Selector):
    """The most typical row of each of the largest k-means clusters (see the module docstring)."""

    metric: str = "cosine"
    n_neighbors: int = 20
    max_clusters: int = 500
    min_cluster_size: int = 5
    exact_max_n: int = EXACT_MAX_N

    needs_embeddings = True

    def __post_init__(self):
        _check_common(self.metric, self.n_neighbors, self.max_clusters, self.exact_max_n)
        if self.min_cluster_size < 0:
            raise ValueError(f"min_cluster_size={self.min_cluster_size!r} must be >= 0")

    @property
    def randomized(self) -> bool:
        return True  # the k-means initialisation

    def cluster_order(self, labels: np.ndarray) -> tuple[list[int], list[int]]:
        """Clusters in the order TypiClust visits them: size > min_cluster_size by decreasing size (ties:
        lower label), then the small ones, used only once the large ones are exhausted."""
        ids, sizes = np.unique(labels, return_counts=True)
        order = np.lexsort((ids, -sizes))
        big = [int(ids[i]) for i in order if sizes[i] > self.min_cluster_size]
        small = [int(ids[i]) for i in order if sizes[i] <= self.min_cluster_size]
        return big, small

    def _select(self, budget, X, S, T, seed):
        labels = kmeans_labels(X, min(budget, self.max_clusters, len(X)), self.metric, seed)
        big, small = self.cluster_order(labels)
        members = {c: np.flatnonzero(labels == c) for c in big + small}
        picks, gains = [], []
        for group in (big, small):  # round robin over the large clusters, then (if needed) the small ones
            while len(picks) < budget:
                live = [c for c in group if len(members[c])]
                if not live:
                    break
                for c in live:
                    if len(picks) == budget:
                        break
                    rows = members[c]
                    k = max(1, min(self.n_neighbors, len(rows) // 2))
                    typ = typicality(X[rows], k, self.metric, exact_max_n=self.exact_max_n, seed=seed)
                    j = int(np.argmax(typ))  # ties: the lowest pool position (rows are sorted)
                    picks.append(int(rows[j]))
                    gains.append(float(typ[j]))
                    members[c] = np.delete(rows, j)
        return SelectionResult(np.array(picks), np.array(gains), float("nan"))


# --------------------------------------------------------------------------------------------
# ProbCover
# --------------------------------------------------------------------------------------------


def purity_delta(
    X,
    labels: np.ndarray,
    alpha: float = 0.95,
    metric: str = "cosine",
    *,
    exact_max_n: int = EXACT_MAX_N,
    n_neighbors: int = 50,
    seed: int = 0,
) -> float:
    """The largest delta at which at least `alpha` of the delta-balls are pure (ProbCover's heuristic).

    The ball of i is pure iff delta < d*_i, the distance from i to the nearest row of ANOTHER label, so
    purity(delta) = mean(d* > delta) and the answer is just below the (floor(n (1 - alpha)) + 1)-th smallest
    d* (less 1e-6, beyond float32 rounding: the supremum itself is not attained). Exact below `exact_max_n` rows; above,
    d* is searched among the `n_neighbors` nearest rows (inf when they all share the label - then
    d*_i exceeds the k-th neighbour distance, and the small quantile asked for is unaffected unless
    more than 1 - alpha of the rows are that isolated).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n <= exact_max_n:
        A, a_sq = prepare(X, metric)
        dstar = np.empty(n)
        step = _rows_per_chunk(n)
        for s in range(0, n, step):
            D = dist_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], A, a_sq, metric)
            D[labels[s : s + step, None] == labels[None, :]] = np.inf
            dstar[s : s + step] = D.min(axis=1)
        dstar = _to_distance(dstar, metric)
    else:
        idx, d = knn_distances(X, n_neighbors, metric, exact_max_n=exact_max_n, seed=seed)
        d = np.where(labels[idx] != labels[:, None], d, np.inf)
        dstar = d.min(axis=1)
    # purity(delta) = mean(d* > delta) >= alpha  <=>  at most m = floor(n (1 - alpha)) rows have d* <= delta,
    # so every delta below the (m+1)-th smallest d* qualifies and none at or above it: return just below it
    srt = np.sort(dstar)
    m = int(np.floor(n * (1.0 - alpha) + 1e-9))
    if m >= n or not np.isfinite(srt[m]):
        finite = srt[np.isfinite(srt)]
        if n <= exact_max_n or len(finite) == 0:  # (nearly) one label: every ball is pure at any radius
            return float("inf")
        return float(finite.max())  # approximate path: no farther than the neighbour lists reach
    q = float(srt[m])
    return max(0.0, q - max(1e-6 * q, 1e-6))  # float32 distances: keep clear of the cut by more than rounding


def ball_graph(
    X, delta: float, metric: str = "cosine", *, exact_max_n: int = EXACT_MAX_N, n_neighbors: int = 50, seed: int = 0
) -> sp.csr_matrix:
    """Boolean CSR (n, n), symmetric: [i, j] when dist(i, j) <= delta, the diagonal included. Exact in
    row chunks up to `exact_max_n` rows, else the k-NN graph (n_neighbors) cut at delta."""
    n = len(X)
    if n <= exact_max_n:
        A, a_sq = prepare(X, metric)
        cut = delta * delta if metric == "euclidean" else delta  # dist_block: squared euclidean
        rows, cols = [], []
        step = _rows_per_chunk(n)
        for s in range(0, n, step):
            D = dist_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], A, a_sq, metric)
            D[np.arange(len(D)), np.arange(s, s + len(D))] = 0.0  # a row always covers itself
            r, c = np.nonzero(D <= cut)
            rows.append(r + s)
            cols.append(c)
        r, c = np.concatenate(rows), np.concatenate(cols)
        G = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(n, n))
        return G.maximum(G.T).tocsr()  # float rounding could break symmetry by one ulp at the cut
    idx, d = knn_distances(X, n_neighbors, metric, exact_max_n=exact_max_n, seed=seed)
    keep = d <= delta
    r = np.concatenate([np.arange(n), np.repeat(np.arange(n), keep.sum(axis=1))])
    c = np.concatenate([np.arange(n), idx[keep]])
    G = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(n, n))
    return G.maximum(G.T).tocsr()


def max_coverage_greedy(G: sp.csr_matrix, budget: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy maximum coverage on a symmetric ball graph: (picks, newly covered count per pick, covered).

    Row i of G is the ball of i. Each step takes the row whose ball holds the most uncovered rows (ties:
    a seeded random priority); when nothing is left to cover, the rest are seeded-random unpicked rows
    with gain 0. A newly covered row y lowers the degree of every x with y in its ball: by symmetry
    that is row y's own neighbour list, so one bincount per step keeps the degrees exact.
    """
    G = G.tocsr()
    n = G.shape[0]
    rng = np.random.default_rng(seed)
    prio = rng.permutation(n)  # tie-breaking: higher priority wins
    deg = np.diff(G.indptr).astype(np.int64)
    covered = np.zeros(n, dtype=bool)
    taken = np.zeros(n, dtype=bool)
    picks, gains = [], []
    while len(picks) < budget:
        best = deg.max(initial=0)
        if best <= 0:
            break
        cand = np.flatnonzero(deg == best)
        j = int(cand[np.argmax(prio[cand])])
        ball = G.indices[G.indptr[j] : G.indptr[j + 1]]
        new = ball[~covered[ball]]
        covered[new] = True
        taken[j] = True
        picks.append(j)
        gains.append(float(len(new)))
        sub = G[new]
        deg -= np.bincount(sub.indices, minlength=n)
        deg[taken] = -1  # a picked row is never picked again (its ball is covered anyway)
    left = budget - len(picks)
    if left:
        rest = np.flatnonzero(~taken)
        picks += rng.choice(rest, size=left, replace=False).tolist()
        gains += [0.0] * left
    return np.array(picks, dtype=np.int64), np.array(gains), int(covered.sum())


@register("probcover")
@dataclass(frozen=True)
class ProbCover(Selector):
    """Greedy maximum coverage of delta-balls, delta by the purity heuristic (see the module docstring).
    `delta` fixes the radius instead; the objective is the covered fraction of the pool."""

    metric: str = "cosine"
    delta: float | None = None
    alpha: float = 0.95
    n_clusters: int | None = None
    max_clusters: int = 500
    n_neighbors: int = 50
    exact_max_n: int = EXACT_MAX_N

    needs_embeddings = True

    def __post_init__(self):
        _check_common(self.metric, self.n_neighbors, self.max_clusters, self.exact_max_n)
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"delta={self.delta!r} must be > 0 (or None: the purity heuristic picks it)")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha!r} must be in (0, 1), e.g. 0.95 (the paper's purity)")
        if self.n_clusters is not None and self.n_clusters < 2:
            raise ValueError(f"n_clusters={self.n_clusters!r} must be >= 2 (or None: the budget)")

    @property
    def randomized(self) -> bool:
        return True  # ties between equal coverage gains, and the fill once everything is covered

    def resolve_delta(self, X, budget: int) -> float:
        """The ball radius for this pool and budget: `delta`, or the purity heuristic's."""
        if self.delta is not None:
            return float(self.delta)
        k = min(self.n_clusters or budget, self.max_clusters, len(X))
        if k < 2:
            return float("inf")
        # fixed k-means seed: delta depends on the pool and budget only, not on the selection's seed
        labels = kmeans_labels(X, k, self.metric, 0)
        return purity_delta(X, labels, self.alpha, self.metric, exact_max_n=self.exact_max_n, n_neighbors=self.n_neighbors)

    def _graph(self, X, budget):
        delta = self.resolve_delta(X, budget)
        if not np.isfinite(delta):  # everything is one ball: any row covers the pool
            n = len(X)
            return sp.csr_matrix(np.ones((n, n), dtype=bool)) if n <= 2048 else None, delta
        return ball_graph(X, delta, self.metric, exact_max_n=self.exact_max_n, n_neighbors=self.n_neighbors), delta

    def _select(self, budget, X, S, T, seed):
        G, _ = self._graph(X, budget)
        if G is None:  # a single ball too large to store: the first pick covers everything
            rng = np.random.default_rng(seed)
            idx = rng.choice(len(X), size=budget, replace=False)
            return SelectionResult(idx, np.r_[float(len(X)), np.zeros(budget - 1)], 1.0)
        idx, gains, covered = max_coverage_greedy(G, budget, seed)
        return SelectionResult(idx, gains, covered / len(X))

    def _objective(self, idx, X, S, T):
        G, _ = self._graph(X, max(1, len(idx)))
        if G is None:
            return 1.0 if len(idx) else 0.0
        if len(idx) == 0:
            return 0.0
        return float(np.unique(G[idx].indices).size) / len(X)
