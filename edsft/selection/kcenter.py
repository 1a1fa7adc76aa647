"""k-center by farthest-first traversal (Gonzalez 1985): a 2-approximation of the minimum covering radius.

Each step adds the pool row farthest from the chosen centers and refreshes every row's distance to its
nearest center with one matrix-vector product: O(n d) per step, O(n B d) in all, O(n) extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import SelectionResult, Selector, check_choice, register, uncertainty
from .similarity import DIST_METRICS, dist_block, min_distance, prepare


def k_center_greedy(
    X: np.ndarray,
    budget: int,
    metric: str = "euclidean",
    seed: int = 0,
    initial: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Farthest-first picks. Returns (indices, radius before each pick, final covering radius).

    `initial` rows count as already chosen (e.g. already labelled) and are not returned; without them
    the first center is a seeded-random row and its "radius before" is NaN. Ties go to the lowest index.
    Distances are cosine distances (1 - cos) or euclidean; squared euclidean is tracked internally.
    """
    A, a_sq = prepare(X, metric)
    n = len(A)
    mind = np.full(n, np.inf, dtype=np.float32)
    taken = np.zeros(n, dtype=bool)

    def absorb(centers: np.ndarray) -> None:
        # mind = min(mind, dist(rows, centers)), centers in blocks to keep the temporaries small
        for s in range(0, len(centers), 256):
            c = centers[s : s + 256]
            if len(c) == 1:  # matrix-vector product: the hot path of the greedy loop
                d = dist_block(A, a_sq, A[c], None if a_sq is None else a_sq[c], metric)[:, 0]
                np.minimum(mind, d, out=mind)
            else:
                step = max(1, (1 << 22) // len(c))
                for r in range(0, n, step):
                    d = dist_block(A[r : r + step], None if a_sq is None else a_sq[r : r + step], A[c],
                                   None if a_sq is None else a_sq[c], metric)
                    np.minimum(mind[r : r + step], d.min(axis=1), out=mind[r : r + step])
        mind[centers] = 0.0
        taken[centers] = True

    to_dist = np.sqrt if metric == "euclidean" else (lambda v: v)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    start = 0
    if initial is not None and len(initial):
        absorb(np.unique(np.asarray(initial, dtype=np.int64)))
    else:
        first = int(np.random.default_rng(seed).integers(n))
        picks[0], gains[0] = first, np.nan
        absorb(np.array([first]))
        start = 1
    it = range(start, budget)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="k-center", leave=False)
    for t in it:
        # argmax returns the first maximum: ties go to the lowest index; taken rows sit at 0 and are
        # masked so duplicate rows (radius 0) still yield distinct picks.
        j = int(np.argmax(np.where(taken, -1.0, mind)))
        picks[t], gains[t] = j, float(to_dist(np.float64(mind[j])))
        absorb(np.array([j]))
    radius = float(to_dist(np.float64(mind.max())))
    return picks, gains, radius


@register("k_center")
@dataclass(frozen=True)
class KCenter(Selector):
    """Farthest-first k-center. `top_q` (fraction in (0, 1] or a count > 1) restricts the candidates,
    and the rows to cover, to the top-q most uncertain rows by `score` (uncertainty-weighted core-set).
    `initial`: pool positions already chosen (not returned)."""

    metric: str = "euclidean"
    initial: tuple[int, ...] | None = None
    top_q: float | None = None
    score: str = "mean_entropy"
    higher_is_uncertain: bool | None = None
    progress: bool = False

    needs_embeddings = True
    maximize = False

    def __post_init__(self):
        check_choice("metric", self.metric, DIST_METRICS)
        if self.top_q is not None and not (self.top_q > 0):
            raise ValueError(f"top_q={self.top_q!r} must be a fraction in (0, 1] or a count > 1")
        if self.top_q is not None and self.initial:
            raise ValueError("k_center: use either top_q or initial, not both")

    @property
    def randomized(self) -> bool:
        return not self.initial

    def score_names(self):
        return (self.score,) if self.top_q is not None else ()

    def candidates(self, S, n: int, budget: int = 1) -> np.ndarray:
        """Pool positions k-center may pick and must cover: all rows, or the top-q most uncertain
        (never fewer than the budget, so a small pool still yields `budget` picks)."""
        if self.top_q is None:
            return np.arange(n)
        q = int(round(self.top_q * n)) if self.top_q <= 1 else int(self.top_q)
        q = max(1, budget, min(n, q))
        u = uncertainty(S[self.score], self.score, self.higher_is_uncertain)
        return np.sort(np.argsort(-u, kind="stable")[:q])

    def _select(self, budget, X, S, T, seed):
        cand = self.candidates(S, len(X), budget)
        init = None
        if self.initial:
            init = np.asarray(self.initial, dtype=np.int64)
            if init.min() < 0 or init.max() >= len(X):
                raise ValueError(f"initial contains positions outside [0, {len(X)})")
        picks, gains, radius = k_center_greedy(X[cand], budget, self.metric, seed, init, self.progress)
        return SelectionResult(cand[picks], gains, radius)

    def _objective(self, idx, X, S, T):
        """Covering radius of the candidate rows (the whole pool without top_q) by the chosen rows."""
        cand = self.candidates(S, len(X), len(idx))
        chosen = idx if not self.initial else np.union1d(idx, np.asarray(self.initial))
        return float(min_distance(X[cand], X[chosen], self.metric).max())


@register("uncertain_k_center")
@dataclass(frozen=True)
class UncertainKCenter(KCenter):
    """k_center over the top_q (default half) most uncertain rows."""

    top_q: float | None = 0.5
