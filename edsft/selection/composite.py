"""Selectors built from other selectors: per-task budgets (task_balanced) and GreeDi (greedi)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from .base import (
    SELECTORS,
    Gather,
    NotDistributable,
    PerTask,
    PoolStatistic,
    ScoreRange,
    SelectionResult,
    Selector,
    TwoRound,
    minmax,
    oriented_range,
    register,
    take_rows,
    uncertainty,
)

GREEDI_SHARDS = 4  # greedi's m in-process when none is given (a distributed run uses selection.shards)

# Scores that are already a probability-like confidence gap in [0, 1].
_CONF_IS_ONE_MINUS = ("least_confidence", "least_confidence_norm")  # 1 - p_max
_CONF_IS_VALUE = ("mean_margin", "min_margin")  # p_top1 - p_top2


def inner_selector(name: str, params: Mapping[str, Any] | None) -> Selector:
    if name not in SELECTORS:
        raise UserError(f"inner={name!r} is not a selector: use one of {sorted(SELECTORS)}")
    return SELECTORS[name].from_params(**dict(params or {}))


def row_confidence(
    values: np.ndarray, score: str, higher_is_uncertain: bool | None = None, raw_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Model confidence per row in [0, 1] from a score column: 1 - least_confidence, the margin itself,
    or 1 - min-max(oriented uncertainty) for any other column (min-max over `values`, or with the pool's
    `raw_range` = (min, max) of the raw column)."""
    v = np.asarray(values, dtype=np.float64)
    if score in _CONF_IS_ONE_MINUS:
        return np.clip(1.0 - v, 0.0, 1.0)
    if score in _CONF_IS_VALUE:
        return np.clip(v, 0.0, 1.0)
    lo, hi = (None, None) if raw_range is None else oriented_range(raw_range, score, higher_is_uncertain)
    return 1.0 - minmax(uncertainty(v, score, higher_is_uncertain), lo, hi)


@dataclass(frozen=True)
class TaskConfidence(PoolStatistic):
    """Per task label: (rows, sum of row_confidence), with the pool's raw (min, max) of the score.

    Sums are bincounts in row order and add up block by block, so one block gives exactly the
    in-process numbers."""

    score: str
    higher_is_uncertain: bool | None
    raw_range: tuple[float, float]

    def partial(self, X, S, T):
        conf = row_confidence(S[self.score], self.score, self.higher_is_uncertain, self.raw_range)
        labels, inv = np.unique(T, return_inverse=True)
        sums = np.bincount(inv, weights=conf, minlength=len(labels))
        counts = np.bincount(inv, minlength=len(labels))
        return {label: (int(c), float(v)) for label, c, v in zip(labels.tolist(), counts, sums)}

    def merge(self, a, b):
        out = dict(a)
        for label, (c, v) in b.items():
            c0, v0 = out.get(label, (0, 0.0))
            out[label] = (c0 + c, v0 + v)
        return out


