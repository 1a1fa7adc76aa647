"""k-center by farthest-first traversal (Gonzalez 1985): a 2-approximation of the minimum covering radius.

Each step adds the pool row farthest from the chosen centers and refreshes every row's distance to its
nearest center with one matrix-vector product: O(n d) per step, O(n B d) in all, O(n) extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .base import NotDistributable, SelectionResult, Selector, TwoRound, check_choice, register, uncertainty
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
    the blocks a new center cannot improve (see `_BlockedCover`); the picks are the same.
    `initial` rows count as already chosen (e.g. already labelled) and are not returned; without them
    the first center is a seeded-random row and its "radius before" is NaN. Ties go to the lowest index.
    Distances are cosine distances (1 - cos) or euclidean; squared euclidean is tracked internally.
    """
    A, a_sq = prepare(X, metric)
    n = len(A)
    if blocked is None:
        blocked = n >= BLOCKED_MIN_N
    cover = _BlockedCover(A, a_sq, metric) if blocked and n > 1 else _Cover(A, a_sq, metric)
    to_dist = np.sqrt if metric == "euclidean" else (lambda v: v)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    start = 0
    if initial is not None and len(initial):
        cover.absorb(np.unique(np.asarray(initial, dtype=np.int64)))
    else:
        first = int(np.random.default_rng(seed).integers(n))
        picks[0], gains[0] = first, np.nan
        cover.absorb(np.array([first]))
        start = 1
    it = range(start, budget)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="k-center", leave=False)
    for t in it:
        j = cover.farthest()
        picks[t], gains[t] = j, float(to_dist(np.float64(cover.mind_of(j))))
        cover.absorb(np.array([j]))
    radius = float(to_dist(np.float64(cover.max())))
    return picks, gains, radius


