"""The worked example of adding a selector: two selectors defined only in this file run on the map-reduce
stage with no edit to edsft/distributed/coresets.py.

- ``Atypical`` honours the whole distributed contract: a pool statistic (the mean embedding), a
  two-round distribution (exact: top-B of the shards' top-B) and an objective over the chosen rows.
- ``ClosestToMedian`` declares nothing: a median is no merge of per-shard summaries, so it takes the
  default, ``Gather`` (the pool gathered into one task, the selector run there in-process).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))
from _data import read_pool, write_scores  # noqa: E402

from edsft.config import Config  # noqa: E402
from edsft.distributed.coresets import select_subset  # noqa: E402
from edsft.selection import SELECTORS, PoolStatistic, SelectionResult, Selector, TwoRound, shard_of  # noqa: E402
from edsft.storage import get_store  # noqa: E402

BUDGET = 40
# Ray workers cannot import this test module (tests/ is no package): ship the classes defined here (the
# selectors, callbacks) by value. A selector in an installed package needs nothing of the kind.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the worked example ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingMean(PoolStatistic):
    """The pool's mean embedding from per-block (row count, float64 sum): sums merge by addition."""

    def partial(self, X, S, T):
        return len(X), X.sum(axis=0, dtype=np.float64)

    def merge(self, a, b):
        return a[0] + b[0], a[1] + b[1]

    def value(self, partial):
        return partial[1] / partial[0]


@dataclass(frozen=True)
class Atypical(Selector):
    """The `budget` rows farthest (euclidean) from the pool's mean embedding, farthest first."""

    name = "atypical"
    needs_embeddings = True

    def pool_statistics(self):
        return {"mean": EmbeddingMean()}  # bound before _select runs: in-process and on every shard

    def _distance(self, X):
        return np.linalg.norm(X - self.globals["mean"], axis=1)

    def _select(self, budget, X, S, T, seed):
        d = self._distance(X)
        idx = np.argsort(-d, kind="stable")[:budget]
        return SelectionResult(idx, d[idx], float(d[idx].sum()))

    def _objective(self, idx, X, S, T):
        return self.chosen_objective(X[idx], None)

    def distribution(self):
        return TwoRound(self, exact=True)  # the top-B of the union of every shard's top-B is the pool's

    def chosen_objective(self, X_chosen, S_chosen):  # combine=None: the objective reads the picks alone
        return float(self._distance(X_chosen).sum())


@dataclass(frozen=True)
class ClosestToMedian(Selector):
    """The `budget` rows whose score is closest to the pool's median score (no distributed form)."""

    name = "closest_to_median"
    score: str = "mean_entropy"

    def score_names(self):
        return (self.score,)

    def _select(self, budget, X, S, T, seed):
        gap = np.abs(S[self.score] - np.median(S[self.score]))
        idx = np.argsort(gap, kind="stable")[:budget]
        return SelectionResult(idx, -gap[idx], float(-gap[idx].sum()))


# -- the tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = write_scores(tmp_path_factory.mktemp("scores") / "scores.parquet", n=2400, d=16, centers=12)
    ids, tasks, S, X = read_pool(folder)
    return {"folder": folder, "ids": ids, "tasks": tasks, "S": S, "X": X}


@pytest.fixture
def registered(monkeypatch):
    for cls in (Atypical, ClosestToMedian):  # registered for this test only: the registry stays as it was
        monkeypatch.setitem(SELECTORS, cls.name, cls)


def run(pool, tmp_path, name, m):
    cfg = Config().replace(
        **{"selection.name": name, "selection.budget": BUDGET, "selection.mode": "distributed", "selection.shards": m}
    )
    out = get_store(tmp_path / f"{name}-{m}.parquet")
    summary = select_subset(cfg, get_store(pool["folder"]), out, progress=False)
    return pq.read_table(out.path).column("row_id").to_pylist(), summary


@pytest.mark.parametrize("m", [1, 4])
def test_a_selector_honouring_the_contract_runs_distributed(ray_cluster, registered, pool, tmp_path, m):
    X, ids = pool["X"], pool["ids"]
    ref = Atypical().select(BUDGET, X)
    picks, summary = run(pool, tmp_path, "atypical", m)
    assert picks == list(ids[ref.indices])  # exactly the in-process selection
    assert summary["objective"] == pytest.approx(ref.objective, rel=1e-9) and summary["shards"] == m
    # the pool statistic is what makes it exact: a selector left to the rows it sees (the union of the
    # shards' candidates has another mean) would pick other rows on this pool
    shard = shard_of(ids, 4, 0)
    cands = np.unique(
        np.concatenate([np.flatnonzero(shard == j)[Atypical().select(BUDGET, X[shard == j]).indices] for j in range(4)])
    )
    unbound = cands[Atypical().select(BUDGET, X[cands]).indices]
    assert set(unbound) != set(ref.indices)


def test_a_selector_without_a_distributed_form_is_gathered(ray_cluster, registered, pool, tmp_path):
    ref = ClosestToMedian().select(BUDGET, scores=pool["S"])
    picks, summary = run(pool, tmp_path, "closest_to_median", 3)
    assert picks == list(pool["ids"][ref.indices])
    assert summary["plan"] == "gather" and summary["objective"] == pytest.approx(ref.objective, rel=1e-12)
