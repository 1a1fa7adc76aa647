"""The two baselines: seeded random and top-B uncertainty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Draw, NotDistributable, SelectionResult, Selector, TwoRound, register, uncertainty


@register("random")
@dataclass(frozen=True)
class RandomSelector(Selector):
    """B distinct pool positions drawn uniformly with np.random.default_rng(seed)."""

    @property
    def randomized(self) -> bool:
        return True

    # not nested: numpy's choice(n, b) draws differently for each b (the tested golden draw), so a
    # run with several budgets draws once per budget, each exactly the single-budget draw

    def draw(self, n: int, budget: int, seed: int) -> SelectionResult:
        """The picks from the pool size alone (what a distributed run does on the driver)."""
        idx = np.random.default_rng(seed).choice(n, size=budget, replace=False)
        return SelectionResult(idx, np.full(budget, np.nan), float("nan"))

    def _select(self, budget, X, S, T, seed):
        return self.draw(_pool_size(X, S, T), budget, seed)

    def distribution(self):
        return Draw(self, self.draw)


@register("uncertainty")
@dataclass(frozen=True)
class UncertaintySelector(Selector):
    """Top-B most uncertain rows by one score column.

    Orientation per column (see base.HIGHER_IS_UNCERTAIN): margins are uncertain when SMALL, entropy and
    least confidence when LARGE; unknown columns count as "larger = more uncertain" unless
    higher_is_uncertain=False. Ties go to the lowest pool position (stable sort) unless jitter=True, which
    breaks them with seeded random keys. gains = oriented uncertainty of each pick, objective = their sum.
    """

    score: str = "mean_entropy"
    higher_is_uncertain: bool | None = None
    jitter: bool = False

    @property
    def randomized(self) -> bool:
        return self.jitter

    def score_names(self):
        return (self.score,)

    @property
    def nested(self) -> bool:
        return True  # a top-B by fixed keys (the jitter's too: one key per row, whatever the budget)

    def _oriented(self, S):
        return uncertainty(S[self.score], self.score, self.higher_is_uncertain)

    def _select(self, budget, X, S, T, seed):
        u = self._oriented(S)
        if self.jitter:
            order = np.lexsort((np.random.default_rng(seed).random(len(u)), -u))
        else:
            order = np.argsort(-u, kind="stable")
        idx = order[:budget]
        return SelectionResult(idx, u[idx], float(u[idx].sum()))

    def _objective(self, idx, X, S, T):
        return self.chosen_objective(None, {self.score: S[self.score][idx]})

    # distributed: the top-B of the union of every shard's top-B is the pool's top-B (ties -> lowest
    # position, as the union is in pool order), and the objective is a sum over the picks alone
    def distribution(self):
        if self.jitter:
            return NotDistributable(self, "uncertainty with jitter=True draws one key per pool row: use selection.mode=local")
        return TwoRound(self, exact=True)

    def chosen_objective(self, X_chosen, S_chosen) -> float:
        return float(self._oriented(S_chosen).sum())


def _pool_size(X, S, T) -> int:
    if X is not None:
        return len(X)
    if S:
        return len(next(iter(S.values())))
    return len(T)
