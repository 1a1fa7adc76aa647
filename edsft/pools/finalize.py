"""The finalise pass, after every input is written: duplicates, eval.parquet, quarantine.jsonl, checks.

Duplicates need one pass over the row_id column only (an Arrow group-by), across all parts of
all workers; parts holding a dropped row are rewritten. Then the held-out and eval parts become
``eval.parquet`` (eval rows whose id is also in the pool are quarantined as ``eval_overlap``), the
staged quarantine streams become ``quarantine.jsonl``, and the bad-fraction check runs.

:func:`ingest_outputs` brackets a whole ingest: old outputs are removed first, and a failed
ingest removes what it wrote (``pool.parquet/``, ``eval.parquet``, ``_ingest_tmp/``), so no
later stage can mistake a half-written or rejected pool for a finished one. A :class:`PoolError`
keeps ``quarantine.jsonl``: it is complete by then, and the error message points to it.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import Config
from ..storage import Store
from .records import SCHEMA, PoolError
from .sources import Listing
from .writer import STAGING, quarantine_line

__all__ = ["finalize", "merge_results", "prepare_run", "discard_outputs", "ingest_outputs"]

log = logging.getLogger(__name__)

OUTPUTS = ("pool.parquet", "eval.parquet", "quarantine.jsonl", STAGING)


def _read_ids(fs: pafs.FileSystem, parts: list[str]) -> tuple[pa.Array, list[int]]:
    arrays, sizes = [], []
    for p in parts:
        col = pq.read_table(p, columns=["row_id"], filesystem=fs).column("row_id")
        arrays.extend(col.chunks)
        sizes.append(len(col))
    ids = pa.chunked_array(arrays, type=pa.string()).combine_chunks() if arrays else pa.array([], pa.string())
    return ids, sizes


def _dedupe(fs: pafs.FileSystem, parts: list[str], split: str, exclude: pa.Array | None = None) -> tuple[list[dict], pa.Array]:
    """Drop later copies of a row_id (and rows whose id is in ``exclude``) from ``parts`` in place.

    Returns the quarantine records of the dropped rows and the kept ids. The check reads only the
    row_id column (an Arrow group-by: min index per id = the copy that is kept); only parts that
    hold a dropped row, or the kept copy of a duplicated id (for the message), are read whole.
    """
    ids, sizes = _read_ids(fs, parts)
    n = len(ids)
    if n == 0:
        return [], ids
    idx = pa.array(range(n), pa.int64())
    groups = pa.table({"row_id": ids, "i": idx}).group_by("row_id", use_threads=False).aggregate([("i", "min"), ("i", "count")])
    dup_groups = groups.filter(pc.greater(groups.column("i_count"), 1))
    keep = pc.is_in(idx, value_set=groups.column("i_min")) if dup_groups.num_rows else pa.array([True] * n)
    overlap = pc.is_in(ids, value_set=exclude) if exclude is not None and len(exclude) else None
    if overlap is not None:
        keep = pc.and_(keep, pc.invert(overlap))
    if pc.all(keep).as_py():
        return [], ids
    first_of = dict(zip(dup_groups.column("row_id").to_pylist(), dup_groups.column("i_min").to_pylist()))
    need = sorted(first_of.values())
    where: dict[int, str] = {}  # index of a kept copy -> "source:line"
    records: list[dict] = []
    lo = 0
    for part, size in zip(parts, sizes):
        hi = lo + size
        mask = keep.slice(lo, size)
        want = need[bisect.bisect_left(need, lo) : bisect.bisect_left(need, hi)]
        if want or not pc.all(mask).as_py():
            table = pq.read_table(part, filesystem=fs)
            src, line = table.column("source"), table.column("line")
            for i in want:
                where[i] = f"{src[i - lo].as_py()}:{line[i - lo].as_py()}"
            if not pc.all(mask).as_py():
                drop = pc.invert(mask)
                gone = table.filter(drop)
                over = overlap.slice(lo, size).filter(drop).to_pylist() if overlap is not None else [False] * gone.num_rows
                for rid, s, ln, o in zip(
                    gone.column("row_id").to_pylist(), gone.column("source").to_pylist(), gone.column("line").to_pylist(), over
                ):
                    if o:
                        records.append(
                            {
                                "split": split,
                                "source": s,
                                "line": ln,
                                "reason": "eval_overlap",
                                "detail": f"row_id {rid} is also in the pool",
                                "raw": "",
                            }
                        )
                    else:
                        records.append(
                            {"split": split, "source": s, "line": ln, "reason": "duplicate_id", "detail": rid, "raw": ""}
                        )
                pq.write_table(table.filter(mask), part, filesystem=fs)
        lo = hi
    for r in records:
        if r["reason"] == "duplicate_id":
            rid = r["detail"]
            r["detail"] = f"row_id {rid} already kept (first at {where[first_of[rid]]})"
    return records, pc.filter(ids, keep)


def _concat_parts(fs: pafs.FileSystem, parts: list[str], dest: Store) -> int:
    """Stream parts into one Parquet file (eval.parquet); writes an empty file when there are none."""
    dest._mkparent()
    n = 0
    with pq.ParquetWriter(dest.path, SCHEMA, filesystem=dest.fs) as w:
        for p in parts:
            t = pq.read_table(p, filesystem=fs)
            w.write_table(t.cast(SCHEMA))
            n += t.num_rows
    return n


def _task_counts(fs: pafs.FileSystem, parts: list[str]) -> dict[str, int]:
    counts: Counter = Counter()
    for p in parts:
        vc = pc.value_counts(pq.read_table(p, columns=["task"], filesystem=fs).column("task"))
        for item in vc.to_pylist():
            counts[item["values"] if item["values"] is not None else "<none>"] += item["counts"]
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _merge_quarantine(run: Store, staged: list[str], extra: list[dict]) -> Store:
    q = run.child("quarantine.jsonl")
    q._mkparent()
    with q.fs.open_output_stream(q.path) as out:
        for path in staged:
            with run.fs.open_input_stream(path) as f:
                while True:
                    buf = f.read(1 << 22)
                    if not buf:
                        break
                    out.write(buf)
        for r in extra:
            out.write(quarantine_line(r))
    return q


def merge_results(results: list[dict]) -> dict:
    """The sum of several :meth:`Sink.close` results (in input order)."""
    total = {
        "rows_read": 0,
        "rows_kept": 0,
        "rows_held_out": 0,
        "quarantine_by_reason": Counter(),
        "unreadable_files": [],
        "parts": [],
        "held_parts": [],
        "quarantine": [],
    }
    for r in results:
        for k in ("rows_read", "rows_kept", "rows_held_out"):
            total[k] += r[k]
        total["quarantine_by_reason"].update(r["quarantine_by_reason"])
        for k in ("unreadable_files", "parts", "held_parts"):
            total[k] += r[k]
        total["quarantine"].append(r["quarantine"])
    return total


def finalize(cfg: Config, run: Store, pool_results: list[dict], eval_result: dict, t0: float, listing: Listing) -> dict:
    """Global duplicate-id pass, eval.parquet, quarantine.jsonl, the bad-fraction check, the summary."""
    fs = run.fs
    pool = merge_results(pool_results)
    dup_records, pool_ids = _dedupe(fs, pool["parts"], "pool")
    pool["rows_kept"] -= len(dup_records)
    pool["quarantine_by_reason"].update(r["reason"] for r in dup_records)

    # Eval: held-out rows (eval_fraction) or the eval split; within-eval duplicates and rows that
    # also sit in the pool are quarantined (split="eval"), so the eval never leaks into training.
    held_records, _ = _dedupe(fs, pool["held_parts"], "pool")  # same row_id -> same side: pool-level dups
    pool["rows_held_out"] -= len(held_records)
    pool["quarantine_by_reason"].update(r["reason"] for r in held_records)
    eval_parts = pool["held_parts"] + eval_result["parts"]
    eval_records, _ = _dedupe(fs, eval_result["parts"], "eval", exclude=pool_ids)
    eval_rows = _concat_parts(fs, eval_parts, run.child("eval.parquet"))

    qstore = _merge_quarantine(run, pool["quarantine"] + eval_result["quarantine"], dup_records + held_records + eval_records)
    run.child(STAGING).remove()

    by_reason = dict(sorted(pool["quarantine_by_reason"].items(), key=lambda kv: (-kv[1], kv[0])))
    quarantined = sum(by_reason.values())
    eval_by_reason = Counter(eval_result["quarantine_by_reason"])
    eval_by_reason.update(r["reason"] for r in eval_records)
    summary = {
        "rows_read": pool["rows_read"],
        "rows_kept": pool["rows_kept"],
        "rows_held_out": pool["rows_held_out"],
        "rows_quarantined": quarantined,
        "quarantine_by_reason": by_reason,
        "eval_rows": eval_rows,
        "eval_rows_read": eval_result["rows_read"],
        "eval_quarantined": sum(eval_by_reason.values()),
        "eval_quarantine_by_reason": dict(eval_by_reason),
        "tasks": _task_counts(fs, pool["parts"]),
        "parts": len(pool["parts"]),
        "quarantine_path": qstore.uri,
        "wall_s": round(time.perf_counter() - t0, 3),
        "files": [i.origin for i in listing.inputs],
        "skipped_files": [{"path": s.path, "reason": s.reason} for s in listing.skipped],
        "unreadable_files": pool["unreadable_files"] + eval_result["unreadable_files"],
    }
    # The invariant every later stage relies on; a failure here is a bug in this package.
    if summary["rows_read"] != summary["rows_kept"] + summary["rows_held_out"] + quarantined:
        raise RuntimeError(f"ingest lost rows: {summary}")
    check_bad_fraction(cfg, summary)
    if eval_rows == 0:
        log.warning("ingest: no eval rows; set pool.eval_path or pool.eval_fraction to evaluate on held-out prompts")
    return summary


def check_bad_fraction(cfg: Config, s: dict) -> None:
    limit = cfg.pool.max_bad_fraction
    skipped = f"; {len(s['skipped_files'])} file(s) were skipped (see skipped_files in the summary)" if s["skipped_files"] else ""
    if s["rows_read"] == 0:
        raise PoolError(f"pool.path={cfg.pool.path!r} holds no rows: check the path and pool.format{skipped}")
    frac = s["rows_quarantined"] / s["rows_read"]
    if frac > limit or s["rows_kept"] == 0:
        top = ", ".join(f"{r}={c}" for r, c in list(s["quarantine_by_reason"].items())[:3])
        damaged = "".join(f"; {u['detail']}" for u in s["unreadable_files"][:3])
        raise PoolError(
            f"{s['rows_quarantined']} of {s['rows_read']} rows ({frac:.1%}) of pool.path={cfg.pool.path!r} are bad, "
            f"more than pool.max_bad_fraction={limit:g} (top reasons: {top}){damaged}; see {s['quarantine_path']} "
            f"for the source, line and reason of each, fix the pool or the field mapping "
            f"(pool.prompt_field={cfg.pool.prompt_field!r}, pool.response_field={cfg.pool.response_field!r}), "
            f"or raise pool.max_bad_fraction"
        )


def discard_outputs(run: Store, keep_quarantine: bool = False) -> None:
    """Remove what a failed ingest wrote (the quarantine too, unless it explains the failure)."""
    for name in OUTPUTS:
        if not (keep_quarantine and name == "quarantine.jsonl"):
            run.child(name).remove()


def prepare_run(run: Store) -> None:
    """Remove outputs of an earlier ingestion so stale parts never mix with new ones."""
    discard_outputs(run)


@contextmanager
def ingest_outputs(run: Store) -> Iterator[None]:
    """Old outputs removed before, this ingest's removed if it fails (see the module docstring)."""
    prepare_run(run)
    try:
        yield
    except BaseException as e:
        discard_outputs(run, keep_quarantine=isinstance(e, PoolError))
        raise
