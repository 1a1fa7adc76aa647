"""Distributed coresets on Ray: map-reduce selection over a sharded scored pool.

``select_subset(cfg, scores, out)`` reads ``scores.parquet`` (row_id, task, score columns, embedding),
picks ``cfg.selection.budget`` rows and writes ``selection.parquet`` (row_id, rank, gain, selector, shard);
with several budgets, also ``selection/b<size>.parquet`` per size (see ``select_subset``).
It never reads a label/response column: only row_id, task, float score columns and the embedding.

Small pools run the numpy selector in-process (``edsft.selection.select``). Large pools run a map-reduce
that is plumbing only: it knows no selector, it asks the selector through the distributed contract of
``edsft.selection.base`` (its pool statistics, its ``distribution()``, how its objective splits over
shards) and every local step is that selector's own ``select`` (no selector is re-implemented here):

  footer scan (driver)   Parquet footers only: row counts, embedding width, read units (file x row groups).
  partition map          one task per read unit reads its columns with the store's filesystem (local or
                         s3://), hashes row_id to one of m shards with ``selection.shard_of`` (GreeDi's
                         partition) and returns m Arrow pieces that stay in the Ray object store, plus the
                         partial statistics the selector declared (``pool_statistics()``), merged on the
                         driver into whole-pool values. The driver keeps only ObjectRefs.
  statistics map         only for statistics that depend on others (task_balanced's per-task confidence
                         needs the score's range first): one task per shard.
  TwoRound:
    round 1 (shard map)  shard j's task runs the bound selector on its rows (pool order) for kappa
                         candidates (default: budget) and returns only those candidate rows.
    round 2 (reduce)     one task runs it on the union of candidates (m * kappa rows, pool order).
    evaluation map       each shard task returns its ``shard_objective`` of the merged set and of every
                         shard-local set; the driver combines them (``combine``: sum or max) and adds
                         ``chosen_objective`` into WHOLE-pool values and keeps the best set (RandGreeDi,
                         Barbosa et al. 2015; two-round k-center, Malkomes et al. 2015). Ties go to the
                         earliest shard, then the merged set, exactly like the in-process ``greedi``
                         reference. ``gain`` comes from the winning run (for a shard-local winner: gains
                         within that shard). ``exact`` plans (uncertainty) take the merged run as is.
  PerTask                per-task quotas from the selector's bound statistics, then one two-round problem
                         per task inside the same tasks; picks are written task by task in sorted label
                         order, and the objective is the inner selector's on the whole pool.
  Draw                   the selector draws B positions from the pool size alone; a lookup map returns just
                         their row_ids (random).
  Gather                 the default for a selector that declares no distributed form: the whole pool is
                         gathered into one task, which runs the selector in-process.

Memory: a task holds one shard (n/m rows) plus its selector's working set; the driver holds the
candidate rows only, O(m * kappa * d). The object store holds the pool once (spilling to disk when it
must); the pieces are released when ``select_subset`` returns.

Global statistics come from the map over the whole (sub)pool, never from one shard, so every shard
optimises the same function; with m = 1 the result is exactly the in-process selector's (cosine; rbf/
euclidean agree up to the last bits of gamma). The in-process ``greedi`` reference normalises per shard
instead, so the two agree exactly for cosine facility location and k-center, not for hybrids or a
default rbf gamma.

Tasks run with ``PlacementGroupSchedulingStrategy(placement_group=None)`` and fractional CPUs, so a call
from inside a Tune trial does not wait forever on the trial's (full) placement group; a task whose worker
dies is retried by Ray (``max_retries``) and, everything being seeded, gives the same set. ``callbacks``
run at the start of every task as ``cb(stage=, shard=)`` (tracing, or fault injection in tests).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import console
from ..config import Config
from ..errors import UserError
from ..selection import (
    MAX_STAT_PASSES,
    SELECTORS,
    ByTask,
    Draw,
    Gather,
    NotDistributable,
    PerTask,
    PoolStatistic,
    Selector,
    TwoRound,
    get_selector,
    shard_of,
    take_rows,
)
from ..storage import Store
from .session import init_ray

__all__ = ["select_subset", "resolve_mode", "SELECTION_SCHEMA", "DISTRIBUTED_PARAMS", "STAGES"]

# selection.parquet: one row per pick, in pick order.
SELECTION_SCHEMA = pa.schema(
    [("row_id", pa.string()), ("rank", pa.int64()), ("gain", pa.float64()), ("selector", pa.string()), ("shard", pa.int64())]
)
# Keys of selection.params that steer the map-reduce and are not selector hyperparameters (unless the
# selector takes one itself: greedi's kappa).
DISTRIBUTED_PARAMS = ("kappa",)
# The `stage` a callback sees; `shard` is the shard's index, None for read-unit and single tasks.
STAGES = ("partition", "statistics", "round1", "reduce", "evaluate", "gather", "lookup")
_NOT_SCORES = ("prompt_tokens", "response_tokens")  # numeric columns of scores.parquet that are not scores
_ROWS_PER_READ = 100_000  # rows one partition task reads (whole row groups; a bigger row group is one unit)
_MAX_RETRIES = 3
_COMBINE: dict[str, Callable] = {"sum": sum, "max": max}  # in shard order: sum adds left to right

Callback = Callable[..., None]


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def resolve_mode(mode: str, rows: int, local_max_rows: int) -> str:
    """auto -> local below `local_max_rows` rows, distributed at or above it."""
    if mode == "auto":
        return "local" if rows < local_max_rows else "distributed"
    if mode not in ("local", "distributed"):
        raise UserError(f"selection.mode={mode!r} is not one of ['auto', 'local', 'distributed']")
    return mode


def select_subset(
    cfg: Config,
    scores: Store,
    out: Store,
    progress: bool = True,
    *,
    callbacks: Sequence[Callback] = (),
    chosen: np.ndarray | None = None,
) -> dict:
    """Pick `cfg.selection.budget` rows of the scored pool and write selection.parquet.

    `scores`: the folder (or file) of Parquet parts written by scoring. `out`: the selection.parquet file
    (a Store whose path ends in .parquet) or a folder to write ``selection.parquet`` into.
    `callbacks` (distributed mode): called at the start of every Ray task as ``cb(stage=, shard=)``
    (see STAGES), inside the task's worker, so they must be picklable.
    `chosen`: embeddings (m, d) of rows chosen before, which are not in `scores` (multi-round selection):
    selectors with ``uses_chosen`` start from them (``Selector.with_chosen``), in-process and in every
    shard task alike.
    Returns the summary the pipeline puts in the manifest: selector, mode, shards, rows, budget,
    objective (also under the selector's ``objective_name``, e.g. ``covering_radius``), wall_s, ...

    Several budgets (``selection.budget: [b1, b2, ...]``): selection.parquet holds the largest (what
    annotate, train and evaluate use) and ``selection/b<size>.parquet`` every size, each exactly what a
    run with that single budget writes. A ``nested`` selector (greedy: its first b picks are its picks at
    budget b) runs once, at the largest budget, in local mode; the others, and the map-reduce (whose
    candidates per shard depend on the budget), run once per budget. The summary's ``budgets`` lists
    each size's rows, objective and file.
    """
    t0 = time.perf_counter()
    sel_cfg = cfg.selection
    scan = _scan(scores, sel_cfg.embedding)
    # capped at the pool size when allowed, so two budgets may become one
    budgets = sorted({_check_budget(b, scan.rows, sel_cfg.allow_budget_over_pool) for b in sel_cfg.budgets})
    params, kappa = _split_params(sel_cfg.name, sel_cfg.params or {})
    mode = resolve_mode(sel_cfg.mode, scan.rows, sel_cfg.local_max_rows)

    if mode == "local":
        results = _select_local(scan, sel_cfg.name, params, budgets, sel_cfg.seed, chosen)
    else:
        init_ray(cfg)
        results = {b: _Distributed(scan, cfg, b, kappa, params, progress, callbacks, chosen).run() for b in budgets}

    target = out if out.uri.endswith(".parquet") else out.child("selection.parquet")
    table, summary = results[budgets[-1]]
    target.write_table(table)
    if not isinstance(sel_cfg.budget, int):  # a list of budgets: every size is its own artifact
        folder = budget_folder(target)
        sizes = {}
        for b in budgets:
            t, s = results[b]
            folder.child(f"b{b}.parquet").write_table(t)
            sizes[str(b)] = {
                "budget": b,
                **{k: v for k, v in s.items() if k != "shards"},
                "output": folder.child(f"b{b}.parquet").uri,
            }
        summary.update(budgets=sizes, one_pass=mode == "local" and get_selector(sel_cfg.name, **params).nested)
    summary.update(
        selector=sel_cfg.name,
        mode=mode,
        rows=scan.rows,
        budget=budgets[-1],
        seed=sel_cfg.seed,
        embedding=sel_cfg.embedding,
        params=params,
        output=target.uri,
    )
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    summary.setdefault("shards", 1)
    return summary


def budget_folder(selection: Store) -> Store:
    """Where a multi-budget run writes ``b<size>.parquet``: ``selection/`` next to selection.parquet."""
    return dataclasses.replace(
        selection, path=selection.path.removesuffix(".parquet"), uri=selection.uri.removesuffix(".parquet")
    )


def _split_params(name: str, params: Mapping[str, Any]) -> tuple[dict, int | None]:
    """selection.params -> (selector hyperparameters, kappa for the map-reduce or None)."""
    params = dict(params)
    kappa = params.get("kappa")
    if kappa is not None and (isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 1):
        raise UserError(f"selection.params.kappa={kappa!r} must be an integer >= 1 (candidates per shard)")
    if "kappa" in _fields(name):  # the selector's own parameter (greedi): its distribution() passes it on
        return params, None
    params.pop("kappa", None)
    return params, kappa


def _fields(name: str) -> set[str]:
    cls = SELECTORS.get(name)
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set()


def _check_budget(budget: int, n: int, allow_over: bool) -> int:
    if budget > n:
        if allow_over:
            return n
        raise UserError(
            f"selection.budget={budget} exceeds the scored pool ({n} rows): lower selection.budget or set "
            "selection.allow_budget_over_pool=true to take the whole pool"
        )
    return budget


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
        raise UserError(f"scores {store.uri!r} holds no Parquet files: run the scoring stage first")
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
        raise UserError(f"scores {store.uri!r} has 0 rows: nothing to select")
    names = schema.names
    if "row_id" not in names:
        raise UserError(f"scores {store.uri!r} has no row_id column (columns: {names})")
    if emb_col not in names:
        raise UserError(
            f"selection.embedding={emb_col!r} is not a column of {store.uri!r} (columns: {names}): "
            "use 'embedding', or re-score with scoring.encoder set for 'embedding_encoder'"
        )
    t = schema.field(emb_col).type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise UserError(f"column {emb_col!r} must be a fixed-size list of floats, got {t}")
    score_cols = tuple(f.name for f in schema if pa.types.is_floating(f.type) and f.name not in _NOT_SCORES and f.name != emb_col)
    return _Scan(store, tuple(units), pos, t.list_size, emb_col, score_cols, "task" in names)


def _read_unit(scan: _Scan, unit: _Unit, columns: list[str]) -> pa.Table:
    with scan.store.fs.open_input_file(unit.path) as f:
        return pq.ParquetFile(f).read_row_groups(list(unit.row_groups), columns=columns)


def _arrays(table: pa.Table, emb_col: str, dim: int, score_cols) -> tuple:
    """(row_ids object array, tasks object array with null -> '', scores dict, embeddings float32 (n, d))."""
    emb = table.column(emb_col).combine_chunks()
    if emb.null_count:
        raise UserError(f"column {emb_col!r} has {emb.null_count} null embedding(s): re-score those rows")
    X = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    ids = table.column("row_id").to_numpy(zero_copy_only=False)
    if "task" in table.column_names:
        tasks = pc.fill_null(table.column("task").cast(pa.string()), "").to_numpy(zero_copy_only=False)
    else:
        tasks = np.full(len(table), "", dtype=object)
    S = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64, copy=False) for c in score_cols}
    return ids, tasks, S, X


def _select_local(scan: _Scan, name: str, params: dict, budgets: list[int], seed: int, chosen=None) -> dict:
    """The whole pool in this process: exactly ``edsft.selection.select``, per budget {b: (table, summary)}.
    A nested selector runs once at the largest budget and every smaller size is its prefix."""
    table = pa.concat_tables([_read_unit(scan, u, scan.columns) for u in scan.units])
    ids, tasks, S, X = _arrays(table, scan.emb_col, scan.dim, scan.score_cols)
    del table
    if "row_keys" in _fields(name) and "row_keys" not in params:
        params = {**params, "row_keys": ids}  # partition by row_id, like the distributed path (greedi)
    sel = get_selector(name, **params).with_chosen(chosen)
    out = {}
    if sel.nested:
        res = sel.select(budgets[-1], X, S, tasks, seed)
        picks = {b: (res.indices[:b], res.gains[:b]) for b in budgets}
        objective = {b: res.objective if b == budgets[-1] else sel.objective(res.indices[:b], X, S, tasks) for b in budgets}
    else:
        runs = {b: sel.select(b, X, S, tasks, seed) for b in budgets}
        picks = {b: (r.indices, r.gains) for b, r in runs.items()}
        objective = {b: r.objective for b, r in runs.items()}
    for b in budgets:
        idx, gains = picks[b]
        summary = _objective_summary(sel, objective[b])
        summary["shards"] = 1
        out[b] = (_selection_table(ids[idx], gains, name, np.zeros(len(idx), np.int64)), summary)
    return out


def _objective_summary(sel: Selector, value) -> dict:
    out = {"objective": _finite(value)}
    if sel.objective_name != "objective":
        out[sel.objective_name] = out["objective"]
    return out


def _selection_table(ids, gains, name: str, shards) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "row_id": pa.array(list(ids), pa.string()),
            "rank": pa.array(np.arange(n, dtype=np.int64)),
            "gain": pa.array(np.asarray(gains, dtype=np.float64)),
            "selector": pa.array([name] * n, pa.string()),
            "shard": pa.array(np.asarray(shards, dtype=np.int64)),
        },
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
# Shards, statistics and problems
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """One two-round selection: over every row (task None) or over one task's rows (PerTask)."""

    key: str
    selector: Selector  # bound to the (sub)pool's statistics
    budget: int
    kappa: int
    task: str | None
    exact: bool


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
        """(X, S, tasks) of some rows."""
        return self.X[rows], take_rows(self.S, rows), self.tasks[rows]


def _cand_arrays(rows_table: pa.Table, meta: dict):
    return _arrays(rows_table, meta["emb_col"], meta["dim"], meta["score_cols"])


def _partials(stats: Mapping[str, PoolStatistic], X, S, T) -> dict | None:
    """Every statistic's partial over one block of rows; None for an empty block (nothing to merge)."""
    if len(X) == 0:
        return None
    return {k: s.partial(X, S, T) for k, s in stats.items()}


def _merge_partials(stats: Mapping[str, PoolStatistic], parts: list) -> dict:
    """Merge per-block partials in block order and finish them into values."""
    merged: dict[str, Any] = {}
    for part in parts:
        if part is None:
            continue
        for k, v in part.items():
            merged[k] = stats[k].merge(merged[k], v) if k in merged else v
    return {k: stats[k].value(v) for k, v in merged.items()}


def _run_callbacks(callbacks, stage: str, shard: int | None) -> None:
    for cb in callbacks:
        cb(stage=stage, shard=shard)


# ------------------------------------------------------------------------------------------------
# Ray tasks (module level so workers import them; every one is deterministic given its inputs)
# ------------------------------------------------------------------------------------------------


@ray.remote
def _partition_task(scan: _Scan, unit: _Unit, m: int, seed: int, stats: dict, callbacks):
    """Read one unit, split it into m shard pieces, and return the partial statistics of its rows."""
    _run_callbacks(callbacks, "partition", None)
    table = _read_unit(scan, unit, scan.columns)
    table = table.append_column("pos", pa.array(np.arange(unit.pos0, unit.pos0 + len(table), dtype=np.int64)))
    ids, tasks, S, X = _arrays(table, scan.emb_col, scan.dim, scan.score_cols)
    if table.column("row_id").null_count:
        raise UserError(f"{unit.path}: row_id has null values; scores.parquet must key every row")
    shard = shard_of(ids, m, seed)
    pieces = [table.take(pa.array(np.flatnonzero(shard == j))) for j in range(m)]
    partials = _partials(stats, X, S, tasks)
    return (*pieces, partials) if m > 1 else (pieces[0], partials)


@ray.remote
def _statistics_task(stats: dict, meta: dict, task: str | None, j: int, callbacks, *pieces):
    """Partial statistics of the shard's rows (of one task, or all)."""
    _run_callbacks(callbacks, "statistics", j)
    sh = _Shard(list(pieces), meta)
    return _partials(stats, *sh.subset(sh.rows(task)))


@ray.remote
def _round1_task(problems: list[_Problem], meta: dict, seed: int, j: int, callbacks, *pieces):
    """Shard-local selection of kappa candidates per problem; returns only the candidate rows."""
    _reset_peak_rss()
    _run_callbacks(callbacks, "round1", j)
    sh = _Shard(list(pieces), meta)
    out = {}
    for p in problems:
        rows = sh.rows(p.task)
        if len(rows) == 0:
            out[p.key] = (sh.table.slice(0, 0) if sh.table is not None else None, np.empty(0))
            continue
        X, S, T = sh.subset(rows)
        res = p.selector.select(min(p.kappa, len(rows)), X, S, T, seed, compute_objective=False)
        out[p.key] = (sh.table.take(pa.array(rows[res.indices])), res.gains)
    return out, _peak_rss_mb()


@ray.remote
def _reduce_task(problems: list[_Problem], unions: dict, meta: dict, seed: int, callbacks):
    """Selection on the union of the shard candidates (rows sorted by pool position)."""
    _reset_peak_rss()
    _run_callbacks(callbacks, "reduce", None)
    out = {}
    for p in problems:
        table = unions[p.key]
        if table is None or len(table) < p.budget:
            out[p.key] = None
            continue
        _, T, S, X = _cand_arrays(table, meta)
        res = p.selector.select(p.budget, X, S, T, seed, compute_objective=False)
        out[p.key] = (res.indices, res.gains)
    return out, _peak_rss_mb()


@ray.remote
def _evaluate_task(problems: list[_Problem], sets: dict, meta: dict, j: int, callbacks, *pieces):
    """This shard's part of the whole-(sub)pool objective of every candidate set (None: no rows here)."""
    _reset_peak_rss()
    _run_callbacks(callbacks, "evaluate", j)
    sh = _Shard(list(pieces), meta)
    out = {}
    for p in problems:
        rows = sh.rows(p.task)
        if len(rows) == 0:
            out[p.key] = None  # an empty block has no part: leave it out of the combination
            continue
        X_rows, S_rows, _ = sh.subset(rows)
        out[p.key] = [p.selector.shard_objective(X_rows, S_rows, X_set, S_set) for X_set, S_set in sets[p.key]]
    return out, _peak_rss_mb()


@ray.remote
def _gather_task(meta: dict, positions: np.ndarray, j: int, callbacks, *pieces):
    """(positions, embeddings, score columns) of the shard's rows at the given pool positions."""
    _run_callbacks(callbacks, "gather", j)
    sh = _Shard(list(pieces), meta)
    rows = np.flatnonzero(np.isin(sh.pos, positions))
    return sh.pos[rows], sh.X[rows], take_rows(sh.S, rows)


@ray.remote
def _select_gathered_task(selector: Selector, budget: int, meta: dict, seed: int, callbacks, *pieces):
    """Gather plans: the whole pool in pool order in this one task, and the selector in-process."""
    _reset_peak_rss()
    _run_callbacks(callbacks, "gather", None)
    table = pa.concat_tables(pieces)
    table = table.take(pc.sort_indices(table, [("pos", "ascending")]))
    ids, tasks, S, X = _cand_arrays(table, meta)
    del table
    res = selector.select(budget, X, S, tasks, seed)
    return (ids[res.indices], res.gains, res.objective), _peak_rss_mb()


@ray.remote
def _lookup_task(scan: _Scan, unit: _Unit, positions: np.ndarray, callbacks):
    """row_id of the given pool positions inside one unit (Draw plans read nothing else)."""
    _run_callbacks(callbacks, "lookup", None)
    table = _read_unit(scan, unit, ["row_id"])
    return table.column("row_id").to_numpy(zero_copy_only=False)[positions - unit.pos0]


# ------------------------------------------------------------------------------------------------
# The driver side
# ------------------------------------------------------------------------------------------------


class _Distributed:
    def __init__(
        self,
        scan: _Scan,
        cfg: Config,
        budget: int,
        kappa: int | None,
        params: dict,
        progress: bool,
        callbacks: Sequence[Callback],
        chosen: np.ndarray | None = None,
    ):
        s = cfg.selection
        self.scan, self.budget, self.seed, self.name = scan, budget, s.seed, s.name
        self.progress, self.callbacks = progress, tuple(callbacks)
        # validates the parameters before any task runs; the rows chosen before travel with the selector
        selector = get_selector(s.name, **params).with_chosen(chosen)
        if selector.chosen is not None and selector.uses_chosen and selector.chosen.shape[1] != scan.dim:
            raise UserError(
                f"the chosen rows' embeddings have {selector.chosen.shape[1]} dimensions, {scan.emb_col!r} of "
                f"{scan.store.uri!r} has {scan.dim}: embed both with the same model and column"
            )
        self.plan = selector.distribution()
        if isinstance(self.plan, NotDistributable):
            raise UserError(self.plan.reason)
        self.m = self.plan.shards or s.shards
        self.kappa = kappa or self.plan.kappa
        self.opts = dict(
            num_cpus=s.cpus_per_task,
            max_retries=_MAX_RETRIES,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        )
        self.meta = {"emb_col": scan.emb_col, "dim": scan.dim, "score_cols": scan.score_cols}
        self.rss: list[float] = []
        for need in selector.score_names():
            if need not in scan.score_cols:
                raise UserError(
                    f"score column {need!r} is missing from {scan.store.uri!r}: available columns are "
                    f"{list(scan.score_cols)}; pass score=<one of them>"
                )

    # -- helpers --------------------------------------------------------------------------------
    def _get(self, refs: list, desc: str) -> list:
        """ray.get with a progress bar over finished tasks (results in submission order)."""
        if (self.progress or console.active() is not None) and len(refs) > 1:
            from tqdm.auto import tqdm

            pending = list(refs)
            with console.bar(len(refs), f"{desc} tasks") or tqdm(total=len(refs), desc=desc, leave=False) as bar:
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

    def _per_shard(self, task, *args, desc: str) -> list:
        """One `task` per shard: task(*args, j, callbacks, *pieces of shard j), results in shard order."""
        return self._get(
            [task.options(**self.opts).remote(*args, j, self.callbacks, *self.pieces[j]) for j in range(self.m)],
            desc,
        )

    def _table(self, ids, gains, summary: dict):
        self.pieces = None  # release the object store copy of the pool
        summary["max_task_rss_mb"] = round(max(self.rss), 1) if self.rss else None
        return _selection_table(ids, gains, self.name, shard_of(ids, self.m, self.seed)), summary

    # -- main -----------------------------------------------------------------------------------
    def run(self):
        plan = self.plan
        if isinstance(plan, Draw):
            return self._draw(plan)
        # every statistic the plan needs, computed while partitioning: the runner's own, and for PerTask
        # the inner selector's per task (its problems) and over the whole pool (the objective of all picks)
        wanted = {f"own:{k}": st for k, st in plan.selector.pool_statistics().items()}
        if isinstance(plan, PerTask):
            for k, st in plan.inner.pool_statistics().items():
                wanted[f"task:{k}"], wanted[f"pool:{k}"] = ByTask(st), st
        values = self._partition(wanted)
        if isinstance(plan, Gather):
            return self._gather(plan)

        def of(prefix):
            return {k.split(":", 1)[1]: v for k, v in values.items() if k.startswith(prefix + ":")}

        owner = self._bind(plan.selector, of("own"))
        plan = owner.distribution()  # asked again: a bound selector can say more (PerTask's quotas)
        if isinstance(plan, PerTask):
            return self._per_task(plan, of("task"), of("pool"))
        if not isinstance(plan, TwoRound):
            raise TypeError(f"selector {self.name!r}: unknown distribution {type(plan).__name__}")
        p = _Problem("all", owner, self.budget, self.kappa or self.budget, None, plan.exact)
        c = self._two_round([p])["all"]
        summary = {
            "shards": self.m,
            "kappa": p.kappa,
            "partition": "shard_of(row_id, m, seed)",
            **_objective_summary(owner, c["objective"]),
            "merged_objective": c["merged_objective"],
            "winner": c["winner"],
        }
        return self._table(c["ids"], c["gains"], summary)

    def _per_task(self, plan: PerTask, by_task: dict, pool: dict):
        quotas = plan.quotas(self.budget)
        problems = []
        for label, q in quotas.items():
            if q > 0:
                inner = self._bind(plan.inner, {k: v[label] for k, v in by_task.items()}, task=label)
                problems.append(_Problem(label, inner, int(q), self.kappa or int(q), label, inner.distribution().exact))
        chosen = self._two_round(problems)
        order = [p.key for p in problems]
        summary = {
            "shards": self.m,
            "kappa": self.kappa,
            "partition": "shard_of(row_id, m, seed)",
            "allocation": {k: int(chosen[k]["budget"]) for k in order},
            "objective": self._whole_pool_objective(self._bind(plan.inner, pool), chosen, order),
        }
        ids = np.concatenate([chosen[k]["ids"] for k in order])
        gains = np.concatenate([chosen[k]["gains"] for k in order])
        return self._table(ids, gains, summary)

    # -- partition map: pieces in the object store, statistics merged on the driver ------------
    def _partition(self, stats: dict) -> dict:
        m = self.m
        refs = [
            _partition_task.options(num_returns=m + 1, **self.opts).remote(self.scan, u, m, self.seed, stats, self.callbacks)
            for u in self.scan.units
        ]
        # refs[u][j] = unit u's piece of shard j (kept as refs), refs[u][m] = its partial statistics
        parts = self._get([r[m] for r in refs], "partition")
        self.pieces = [[r[j] for r in refs] for j in range(m)]
        return _merge_partials(stats, parts)

    def _bind(self, sel: Selector, values: Mapping[str, Any], task: str | None = None) -> Selector:
        """`sel` bound to the (task's) statistics, running a statistics map for those that need others first."""
        sel = sel.with_globals(values)
        for _ in range(MAX_STAT_PASSES):
            need = sel.unbound_statistics()
            if not need:
                return sel
            parts = self._per_shard(_statistics_task, need, self.meta, task, desc="statistics")
            more = _merge_partials(need, parts)
            if set(more) != set(need):  # only for a task without rows, which gets no problem
                raise RuntimeError(f"task {task!r} has no rows to compute {sorted(set(need) - set(more))} on")
            sel = sel.with_globals(more)
        raise RuntimeError(f"selector {self.name!r} keeps declaring unbound statistics: {sorted(need)}")

    # -- the two rounds and the whole-pool comparison -------------------------------------------
    def _two_round(self, problems: list[_Problem]) -> dict:
        m = self.m
        r1 = self._collect(self._per_shard(_round1_task, problems, self.meta, self.seed, desc="shard selection"))
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
        merged, rss = ray.get(_reduce_task.options(**self.opts).remote(problems, unions, self.meta, self.seed, self.callbacks))
        self.rss += [rss] if rss is not None else []

        to_eval = {}
        for p in problems:
            runs = list(local_runs[p.key])
            if merged[p.key] is not None:
                idx, gains = merged[p.key]
                runs.append(("merged", np.asarray(idx, np.int64), np.asarray(gains, np.float64)))
            if p.exact:  # the merged run is the answer (e.g. the top-B of the union of per-shard top-B)
                runs = [r for r in runs if r[0] == "merged"]
            if not runs:
                raise UserError(f"no shard or merged run reached budget={p.budget} for {p.key!r}: raise kappa or lower m={m}")
            to_eval[p.key] = runs

        # Each distinct set is evaluated once, in its first run's pick order. A run that picked the same
        # set in another order (with m = 1 the merged run re-picks the shard's set) then ties exactly
        # instead of winning by the last bits of a sum taken in another order.
        sets, which = {}, {}
        for p in problems:
            _, _, S_u, X_u = _cand_arrays(unions[p.key], self.meta)
            distinct: dict[bytes, int] = {}  # the set (sorted) -> its place in sets[p.key]
            sets[p.key], which[p.key] = [], []
            for _, idx, _ in to_eval[p.key]:
                key = np.sort(idx).tobytes()
                if key not in distinct:
                    distinct[key] = len(sets[p.key])
                    sets[p.key].append((X_u[idx], take_rows(S_u, idx)))
                which[p.key].append(distinct[key])
        set_values = self._evaluate(problems, sets)
        chosen = {}
        for p in problems:
            union, runs = unions[p.key], to_eval[p.key]
            vals = [set_values[p.key][k] for k in which[p.key]]
            best = None  # strict improvement only: ties go to the earliest shard, then merged (like greedi)
            for (label, idx, gains), val in zip(runs, vals):
                if best is None or (val > best[3] if p.selector.maximize else val < best[3]):
                    best = (label, idx, gains, val)
            label, idx, gains, val = best
            merged_val = next((v for (lab, _, _), v in zip(runs, vals) if lab == "merged"), None)
            chosen[p.key] = {
                "ids": union.column("row_id").to_numpy(zero_copy_only=False)[idx],
                "gains": gains,
                "budget": p.budget,
                "objective": _finite(val),
                "merged_objective": _finite(merged_val),
                "winner": label,
                "positions": union.column("pos").to_numpy()[idx],
            }
        return chosen

    def _evaluate(self, problems: list[_Problem], sets: dict) -> dict:
        """Whole-(sub)pool objective of every set: `combine` of the shards' parts plus the chosen rows' part.

        Selectors whose objective reads only the chosen rows (combine None) need no map at all."""
        mapped = [p for p in problems if p.selector.combine is not None]
        parts = []
        if mapped:
            sets_ref = ray.put({p.key: sets[p.key] for p in mapped})
            parts = self._collect(self._per_shard(_evaluate_task, mapped, sets_ref, self.meta, desc="objective"))
        values = {}
        for p in problems:
            vals = []
            for r, (X_set, S_set) in enumerate(sets[p.key]):
                v = 0.0
                if p.selector.combine is not None:
                    v = _COMBINE[p.selector.combine](part[p.key][r] for part in parts if part[p.key] is not None)
                vals.append(float(v + p.selector.chosen_objective(X_set, S_set)))
            values[p.key] = vals
        return values

    def _whole_pool_objective(self, sel: Selector, chosen: dict, order: list[str]) -> float | None:
        """The objective of all picks on the whole pool (PerTask): the picks' rows come back from the
        shard pieces, so the driver holds O(budget * d); then one evaluation map."""
        positions = np.sort(np.concatenate([chosen[k]["positions"] for k in order]))
        got = self._per_shard(_gather_task, self.meta, positions, desc="gather picks")
        in_pool_order = np.argsort(np.concatenate([pos for pos, _, _ in got]), kind="stable")
        X_set = np.concatenate([x for _, x, _ in got])[in_pool_order]
        S_set = {c: np.concatenate([s[c] for _, _, s in got])[in_pool_order] for c in self.meta["score_cols"]}
        p = _Problem("pool", sel, len(positions), len(positions), None, False)
        return _finite(self._evaluate([p], {"pool": [(X_set, S_set)]})["pool"][0])

    # -- Gather: the default for a selector without a distributed form ---------------------------
    def _gather(self, plan: Gather):
        all_pieces = [ref for shard in self.pieces for ref in shard]
        (ids, gains, objective), rss = ray.get(
            _select_gathered_task.options(**self.opts).remote(
                plan.selector, self.budget, self.meta, self.seed, self.callbacks, *all_pieces
            )
        )
        self.rss += [rss] if rss is not None else []
        summary = {"shards": self.m, "plan": "gather", **_objective_summary(plan.selector, objective)}
        return self._table(ids, gains, summary)

    # -- Draw: positions from the pool size, then a row_id lookup ---------------------------------
    def _draw(self, plan: Draw):
        res = plan.draw(self.scan.rows, self.budget, self.seed)
        order = np.argsort(res.indices, kind="stable")
        pos_sorted = res.indices[order]
        refs, spans = [], []
        for u in self.scan.units:
            lo, hi = np.searchsorted(pos_sorted, [u.pos0, u.pos0 + u.rows])
            if hi > lo:
                refs.append(_lookup_task.options(**self.opts).remote(self.scan, u, pos_sorted[lo:hi], self.callbacks))
                spans.append((lo, hi))
        ids_sorted = np.empty(len(pos_sorted), dtype=object)
        for (lo, hi), ids in zip(spans, self._get(refs, "lookup")):
            ids_sorted[lo:hi] = ids
        ids = np.empty_like(ids_sorted)
        ids[order] = ids_sorted
        return _selection_table(ids, res.gains, self.name, shard_of(ids, self.m, self.seed)), {
            "shards": self.m,
            **_objective_summary(plan.selector, res.objective),
        }
