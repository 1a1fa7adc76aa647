"""Facility location: f(S) = sum_i max_{j in S} sim(i, j), greedy maximisation (1 - 1/e guarantee).

Similarity is dense (n x n int16, below `dense_max_n`) or a sparse k-nearest-neighbour graph (CSR,
`n_neighbors` per row). Either way it is quantised to integers (see similarity.quantize), so every gain
is an exact integer and the three optimisers agree on the numbers:

- ``naive``: the textbook greedy "recompute every gain every step", done incrementally: when a pick
  raises row i's best similarity from old_i to new_i, candidate j loses exactly clip(K_ij, old_i, new_i)
  - old_i. Only rows that changed are touched, and integer arithmetic makes the running gains equal to
  a full recomputation bit for bit.
- ``lazy``: Minoux's accelerated greedy. Stale gains are upper bounds (submodularity); the top stale
  candidates are re-evaluated in vectorised batches until the best bound is fresh, searching a pool of
  the highest bounds so a step costs O(pool), not O(n). Same ranking as naive, exactly (ties -> lowest
  index in both). On the dense graph an evaluation skips the blocks of rows where the candidate cannot
  gain (see DenseGraph), which late in the greedy is most of them.
- ``stochastic``: Mirzasoleiman et al. 2015: each step evaluates a seeded random sample of
  ceil(n / B * log(1 / epsilon)) remaining candidates; (1 - 1/e - epsilon) in expectation.

Rows chosen before (``with_chosen``, multi-round selection): every pool row starts covered by its most
similar chosen row (c_i = quantised max_j sim(i, chosen_j) instead of 0), so the greedy maximises
f(chosen + picks) over the pool; the chosen rows themselves are not in the pool (each would add its own
similarity, 1, whatever is picked).

Hybrid: ``lambda_ > 0`` adds lambda_ * u_j to candidate j's gain, u = the `score` column oriented so
uncertain = larger and min-maxed to [0, 1] over the pool. A modular term keeps f submodular; lambda_ = 0
is exactly plain facility location.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import UserError
from .base import (
    ScoreRange,
    SelectionResult,
    Selector,
    TwoRound,
    check_choice,
    minmax,
    oriented_range,
    register,
    take_rows,
    uncertainty,
)
from .similarity import (
    QDTYPE,
    QUANT_SCALE,
    SIM_METRICS,
    PoolGamma,
    best_similarity,
    cluster_order,
    dense_similarity,
    executor,
    knn_graph,
    n_threads,
    parallel,
    prepare,
    quantize,
    sim_block,
    split_range,
)

OPTIMIZERS = ("naive", "lazy", "stochastic")
DENSE_BLOCK = 256  # columns per skippable block of the dense graph
_TAKEN = np.iinfo(np.int64).min // 4  # gain of an already chosen row: never the argmax


class DenseGraph:
    """Exactly symmetric int16 similarity, so row r doubles as column r (rows are contiguous).

    `order` (optional) is the permutation of pool rows that K is stored in: K[a, b] = sim(order[a],
    order[b]). Callers always speak in pool positions; only the row vector `c` the greedy threads through
    lives in K's order. With rows grouped by a clustering (see `cluster_order`), the columns split into
    `block`-wide stretches of similar rows, and the greedy skips whole stretches: when the largest
    similarity of candidate j to a stretch is <= the smallest current best in it, j gains exactly 0
    there. Late in the greedy that is most of the row (measured: 95-97% of blocks on clustered data), so
    an evaluation reads a few blocks instead of a 2n-byte row. Gains stay exact integers either way.
    """

    def __init__(self, K: np.ndarray, order: np.ndarray | None = None, block: int = 256):
        # K may be wider than n (zero-padded columns, dense_similarity(width=...)): block skipping views
        # each row as (n_blocks, block), which needs width == n_blocks * block.
        n = len(K)
        padded, self.K = K, K[:, :n]
        self._padded = padded  # contiguous rows: np.take on the strided (n, n) view is element by element
        self.n = n
        self.inv = None if order is None else np.argsort(order)  # pool position -> row of K
        # a row sum of n values <= 32767 fits int32 below 65536 rows; int32 reductions are faster
        self.acc = np.int32 if n < 65536 else np.int64
        # per thread: the rows of a batch, and the same folded in half (see _gains_into)
        self._bufs = [
            (np.empty((min(64, n), n), dtype=K.dtype), np.empty((min(64, n), n // 2), dtype=np.uint16))
            for _ in range(n_threads())
        ]
        self._rows = None  # naive's row buffer, allocated on first use
        self.block, self.n_blocks = block, -(-n // block)
        self.K3 = None
        if order is not None and self.n_blocks > 1 and padded.shape[1] == self.n_blocks * block:
            self.K3 = padded.reshape(n, self.n_blocks, block)
            self.M = np.empty((n, self.n_blocks), dtype=K.dtype)  # per row, the maximum of each block

            def fill(a, b):
                np.max(self.K3[a:b], axis=2, out=self.M[a:b])

            parallel(n_threads(), n, fill)
            self._c = np.zeros(self.n_blocks * block, dtype=K.dtype)  # c, zero-padded like K's rows

    def rows(self, cands: np.ndarray) -> np.ndarray:
        return cands if self.inv is None else self.inv[cands]

    def coverage(self, c_pool: np.ndarray) -> np.ndarray:
        """A per-row vector in pool order -> the greedy's `c`, which lives in K's row order."""
        if self.inv is None:
            return c_pool.copy()
        c = np.empty_like(c_pool)
        c[self.inv] = c_pool
        return c

    def initial_gains(self) -> np.ndarray:
        sums = np.add.reduce(self.K, axis=1, dtype=np.int64)
        return sums if self.inv is None else sums[self.inv]

    def fresh_gains(self, cands: np.ndarray, c: np.ndarray) -> np.ndarray:
        r = self.rows(np.asarray(cands))
        if self.K3 is not None and len(r):
            self._c[: self.n] = c
            C3 = self._c.reshape(self.n_blocks, self.block)
            active = self.M[r] > C3.min(axis=1)  # (candidates, blocks): where a candidate can gain at all
            if active.mean() < 0.25:
                return self._block_gains(r, C3, active)
        # gain_j = sum_i max(K_ij, c_i) - sum_i c_i: one pass fewer than summing max(K_ij - c_i, 0).
        # Memory-bound (every evaluation reads a 2n-byte row), so rows go straight from K through
        # np.maximum into a reused buffer: a separate gather (np.take) would read and write them twice.
        # Big batches are split over threads (numpy releases the GIL inside ufunc loops).
        out = np.empty(len(r), dtype=np.int64)
        parts = split_range(len(r), len(self._bufs), min_part=16)
        if len(parts) == 1:
            self._gains_into(r, c, out, self._bufs[0])
        else:
            list(
                executor(len(parts)).map(
                    lambda a: self._gains_into(r[a[0] : a[1]], c, out[a[0] : a[1]], self._bufs[a[2]]),
                    [(s, e, w) for w, (s, e) in enumerate(parts)],
                )
            )
        out -= int(c.sum(dtype=np.int64))
        return out

    def _block_gains(self, r: np.ndarray, C3: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Exact gains summed over the active (candidate, block) pairs only: the rest contribute 0.

        Pad columns hold K = 0 and c = 0, so they add max(0, 0) - 0 = 0."""
        who, b = np.nonzero(active)
        blk = self.K3[r[who], b]  # (pairs, block): one contiguous copy per pair
        np.maximum(blk, C3[b], out=blk)
        part = np.add.reduce(blk, axis=1, dtype=np.int64)
        part -= np.add.reduce(C3, axis=1, dtype=np.int64)[b]
        # float64 bincount of integers < 2**53 is exact
        return np.bincount(who, weights=part, minlength=len(r)).astype(np.int64)

    def _gains_into(self, cands, c, out, bufs) -> None:
        K, h = self.K, self.n // 2
        buf, half = bufs
        for s in range(0, len(cands), len(buf)):
            part = cands[s : s + len(buf)].tolist()
            blk = buf[: len(part)]  # reused: fresh allocations of this size cost page faults
            for r, j in enumerate(part):
                np.maximum(K[j], c, out=blk[r])
            # fold the row in two before the widening sum: entries are <= 32767, so a uint16 pair sum
            # cannot overflow, and the int16 -> int32 reduction (the slow part) reads half as much
            u, hb = blk.view(np.uint16), half[: len(part)]
            np.add(u[:, :h], u[:, h : 2 * h], out=hb)
            total = np.add.reduce(hb, axis=1, dtype=self.acc)
            if self.n % 2:
                total += blk[:, -1]
            out[s : s + len(part)] = total

    def absorb(self, j: int, c: np.ndarray, gains: np.ndarray | None) -> None:
        """Raise c to include pick j; with `gains`, subtract every candidate's exact loss."""
        row = self.K[j if self.inv is None else int(self.inv[j])]
        R = np.flatnonzero(row > c)
        if gains is not None:
            loss = np.zeros(self.n, dtype=np.int64)  # per row of K; column r of K is candidate order[r]
            for s in range(0, len(R), 2048):  # 2048 rows * 32767 < 2**31: int32 column sums are safe
                r = R[s : s + 2048]
                old, new = c[r], row[r]
                if self._rows is None:
                    self._rows = np.empty((min(2048, self.n), self._padded.shape[1]), dtype=self.K.dtype)
                np.take(self._padded, r, axis=0, out=self._rows[: len(r)])
                blk = self._rows[: len(r), : self.n]
                np.maximum(blk, old[:, None], out=blk)
                np.minimum(blk, new[:, None], out=blk)
                loss += np.add.reduce(blk, axis=0, dtype=np.int32)
                loss -= int(old.sum(dtype=np.int64))
            gains -= loss if self.inv is None else loss[self.inv]
        c[R] = row[R]


