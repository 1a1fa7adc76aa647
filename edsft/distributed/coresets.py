"""Distributed coresets on Ray: map-reduce selection over a sharded scored pool.

``select_subset(cfg, scores, out)`` reads ``scores.parquet`` (row_id, task, score columns, embedding),
picks ``cfg.selection.budget`` rows and writes ``selection.parquet`` (row_id, rank, gain, selector, shard).
It never reads a label/response column: only row_id, task, float score columns and the embedding.

Small pools run the numpy selector in-process (``edsft.selection.select``). Large pools run a map-reduce
whose local steps are the same numpy selectors (no selector is re-implemented here):

  footer scan (driver)   Parquet footers only: row counts, embedding width, read units (file x row groups).
  partition map          one task per read unit reads its columns with the store's filesystem (local or
                         s3://), hashes row_id to one of m shards with ``selection.shard_of`` (GreeDi's
                         partition) and returns m Arrow pieces that stay in the Ray object store, plus
                         small per-task statistics (score min/max, embedding moments) for the global
                         normalisation. The driver keeps only ObjectRefs.
  round 1 (shard map)    shard j's task receives its pieces (rows in pool order), runs the selector for
                         kappa candidates (default: budget) and returns only those candidate rows.
  round 2 (reduce)       one task runs the selector on the union of candidates (m * kappa rows).
  evaluation map         each shard task returns, for the merged set and every shard-local set, the sum
                         of its rows' best similarity to the set (facility location) or their largest
                         distance to it (k-center); the driver adds/maxes them into WHOLE-pool values
                         and keeps the best set (RandGreeDi, Barbosa et al. 2015; two-round k-center,
                         Malkomes et al. 2015). Ties go to the earliest shard, then the merged set,
                         exactly like the in-process ``greedi`` reference. ``gain`` in the output comes
                         from the winning run (for a shard-local winner: gains within that shard).

Memory: a task holds one shard (n/m rows) plus its selector's working set; the driver holds the
candidate rows only, O(m * kappa * d). The object store holds the pool once (spilling to disk when it
must); the pieces are released when ``select_subset`` returns.

Global statistics: the hybrid's uncertainty min/max and the rbf/euclidean ``gamma`` come from the
partition map over the whole (sub)pool, never from one shard, so every shard optimises the same
function; with m = 1 the result is exactly the in-process selector's (cosine; rbf/euclidean agree up
to the last bits of gamma). The in-process ``greedi`` reference normalises per shard instead, so the two
agree exactly for cosine facility location and k-center, not for hybrids or a default rbf gamma.

Exact distributed forms: ``uncertainty`` is the top-B of the union of each shard's top-B (ties to the
lowest pool position, as in-process); ``random`` is the in-process seeded draw of B pool positions (it
needs only n) followed by a row_id lookup of just those positions. ``task_balanced`` gets its per-task
quotas from a map pass (per-task mean confidence, normalised with the whole pool's min/max), then runs
one two-round problem per task in the same tasks; picks are written task by task in sorted label order.

Tasks run with ``PlacementGroupSchedulingStrategy(placement_group=None)`` and fractional CPUs, so a call
from inside a Tune trial does not wait forever on the trial's (full) placement group; a task whose worker
dies is retried by Ray (``max_retries``) and, everything being seeded, gives the same set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import Config
from ..selection import (
    FacilityLocation,
    GreeDi,
    KCenter,
    RandomSelector,
    TaskBalanced,
    UncertaintySelector,
    allocate_budget,
    best_similarity,
    get_selector,
    k_center_greedy,
    min_distance,
    row_confidence,
    select,
    shard_of,
)
from ..selection.facility import build_graph, facility_location_greedy
from ..selection.similarity import QUANT_SCALE
from ..storage import Store

__all__ = ["select_subset", "resolve_mode", "SELECTION_SCHEMA", "DISTRIBUTED_PARAMS"]

# selection.parquet: one row per pick, in pick order.
SELECTION_SCHEMA = pa.schema(
    [("row_id", pa.string()), ("rank", pa.int64()), ("gain", pa.float64()), ("selector", pa.string()),
     ("shard", pa.int64())]
)
# Keys of selection.params that steer the map-reduce and are not selector hyperparameters.
DISTRIBUTED_PARAMS = ("kappa",)
_NOT_SCORES = ("prompt_tokens", "response_tokens")  # numeric columns of scores.parquet that are not scores
_ROWS_PER_READ = 100_000  # rows one partition task reads (whole row groups; a bigger row group is one unit)
_MAX_RETRIES = 3


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def resolve_mode(mode: str, rows: int, local_max_rows: int) -> str:
    """auto -> local below `local_max_rows` rows, distributed at or above it."""
    if mode == "auto":
        return "local" if rows < local_max_rows else "distributed"
    if mode not in ("local", "distributed"):
        raise ValueError(f"selection.mode={mode!r} is not one of ['auto', 'local', 'distributed']")
    return mode


def select_subset(cfg: Config, scores: Store, out: Store, progress: bool = True, *,
                  _kill_once: str | None = None) -> dict:
    """Pick `cfg.selection.budget` rows of the scored pool and write selection.parquet.

    `scores`: the folder (or file) of Parquet parts written by scoring. `out`: the selection.parquet file
    (a Store whose path ends in .parquet) or a folder to write ``selection.parquet`` into.
    Returns the summary the pipeline puts in the manifest: selector, mode, shards, rows, budget,
    objective (for k-center: the covering radius, also under ``covering_radius``), wall_s, ...
    `_kill_once` (tests only): path of a lock file; the first round-1 task of shard 0 that finds it
    missing creates it and kills its own worker, so Ray's retry is exercised.
    """
    t0 = time.perf_counter()
    sel_cfg = cfg.selection
    scan = _scan(scores, sel_cfg.embedding)
    budget = _check_budget(sel_cfg.budget, scan.rows, sel_cfg.allow_budget_over_pool)
    params = dict(sel_cfg.params or {})
    kappa = params.pop("kappa", None)
    if kappa is not None and (isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 1):
        raise ValueError(f"selection.params.kappa={kappa!r} must be an integer >= 1 (candidates per shard)")
    mode = resolve_mode(sel_cfg.mode, scan.rows, sel_cfg.local_max_rows)

    if mode == "local":
        if sel_cfg.name == "greedi" and kappa is not None:
            params["kappa"] = kappa  # greedi's own parameter
        table, summary = _select_local(scan, sel_cfg.name, params, budget, sel_cfg.seed)
    else:
        _ensure_ray(cfg)
        runner = _Distributed(scan, cfg, budget, kappa, params, progress, _kill_once)
        table, summary = runner.run()

    target = out if out.uri.endswith(".parquet") else out.child("selection.parquet")
    target.write_table(table)
    summary.update(
        selector=sel_cfg.name, mode=mode, rows=scan.rows, budget=budget, seed=sel_cfg.seed,
        embedding=sel_cfg.embedding, params=params, output=target.uri,
        wall_s=round(time.perf_counter() - t0, 3),
    )
    summary.setdefault("shards", 1)
    return summary


def _check_budget(budget: int, n: int, allow_over: bool) -> int:
    if budget > n:
        if allow_over:
            return n
        raise ValueError(
            f"selection.budget={budget} exceeds the scored pool ({n} rows): lower selection.budget or set "
            "selection.allow_budget_over_pool=true to take the whole pool"
        )
    return budget


def _ensure_ray(cfg: Config) -> None:
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus,
                 object_store_memory=cfg.ray.object_store_memory, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


# ------------------------------------------------------------------------------------------------
# Footer scan and reading
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    path: str
    row_groups: tuple[int, ...]
    pos0: int  # pool position of the unit's first row (pool order = file order, then row order)
    rows: int


@dataclass(frozen=True)
class _Scan:
    store: Store
    units: tuple[_Unit, ...]
    rows: int
    dim: int
    emb_col: str
    score_cols: tuple[str, ...]
    has_task: bool

    @property
    def columns(self) -> list[str]:
        return ["row_id", *(["task"] if self.has_task else []), *self.score_cols, self.emb_col]


def _scan(store: Store, emb_col: str) -> _Scan:
    """Footers only: which columns exist, the embedding width and the read units."""
    files = store.parquet_files()
    if not files:
        raise ValueError(f"scores {store.uri!r} holds no Parquet files: run the scoring stage first")
    units, pos, schema = [], 0, None
    for path in files:
        with store.fs.open_input_file(path) as f:
            md = pq.ParquetFile(f).metadata
            file_schema = md.schema.to_arrow_schema()
        schema = schema or file_schema
        group, group_rows = [], 0
        for g in range(md.num_row_groups):
            r = md.row_group(g).num_rows
            if group and group_rows + r > _ROWS_PER_READ:
                units.append(_Unit(path, tuple(group), pos, group_rows))
                pos += group_rows
                group, group_rows = [], 0
            group.append(g)
            group_rows += r
        if group:
            units.append(_Unit(path, tuple(group), pos, group_rows))
            pos += group_rows
    if pos == 0:
        raise ValueError(f"scores {store.uri!r} has 0 rows: nothing to select")
    names = schema.names
    if "row_id" not in names:
        raise ValueError(f"scores {store.uri!r} has no row_id column (columns: {names})")
    if emb_col not in names:
        raise ValueError(
            f"selection.embedding={emb_col!r} is not a column of {store.uri!r} (columns: {names}): "
            "use 'embedding', or re-score with scoring.encoder set for 'embedding_encoder'"
        )
    t = schema.field(emb_col).type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise ValueError(f"column {emb_col!r} must be a fixed-size list of floats, got {t}")
    score_cols = tuple(
        f.name for f in schema
        if pa.types.is_floating(f.type) and f.name not in _NOT_SCORES and f.name != emb_col
    )
    return _Scan(store, tuple(units), pos, t.list_size, emb_col, score_cols, "task" in names)


def _read_unit(scan: _Scan, unit: _Unit, columns: list[str]) -> pa.Table:
    with scan.store.fs.open_input_file(unit.path) as f:
        return pq.ParquetFile(f).read_row_groups(list(unit.row_groups), columns=columns)


def _arrays(table: pa.Table, emb_col: str, dim: int, score_cols) -> tuple:
    """(row_ids object array, tasks object array with null -> '', scores dict, embeddings float32 (n, d))."""
    emb = table.column(emb_col).combine_chunks()
    if emb.null_count:
        raise ValueError(f"column {emb_col!r} has {emb.null_count} null embedding(s): re-score those rows")
    X = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    ids = table.column("row_id").to_numpy(zero_copy_only=False)
    if "task" in table.column_names:
        tasks = pc.fill_null(table.column("task").cast(pa.string()), "").to_numpy(zero_copy_only=False)
    else:
        tasks = np.full(len(table), "", dtype=object)
    S = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64, copy=False) for c in score_cols}
    return ids, tasks, S, X


def _select_local(scan: _Scan, name: str, params: dict, budget: int, seed: int):
    """The whole pool in this process: exactly ``edsft.selection.select``."""
    table = pa.concat_tables([_read_unit(scan, u, scan.columns) for u in scan.units])
    ids, tasks, S, X = _arrays(table, scan.emb_col, scan.dim, scan.score_cols)
    del table
    if name == "greedi" and "row_keys" not in params:
        params = {**params, "row_keys": ids}  # partition by row_id, like the distributed path
    res = select(name, budget, embeddings=X, scores=S, tasks=tasks, seed=seed, **params)
    summary = {"objective": _finite(res.objective), "shards": 1}
    if isinstance(get_selector(name, **params), KCenter):
        summary["covering_radius"] = _finite(res.objective)
    return _selection_table(ids[res.indices], res.gains, name, np.zeros(len(res.indices), np.int64)), summary


def _selection_table(ids, gains, name: str, shards) -> pa.Table:
    n = len(ids)
    return pa.table(
        {"row_id": pa.array(list(ids), pa.string()), "rank": pa.array(np.arange(n, dtype=np.int64)),
         "gain": pa.array(np.asarray(gains, dtype=np.float64)), "selector": pa.array([name] * n, pa.string()),
         "shard": pa.array(np.asarray(shards, dtype=np.int64))},
        schema=SELECTION_SCHEMA,
    )


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


# ------------------------------------------------------------------------------------------------
# Per-task memory: peak RSS measured inside the task
# ------------------------------------------------------------------------------------------------


def _reset_peak_rss() -> None:
    # Workers are reused across tasks; clearing the high-water mark makes VmHWM this task's own peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------
# Problems: one two-round selection over the pool (or over one task's rows, for task_balanced)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    key: str
    selector: Any  # FacilityLocation | KCenter | UncertaintySelector (frozen dataclasses)
    budget: int
    kappa: int
    task: str | None  # None: every row; else only rows of this task
    gamma: float | None = None  # rbf/euclidean similarity of facility location, from the whole (sub)pool
    score_range: tuple[float, float] | None = None  # raw min/max of the hybrid's score over the (sub)pool

    @property
    def kind(self) -> str:
        if isinstance(self.selector, FacilityLocation):
            return "fl"
        if isinstance(self.selector, KCenter):
            return "kc"
        return "unc"


def _bonus(p: _Problem, S: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The hybrid's lambda_ * normalised uncertainty with the (sub)pool's GLOBAL min/max.

    FacilityLocation.bonus min-maxes over the rows it is given; appending the global raw min and max as
    two extra values makes its min/max the global ones (orientation flips them together), so the numbers
    are bit for bit those of an in-process run on the whole (sub)pool.
    """
    sel = p.selector
    if not isinstance(sel, FacilityLocation) or sel.lambda_ == 0:
        return None
    v = np.concatenate([S[sel.score], np.asarray(p.score_range, dtype=np.float64)])
    return sel.bonus({sel.score: v}, len(v))[:-2]


