"""Distributed selection on a real local Ray cluster: parity with the in-process selectors and the
in-process GreeDi reference, approximation bounds against the centralised run, determinism, retries."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))
from _data import read_pool, write_scores  # noqa: E402

from edsft.config import Config  # noqa: E402
from edsft.distributed.coresets import SELECTION_SCHEMA, resolve_mode, select_subset  # noqa: E402
from edsft.errors import UserError  # noqa: E402
from edsft.selection import objective, select  # noqa: E402
from edsft.storage import get_store  # noqa: E402

BUDGET = 40
# Ray workers cannot import this test module (tests/ is no package): ship the classes defined here (the
# selectors, callbacks) by value. A selector in an installed package needs nothing of the kind.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = write_scores(tmp_path_factory.mktemp("scores") / "scores.parquet", n=2400, d=16, centers=12)
    ids, tasks, S, X = read_pool(folder)
    return {"folder": folder, "ids": ids, "tasks": tasks, "S": S, "X": X}


_CACHE: dict = {}


def run(pool, tmp_path, name, params=None, m=4, mode="distributed", budget=BUDGET, seed=0, fresh=False, **kw):
    """select_subset on the shared pool -> (selection table, summary); plain runs are cached per module."""
    key = (name, repr(sorted((params or {}).items())), m, mode, budget, seed)
    if not fresh and not kw and key in _CACHE:
        return _CACHE[key]
    cfg = Config().replace(
        **{
            "selection.name": name,
            "selection.params": dict(params or {}),
            "selection.budget": budget,
            "selection.mode": mode,
            "selection.shards": m,
            "selection.seed": seed,
        }
    )
    out = get_store(tmp_path / f"sel-{name}-{m}-{mode}-{seed}.parquet")
    summary = select_subset(cfg, get_store(pool["folder"]), out, progress=False, **kw)
    table = pq.read_table(out.path)
    if not kw:
        _CACHE[key] = (table, summary)
    return table, summary


def picked(table):
    return table.column("row_id").to_pylist()


@ray.remote(num_cpus=0.25)
def in_a_task(name, budget, X, S, T, params):
    """The in-process selector, run where the shard tasks run: a fractional-CPU task gets one BLAS thread,
    and OpenBLAS rounds float32 GEMMs differently at another thread count (seen on AMD EPYC, OpenBLAS
    0.3.31), which int16 quantisation can turn into another pick. Same threads, same bits."""
    return select(name, budget, embeddings=X, scores=S, tasks=T, seed=0, **params)


# m = 1: one shard is the whole pool, so the map-reduce must reproduce the in-process selector exactly
@pytest.mark.parametrize(
    "name,params",
    [
        ("facility_location", {}),
        ("facility_location", {"metric": "euclidean", "optimizer": "naive"}),
        ("fl_uncertainty", {"lambda_": 2.0}),
        ("k_center", {}),
        ("uncertainty", {"score": "min_margin"}),
        ("random", {}),
        ("task_balanced", {"inner": "facility_location"}),
    ],
)
def test_one_shard_equals_in_process_selector(ray_cluster, pool, tmp_path, name, params):
    table, summary = run(pool, tmp_path, name, params, m=1)
    ref = ray.get(in_a_task.remote(name, BUDGET, pool["X"], pool["S"], pool["tasks"], params))
    assert picked(table) == list(pool["ids"][ref.indices])
    np.testing.assert_array_equal(table.column("gain").to_numpy(), ref.gains)
    if np.isfinite(ref.objective):
        assert summary["objective"] == pytest.approx(ref.objective, rel=1e-9)
    assert summary["mode"] == "distributed" and summary["shards"] == 1 and summary["rows"] == len(pool["ids"])


@pytest.mark.slow
@pytest.mark.parametrize("m", [2, 4, 8])
def test_shards_match_greedi_reference_and_bounds(ray_cluster, pool, tmp_path, m):
    X, S, T, ids = pool["X"], pool["S"], pool["tasks"], pool["ids"]
    for name, bound in (("facility_location", 0.98), ("k_center", 2.0)):
        table, summary = run(pool, tmp_path, name, m=m)
        # same partition (shard_of on row_id), same seed: the in-process reference picks the same set
        ref = select("greedi", BUDGET, embeddings=X, scores=S, tasks=T, seed=0, inner=name, m=m, row_keys=ids)
        assert picked(table) == list(ids[ref.indices])
        assert summary["objective"] == pytest.approx(ref.objective, rel=1e-9)
        central = select(name, BUDGET, embeddings=X, seed=0)
        if name == "facility_location":
            assert summary["objective"] >= bound * central.objective
        else:
            assert summary["covering_radius"] <= bound * central.objective
        # the recorded objective is the whole-pool objective of the written set
        pos = np.searchsorted(ids, table.column("row_id").to_numpy(zero_copy_only=False))
        assert summary["objective"] == pytest.approx(objective(name, pos, embeddings=X), rel=1e-9)
        assert table.column("shard").to_numpy().max() < m


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,params",
    [("fl_uncertainty", {}), ("task_balanced", {"inner": "fl_uncertainty"}), ("uncertainty", {})],
)
def test_hybrids_and_task_balanced_report_whole_pool_objective(ray_cluster, pool, tmp_path, name, params):
    table, summary = run(pool, tmp_path, name, params, m=4)
    ids = pool["ids"]
    pos = np.searchsorted(ids, table.column("row_id").to_numpy(zero_copy_only=False))
    assert len(set(pos)) == BUDGET
    whole = objective(name, pos, embeddings=pool["X"], scores=pool["S"], tasks=pool["tasks"], **params)
    # the hybrid's bonus is normalised with the WHOLE pool's min/max, so the sums agree
    assert summary["objective"] == pytest.approx(whole, rel=1e-9)
    central = select(name, BUDGET, embeddings=pool["X"], scores=pool["S"], tasks=pool["tasks"], **params)
    assert summary["objective"] >= 0.98 * central.objective
    if name == "task_balanced":
        ref_alloc = select(name, BUDGET, embeddings=pool["X"], scores=pool["S"], tasks=pool["tasks"], **params)
        tasks_of = dict(zip(ids, pool["tasks"]))
        got = {t: sum(tasks_of[r] == t for r in picked(table)) for t in set(pool["tasks"])}
        want = {t: int((pool["tasks"][ref_alloc.indices] == t).sum()) for t in set(pool["tasks"])}
        assert got == want == {t: summary["allocation"].get(t, 0) for t in want}
    if name == "uncertainty":  # exact distributed form
        assert list(pos) == list(central.indices)


def test_deterministic_per_seed(ray_cluster, pool, tmp_path):
    a, _ = run(pool, tmp_path / "a", "facility_location", m=4, seed=0)  # cached from the greedi test
    b, _ = run(pool, tmp_path / "b", "facility_location", m=4, seed=0, fresh=True)
    c, _ = run(pool, tmp_path / "c", "facility_location", m=4, seed=1)
    assert a.equals(b)
    assert picked(a) != picked(c)  # another seed: another partition of the rows


class KillOnce:
    """A select_subset callback: kills the worker of `stage`'s task for `shard`, once (a lock file remembers)."""

    def __init__(self, lock: str, stage: str = "round1", shard: int | None = 0):
        self.lock, self.stage, self.shard = lock, stage, shard

    def __call__(self, *, stage, shard):
        if stage == self.stage and shard == self.shard:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # killed before: let the retry run
            os.close(fd)
            os._exit(1)  # a hard crash of the worker process, no exception


