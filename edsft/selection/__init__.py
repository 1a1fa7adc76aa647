"""Selection core: pick `budget` pool rows by uncertainty and/or diversity. numpy/scipy only.

Entry points
------------
``select(name, budget, embeddings=X, scores=S, tasks=T, seed=0, allow_budget_over_pool=False, chosen=None, **params)``
    -> ``SelectionResult(indices, gains, objective)``: `indices` int64 pool positions in pick order
    (unique), `gains` float64 marginal gain of each pick (NaN where none), `objective` float (NaN if none).
    X: float32 (n, d) or None; S: mapping score name -> (n,) array, or None; T: (n,) task labels or None.
``SELECTORS[name]``: frozen dataclass of the selector's hyperparameters (what Tune sweeps), e.g.
    ``SELECTORS["facility_location"](metric="cosine", optimizer="lazy").select(budget, X, S, T, seed)``.
    ``SELECTORS[name].from_params(**params)`` raises a UserError (a ValueError) listing the valid parameters.
``objective(name, indices, embeddings=X, scores=S, tasks=T, chosen=None, **params)``: the selector's objective on any set.
``chosen``: embeddings (m, d) of rows chosen before, outside the pool (multi-round selection): facility
    location and k-center (``Selector.uses_chosen``; composites pass them to their inner selector) start from
    them, the others ignore them (see ``base``, "Rows chosen before").

Registry
--------
- ``random``: seeded uniform.
- ``uncertainty``: top-B by `score` (mean_entropy, max_entropy, least_confidence, least_confidence_norm:
  large = uncertain; mean_margin, min_margin: small = uncertain; other columns: large = uncertain unless
  higher_is_uncertain=False). gains = oriented uncertainty, objective = their sum.
- ``k_center`` (metric euclidean|cosine, initial, top_q, score): farthest-first; gains = covering radius
  before each pick (NaN for the seeded first center); objective = final covering radius (minimised).
- ``uncertain_k_center``: k_center with top_q=0.5 (candidates = the most uncertain half).
- ``facility_location`` (metric cosine|euclidean|rbf, gamma, optimizer naive|lazy|stochastic, epsilon,
  dense_max_n, n_neighbors, lambda_, score): greedy FL; objective = sum_i max_{j in S} sim(i, j)
  (+ lambda_ * sum of normalised uncertainty of the picks).
- ``fl_uncertainty``: facility_location with lambda_=1.0, score="mean_entropy" (the hybrid).
- ``task_balanced`` (score, inner, inner_params, size_aware): per-task quotas ~ 1 / mean confidence.
- ``greedi`` (inner, inner_params, m, kappa, row_keys): in-process two-round distributed reference (m None:
  4 shards in-process, selection.shards in the distributed stage).
- ``dedup`` (inner, inner_params, threshold, n_neighbors): the inner selector (default random) on the pool
  without exact duplicates and near duplicates (cosine >= threshold, leader rule); objective = inner's.
- ``typiclust`` (metric, n_neighbors, max_clusters, min_cluster_size): Hacohen et al. 2022, the most
  typical row (1 / mean k-NN distance in its cluster) of each of the min(B, max_clusters) k-means clusters.
- ``probcover`` (metric, delta, alpha, n_clusters, max_clusters, n_neighbors): Yehuda et al. 2022, greedy
  max coverage of delta-balls (delta by k-means purity >= alpha); objective = covered fraction of the pool.

Bad parameters and inputs raise ``edsft.errors.UserError`` (a ValueError) naming the field, value and fix.

The distributed contract (details in ``base``)
---------------------------------------------
``edsft.distributed.coresets`` runs any selector through these methods, never through its type:
``pool_statistics()`` (PoolStatistic per name: ScoreRange, PoolGamma, ByTask, TaskConfidence),
``with_globals(values)`` / ``globals``, ``distribution()`` (TwoRound, Draw, PerTask, Gather,
NotDistributable) and, for TwoRound, ``combine`` + ``shard_objective`` + ``chosen_objective``.

Pieces for the distributed stage
--------------------------------
- ``shard_of(row_keys, m, seed) -> int64 (n,)``: GreeDi's partition (seeded SplitMix64 / blake2b hash).
- ``best_similarity(X_pool, X_sel, metric, gamma) -> float64 (n,)``: per-row max similarity to a chosen
  set, chunked; the FL objective of a set is the SUM of this over all shards.
- ``facility_location_gains(X_pool, X_cand, current, metric, gamma) -> float64 (len(X_cand),)``: marginal
  gains of candidates given per-row current best similarity; sums over shards.
- ``min_distance(X_pool, X_sel, metric) -> float64 (n,)``: per-row distance to the nearest center; the
  k-center objective is the MAX of this over all shards.
- ``default_gamma(X)``: the rbf/euclidean gamma facility location uses when none is given
  (1 / mean squared distance). A sharded run must compute it once on the whole pool and pass it on.
- ``allocate_budget(budget, sizes, mean_confidence, size_aware)``: task_balanced's quotas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from .base import (
    HIGHER_IS_UNCERTAIN,
    MAX_STAT_PASSES,
    SELECTORS,
    ByTask,
    Distribution,
    Draw,
    Gather,
    NotDistributable,
    PerTask,
    PoolStatistic,
    ScoreRange,
    SelectionResult,
    Selector,
    TwoRound,
    take_rows,
    uncertainty,
)
from .basic import RandomSelector, UncertaintySelector
from .composite import GreeDi, TaskBalanced, TaskConfidence, allocate_budget, row_confidence, shard_of
from .dedup import Dedup, dedup_keep
from .facility import FacilityLocation, FacilityLocationUncertainty, facility_location_gains, facility_location_greedy
from .kcenter import KCenter, UncertainKCenter, k_center_greedy
from .similarity import PoolGamma, best_similarity, default_gamma, dense_similarity, knn_graph, min_distance
from .typical import ProbCover, TypiClust, knn_distances, typicality


def get_selector(name: str, **params) -> Selector:
    """Build a registered selector from its name and hyperparameters (clear UserError on typos)."""
    if name not in SELECTORS:
        raise UserError(f"unknown selector {name!r}: valid names are {sorted(SELECTORS)}")
    return SELECTORS[name].from_params(**params)


def select(
    name: str,
    budget: int,
    embeddings=None,
    scores: Mapping[str, Any] | None = None,
    tasks=None,
    seed: int = 0,
    *,
    allow_budget_over_pool: bool = False,
    chosen=None,
    **params,
) -> SelectionResult:
    """Pick `budget` pool positions with selector `name` (see the module docstring)."""
    return get_selector(name, **params).select(
        budget, embeddings, scores, tasks, seed, allow_budget_over_pool=allow_budget_over_pool, chosen=chosen
    )


def objective(name: str, indices, embeddings=None, scores=None, tasks=None, chosen=None, **params) -> float:
    """Selector `name`'s objective on an arbitrary set of pool positions (given the rows `chosen` before)."""
    return get_selector(name, **params).with_chosen(chosen).objective(indices, embeddings, scores, tasks)


__all__ = [
    "HIGHER_IS_UNCERTAIN",
    "MAX_STAT_PASSES",
    "SELECTORS",
    "ByTask",
    "Distribution",
    "Draw",
    "Gather",
    "Dedup",
    "GreeDi",
    "NotDistributable",
    "PerTask",
    "PoolGamma",
    "PoolStatistic",
    "ScoreRange",
    "TaskConfidence",
    "TwoRound",
    "FacilityLocation",
    "FacilityLocationUncertainty",
    "KCenter",
    "ProbCover",
    "RandomSelector",
    "SelectionResult",
    "Selector",
    "TaskBalanced",
    "TypiClust",
    "UncertainKCenter",
    "UncertaintySelector",
    "allocate_budget",
    "best_similarity",
    "default_gamma",
    "dedup_keep",
    "dense_similarity",
    "facility_location_gains",
    "facility_location_greedy",
    "get_selector",
    "k_center_greedy",
    "knn_distances",
    "knn_graph",
    "min_distance",
    "objective",
    "row_confidence",
    "select",
    "shard_of",
    "take_rows",
    "typicality",
    "uncertainty",
]