def _run_selector(p: _Problem, X, S, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The numpy selector on one block of rows, with the problem's global gamma / normalisation."""
    sel = p.selector
    if p.kind == "fl":
        # FacilityLocation._select, with gamma and the hybrid bonus taken from the whole (sub)pool
        graph = build_graph(X, sel.metric, p.gamma, sel.dense_max_n, sel.n_neighbors, seed, False)
        b = _bonus(p, S)
        mod = None if b is None else np.rint(b * QUANT_SCALE).astype(np.int64)
        return facility_location_greedy(graph, budget, sel.optimizer, mod, sel.epsilon, seed, sel.batch_size)
    if p.kind == "kc":
        picks, gains, _ = k_center_greedy(X, budget, sel.metric, seed)
        return picks, gains
    res = sel.select(budget, None, S, None, seed)
    return res.indices, res.gains


def _contribution(p: _Problem, X_rows: np.ndarray, X_set: np.ndarray) -> float:
    """This shard's part of the whole-pool objective of a set: a sum (FL) or a max (k-center)."""
    if len(X_rows) == 0:
        return 0.0 if p.kind == "fl" else -np.inf
    if p.kind == "fl":
        metric = "rbf" if p.selector.metric == "euclidean" else p.selector.metric
        return float(best_similarity(X_rows, X_set, metric, p.gamma).sum())
    return float(min_distance(X_rows, X_set, p.selector.metric).max())


class _Shard:
    """A shard's rows (pool order) as numpy arrays, built from its Arrow pieces inside a task."""

    def __init__(self, pieces, scan_meta: dict):
        self.table = pa.concat_tables(pieces) if pieces else None
        emb_col, dim, score_cols = scan_meta["emb_col"], scan_meta["dim"], scan_meta["score_cols"]
        if self.table is None or len(self.table) == 0:
            self.ids = np.empty(0, object)
            self.tasks = np.empty(0, object)
            self.S = {c: np.empty(0) for c in score_cols}
            self.X = np.empty((0, dim), np.float32)
            self.pos = np.empty(0, np.int64)
        else:
            self.ids, self.tasks, self.S, self.X = _arrays(self.table, emb_col, dim, score_cols)
            self.pos = self.table.column("pos").to_numpy()

    def rows(self, task: str | None) -> np.ndarray:
        return np.arange(len(self.X)) if task is None else np.flatnonzero(self.tasks == task)

    def subset(self, rows):
        return self.X[rows], {k: v[rows] for k, v in self.S.items()}


def _cand_arrays(rows_table: pa.Table, meta: dict):
    return _arrays(rows_table, meta["emb_col"], meta["dim"], meta["score_cols"])


# ------------------------------------------------------------------------------------------------
# Ray tasks (module level so workers import them; every one is deterministic given its inputs)
# ------------------------------------------------------------------------------------------------


@ray.remote
def _partition_task(scan: _Scan, unit: _Unit, m: int, seed: int, want_moments: bool):
    """Read one unit, split it into m shard pieces, and return per-task statistics of its rows."""
    table = _read_unit(scan, unit, scan.columns)
    table = table.append_column("pos", pa.array(np.arange(unit.pos0, unit.pos0 + len(table), dtype=np.int64)))
    ids, tasks, S, X = _arrays(table, scan.emb_col, scan.dim, scan.score_cols)
    if table.column("row_id").null_count:
        raise ValueError(f"{unit.path}: row_id has null values; scores.parquet must key every row")
    shard = shard_of(ids, m, seed)
    pieces = [table.take(pa.array(np.flatnonzero(shard == j))) for j in range(m)]
    stats = {}
    labels, inv = np.unique(tasks, return_inverse=True)
    for t, label in enumerate(labels):
        rows = np.flatnonzero(inv == t)
        st = {"n": len(rows), "min": {c: float(S[c][rows].min()) for c in S},
              "max": {c: float(S[c][rows].max()) for c in S}}
        if want_moments:
            x = X[rows].astype(np.float64)
            mean = x.mean(axis=0)
            st["moments"] = (len(rows), mean, ((x - mean) ** 2).sum(axis=0))
        stats[str(label)] = st
    return (*pieces, stats) if m > 1 else (pieces[0], stats)


@ray.remote
def _confidence_task(meta: dict, score: str, hio, lo: float, hi: float, *pieces):
    """Per-task (count, sum of row_confidence) with the whole pool's min/max (task_balanced's allocation)."""
    sh = _Shard(list(pieces), meta)
    if len(sh.X) == 0:
        return {}
    v = np.concatenate([sh.S[score], [lo, hi]])  # global extremes: row_confidence's min-max becomes global
    conf = row_confidence(v, score, hio)[:-2]
    labels, inv = np.unique(sh.tasks, return_inverse=True)
    sums = np.bincount(inv, weights=conf, minlength=len(labels))
    counts = np.bincount(inv, minlength=len(labels))
    return {str(lab): (int(counts[i]), float(sums[i])) for i, lab in enumerate(labels)}


@ray.remote
def _round1_task(problems: list[_Problem], meta: dict, seed: int, kill_once: str | None, *pieces):
    """Shard-local selection of kappa candidates per problem; returns only the candidate rows."""
    _reset_peak_rss()
    if kill_once is not None and not os.path.exists(kill_once):
        open(kill_once, "w").close()
        os._exit(1)  # simulate a dying worker (tests): Ray retries the task
    sh = _Shard(list(pieces), meta)
    out = {}
    for p in problems:
        rows = sh.rows(p.task)
        if len(rows) == 0:
            out[p.key] = (sh.table.slice(0, 0) if sh.table is not None else None, np.empty(0))
            continue
        X, S = sh.subset(rows)
        idx, gains = _run_selector(p, X, S, min(p.kappa, len(rows)), seed)
        out[p.key] = (sh.table.take(pa.array(rows[idx])), np.asarray(gains, dtype=np.float64))
    return out, _peak_rss_mb()


@ray.remote
def _reduce_task(problems: list[_Problem], unions: dict, meta: dict, seed: int):
    """Selection on the union of the shard candidates (rows sorted by pool position)."""
    _reset_peak_rss()
    out = {}
    for p in problems:
        table = unions[p.key]
        if table is None or len(table) < p.budget:
            out[p.key] = None
            continue
        _, _, S, X = _cand_arrays(table, meta)
        out[p.key] = _run_selector(p, X, S, p.budget, seed)
    return out, _peak_rss_mb()


@ray.remote
def _evaluate_task(problems: list[_Problem], sets: dict, meta: dict, *pieces):
    """This shard's contribution to the whole-(sub)pool objective of every candidate set."""
    _reset_peak_rss()
    sh = _Shard(list(pieces), meta)
    out = {}
    for p in problems:
        X_rows = sh.X[sh.rows(p.task)]
        out[p.key] = [_contribution(p, X_rows, X_set) for X_set in sets[p.key]]
    return out, _peak_rss_mb()


@ray.remote
def _lookup_task(scan: _Scan, unit: _Unit, positions: np.ndarray):
    """row_id of the given pool positions inside one unit (random selection reads nothing else)."""
    table = _read_unit(scan, unit, ["row_id"])
    return table.column("row_id").to_numpy(zero_copy_only=False)[positions - unit.pos0]


# ------------------------------------------------------------------------------------------------
# The driver side
# ------------------------------------------------------------------------------------------------


class _Distributed:
    def __init__(self, scan: _Scan, cfg: Config, budget: int, kappa: int | None, params: dict,
                 progress: bool, kill_once: str | None):
        s = cfg.selection
        self.scan, self.budget, self.seed, self.name = scan, budget, s.seed, s.name
        self.progress, self.kill_once = progress, kill_once
        self.selector = get_selector(s.name, **params)  # validates the parameters before any task runs
        self.m = s.shards
        self.kappa = kappa
        if isinstance(self.selector, GreeDi):  # greedi is the in-process reference: run its inner selector
            g = self.selector
            if g.row_keys is not None:
                raise ValueError("selection.params.row_keys cannot be used with mode=distributed: rows are keyed by row_id")
            self.selector = get_selector(g.inner, **dict(g.inner_params))
            self.m = g.m if "m" in params else s.shards
            self.kappa = kappa or g.kappa
        self.opts = dict(num_cpus=s.cpus_per_task, max_retries=_MAX_RETRIES,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        self.meta = {"emb_col": scan.emb_col, "dim": scan.dim, "score_cols": scan.score_cols}
        self.rss: list[float] = []
        self._check_supported(self.selector)

    # -- helpers --------------------------------------------------------------------------------
    def _check_supported(self, sel) -> None:
        if isinstance(sel, TaskBalanced):
            inner = get_selector(sel.inner, **dict(sel.inner_params))
            if isinstance(inner, RandomSelector):
                raise ValueError("task_balanced with inner='random' has no distributed form: use mode=local")
            self._check_supported(inner)
        if isinstance(sel, KCenter) and (sel.top_q is not None or sel.initial):
            raise ValueError(
                f"{self.name} with top_q/initial needs the whole pool at once: use selection.mode=local"
            )
        if isinstance(sel, UncertaintySelector) and sel.jitter:
            raise ValueError("uncertainty with jitter=True draws one key per pool row: use selection.mode=local")
        for need in sel.score_names():
            if need not in self.scan.score_cols:
                raise ValueError(
                    f"score column {need!r} is missing from {self.scan.store.uri!r}: available columns are "
                    f"{list(self.scan.score_cols)}; pass score=<one of them>"
                )

    def _get(self, refs: list, desc: str) -> list:
        """ray.get with a progress bar over finished tasks (results in submission order)."""
        if self.progress and len(refs) > 1:
            from tqdm.auto import tqdm

            pending = list(refs)
            with tqdm(total=len(refs), desc=desc, leave=False) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    bar.update(len(done))
        return ray.get(refs)

    def _collect(self, results):
        outs = []
        for value, rss in results:
            if rss is not None:
                self.rss.append(rss)
            outs.append(value)
        return outs

    # -- main -----------------------------------------------------------------------------------
    def run(self):
        sel = self.selector
        if isinstance(sel, RandomSelector):
            return self._random()
        self._partition(want_moments=self._wants_gamma(sel))
        if isinstance(sel, TaskBalanced):
            problems, order = self._task_balanced_problems(sel)
        else:
            problems, order = [self._problem("all", sel, self.budget, None)], ["all"]
        chosen = self._two_round(problems)
        ids = np.concatenate([chosen[k]["ids"] for k in order])
        gains = np.concatenate([chosen[k]["gains"] for k in order])
        shards = np.concatenate([chosen[k]["shard"] for k in order])
        # kappa: candidates per shard (default: the budget; for task_balanced: each task's quota)
        kappa = self.kappa or (None if isinstance(sel, TaskBalanced) else self.budget)
        summary = {"shards": self.m, "kappa": kappa, "partition": "shard_of(row_id, m, seed)"}
        if isinstance(sel, TaskBalanced):
            summary["allocation"] = {k: int(chosen[k]["budget"]) for k in order}
            summary["objective"] = self._whole_pool_objective(sel, chosen, order)
        else:
            c = chosen["all"]
            summary.update(objective=c["objective"], merged_objective=c["merged_objective"], winner=c["winner"])
            if isinstance(sel, KCenter):
                summary["covering_radius"] = c["objective"]
        summary["max_task_rss_mb"] = round(max(self.rss), 1) if self.rss else None
        self.pieces = None  # release the object store copy of the pool
        return _selection_table(ids, gains, self.name, shards), summary

    @staticmethod
    def _wants_gamma(sel) -> bool:
        if isinstance(sel, TaskBalanced):
            sel = get_selector(sel.inner, **dict(sel.inner_params))
        return isinstance(sel, FacilityLocation) and sel.metric != "cosine" and sel.gamma is None

    # -- partition map: pieces in the object store, statistics merged on the driver ------------
    def _partition(self, want_moments: bool) -> None:
        m = self.m
        refs = [
            _partition_task.options(num_returns=m + 1, **self.opts).remote(self.scan, u, m, self.seed, want_moments)
            for u in self.scan.units
        ]
        # refs[u][j] = unit u's piece of shard j (kept as refs), refs[u][m] = its statistics
        stats = self._get([r[m] for r in refs], "partition")
        self.pieces = [[r[j] for r in refs] for j in range(m)]
        merged: dict[str, dict] = {}
        for st in stats:
            for label, s in st.items():
                if label not in merged:
                    merged[label] = {"n": 0, "min": dict(s["min"]), "max": dict(s["max"]), "moments": None}
                g = merged[label]
                g["n"] += s["n"]
                for c in s["min"]:
                    g["min"][c] = min(g["min"][c], s["min"][c])
                    g["max"][c] = max(g["max"][c], s["max"][c])
                if "moments" in s:
                    g["moments"] = _merge_moments(g["moments"], s["moments"])
        total = {"n": 0, "min": {}, "max": {}, "moments": None}
        for g in merged.values():
            total["n"] += g["n"]
            for c in g["min"]:
                total["min"][c] = min(total["min"].get(c, np.inf), g["min"][c])
                total["max"][c] = max(total["max"].get(c, -np.inf), g["max"][c])
            if g["moments"] is not None:
                total["moments"] = _merge_moments(total["moments"], g["moments"])
        self.stats, self.total = merged, total

    def _problem(self, key: str, sel, budget: int, task: str | None) -> _Problem:
        st = self.total if task is None else self.stats[task]
        gamma = score_range = None
        if isinstance(sel, FacilityLocation):
            if sel.metric != "cosine":
                gamma = sel.gamma if sel.gamma is not None else _gamma_from_moments(st["moments"])
            if sel.lambda_ > 0:
                score_range = (st["min"][sel.score], st["max"][sel.score])
        return _Problem(key, sel, budget, self.kappa or budget, task, gamma, score_range)

    # -- task_balanced: allocation by a map pass, then one problem per task ----------------------
    def _task_balanced_problems(self, tb: TaskBalanced):
        lo, hi = self.total["min"][tb.score], self.total["max"][tb.score]
        parts = self._get(
            [_confidence_task.options(**self.opts).remote(self.meta, tb.score, tb.higher_is_uncertain, lo, hi, *p)
             for p in self.pieces],
            "task confidence",
        )
        labels = sorted(self.stats)  # np.unique order, like TaskBalanced
        counts = {k: 0 for k in labels}
        sums = {k: 0.0 for k in labels}
        for part in parts:
            for k, (c, s) in part.items():
                counts[k] += c
                sums[k] += s
        sizes = np.array([counts[k] for k in labels])
        mean_conf = np.array([sums[k] / counts[k] for k in labels])
        alloc = allocate_budget(self.budget, sizes, mean_conf, tb.size_aware, tb.min_confidence)
        inner = get_selector(tb.inner, **dict(tb.inner_params))
        problems = [self._problem(k, inner, int(q), k) for k, q in zip(labels, alloc) if q > 0]
        return problems, [p.key for p in problems]

    # -- the two rounds and the whole-pool comparison -------------------------------------------
    def _two_round(self, problems: list[_Problem]) -> dict:
        m = self.m
        r1 = self._collect(self._get(
            [_round1_task.options(**self.opts).remote(problems, self.meta, self.seed,
                                                        self.kill_once if j == 0 else None, *self.pieces[j])
             for j in range(m)],
            "shard selection",
        ))
        # Candidates to the driver: m * kappa rows per problem, sorted by pool position (like np.unique).
        unions, local_runs = {}, {}
        for p in problems:
            tables = [r1[j][p.key][0] for j in range(m) if r1[j][p.key][0] is not None]
            union = pa.concat_tables(tables) if tables else None
            if union is not None:
                union = union.take(pc.sort_indices(union, [("pos", "ascending")]))
            unions[p.key] = union
            pos = union.column("pos").to_numpy() if union is not None else np.empty(0, np.int64)
            runs = []
            for j in range(m):
                cand, gains = r1[j][p.key]
                if cand is not None and len(cand) >= p.budget:  # greedi: a shard run counts if it reached B
                    first = cand.column("pos").to_numpy()[: p.budget]
                    runs.append((f"shard:{j}", np.searchsorted(pos, first), gains[: p.budget]))
            local_runs[p.key] = runs
        merged, rss = ray.get(_reduce_task.options(**self.opts).remote(problems, unions, self.meta, self.seed))
        self.rss += [rss] if rss is not None else []

        chosen = {}
        to_eval = {}
        for p in problems:
            runs = list(local_runs[p.key])
            if merged[p.key] is not None:
                idx, gains = merged[p.key]
                runs.append(("merged", np.asarray(idx, np.int64), np.asarray(gains, np.float64)))
            if not runs:
                raise ValueError(
                    f"no shard or merged run reached budget={p.budget} for {p.key!r}: raise kappa or lower m={m}"
                )
            if p.kind == "unc":  # exact: top-B of the union of per-shard top-B is the global top-B
                runs = [r for r in runs if r[0] == "merged"]
            to_eval[p.key] = runs
            chosen[p.key] = {"runs": runs}

        values = self._evaluate(problems, unions, to_eval)
        for p in problems:
            union, runs = unions[p.key], to_eval[p.key]
            vals = values[p.key]
            best = None  # strict improvement only: ties go to the earliest shard, then merged (like greedi)
            for (label, idx, gains), val in zip(runs, vals):
                if best is None or (val > best[3] if p.kind != "kc" else val < best[3]):
                    best = (label, idx, gains, val)
            label, idx, gains, val = best
            merged_val = next((v for (lab, _, _), v in zip(runs, vals) if lab == "merged"), None)
            ids = union.column("row_id").to_numpy(zero_copy_only=False)[idx]
            chosen[p.key] = {
                "ids": ids, "gains": gains, "shard": shard_of(ids, m, self.seed), "budget": p.budget,
                "objective": _finite(val), "merged_objective": _finite(merged_val), "winner": label,
                "positions": union.column("pos").to_numpy()[idx],
            }
        return chosen

    def _evaluate(self, problems, unions, runs) -> dict:
        """Whole-(sub)pool objective of every run: map over the shards, then sum (FL) or max (k-center)."""
        values = {}
        needs_map = [p for p in problems if p.kind in ("fl", "kc")]
        for p in problems:
            if p.kind == "unc":
                _, _, S_u, _ = _cand_arrays(unions[p.key], self.meta)
                values[p.key] = [float(p.selector._oriented(S_u)[idx].sum()) for _, idx, _ in runs[p.key]]
        if not needs_map:
            return values
        sets = {}
        for p in needs_map:
            _, _, _, X_u = _cand_arrays(unions[p.key], self.meta)
            sets[p.key] = [X_u[idx] for _, idx, _ in runs[p.key]]
        sets_ref = ray.put(sets)
        parts = self._collect(self._get(
            [_evaluate_task.options(**self.opts).remote(needs_map, sets_ref, self.meta, *self.pieces[j])
             for j in range(self.m)],
            "objective",
        ))
        for p in needs_map:
            per_run = np.array([part[p.key] for part in parts], dtype=np.float64)  # (m, runs)
            if p.kind == "fl":
                vals = per_run.sum(axis=0)
                _, _, S_u, _ = _cand_arrays(unions[p.key], self.meta)
                b = _bonus(p, S_u)
                if b is not None:
                    vals = vals + np.array([b[idx].sum() for _, idx, _ in runs[p.key]])
            else:
                vals = per_run.max(axis=0)
            values[p.key] = [float(v) for v in vals]
        return values

    def _whole_pool_objective(self, tb: TaskBalanced, chosen: dict, order: list[str]) -> float | None:
        """task_balanced's objective: its inner objective of all picks on the whole pool (one map pass)."""
        inner = get_selector(tb.inner, **dict(tb.inner_params))
        p = self._problem("all", inner, self.budget, None)
        if p.kind == "unc":
            return _finite(sum(float(np.nansum(chosen[k]["gains"])) for k in order))
        # the picks' embeddings come back from the shard pieces: the driver holds O(budget * d)
        positions = np.sort(np.concatenate([chosen[k]["positions"] for k in order]))
        X_set = np.concatenate(self._get(
            [_gather_task.options(**self.opts).remote(self.meta, positions, *self.pieces[j]) for j in range(self.m)],
            "gather picks",
        ))
        parts = self._collect(self._get(
            [_evaluate_task.options(**self.opts).remote([p], {"all": [X_set]}, self.meta, *self.pieces[j])
             for j in range(self.m)],
            "objective",
        ))
        vals = np.array([part["all"][0] for part in parts])
        if p.kind == "kc":
            return _finite(vals.max())
        total = float(vals.sum())
        if inner.lambda_ > 0:  # the hybrid's bonus of the picks, normalised over the whole pool
            S_picks = np.concatenate(self._get(
                [_gather_task.options(**self.opts).remote(self.meta, positions, *self.pieces[j], score=inner.score)
                 for j in range(self.m)],
                "gather scores",
            ))
            total += float(_bonus(p, {inner.score: S_picks}).sum())
        return _finite(total)

    # -- random: the in-process draw, then a row_id lookup ---------------------------------------
    def _random(self):
        n = self.scan.rows
        # RandomSelector only needs the pool size: a zero-byte broadcast view stands in for the rows.
        res = self.selector.select(self.budget, None, None, np.broadcast_to(np.int8(0), (n,)), self.seed)
        order = np.argsort(res.indices, kind="stable")
        pos_sorted = res.indices[order]
        refs, spans = [], []
        for u in self.scan.units:
            lo, hi = np.searchsorted(pos_sorted, [u.pos0, u.pos0 + u.rows])
            if hi > lo:
                refs.append(_lookup_task.options(**self.opts).remote(self.scan, u, pos_sorted[lo:hi]))
                spans.append((lo, hi))
        ids_sorted = np.empty(len(pos_sorted), dtype=object)
        for (lo, hi), ids in zip(spans, self._get(refs, "lookup")):
            ids_sorted[lo:hi] = ids
        ids = np.empty_like(ids_sorted)
        ids[order] = ids_sorted
        table = _selection_table(ids, res.gains, self.name, shard_of(ids, self.m, self.seed))
        return table, {"shards": self.m, "objective": None}


@ray.remote
def _gather_task(meta: dict, positions: np.ndarray, *pieces, score: str | None = None):
    """Embeddings (or one score column) of the shard's rows at the given pool positions, in position order."""
    sh = _Shard(list(pieces), meta)
    rows = np.flatnonzero(np.isin(sh.pos, positions))
    rows = rows[np.argsort(sh.pos[rows], kind="stable")]
    return sh.S[score][rows] if score is not None else sh.X[rows]


def _merge_moments(a, b):
    """Chan et al.'s parallel update of (count, mean, M2) per embedding dimension (float64)."""
    if a is None:
        return b
    if b is None:
        return a
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


def _gamma_from_moments(moments) -> float:
    """selection.default_gamma from merged moments: 1 / (2 * total population variance)."""
    n, _, m2 = moments
    total_var = float((m2 / n).sum()) if n > 1 else 0.0
    return 1.0 / (2.0 * total_var) if total_var > 0 else 1.0