def test_killed_shard_task_is_retried_with_the_same_result(ray_cluster, pool, tmp_path):
    calm, _ = run(pool, tmp_path / "calm", "facility_location", m=4)  # undisturbed (cached from above)
    for stage, shard in (("round1", 0), ("reduce", None)):
        lock = tmp_path / f"killed-{stage}"
        hit, _ = run(pool, tmp_path / stage, "facility_location", m=4, callbacks=[KillOnce(str(lock), stage, shard)])
        assert lock.exists()  # the first attempt of that task really died
        assert calm.equals(hit)


def test_callbacks_see_every_stage_of_a_two_round_run(ray_cluster, pool, tmp_path):
    from edsft.distributed.coresets import STAGES

    log = tmp_path / "stages"
    log.mkdir()
    run(pool, tmp_path, "fl_uncertainty", m=2, callbacks=[TouchStage(str(log))])
    seen = {p.name for p in log.iterdir()}
    assert seen == {"partition-None", "round1-0", "round1-1", "reduce-None", "evaluate-0", "evaluate-1"}
    assert {s.split("-")[0] for s in seen} <= set(STAGES)


class TouchStage:
    """A select_subset callback that leaves one file per (stage, shard) it ran in."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, *, stage, shard):
        Path(self.folder, f"{stage}-{shard}").touch()


def test_budget_over_pool(ray_cluster, pool, tmp_path):
    n = len(pool["ids"])
    with pytest.raises(UserError, match=r"selection.budget=5000 exceeds the scored pool \(2400 rows\)"):
        run(pool, tmp_path, "facility_location", budget=5000)
    cfg = Config().replace(
        **{
            "selection.name": "uncertainty",
            "selection.budget": 5000,
            "selection.allow_budget_over_pool": True,
            "selection.mode": "distributed",
        }
    )
    summary = select_subset(cfg, get_store(pool["folder"]), get_store(tmp_path / "all.parquet"), progress=False)
    assert summary["budget"] == n and pq.read_table(tmp_path / "all.parquet").num_rows == n


def test_auto_mode_and_same_output_either_way(ray_cluster, pool, tmp_path):
    assert resolve_mode("auto", 10, 100) == "local" and resolve_mode("auto", 100, 100) == "distributed"
    local, s_local = run(pool, tmp_path, "k_center", m=1, mode="auto")  # 2400 rows < local_max_rows
    dist, s_dist = run(pool, tmp_path, "k_center", m=1, mode="distributed")
    assert s_local["mode"] == "local" and s_dist["mode"] == "distributed"
    assert local.schema.equals(SELECTION_SCHEMA) and dist.schema.equals(SELECTION_SCHEMA)
    assert picked(local) == picked(dist) and local.column("shard").equals(dist.column("shard"))
    np.testing.assert_array_equal(local.column("gain").to_numpy(), dist.column("gain").to_numpy())  # NaN first
    assert s_local["covering_radius"] == pytest.approx(s_dist["covering_radius"], rel=1e-12)


def test_distributed_selection_joins_ray_through_the_session(ray_cluster, pool, tmp_path, monkeypatch):
    """One ray.init path (session.init_ray): it also keeps credentials out of the runtime envs Tune records."""
    from ray.tune.execution import class_cache

    leaky = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) | {"AWS_SECRET_ACCESS_KEY"}
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", leaky)
    run(pool, tmp_path, "k_center", m=2, fresh=True)
    assert "AWS_SECRET_ACCESS_KEY" not in class_cache.ENV_VARS_TO_PROPAGATE


def test_clear_errors(ray_cluster, pool, tmp_path):
    with pytest.raises(UserError, match="jitter=True"):
        run(pool, tmp_path, "uncertainty", {"jitter": True})
    for name, params, match in (
        ("k_center", {"top_q": 0.5}, "needs the whole pool at once"),
        ("task_balanced", {"inner": "random"}, "has no distributed form"),
        ("greedi", {"row_keys": [0, 1]}, "row_keys cannot be used"),
    ):
        with pytest.raises(UserError, match=match):
            run(pool, tmp_path, name, params)
    with pytest.raises(UserError, match="selection.params.kappa=0"):
        run(pool, tmp_path, "facility_location", {"kappa": 0})
    cfg = Config().replace(**{"selection.embedding": "embedding_encoder"})
    with pytest.raises(UserError, match="selection.embedding='embedding_encoder' is not a column"):
        select_subset(cfg, get_store(pool["folder"]), get_store(tmp_path / "x.parquet"), progress=False)
    with pytest.raises(UserError, match="no Parquet files"):
        select_subset(Config(), get_store(tmp_path / "missing"), get_store(tmp_path / "x.parquet"), progress=False)


def test_kappa_param_matches_greedi_reference(ray_cluster, pool, tmp_path):
    more, s2 = run(pool, tmp_path / "k2", "facility_location", {"kappa": 3 * BUDGET}, m=4)
    ref = select("greedi", BUDGET, embeddings=pool["X"], seed=0, m=4, kappa=3 * BUDGET, row_keys=pool["ids"])
    assert picked(more) == list(pool["ids"][ref.indices]) and s2["kappa"] == 3 * BUDGET


def test_runs_inside_a_full_placement_group(ray_cluster, pool, tmp_path):
    """A Tune trial holds a placement group whose bundle its own process fills; child tasks that were
    captured by it would wait forever. select_subset's tasks opt out of the group, so this finishes."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)

    @ray.remote(num_cpus=1)
    def trial(folder, out):
        cfg = Config().replace(
            **{"selection.name": "k_center", "selection.budget": 10, "selection.mode": "distributed", "selection.shards": 2}
        )
        return select_subset(cfg, get_store(folder), get_store(out), progress=False)["rows"]

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    try:
        ref = trial.options(scheduling_strategy=strategy).remote(str(pool["folder"]), str(tmp_path / "pg.parquet"))
        assert ray.get(ref, timeout=120) == len(pool["ids"])
    finally:
        remove_placement_group(pg)