def _lower_to(mind: np.ndarray, A, a_sq, centers: np.ndarray, metric: str) -> None:
    """mind = min(mind, distance of every row of A to its nearest row in `centers`), in row chunks.
    One center is a single matrix-vector product: the hot path of the plain greedy loop."""
    step = max(1, (1 << 22) // max(1, len(centers)))
    C, c_sq = A[centers], None if a_sq is None else a_sq[centers]
    for r in range(0, len(A), step):
        d = dist_block(A[r : r + step], None if a_sq is None else a_sq[r : r + step], C, c_sq, metric)
        np.minimum(mind[r : r + step], d[:, 0] if d.shape[1] == 1 else d.min(axis=1), out=mind[r : r + step])


class _Cover:
    """Every row's distance to its nearest chosen center (`mind`), refreshed with one matrix-vector
    product per new center. Distances: 1 - cos, or SQUARED euclidean. Indices are pool positions."""

    def __init__(self, A, a_sq, metric: str):
        self.A, self.a_sq, self.metric = A, a_sq, metric
        self.mind = np.full(len(A), np.inf, dtype=np.float32)
        self.taken = np.zeros(len(A), dtype=bool)

    def absorb(self, centers: np.ndarray) -> None:
        for s in range(0, len(centers), 256):  # centers in blocks to keep the temporaries small
            _lower_to(self.mind, self.A, self.a_sq, centers[s : s + 256], self.metric)
        self.mind[centers] = 0.0
        self.taken[centers] = True

    def farthest(self) -> int:
        # argmax returns the first maximum: ties go to the lowest index; taken rows sit at 0 and are
        # masked so duplicate rows (radius 0) still yield distinct picks.
        return int(np.argmax(np.where(self.taken, -1.0, self.mind)))

    def mind_of(self, j: int) -> float:
        return self.mind[j]

    def max(self) -> float:
        return self.mind.max()


class _BlockedCover:
    """The same cover, updated only in the row blocks a new center can improve.

    Rows are grouped into k-means cells (blocks). Each block keeps a ball (centroid, radius) in the
    euclidean geometry of the prepared rows (unit vectors for cosine, where 1 - cos = |x - z|^2 / 2) and
    the largest distance-to-nearest-center of its rows. A new center z can only improve a row of block b
    if |z - centroid_b| - radius_b < that largest distance (triangle inequality), so late in the traversal
    it touches the few blocks around z instead of all n rows. Same picks as the plain loop (ties -> the
    lowest pool index); the bound keeps a small slack for float rounding, so it never skips wrongly.
    """

    def __init__(self, A, a_sq, metric: str):
        n = len(A)
        # fixed seed: the traversal is the same whatever the selection's `seed`
        lab = cell_labels(A, min(MAX_BLOCKS, max(1, n // BLOCK_ROWS)), seed=0)
        self.order = np.argsort(lab, kind="stable")
        self.A = A[self.order]  # rows of a block are contiguous
        self.sq = None if a_sq is None else a_sq[self.order]
        self.metric = metric
        bounds = np.unique(np.searchsorted(lab[self.order], np.arange(lab.max() + 2)))
        self.starts, self.ends = bounds[:-1], bounds[1:]
        nb = len(self.starts)
        self.cent = np.empty((nb, A.shape[1]), dtype=np.float64)
        self.rad = np.empty(nb, dtype=np.float64)
        for b, (s, e) in enumerate(zip(self.starts.tolist(), self.ends.tolist())):
            self.cent[b] = self.A[s:e].mean(axis=0, dtype=np.float64)
            self.rad[b] = np.sqrt(((self.A[s:e] - self.cent[b]) ** 2).sum(axis=1).max())
        self.c_sq = np.einsum("ij,ij->i", self.cent, self.cent)
        self.block_of = np.repeat(np.arange(nb), self.ends - self.starts)
        self.mind = np.full(n, np.inf, dtype=np.float32)  # in block order
        self.bmax = np.full(nb, np.inf)
        self.taken = np.zeros(n, dtype=bool)
        self.pos = np.empty(n, dtype=np.int64)
        self.pos[self.order] = np.arange(n)  # pool index -> position in block order
        # mind (1 - cos, or squared euclidean) -> euclidean distance, for the ball bound
        self.to_euclid = (lambda v: np.sqrt(2.0 * v)) if metric == "cosine" else np.sqrt

    def _refresh(self, b: int) -> None:
        self.bmax[b] = float(self.mind[self.starts[b] : self.ends[b]].max())

    def absorb(self, centers: np.ndarray) -> None:
        ps = self.pos[centers]
        if len(ps) == 1:
            self._absorb_one(int(ps[0]))
            return
        _lower_to(self.mind, self.A, self.sq, ps, self.metric)
        self.mind[ps] = 0.0
        self.taken[ps] = True
        for b in range(len(self.starts)):
            self._refresh(b)

    def _absorb_one(self, p: int) -> None:
        z = self.A[p : p + 1]
        z_sq = None if self.sq is None else self.sq[p : p + 1]
        z64 = z[0].astype(np.float64)
        dc = np.sqrt(np.maximum(self.c_sq - 2.0 * (self.cent @ z64) + float(z64 @ z64), 0.0))
        hit = np.flatnonzero(dc - self.rad < self.to_euclid(self.bmax) * (1 + 1e-4) + 1e-5)
        for b in hit.tolist():
            s, e = self.starts[b], self.ends[b]
            # distances are >= 0, so rows already chosen (mind 0) stay at 0
            d = dist_block(self.A[s:e], None if self.sq is None else self.sq[s:e], z, z_sq, self.metric)[:, 0]
            np.minimum(self.mind[s:e], d, out=self.mind[s:e])
            self._refresh(b)
        self.mind[p] = 0.0
        self.taken[p] = True
        self._refresh(int(self.block_of[p]))

    def farthest(self) -> int:
        """Pool index of the non-chosen row farthest from the centers; ties -> lowest pool index."""
        top = self.bmax.max()
        if top <= 0.0:  # every remaining row sits on a center (duplicates): the lowest free pool index
            return int(np.flatnonzero(~self.taken[self.pos])[0])
        best = None
        for b in np.flatnonzero(self.bmax == top).tolist():
            s, e = self.starts[b], self.ends[b]
            rows = np.flatnonzero((self.mind[s:e] == top) & ~self.taken[s:e]) + s
            cand = int(self.order[rows].min())
            best = cand if best is None else min(best, cand)
        return best

    def mind_of(self, j: int) -> float:
        return self.mind[self.pos[j]]

    def max(self) -> float:
        return self.mind.max()


@register("k_center")
@dataclass(frozen=True)
class KCenter(Selector):
    """Farthest-first k-center. `top_q` (fraction in (0, 1] or a count > 1) restricts the candidates,
    and the rows to cover, to the top-q most uncertain rows by `score` (uncertainty-weighted core-set).
    `initial`: pool positions already chosen (not returned). Rows chosen before outside the pool
    (``with_chosen``, multi-round selection) are centers from the start, like `initial`."""

    metric: str = "euclidean"
    initial: tuple[int, ...] | None = None
    top_q: float | None = None
    score: str = "mean_entropy"
    higher_is_uncertain: bool | None = None
    progress: bool = False

    needs_embeddings = True
    maximize = False
    objective_name = "covering_radius"
    combine = "max"  # the covering radius of the pool is the largest of its shards' radii
    uses_chosen = True

    def __post_init__(self):
        check_choice("metric", self.metric, DIST_METRICS)
        if self.top_q is not None and not (self.top_q > 0):
            raise UserError(f"top_q={self.top_q!r} must be a fraction in (0, 1] or a count > 1")
        if self.top_q is not None and self.initial:
            raise UserError("k_center: use either top_q or initial, not both")

    @property
    def randomized(self) -> bool:
        return not self.initial and self.chosen is None  # only the first center is drawn

    @property
    def nested(self) -> bool:
        return self.top_q is None  # top_q's candidate set grows with the budget (never fewer than it)

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
                raise UserError(f"initial contains positions outside [0, {len(X)})")
        Xc = X[cand]
        if self.chosen is not None:
            # the rows chosen before join as extra rows that are centers from the start: never picked,
            # at distance 0, and the radius is that of the candidates (plus them, at 0) by all centers
            extra = np.arange(len(cand), len(cand) + len(self.chosen))
            Xc = np.concatenate([Xc, self.chosen])
            init = extra if init is None else np.concatenate([init, extra])
        picks, gains, radius = k_center_greedy(Xc, budget, self.metric, seed, init, self.progress)
        return SelectionResult(cand[picks], gains, radius)

    def _objective(self, idx, X, S, T):
        """Covering radius of the candidate rows (the whole pool without top_q) by the chosen rows."""
        cand = self.candidates(S, len(X), len(idx))
        chosen = idx if not self.initial else np.union1d(idx, np.asarray(self.initial))
        return self.shard_objective(X[cand], None, X[chosen], None)

    def distribution(self):
        if self.top_q is not None or self.initial:
            # top_q ranks the whole pool; `initial` positions are pool positions: both need every row at once
            return NotDistributable(
                self, f"{self.name} with top_q/initial needs the whole pool at once: use selection.mode=local"
            )
        return TwoRound(self)

    def shard_objective(self, X_rows, S_rows, X_chosen, S_chosen) -> float:
        if self.chosen is not None:  # the rows chosen before are centers too
            X_chosen = np.concatenate([np.asarray(X_chosen, dtype=np.float32).reshape(-1, self.chosen.shape[1]), self.chosen])
        return float(min_distance(X_rows, X_chosen, self.metric).max())


@register("uncertain_k_center")
@dataclass(frozen=True)
class UncertainKCenter(KCenter):
    """k_center over the top_q (default half) most uncertain rows."""

    top_q: float | None = 0.5