def allocate_budget(budget: int, sizes, mean_confidence, size_aware: bool = False, min_confidence: float = 1e-3):
    """Per-task quotas: proportional to 1 / mean confidence (times task size if size_aware), each capped
    by the task's size with the excess redistributed (water filling), then largest-remainder rounding so
    the quotas sum to `budget` exactly (ties -> earlier task). Arabelly et al. 2025 (arXiv 2507.21482).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if budget > sizes.sum():
        raise UserError(f"budget={budget} exceeds the pool size {int(sizes.sum())}")
    w = 1.0 / np.maximum(np.asarray(mean_confidence, dtype=np.float64), min_confidence)
    if size_aware:
        w = w * sizes
    w = np.where(sizes > 0, w, 0.0)
    quota = np.zeros(len(sizes), dtype=np.float64)
    capped = sizes == 0
    left = float(budget)
    while True:  # at most len(sizes) rounds: each round caps at least one task or stops
        active = ~capped
        if not active.any():
            break
        q = left * w / w[active].sum() * active
        over = active & (q >= sizes)
        if not over.any():
            quota[active] = q[active]
            break
        quota[over] = sizes[over]
        capped |= over
        left -= float(sizes[over].sum())
    alloc = np.floor(quota + 1e-9).astype(np.int64)
    alloc = np.minimum(alloc, sizes)
    short = budget - int(alloc.sum())
    if short > 0:
        frac = np.where(alloc < sizes, quota - alloc, -np.inf)
        order = np.lexsort((np.arange(len(sizes)), -frac))  # largest remainder, ties -> earlier task
        for t in order[:short]:
            alloc[t] += 1
    return alloc


@register("task_balanced")
@dataclass(frozen=True)
class TaskBalanced(Selector):
    """Budget split across tasks inversely to the model's mean confidence per task, then an inner
    selector inside each task. Picks are returned task by task (tasks in sorted label order)."""

    score: str = "least_confidence_norm"
    higher_is_uncertain: bool | None = None
    inner: str = "facility_location"
    inner_params: Mapping[str, Any] = field(default_factory=dict)
    size_aware: bool = False
    min_confidence: float = 1e-3

    def __post_init__(self):
        if self.inner in ("task_balanced", "greedi"):
            raise UserError(f"inner={self.inner!r} cannot be nested inside task_balanced")
        inner_selector(self.inner, self.inner_params)  # fail early on bad inner params

    def _inner(self) -> Selector:
        """The inner selector, bound to the rows chosen before (if any): they pass on to it."""
        return inner_selector(self.inner, self.inner_params).with_chosen(self.chosen)

    @property
    def uses_chosen(self) -> bool:  # type: ignore[override]
        return self._inner().uses_chosen

    @property
    def needs_tasks(self) -> bool:
        return True

    @property
    def needs_embeddings(self) -> bool:  # type: ignore[override]
        return self._inner().needs_embeddings

    @property
    def randomized(self) -> bool:
        return self._inner().randomized

    def score_names(self):
        inner = self._inner().score_names()
        return tuple(dict.fromkeys((self.score, *inner)))

    def pool_statistics(self):
        stats = {"score_range": ScoreRange(self.score)}
        if "score_range" in self.globals:  # the confidence is normalised with the pool's range: a second pass
            rng = self.globals["score_range"]
            stats["task_confidence"] = TaskConfidence(self.score, self.higher_is_uncertain, rng)
        return stats

    def quotas(self, budget: int) -> dict:
        """{task label: quota} for `budget` from the bound per-task confidence (labels in sorted order)."""
        conf = self.globals["task_confidence"]
        labels = sorted(conf)
        sizes = np.array([conf[k][0] for k in labels], dtype=np.int64)
        mean_conf = np.array([conf[k][1] / conf[k][0] for k in labels], dtype=np.float64)
        alloc = allocate_budget(budget, sizes, mean_conf, self.size_aware, self.min_confidence)
        return dict(zip(labels, alloc.tolist()))

    def _select(self, budget, X, S, T, seed):
        inner = self._inner()
        quotas = self.quotas(budget)
        labels, inv = np.unique(T, return_inverse=True)
        picks, gains = [], []
        for t, label in enumerate(labels.tolist()):
            q = quotas[label]
            if q == 0:
                continue
            rows = np.flatnonzero(inv == t)
            res = inner.select(
                int(q), None if X is None else X[rows], take_rows(S, rows), T[rows], seed, compute_objective=False
            )  # the objective below is the whole pool's
            picks.append(rows[res.indices])
            gains.append(res.gains)
        idx = np.concatenate(picks)
        return SelectionResult(idx, np.concatenate(gains), self._objective(idx, X, S, T))

    def _objective(self, idx, X, S, T):
        return self._inner().objective(idx, X, S, T)

    def distribution(self):
        inner = self._inner()
        plan = inner.distribution()
        if isinstance(plan, Gather):  # an inner selector without a distributed form: all of it in one task
            return Gather(self)
        if isinstance(plan, NotDistributable):
            return NotDistributable(self, plan.reason)
        if not isinstance(plan, TwoRound):
            return NotDistributable(self, f"task_balanced with inner={self.inner!r} has no distributed form: use mode=local")
        bound = "task_confidence" in self.globals
        return PerTask(self, inner=inner, quotas=self.quotas if bound else None)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Steele et al.'s SplitMix64 finaliser on uint64 arrays (wrapping arithmetic, no Python hash()).
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shard_of(row_keys, m: int, seed: int = 0) -> np.ndarray:
    """Shard (0..m-1, int64) of every row key: a seeded stable hash, identical across processes and
    machines. Integer keys: SplitMix64(key + SplitMix64(seed)); other keys: blake2b of str(key) with the
    seed as the hash key. GreeDi's partition; the distributed stage must use this same function."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise UserError(f"m={m!r} (number of shards) must be an integer >= 1")
    keys = np.asarray(row_keys)
    if keys.ndim != 1:
        raise UserError(f"row_keys must be 1-d, got shape {keys.shape}")
    if keys.dtype.kind in "iu":
        salt = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        h = _splitmix64(keys.astype(np.uint64) + salt)
    else:
        skey = int(seed).to_bytes(16, "little", signed=False)
        h = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(str(k).encode("utf-8"), digest_size=8, key=skey).digest(), "little")
                for k in keys.tolist()
            ),
            dtype=np.uint64,
            count=len(keys),
        )
    return (h % np.uint64(m)).astype(np.int64)