# Multi-round selection: rows chosen before travel with the bound selector into every shard task.
@pytest.mark.parametrize("name", ["facility_location", "k_center", "task_balanced"])
def test_chosen_rows_one_shard_equals_in_process_and_shards_match_greedi(ray_cluster, pool, tmp_path, name):
    from _data import blobs

    X, S, T, ids = pool["X"], pool["S"], pool["tasks"], pool["ids"]
    X0 = blobs(30, X.shape[1], 12, seed=0)[:30] + 0.01  # near the pool's own clusters: they cover some of it
    params = {"inner": "facility_location"} if name == "task_balanced" else {}
    table, summary = run(pool, tmp_path, name, params, m=1, chosen=X0)
    ref = ray.get(in_a_task.remote(name, BUDGET, X, S, T, {**params, "chosen": X0}))  # same BLAS threads
    assert picked(table) == list(ids[ref.indices])
    assert summary["objective"] == pytest.approx(ref.objective, rel=1e-6)
    plain, _ = run(pool, tmp_path, name, params, m=1)
    assert picked(table) != picked(plain)  # the chosen rows changed the picks
    if name != "task_balanced":
        table4, summary4 = run(pool, tmp_path, name, m=4, chosen=X0)
        g = select("greedi", BUDGET, embeddings=X, seed=0, inner=name, m=4, row_keys=ids, chosen=X0)
        assert picked(table4) == list(ids[g.indices])
        # the recorded objective is the whole pool's, given the chosen rows
        pos = np.searchsorted(ids, table4.column("row_id").to_numpy(zero_copy_only=False))
        assert summary4["objective"] == pytest.approx(objective(name, pos, embeddings=X, chosen=X0), rel=1e-6)
    with pytest.raises(UserError, match="dimensions"):
        run(pool, tmp_path, name, params, m=2, chosen=X0[:, :3], fresh=True)
