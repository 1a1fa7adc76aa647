"""Selector base class, registry, result type, input validation, and the distributed contract.

The distributed contract
------------------------
``edsft.distributed.coresets`` runs any selector on a sharded pool without knowing which one it is. It
asks the selector three things (defaults in brackets):

1. ``pool_statistics()`` [none]: the pool-wide statistics its function depends on (a score's min/max, the
   rbf gamma), each a :class:`PoolStatistic` that a map pass over the shards computes and merges. The
   selector reads them back from ``self.globals`` after ``with_globals(values)`` bound a copy to them, so
   that every shard optimises the same function. ``select`` binds whatever is still unbound to the rows
   it is given: in-process, the pool's own statistics, through the very same code.
2. ``distribution()`` [:class:`Gather`]: how it runs sharded: :class:`TwoRound` (GreeDi: shard-local
   runs, a run on the union of their candidates, the best by the whole-pool objective), :class:`Draw`
   (the picks depend only on the pool size), :class:`PerTask` (a budget per task, then the inner
   selector's two rounds inside each task), :class:`Gather` (not distributable: the pool is gathered into
   one task and the selector runs there in-process) or :class:`NotDistributable` (a clear error).
3. For :class:`TwoRound`, how the objective splits over disjoint blocks of pool rows:
   ``objective(chosen) = combine_j shard_objective(rows_j, chosen) + chosen_objective(chosen)`` with
   ``combine`` = "sum" (facility location), "max" (k-center) or None (the objective reads only the
   chosen rows, e.g. uncertainty's sum). ``maximize`` says which run wins.

Rows chosen before
------------------
Multi-round selection picks each batch among the rows not chosen yet. ``with_chosen(embeddings)`` binds
a copy to the embeddings of the rows earlier rounds chose (not part of the pool it is given, in the same
embedding space); selectors with ``uses_chosen`` start from them: facility location counts every pool
row as already covered by its most similar chosen row, k-center as already at its distance to the
nearest chosen row, and their objectives are those of the chosen rows plus the picks. The others select
among the pool they are given and ignore them. Like the statistics, the chosen rows travel with the
bound copy into every shard task, so the distributed stage needs nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError

SELECTORS: dict[str, type[Selector]] = {}

# Orientation of the known uncertainty scores: True = a LARGER value means MORE uncertain.
# Margins are the gap between the top two probabilities: a SMALL gap is an uncertain token.
HIGHER_IS_UNCERTAIN: dict[str, bool] = {
    "mean_entropy": True,
    "max_entropy": True,
    "least_confidence": True,
    "least_confidence_norm": True,
    "mean_margin": False,
    "min_margin": False,
}


@dataclass(frozen=True)
class SelectionResult:
    """What a selector returns. `indices` are positions into the pool, in pick order, unique."""

    indices: np.ndarray  # int64 (budget,)
    gains: np.ndarray  # float64 (budget,), NaN where the selector has no marginal gain
    objective: float  # the selector's objective on the chosen set, NaN if it has none

    def __post_init__(self):
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64))
        object.__setattr__(self, "gains", np.asarray(self.gains, dtype=np.float64))
        object.__setattr__(self, "objective", float(self.objective))


MAX_STAT_PASSES = 8  # statistics that depend on statistics: a few passes at most


def take_rows(S: Mapping[str, np.ndarray] | None, rows) -> dict[str, np.ndarray] | None:
    """The score columns restricted to some rows."""
    return {k: v[rows] for k, v in S.items()} if S is not None else None


def register(name: str):
    def deco(cls):
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return deco


class PoolStatistic:
    """A statistic of the whole pool that a selector's function depends on (see the module docstring).

    ``partial`` summarises one non-empty block of rows (X float32 (n, d) or None, S score columns, T task
    labels or None), ``merge`` combines two summaries of disjoint blocks (called in pool-block order) and
    ``value`` finishes the merged summary. In-process a statistic is ``value(partial(whole pool))``.
    Instances are frozen dataclasses: they travel to the distributed stage's tasks.
    """

    def partial(self, X, S, T) -> Any:
        raise NotImplementedError

    def merge(self, a, b) -> Any:
        raise NotImplementedError

    def value(self, partial) -> Any:
        return partial

    def of(self, X, S, T) -> Any:
        """The statistic of one block of rows taken as the whole pool."""
        return self.value(self.partial(X, S, T))


@dataclass(frozen=True)
class ScoreRange(PoolStatistic):
    """(min, max) of one raw score column: what min-max normalisation over the pool needs."""

    column: str

    def partial(self, X, S, T):
        v = S[self.column]
        return float(v.min()), float(v.max())

    def merge(self, a, b):
        return min(a[0], b[0]), max(a[1], b[1])


@dataclass(frozen=True)
class ByTask(PoolStatistic):
    """`inner` computed separately on the rows of every task label: value = {label: inner value}."""

    inner: PoolStatistic

    def partial(self, X, S, T):
        labels, inv = np.unique(T, return_inverse=True)
        out = {}
        for t, label in enumerate(labels.tolist()):
            rows = np.flatnonzero(inv == t)
            out[label] = self.inner.partial(None if X is None else X[rows], take_rows(S, rows), T[rows])
        return out

    def merge(self, a, b):
        out = dict(a)
        for label, part in b.items():
            out[label] = self.inner.merge(out[label], part) if label in out else part
        return out

    def value(self, partial):
        return {label: self.inner.value(part) for label, part in partial.items()}


@dataclass(frozen=True)
class Distribution:
    """How a selector runs on a sharded pool: returned by ``Selector.distribution()``.

    `selector` is the one that runs (the selector itself, or what it delegates to, e.g. greedi's inner).
    `shards` / `kappa` override the run's shard count / default candidates per shard when not None.
    """

    selector: Selector
    shards: int | None = dataclasses.field(default=None, kw_only=True)
    kappa: int | None = dataclasses.field(default=None, kw_only=True)


@dataclass(frozen=True)
class Gather(Distribution):
    """Not distributable: the whole pool is gathered into one task and `selector` runs there in-process
    (memory: the whole pool in one task). The default for a selector that declares nothing else."""


@dataclass(frozen=True)
class NotDistributable(Distribution):
    """This configuration has no distributed form: the distributed stage raises `reason` (a UserError)."""

    reason: str


@dataclass(frozen=True)
class TwoRound(Distribution):
    """GreeDi / RandGreeDi (Barbosa et al. 2015), two-round k-center (Malkomes et al. 2015): `selector`
    picks kappa candidates in every shard, then `budget` from the union of the candidates; the answer is
    the best of the merged run and every shard run that reached the budget, by the whole-pool objective
    (``combine`` of ``shard_objective`` over the shards, plus ``chosen_objective``; ties -> earliest
    shard, then merged). `exact`: the merged run is the answer, with no comparison (top-B of the union
    of each shard's top-B is the pool's top-B)."""

    exact: bool = False


@dataclass(frozen=True)
class Draw(Distribution):
    """The picks depend only on the pool size and the seed: ``draw(n, budget, seed)`` runs on the driver and
    the distributed stage looks up the row_ids of the drawn positions."""

    draw: Callable[[int, int, int], SelectionResult]


@dataclass(frozen=True)
class PerTask(Distribution):
    """A budget per task, then `inner`'s two-round form inside each task (on that task's rows, with the
    task's own statistics). ``quotas(budget) -> {task label: quota}`` reads `selector`'s bound statistics:
    the distributed stage asks a bound copy's distribution() for it."""

    inner: Selector
    quotas: Callable[[int], Mapping[Any, int]] | None


@dataclass(frozen=True)
class Selector:
    """A frozen dataclass of hyperparameters; `select` is the only entry point.

    Subclasses set the class flags and implement `_select(budget, X, S, T, seed)` on validated inputs; a
    `_select` may leave `objective` NaN and implement `_objective` instead. For the distributed stage
    they may also declare statistics, a distribution and the objective's split (module docstring).
    """

    name: ClassVar[str] = "?"
    needs_embeddings: ClassVar[bool] = False
    maximize: ClassVar[bool] = True  # direction of `objective` (k-center minimises its radius)
    objective_name: ClassVar[str] = "objective"  # what a run summary also calls it (k-center: covering_radius)
    combine: ClassVar[str | None] = None  # how shard_objective parts combine: "sum", "max", None (see above)
    uses_chosen: ClassVar[bool] = False  # starts from the rows chosen before (see with_chosen)

    @property
    def randomized(self) -> bool:
        """Whether the seed changes the selection."""
        return False

    def score_names(self) -> tuple[str, ...]:
        """Score columns this configuration reads."""
        return ()

    @property
    def nested(self) -> bool:
        """Whether its picks at budget b are the first b of its picks at any larger budget (same pool and
        seed): true of greedy selectors, whose every step ignores the budget. A run with several budgets
        then takes every size from one pass at the largest; otherwise it runs once per budget."""
        return False

    @property
    def needs_tasks(self) -> bool:
        return False

    @classmethod
    def from_params(cls, **params) -> Selector:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise UserError(f"selector {cls.name!r} has no parameter(s) {unknown}: its parameters are {known}")
        return cls(**params)

    def select(
        self,
        budget: int,
        embeddings=None,
        scores: Mapping[str, Any] | None = None,
        tasks=None,
        seed: int = 0,
        *,
        allow_budget_over_pool: bool = False,
        compute_objective: bool = True,
        chosen=None,
    ) -> SelectionResult:
        """Pick `budget` pool positions. `compute_objective=False` leaves `objective` NaN where computing it
        costs extra work: the distributed stage scores shard runs on the whole pool instead. `chosen`: the
        embeddings of rows chosen before, outside this pool (see ``with_chosen``)."""
        X, S, T, n = self.validate(embeddings, scores, tasks)
        budget = check_budget(budget, n, allow_budget_over_pool)
        seed = check_seed(seed)
        sel = (self if chosen is None else self.with_chosen(chosen)).bound_to(X, S, T)
        sel._check_chosen(X)
        res = sel._select(budget, X, S, T, seed)
        if len(res.indices) != budget or len(np.unique(res.indices)) != budget:  # internal invariant
            raise RuntimeError(f"selector {self.name!r} returned {len(res.indices)} picks for budget={budget}")
        if compute_objective and np.isnan(res.objective):
            res = dataclasses.replace(res, objective=sel._objective(res.indices, X, S, T))
        return res

    def objective(self, indices, embeddings=None, scores=None, tasks=None) -> float:
        """Value of this selector's objective on an arbitrary set of pool positions."""
        X, S, T, n = self.validate(embeddings, scores, tasks)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
            raise UserError(f"indices must be a 1-d array of positions in [0, {n}), got shape {idx.shape}")
        self._check_chosen(X)
        return float(self.bound_to(X, S, T)._objective(idx, X, S, T))

    # -- to implement -------------------------------------------------------------------------
    def _select(self, budget, X, S, T, seed) -> SelectionResult:
        raise NotImplementedError

    def _objective(self, idx, X, S, T) -> float:
        return float("nan")

    # -- the distributed contract (module docstring) ------------------------------------------
    def pool_statistics(self) -> Mapping[str, PoolStatistic]:
        """Statistics of the whole pool this configuration's function needs, by name. A statistic may
        depend on others: a bound copy may declare more (the distributed stage then runs another pass)."""
        return {}

    @property
    def globals(self) -> Mapping[str, Any]:
        """The pool statistics this copy is bound to (see with_globals); empty for a fresh selector."""
        return MappingProxyType(self.__dict__.get("_globals", {}))

    def with_globals(self, values: Mapping[str, Any]) -> Selector:
        """A copy bound to pool statistics (name -> value); the hyperparameters are unchanged."""
        bound = copy.copy(self)
        # not a dataclass field: statistics are facts about a pool, not hyperparameters (from_params,
        # equality and repr ignore them); a plain dict so the copy pickles into Ray tasks
        object.__setattr__(bound, "_globals", {**self.globals, **values})
        return bound

    @property
    def chosen(self) -> np.ndarray | None:
        """The embeddings of the rows chosen before (float32 (m, d)) this copy is bound to, or None."""
        return self.__dict__.get("_chosen")

    def with_chosen(self, embeddings) -> Selector:
        """A copy bound to the embeddings of rows chosen before, outside the pool it will be given (earlier
        rounds' picks): selectors with ``uses_chosen`` start from them, the others ignore them. None or an
        empty array unbinds. The hyperparameters are unchanged."""
        bound = copy.copy(self)
        X0 = None
        if embeddings is not None:
            X0 = np.asarray(embeddings)
            if X0.ndim != 2 or not np.issubdtype(X0.dtype, np.number):
                raise UserError(f"chosen must be a numeric 2-d (m, d) array of embeddings, got shape {X0.shape}")
            X0 = np.ascontiguousarray(X0, dtype=np.float32)
            if not np.isfinite(X0).all():
                raise UserError("chosen embeddings contain NaN or inf: re-embed those rows")
            if len(X0) == 0:
                X0 = None
        object.__setattr__(bound, "_chosen", X0)  # not a field, like _globals: a fact about the run
        return bound

    def _check_chosen(self, X) -> None:
        X0 = self.chosen
        if X0 is not None and self.uses_chosen and X is not None and X0.shape[1] != X.shape[1]:
            raise UserError(
                f"the chosen rows' embeddings have {X0.shape[1]} dimensions, the pool's {X.shape[1]}: "
                "embed both with the same model and column"
            )

    def unbound_statistics(self) -> dict[str, PoolStatistic]:
        return {k: s for k, s in self.pool_statistics().items() if k not in self.globals}

    def bound_to(self, X, S, T) -> Selector:
        """This selector bound to the statistics of the given rows, for what it is not bound to yet."""
        sel = self
        for _ in range(MAX_STAT_PASSES):
            need = sel.unbound_statistics()
            if not need:
                return sel
            sel = sel.with_globals({k: s.of(X, S, T) for k, s in need.items()})
        raise RuntimeError(f"selector {self.name!r} keeps declaring unbound statistics: {sorted(need)}")

    def distribution(self) -> Distribution:
        return Gather(self)

    def shard_objective(self, X_rows, S_rows, X_chosen, S_chosen) -> float:
        """One block of pool rows' part of the objective of the chosen rows (see `combine`)."""
        raise NotImplementedError(f"selector {self.name!r} does not split its objective over shards")

    def chosen_objective(self, X_chosen, S_chosen) -> float:
        """The part of the objective that depends only on the chosen rows (0 when there is none)."""
        return 0.0

    # -- validation ---------------------------------------------------------------------------
    def validate(self, embeddings, scores, tasks):
        X = None
        lengths: dict[str, int] = {}
        if embeddings is not None:
            X = np.asarray(embeddings)
            if X.ndim != 2:
                raise UserError(f"embeddings must be 2-d (n, d), got shape {X.shape}")
            if not np.issubdtype(X.dtype, np.number):
                raise UserError(f"embeddings must be numeric, got dtype {X.dtype}")
            X = np.ascontiguousarray(X, dtype=np.float32)
            if not np.isfinite(X).all():
                bad = int((~np.isfinite(X).all(axis=1)).sum())
                raise UserError(f"embeddings contain NaN or inf in {bad} row(s): drop or re-embed those rows")
            lengths["embeddings"] = len(X)
        elif self.needs_embeddings:
            raise UserError(f"selector {self.name!r} needs embeddings=<float32 (n, d) array>, got None")

        S: dict[str, np.ndarray] = {}
        needed = self.score_names()  # validated strictly (float, finite); other columns only for length
        if needed and scores is None:
            raise UserError(f"selector {self.name!r} needs scores with column(s) {list(needed)}, got scores=None")
        if scores is not None:
            if not isinstance(scores, Mapping):
                raise UserError(f"scores must be a mapping of column name -> (n,) array, got {type(scores).__name__}")
            for col, v in scores.items():  # unused columns still have to describe the same pool
                if col not in needed:
                    S[col] = np.asarray(v)
                    lengths[f"scores[{col!r}]"] = len(S[col])
        for col in needed:
            if col not in scores:
                raise UserError(
                    f"score column {col!r} is missing: available columns are {sorted(scores)}; pass score=<one of them>"
                )
            v = np.asarray(scores[col], dtype=np.float64)
            if v.ndim != 1:
                raise UserError(f"score column {col!r} must be 1-d, got shape {v.shape}")
            if not np.isfinite(v).all():
                raise UserError(
                    f"score column {col!r} has {int((~np.isfinite(v)).sum())} NaN/inf value(s): re-score or drop those rows"
                )
            S[col] = v
            lengths[f"scores[{col!r}]"] = len(v)

        T = None
        if tasks is not None:
            T = np.asarray(tasks)
            if T.ndim != 1:
                raise UserError(f"tasks must be 1-d (n,), got shape {T.shape}")
            lengths["tasks"] = len(T)
        elif self.needs_tasks:
            raise UserError(
                f"selector {self.name!r} needs tasks=<(n,) task labels>, got None; "
                "use another selector for pools without task labels"
            )

        if not lengths:
            raise UserError(f"selector {self.name!r} got no embeddings, scores or tasks: nothing to select from")
        if len(set(lengths.values())) > 1:
            raise UserError(f"inputs disagree on the pool size: {lengths}; they must all have one row per prompt")
        n = next(iter(lengths.values()))
        if n == 0:
            raise UserError("the pool is empty (0 rows): nothing to select")
        return X, S, T, n


def check_budget(budget, n: int, allow_over: bool = False) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise UserError(f"budget={budget!r} must be an integer >= 1")
    budget = int(budget)
    if budget < 1:
        raise UserError(f"budget={budget} must be >= 1")
    if budget > n:
        if allow_over:
            return n
        raise UserError(
            f"budget={budget} exceeds the pool size n={n}: lower the budget or pass "
            "allow_budget_over_pool=True to take the whole pool"
        )
    return budget


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed={seed!r} must be an integer >= 0")
    return int(seed)


def uncertainty(values: np.ndarray, score: str, higher_is_uncertain: bool | None = None) -> np.ndarray:
    """Oriented uncertainty (float64): LARGER = MORE uncertain, whatever the column's convention."""
    v = np.asarray(values, dtype=np.float64)
    return v.copy() if uncertain_when_high(score, higher_is_uncertain) else -v


def uncertain_when_high(score: str, override: bool | None = None) -> bool:
    return override if override is not None else HIGHER_IS_UNCERTAIN.get(score, True)


def oriented_range(raw: tuple[float, float], score: str, higher_is_uncertain: bool | None = None):
    """A raw column's (min, max) as the (min, max) of its oriented uncertainty (see `uncertainty`)."""
    lo, hi = raw
    return (lo, hi) if uncertain_when_high(score, higher_is_uncertain) else (-hi, -lo)


def minmax(u: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Min-max to [0, 1] over the pool (or with the pool's given `lo`, `hi`); a constant column maps to zeros."""
    if lo is None:
        lo, hi = float(u.min()), float(u.max())
    return (u - lo) / (hi - lo) if hi > lo else np.zeros_like(u)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not valid: use one of {list(allowed)}")
