"""Selector base class, registry, result type and input validation shared by every selector."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

SELECTORS: dict[str, type["Selector"]] = {}

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


def register(name: str):
    def deco(cls):
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class Selector:
    """A frozen dataclass of hyperparameters; `select` is the only entry point.

    Subclasses set the class flags and implement `_select(budget, X, S, T, seed)` on validated inputs.
    """

    name: ClassVar[str] = "?"
    needs_embeddings: ClassVar[bool] = False
    maximize: ClassVar[bool] = True  # direction of `objective` (k-center minimises its radius)

    @property
    def randomized(self) -> bool:
        """Whether the seed changes the selection."""
        return False

    def score_names(self) -> tuple[str, ...]:
        """Score columns this configuration reads."""
        return ()

    @property
    def needs_tasks(self) -> bool:
        return False

    @classmethod
    def from_params(cls, **params) -> "Selector":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"selector {cls.name!r} has no parameter(s) {unknown}: its parameters are {known}"
            )
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
    ) -> SelectionResult:
        X, S, T, n = self.validate(embeddings, scores, tasks)
        budget = check_budget(budget, n, allow_budget_over_pool)
        seed = check_seed(seed)
        res = self._select(budget, X, S, T, seed)
        if len(res.indices) != budget or len(np.unique(res.indices)) != budget:  # internal invariant
            raise RuntimeError(f"selector {self.name!r} returned {len(res.indices)} picks for budget={budget}")
        return res

    def objective(self, indices, embeddings=None, scores=None, tasks=None) -> float:
        """Value of this selector's objective on an arbitrary set of pool positions."""
        X, S, T, n = self.validate(embeddings, scores, tasks)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
            raise ValueError(f"indices must be a 1-d array of positions in [0, {n}), got shape {idx.shape}")
        return float(self._objective(idx, X, S, T))

    # -- to implement -------------------------------------------------------------------------
    def _select(self, budget, X, S, T, seed) -> SelectionResult:
        raise NotImplementedError

    def _objective(self, idx, X, S, T) -> float:
        return float("nan")

    # -- validation ---------------------------------------------------------------------------
    def validate(self, embeddings, scores, tasks):
        X = None
        lengths: dict[str, int] = {}
        if embeddings is not None:
            X = np.asarray(embeddings)
            if X.ndim != 2:
                raise ValueError(f"embeddings must be 2-d (n, d), got shape {X.shape}")
            if not np.issubdtype(X.dtype, np.number):
                raise ValueError(f"embeddings must be numeric, got dtype {X.dtype}")
            X = np.ascontiguousarray(X, dtype=np.float32)
            if not np.isfinite(X).all():
                bad = int((~np.isfinite(X).all(axis=1)).sum())
                raise ValueError(f"embeddings contain NaN or inf in {bad} row(s): drop or re-embed those rows")
            lengths["embeddings"] = len(X)
        elif self.needs_embeddings:
            raise ValueError(f"selector {self.name!r} needs embeddings=<float32 (n, d) array>, got None")

        S: dict[str, np.ndarray] = {}
        needed = self.score_names()  # validated strictly (float, finite); other columns only for length
        if needed and scores is None:
            raise ValueError(f"selector {self.name!r} needs scores with column(s) {list(needed)}, got scores=None")
        if scores is not None:
            if not isinstance(scores, Mapping):
                raise ValueError(f"scores must be a mapping of column name -> (n,) array, got {type(scores).__name__}")
            for col, v in scores.items():  # unused columns still have to describe the same pool
                if col not in needed:
                    S[col] = np.asarray(v)
                    lengths[f"scores[{col!r}]"] = len(S[col])
        for col in needed:
            if col not in scores:
                raise ValueError(
                    f"score column {col!r} is missing: available columns are {sorted(scores)}; "
                    f"pass score=<one of them>"
                )
            v = np.asarray(scores[col], dtype=np.float64)
            if v.ndim != 1:
                raise ValueError(f"score column {col!r} must be 1-d, got shape {v.shape}")
            if not np.isfinite(v).all():
                raise ValueError(
                    f"score column {col!r} has {int((~np.isfinite(v)).sum())} NaN/inf value(s): "
                    "re-score or drop those rows"
                )
            S[col] = v
            lengths[f"scores[{col!r}]"] = len(v)

        T = None
        if tasks is not None:
            T = np.asarray(tasks)
            if T.ndim != 1:
                raise ValueError(f"tasks must be 1-d (n,), got shape {T.shape}")
            lengths["tasks"] = len(T)
        elif self.needs_tasks:
            raise ValueError(
                f"selector {self.name!r} needs tasks=<(n,) task labels>, got None; "
                "use another selector for pools without task labels"
            )

        if not lengths:
            raise ValueError(f"selector {self.name!r} got no embeddings, scores or tasks: nothing to select from")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"inputs disagree on the pool size: {lengths}; they must all have one row per prompt")
        n = next(iter(lengths.values()))
        if n == 0:
            raise ValueError("the pool is empty (0 rows): nothing to select")
        return X, S, T, n


def check_budget(budget, n: int, allow_over: bool = False) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget={budget!r} must be an integer >= 1")
    budget = int(budget)
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1")
    if budget > n:
        if allow_over:
            return n
        raise ValueError(
            f"budget={budget} exceeds the pool size n={n}: lower the budget or pass "
            "allow_budget_over_pool=True to take the whole pool"
        )
    return budget


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    return int(seed)


def uncertainty(values: np.ndarray, score: str, higher_is_uncertain: bool | None = None) -> np.ndarray:
    """Oriented uncertainty (float64): LARGER = MORE uncertain, whatever the column's convention."""
    hi = higher_is_uncertain if higher_is_uncertain is not None else HIGHER_IS_UNCERTAIN.get(score, True)
    v = np.asarray(values, dtype=np.float64)
    return v.copy() if hi else -v


def minmax(u: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the pool; a constant column maps to zeros."""
    lo, hi = float(u.min()), float(u.max())
    return (u - lo) / (hi - lo) if hi > lo else np.zeros_like(u)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid: use one of {list(allowed)}")