class SparseGraph:
    """k-NN graph: CSR rows (pool rows i -> neighbours j) for the naive update, CSC for column gains."""

    def __init__(self, G: sp.csr_matrix):
        self.G = G.tocsr()
        self.C = self.G.tocsc()
        self.C.sort_indices()
        self.n = G.shape[0]

    def coverage(self, c_pool: np.ndarray) -> np.ndarray:
        return c_pool.copy()

    def initial_gains(self) -> np.ndarray:
        # float64 bincount of integers < 2**53 is exact
        return np.bincount(self.G.indices, weights=self.G.data, minlength=self.n).astype(np.int64)

    @staticmethod
    def _ranges(indptr, which):
        starts, ends = indptr[which], indptr[which + 1]
        lens = ends - starts
        total = int(lens.sum())
        offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        return np.repeat(starts, lens) + offs, lens

    def fresh_gains(self, cands: np.ndarray, c: np.ndarray) -> np.ndarray:
        pos, lens = self._ranges(self.C.indptr, cands)
        contrib = self.C.data[pos].astype(np.int64) - c[self.C.indices[pos]]
        np.maximum(contrib, 0, out=contrib)
        cs = np.concatenate([[0], np.cumsum(contrib)])
        ends = np.cumsum(lens)
        return cs[ends] - cs[ends - lens]

    def column(self, j: int):
        s, e = self.C.indptr[j], self.C.indptr[j + 1]
        return self.C.indices[s:e], self.C.data[s:e]

    def absorb(self, j: int, c: np.ndarray, gains: np.ndarray | None) -> None:
        rows, vals = self.column(j)
        m = vals > c[rows]
        R, new = rows[m], vals[m]
        if gains is not None and len(R):
            old = c[R]
            pos, lens = self._ranges(self.G.indptr, R)
            o, nw = np.repeat(old, lens), np.repeat(new, lens)
            delta = np.minimum(np.maximum(self.G.data[pos], o), nw) - o
            gains -= np.bincount(self.G.indices[pos], weights=delta, minlength=self.n).astype(np.int64)
        c[R] = new