@register("greedi")
@dataclass(frozen=True)
class GreeDi(Selector):
    """In-process reference of two-round distributed selection (GreeDi / RandGreeDi).

    Rows are split into m shards (None: 4 in-process, selection.shards in a distributed run) by
    shard_of(row_keys or positions, m, seed); the inner selector picks
    `kappa` (default budget) candidates per shard; it runs again on the union of the candidates; the
    answer is the best, by the inner objective on the WHOLE pool, of the merged selection and each
    shard's first `budget` picks (ties -> the earliest shard, then merged). gains come from the winning run.
    """

    inner: str = "facility_location"
    inner_params: Mapping[str, Any] = field(default_factory=dict)
    m: int | None = None
    kappa: int | None = None
    row_keys: Any = None

    def __post_init__(self):
        if self.inner in ("greedi", "random"):
            raise UserError(f"inner={self.inner!r} has no objective to compare runs: use e.g. facility_location")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, (int, np.integer)) or self.m < 1):
            raise UserError(f"m={self.m!r} must be an integer >= 1 or None")
        if self.kappa is not None and self.kappa < 1:
            raise UserError(f"kappa={self.kappa!r} must be >= 1 or None (= budget)")
        inner_selector(self.inner, self.inner_params)

    def _inner(self) -> Selector:
        """The inner selector, bound to the rows chosen before (if any): they pass on to it."""
        return inner_selector(self.inner, self.inner_params).with_chosen(self.chosen)

    @property
    def uses_chosen(self) -> bool:  # type: ignore[override]
        return self._inner().uses_chosen

    @property
    def shards(self) -> int:
        return GREEDI_SHARDS if self.m is None else int(self.m)

    @property
    def randomized(self) -> bool:
        return self.shards > 1 or self._inner().randomized

    @property
    def needs_embeddings(self) -> bool:  # type: ignore[override]
        return self._inner().needs_embeddings

    @property
    def needs_tasks(self) -> bool:
        return self._inner().needs_tasks

    def score_names(self):
        return self._inner().score_names()

    def _select(self, budget, X, S, T, seed):
        inner = self._inner()
        n = len(X) if X is not None else len(next(iter(S.values())))
        keys = np.arange(n) if self.row_keys is None else np.asarray(self.row_keys)
        if len(keys) != n:
            raise UserError(f"row_keys has {len(keys)} entries for a pool of {n} rows")
        shard = shard_of(keys, self.shards, seed)
        kappa = self.kappa or budget

        def run(rows, k):  # the runs are compared by the whole-pool objective below, not their own
            res = inner.select(
                k,
                None if X is None else X[rows],
                take_rows(S, rows),
                None if T is None else T[rows],
                seed,
                compute_objective=False,
            )
            return rows[res.indices], res.gains

        runs, cands = [], []
        for p in range(self.shards):
            rows = np.flatnonzero(shard == p)
            if len(rows) == 0:
                continue
            idx, g = run(rows, min(kappa, len(rows)))
            cands.append(idx)
            if len(idx) >= budget:
                runs.append((idx[:budget], g[:budget]))
        union = np.unique(np.concatenate(cands))
        if len(union) >= budget:
            runs.append(run(union, budget))
        if not runs:
            raise UserError(f"no shard or merged run reached budget={budget}: raise kappa or lower m={self.shards}")
        best, best_val = None, None
        for idx, g in runs:
            val = inner.objective(idx, X, S, T)
            if best is None or (val > best_val if inner.maximize else val < best_val):
                best, best_val = (idx, g), val
        return SelectionResult(best[0], best[1], best_val)

    def _objective(self, idx, X, S, T):
        return self._inner().objective(idx, X, S, T)

    def distribution(self):
        # greedi IS the two-round scheme: distributed, its inner selector runs it on the real shards
        if self.row_keys is not None:
            return NotDistributable(
                self, "selection.params.row_keys cannot be used with mode=distributed: rows are keyed by row_id"
            )
        plan = self._inner().distribution()
        return dataclasses.replace(
            plan, shards=self.m if self.m is not None else plan.shards, kappa=self.kappa if self.kappa is not None else plan.kappa
        )
