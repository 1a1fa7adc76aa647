"""k-center by farthest-first traversal (Gonzalez 1985): a 2-approximation of the minimum covering radius.

Each step adds the pool row farthest from the chosen centers and refreshes every row's distance to its
nearest center with one matrix-vector product: O(n d) per step, O(n B d) in all, O(n) extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import SelectionResult, Selector, check_choice, register, uncertainty
from .similarity import DIST_METRICS, cell_labels, dist_block, min_distance, prepare

BLOCKED_MIN_N = 20_000  # below this one matrix-vector product per step is cheaper than the bookkeeping
BLOCK_ROWS = 128  # mean rows per block (k-means cell) of the blocked traversal
MAX_BLOCKS = 2048  # k-means on more cells costs more than the pruning saves


def k_center_greedy(
    X: np.ndarray,
    budget: int,
    metric: str = "euclidean",
    seed: int = 0,
    initial: np.ndarray | None = None,
    progress: bool = False,
    blocked: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Farthest-first picks. Returns (indices, radius before each pick, final covering radius).

    `blocked` (default: n >= BLOCKED_MIN_N) runs the same traversal over clustered row blocks and skips
    the blocks a new center cannot improve (see `_k_center_blocked`); the picks are the same.
    `initial` rows count as already chosen (e.g. already labelled) and are not returned; without them
    the first center is a seeded-random row and its "radius before" is NaN. Ties go to the lowest index.
    Distances are cosine distances (1 - cos) or euclidean; squared euclidean is tracked internally.
    """
    A, a_sq = prepare(X, metric)
    n = len(A)
    if blocked is None:
        blocked = n >= BLOCKED_MIN_N
    if blocked and n > 1:
        return _k_center_blocked(A, a_sq, budget, metric, seed, initial, progress)
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


def _k_center_blocked(A, a_sq, budget, metric, seed, initial, progress):
    """Farthest-first traversal that only touches the row blocks a new center can improve.

    Rows are grouped into k-means cells (blocks). Each block keeps a ball (centroid, radius) in the
    euclidean geometry of the prepared rows (unit vectors for cosine, where 1 - cos = |x - z|^2 / 2) and
    the largest distance-to-nearest-center of its rows. A new center z can only improve a row of block b
    if |z - centroid_b| - radius_b < that largest distance (triangle inequality), so late in the traversal
    it touches the few blocks around z instead of all n rows. Same picks as the plain loop (ties -> the
    lowest pool index); the bound keeps a small slack for float rounding, so it never skips wrongly.
    """
    n = len(A)
    lab = cell_labels(A, min(MAX_BLOCKS, max(1, n // BLOCK_ROWS)), seed=0)  # fixed seed: the traversal is the same whatever `seed`
    order = np.argsort(lab, kind="stable")
    A = A[order]  # rows of a block are contiguous
    sq = None if a_sq is None else a_sq[order]
    bounds = np.searchsorted(lab[order], np.arange(lab.max() + 2))
    bounds = np.unique(bounds)
    starts, ends = bounds[:-1], bounds[1:]
    nb = len(starts)
    cent = np.empty((nb, A.shape[1]), dtype=np.float64)
    rad = np.empty(nb, dtype=np.float64)
    for b, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        cent[b] = A[s:e].mean(axis=0, dtype=np.float64)
        rad[b] = np.sqrt(((A[s:e] - cent[b]) ** 2).sum(axis=1).max())
    c_sq = np.einsum("ij,ij->i", cent, cent)
    block_of = np.repeat(np.arange(nb), ends - starts)
    mind = np.full(n, np.inf, dtype=np.float32)  # permuted order
    bmax = np.full(nb, np.inf)
    taken = np.zeros(n, dtype=bool)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)  # pool index -> permuted position
    # mind (1 - cos, or squared euclidean) -> euclidean distance, for the ball bound
    to_euclid = (lambda v: np.sqrt(2.0 * v)) if metric == "cosine" else np.sqrt

    def refresh(b: int) -> None:
        s, e = starts[b], ends[b]
        bmax[b] = float(mind[s:e].max())

    def absorb_one(p: int) -> None:
        z = A[p : p + 1]
        z_sq = None if sq is None else sq[p : p + 1]
        dc = np.sqrt(np.maximum(c_sq - 2.0 * (cent @ z[0].astype(np.float64)) + float(z[0].astype(np.float64) @ z[0]), 0.0))
        lower = dc - rad
        hit = np.flatnonzero(lower < to_euclid(bmax) * (1 + 1e-4) + 1e-5)
        for b in hit.tolist():
            s, e = starts[b], ends[b]
            d = dist_block(A[s:e], None if sq is None else sq[s:e], z, z_sq, metric)[:, 0]
            np.minimum(mind[s:e], d, out=mind[s:e])
            mind[s:e][taken[s:e]] = 0.0
            bmax[b] = float(mind[s:e].max())
        mind[p] = 0.0
        taken[p] = True
        refresh(int(block_of[p]))

    def absorb_many(ps: np.ndarray) -> None:
        step = max(1, (1 << 22) // max(1, len(ps)))
        for r in range(0, n, step):
            d = dist_block(A[r : r + step], None if sq is None else sq[r : r + step], A[ps], None if sq is None else sq[ps], metric)
            np.minimum(mind[r : r + step], d.min(axis=1), out=mind[r : r + step])
        mind[ps] = 0.0
        taken[ps] = True
        for b in range(nb):
            refresh(b)

    def farthest() -> int:
        """Pool index of the non-chosen row farthest from the centers; ties -> lowest pool index."""
        top = bmax.max()
        if top <= 0.0:  # every remaining row sits on a center (duplicates): the lowest free pool index
            return int(np.flatnonzero(~taken[pos])[0])
        best = None
        for b in np.flatnonzero(bmax == top).tolist():
            s, e = starts[b], ends[b]
            rows = np.flatnonzero((mind[s:e] == top) & ~taken[s:e]) + s
            cand = int(order[rows].min())
            best = cand if best is None else min(best, cand)
        return best

    to_dist = np.sqrt if metric == "euclidean" else (lambda v: v)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    start = 0
    if initial is not None and len(initial):
        absorb_many(pos[np.unique(np.asarray(initial, dtype=np.int64))])
    else:
        first = int(np.random.default_rng(seed).integers(n))
        picks[0], gains[0] = first, np.nan
        absorb_one(int(pos[first]))
        start = 1
    it = range(start, budget)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="k-center", leave=False)
    for t in it:
        j = farthest()
        picks[t], gains[t] = j, float(to_dist(np.float64(mind[pos[j]])))
        absorb_one(int(pos[j]))
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