def facility_location_greedy(
    graph,
    budget: int,
    optimizer: str = "lazy",
    modular: np.ndarray | None = None,
    epsilon: float = 0.01,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    pool: int = 2048,
    covered: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy picks over a DenseGraph/SparseGraph. `modular`: int64 per-candidate bonus (hybrid).
    `covered`: every row's quantised similarity to the rows chosen before (pool order; None: zeros).

    Returns (indices, gains) with gains as float similarity units (quantised FL gain + bonus).
    """
    check_choice("optimizer", optimizer, OPTIMIZERS)
    n = graph.n
    mod = np.zeros(n, dtype=np.int64) if modular is None else np.asarray(modular, dtype=np.int64)
    # current best quantised similarity of every row (in the graph's row order)
    c = np.zeros(n, dtype=QDTYPE) if covered is None else graph.coverage(np.asarray(covered, dtype=QDTYPE))
    picks = np.empty(budget, dtype=np.int64)
    gains_out = np.empty(budget, dtype=np.float64)
    steps = range(budget)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"facility-location ({optimizer})", leave=False)

    if optimizer == "stochastic":
        rng = np.random.default_rng(seed)
        s = max(1, int(math.ceil(n / budget * math.log(1.0 / epsilon))))
        taken = np.zeros(n, dtype=bool)
        for t in steps:
            remaining = np.flatnonzero(~taken)
            sample = remaining if s >= len(remaining) else np.sort(rng.choice(remaining, size=s, replace=False))
            g = graph.fresh_gains(sample, c) + mod[sample]
            k = int(np.argmax(g))  # sample is sorted: ties go to the lowest index
            j = int(sample[k])
            picks[t], gains_out[t] = j, g[k]
            taken[j] = True
            graph.absorb(j, c, None)
        return picks, gains_out / QUANT_SCALE

    # exact gains for the empty set, or (rows chosen before) given their coverage: one pass over every candidate
    total = (graph.initial_gains() if covered is None else graph.fresh_gains(np.arange(n), c)) + mod
    if optimizer == "naive":
        for t in steps:
            j = int(np.argmax(total))  # first maximum = lowest index among ties
            picks[t], gains_out[t] = j, total[j]
            graph.absorb(j, c, total)
            total[j] = _TAKEN  # later updates subtract a little more; it stays hugely negative
        return picks, gains_out / QUANT_SCALE

    # lazy: `total` holds upper bounds; fresh_at[j] == t means the bound is the exact gain at step t.
    # The search runs inside a pool of the highest bounds (indices ascending) so that the per-step work
    # is O(pool), not O(n); every candidate outside the pool has a bound < `floor` (bounds only fall),
    # so a fresh pool maximum >= floor is the global maximum, ties included (lowest index wins).
    fresh_at = np.zeros(n, dtype=np.int64)
    pool_size = min(n, max(pool, 1))
    cand, floor = _lazy_pool(total, pool_size)
    for t in steps:
        k = batch_size
        while True:
            sub = total[cand]
            p = int(np.argmax(sub))  # cand is sorted: first maximum = lowest index among ties
            j = int(cand[p])
            if fresh_at[j] == t:
                if sub[p] >= floor:
                    break
                cand, floor = _lazy_pool(total, pool_size)  # the pool ran dry: rebuild it
                continue
            # re-evaluate the k best stale bounds of the pool in one vectorised batch, then look again
            top = _top_stale(cand, sub, fresh_at[cand] == t, k)
            total[top] = graph.fresh_gains(top, c) + mod[top]
            fresh_at[top] = t
            k = min(2 * k, 4096)
        picks[t], gains_out[t] = j, total[j]
        graph.absorb(j, c, None)
        total[j] = _TAKEN
        fresh_at[j] = budget + 1  # never fresh again: stays at _TAKEN
        cand = cand[cand != j]
        if len(cand) == 0:
            cand, floor = _lazy_pool(total, pool_size)
    return picks, gains_out / QUANT_SCALE


def _top_stale(cand: np.ndarray, sub: np.ndarray, skip: np.ndarray, k: int) -> np.ndarray:
    """The (up to) k candidates with the highest bounds `sub` among those not in `skip`."""
    stale = np.where(skip, _TAKEN, sub)
    kk = min(k, len(cand)) - 1
    top = np.argpartition(-stale, kk)[: kk + 1] if kk + 1 < len(cand) else np.arange(len(cand))
    return cand[top[stale[top] > _TAKEN]]


def _lazy_pool(total: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """(sorted indices of every candidate whose bound >= the size-th largest bound, that bound).

    Ties at the cut all go in, so every candidate left out has a bound strictly below the returned floor.
    Chosen rows (bound _TAKEN) never enter.
    """
    live = total > _TAKEN
    n_live = int(live.sum())
    if n_live <= size:
        return np.flatnonzero(live), _TAKEN + 1
    floor = int(np.partition(total, len(total) - size)[len(total) - size])
    return np.flatnonzero(total >= floor), floor


def facility_location_gains(X_pool, X_cand, current, metric: str = "cosine", gamma: float | None = None) -> np.ndarray:
    """Float64 marginal gain of each candidate row given every pool row's current best similarity.

    gain_j = sum_i max(0, sim(pool_i, cand_j) - current_i); chunked over pool rows. Sums over shards, so a
    distributed run evaluates global gains as the sum of each shard's result (same `gamma` everywhere).
    """
    A, a_sq = prepare(X_pool, metric)
    B, b_sq = prepare(X_cand, metric)
    cur = np.asarray(current, dtype=np.float32)
    out = np.zeros(len(B), dtype=np.float64)
    step = max(1, (1 << 24) // max(1, len(B)))
    for s in range(0, len(A), step):
        blk = sim_block(A[s : s + step], None if a_sq is None else a_sq[s : s + step], B, b_sq, metric, gamma)
        blk -= cur[s : s + step, None]
        np.maximum(blk, 0.0, out=blk)
        out += blk.sum(axis=0, dtype=np.float64)
    return out


def build_graph(X, metric: str, gamma: float | None, dense_max_n: int, n_neighbors: int, seed: int = 0, progress: bool = False):
    if len(X) <= dense_max_n:
        # rows grouped by a clustering so the greedy can skip whole blocks (see DenseGraph); its seed is
        # fixed, not the selection's: lazy greedy is deterministic and must not vary with `seed`
        order = cluster_order(X, metric, max(1, len(X) // DENSE_BLOCK), 0) if len(X) > 2 * DENSE_BLOCK else None
        width = -(-len(X) // DENSE_BLOCK) * DENSE_BLOCK if order is not None else None
        K = dense_similarity(X if order is None else X[order], metric, gamma, width)
        return DenseGraph(K, order, DENSE_BLOCK)
    return SparseGraph(knn_graph(X, n_neighbors, metric, gamma, seed=seed, progress=progress))


@register("facility_location")
@dataclass(frozen=True)
class FacilityLocation(Selector):
    """Greedy facility location (see module docstring). `gamma` only for rbf/euclidean (None: the pool's
    1 / mean squared distance). Dense similarity up to `dense_max_n` rows, else a k-NN graph."""

    metric: str = "cosine"
    gamma: float | None = None
    optimizer: str = "lazy"
    epsilon: float = 0.01
    dense_max_n: int = 20_000
    n_neighbors: int = 50
    lambda_: float = 0.0
    score: str | None = None
    higher_is_uncertain: bool | None = None
    batch_size: int = 16
    progress: bool = False

    needs_embeddings = True
    combine = "sum"  # sum_i max_j sim(i, j) is a sum over pool rows; the hybrid's bonus is a sum over picks
    uses_chosen = True

    def __post_init__(self):
        check_choice("metric", self.metric, SIM_METRICS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.metric == "cosine" and self.gamma is not None:
            raise UserError("gamma is only used by metric='rbf' or 'euclidean'; drop it for metric='cosine'")
        if self.gamma is not None and not self.gamma > 0:
            raise UserError(f"gamma={self.gamma!r} must be > 0")
        if not 0 < self.epsilon < 1:
            raise UserError(f"epsilon={self.epsilon!r} must be in (0, 1)")
        if self.n_neighbors < 1:
            raise UserError(f"n_neighbors={self.n_neighbors!r} must be >= 1")
        if self.dense_max_n < 0:
            raise UserError(f"dense_max_n={self.dense_max_n!r} must be >= 0")
        if self.lambda_ < 0:
            raise UserError(f"lambda_={self.lambda_!r} must be >= 0 (0 = plain facility location)")
        if self.lambda_ > 0 and self.score is None:
            raise UserError(f"lambda_={self.lambda_} needs score=<uncertainty column>, e.g. score='mean_entropy'")
        if self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size!r} must be >= 1")

    @property
    def randomized(self) -> bool:
        return self.optimizer == "stochastic"

    @property
    def nested(self) -> bool:
        return self.optimizer != "stochastic"  # stochastic greedy's sample size is n / budget * log(1/eps)

    def score_names(self):
        return (self.score,) if self.lambda_ > 0 else ()

    def pool_statistics(self):
        # the similarity and the hybrid's normalisation are functions of the whole pool: a shard must
        # not use its own gamma or min/max, or every shard optimises a different function
        stats = {}
        if self.metric != "cosine" and self.gamma is None:
            stats["gamma"] = PoolGamma()
        if self.lambda_ > 0:
            stats["score_range"] = ScoreRange(self.score)
        return stats

    @property
    def _gamma(self) -> float | None:
        """The similarity's gamma: the given one, else the (bound) pool's; None for cosine."""
        return self.gamma if self.gamma is not None else self.globals.get("gamma")

    def bonus(self, S) -> np.ndarray | None:
        """Hybrid term lambda_ * u in [0, lambda_] per row of S (float64), u min-maxed with the pool's
        range of the score; None for plain FL. Call on a bound selector (select binds it)."""
        if self.lambda_ == 0:
            return None
        lo, hi = oriented_range(self.globals["score_range"], self.score, self.higher_is_uncertain)
        return self.lambda_ * minmax(uncertainty(S[self.score], self.score, self.higher_is_uncertain), lo, hi)

    def _select(self, budget, X, S, T, seed):
        graph = build_graph(X, self.metric, self._gamma, self.dense_max_n, self.n_neighbors, seed, self.progress)
        b = self.bonus(S)
        mod = None if b is None else np.rint(b * QUANT_SCALE).astype(np.int64)
        covered = None
        if self.chosen is not None:  # quantised like the graph's entries: gains stay exact integers
            covered = quantize(best_similarity(X, self.chosen, self._sim_metric, self._gamma).astype(np.float32))
        idx, gains = facility_location_greedy(
            graph,
            budget,
            self.optimizer,
            mod,
            self.epsilon,
            seed,
            self.batch_size,
            self.progress,
            covered=covered,
        )
        del graph
        return SelectionResult(idx, gains, float("nan"))  # select() adds the objective when asked

    def _objective(self, idx, X, S, T):
        X_c, S_c = X[idx], take_rows(S, idx)
        return self.shard_objective(X, S, X_c, S_c) + self.chosen_objective(X_c, S_c)

    def distribution(self):
        return TwoRound(self)

    @property
    def _sim_metric(self) -> str:
        return "rbf" if self.metric == "euclidean" else self.metric  # euclidean FL is the rbf similarity

    def shard_objective(self, X_rows, S_rows, X_chosen, S_chosen) -> float:
        if self.chosen is not None:  # the rows chosen before cover the pool too
            X_chosen = np.concatenate([np.asarray(X_chosen, dtype=np.float32).reshape(-1, self.chosen.shape[1]), self.chosen])
        return float(best_similarity(X_rows, X_chosen, self._sim_metric, self._gamma).sum())

    def chosen_objective(self, X_chosen, S_chosen) -> float:
        b = self.bonus(S_chosen)
        return 0.0 if b is None else float(b.sum())


@register("fl_uncertainty")
@dataclass(frozen=True)
class FacilityLocationUncertainty(FacilityLocation):
    """Hybrid: facility location + lambda_ * normalised uncertainty (defaults lambda_=1, mean_entropy)."""

    lambda_: float = 1.0
    score: str | None = "mean_entropy"
