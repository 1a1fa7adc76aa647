"""Exact and near-duplicate removal in front of any selector: ``dedup`` (inner = random by default).

Real pools repeat themselves (the same prompt scraped twice, a template filled with the same values), and
a selector that pays twice for one prompt wastes a label. ``Dedup(inner=..., threshold=...)`` keeps one
representative of every duplicate group and runs the inner selector on the representatives only:

- exact duplicates: identical embedding rows (byte for byte);
- near duplicates: cosine similarity >= `threshold` among each row's `n_neighbors` nearest rows
  (similarity.knn_graph: exact up to 20k rows, an inverted-file approximation above), made symmetric.
  Groups are formed greedily in pool order (the leader rule): a row that is not yet removed is kept and
  removes every near duplicate of it. No chaining: two rows are only merged through a kept row they
  are both close to, so a long path of small steps does not collapse into one group.

`dedup` with its default inner selector is the "random that does not pay twice" baseline. If the budget
exceeds the number of representatives, the remaining picks are seeded-random removed rows (gain NaN),
so the selector always returns `budget` rows. The objective is the inner selector's objective of the
picks on the WHOLE pool. Mean-pooled LLM embeddings are anisotropic (unrelated prompts often have
cosine > 0.9), hence a high default threshold: it should only merge prompts that say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import SelectionResult, Selector, register
from .composite import inner_selector
from .similarity import knn_graph, normalize_rows


def exact_duplicate_groups(X: np.ndarray) -> np.ndarray:
    """Representative (lowest position) of every row's group of identical rows, int64 (n,)."""
    X = np.ascontiguousarray(X)
    rows = X.view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel()
    _, first, inv = np.unique(rows, return_index=True, return_inverse=True)
    return first[inv.ravel()].astype(np.int64)


def dedup_keep(X, threshold: float = 0.99, n_neighbors: int = 16, seed: int = 0) -> np.ndarray:
    """Positions (sorted) of the rows kept: one per exact-duplicate group, then the leader rule over
    near duplicates (cosine >= threshold, see the module docstring). threshold > 1 removes exact
    duplicates only."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    rep = exact_duplicate_groups(X)
    keep = np.flatnonzero(rep == np.arange(len(X)))
    if threshold > 1.0 or len(keep) < 2:
        return keep
    U = X[keep]
    G = knn_graph(U, min(n_neighbors + 1, len(U)), "cosine", seed=seed).tocoo()
    # candidate pairs from the (quantised) graph, the threshold applied to the exact cosine of each pair
    V = normalize_rows(U).astype(np.float64)
    r, c = G.row, G.col
    near = (np.einsum("ij,ij->i", V[r], V[c]) >= threshold) & (r != c)
    r, c = r[near], c[near]
    G = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(len(U), len(U)))
    G = G.maximum(G.T).tocsr()
    removed = np.zeros(len(U), dtype=bool)
    indptr, indices = G.indptr, G.indices
    for i in range(len(U)):  # leader rule in pool order
        if removed[i]:
            continue
        nb = indices[indptr[i] : indptr[i + 1]]
        removed[nb[nb > i]] = True
    return keep[~removed]


@register("dedup")
@dataclass(frozen=True)
class Dedup(Selector):
    """An inner selector on the pool without its exact and near duplicates (see the module docstring)."""

    inner: str = "random"
    inner_params: Mapping[str, Any] = field(default_factory=dict)
    threshold: float = 0.99
    n_neighbors: int = 16

    needs_embeddings = True

    def __post_init__(self):
        if self.inner in ("dedup", "greedi"):
            raise ValueError(f"inner={self.inner!r} cannot be nested inside dedup: use e.g. inner='facility_location'")
        if not 0 < self.threshold:
            raise ValueError(f"threshold={self.threshold!r} must be > 0 (cosine similarity; > 1 removes exact duplicates only)")
        if isinstance(self.n_neighbors, bool) or not isinstance(self.n_neighbors, (int, np.integer)) or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors={self.n_neighbors!r} must be an integer >= 1")
        inner_selector(self.inner, self.inner_params)  # fail early on bad inner params

    def _inner(self) -> Selector:
        """The inner selector, bound to the rows chosen before (if any): they pass on to it."""
        return inner_selector(self.inner, self.inner_params).with_chosen(self.chosen)

    @property
    def uses_chosen(self) -> bool:  # type: ignore[override]
        return self._inner().uses_chosen

    @property
    def randomized(self) -> bool:
        return self._inner().randomized

    @property
    def needs_tasks(self) -> bool:
        return self._inner().needs_tasks

    def score_names(self):
        return self._inner().score_names()

    def keep(self, X) -> np.ndarray:
        """The representatives this configuration keeps (sorted pool positions)."""
        return dedup_keep(X, self.threshold, self.n_neighbors)

    def _select(self, budget, X, S, T, seed):
        inner = self._inner()
        kept = self.keep(X)
        k = min(budget, len(kept))
        sub_S = {c: v[kept] for c, v in S.items()} if S else None
        res = inner.select(k, X[kept], sub_S, None if T is None else T[kept], seed)
        idx, gains = kept[res.indices], res.gains
        if k < budget:  # more labels than distinct prompts: duplicates after all, in seeded-random order
            rest = np.setdiff1d(np.arange(len(X)), kept)
            fill = np.random.default_rng(seed).choice(rest, size=budget - k, replace=False)
            idx, gains = np.concatenate([idx, fill]), np.concatenate([gains, np.full(budget - k, np.nan)])
        return SelectionResult(idx, gains, self._objective(idx, X, S, T))

    def _objective(self, idx, X, S, T):
        return self._inner().objective(idx, X, S, T)
