"""Writing rows as they stream in: rolling Parquet parts, held-out parts and quarantine lines.

:class:`PartWriter` rolls ``part-<prefix><k>.parquet`` files over every ``rows_per_part`` rows and
flushes every :data:`FLUSH_ROWS` rows (one row group), so memory stays bounded whatever the pool
size. :class:`Sink` is one ingest worker's output: it maps each record (the source's
:class:`~edsft.pools.records.RecordMapping`), sends rows to the pool or, by a seeded hash of
their row_id, to the held-out eval parts, and bad records to a quarantine stream. Everything but
the pool parts goes to ``_ingest_tmp/`` in the run folder, merged and removed by the finalise pass.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Store
from .records import SCHEMA, Bad, RecordMapping

__all__ = ["STAGING", "FLUSH_ROWS", "PartWriter", "Sink", "quarantine_line"]

FLUSH_ROWS = 8192  # rows buffered before a write (one row group); bounds memory per writer
STAGING = "_ingest_tmp"  # per-run scratch folder, removed at the end


def quarantine_line(rec: dict) -> bytes:
    """One JSON line; a lone surrogate in a generated string is escaped, not an encoding error."""
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8", errors="backslashreplace")


class PartWriter:
    """Rows -> part-<prefix><k>.parquet files of at most ``rows_per_part`` rows, written incrementally."""

    def __init__(self, folder: Store, prefix: str, rows_per_part: int):
        self.folder, self.prefix, self.rows_per_part = folder, prefix, rows_per_part
        self.cols: dict[str, list] = {n: [] for n in SCHEMA.names}
        self.files: list[str] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_part = 0  # rows written to the open part
        self.rows = 0

    def add(self, row_id: str, prompt: str, response, task, source: str, line: int, context: str | None = None) -> None:
        c = self.cols
        c["row_id"].append(row_id)
        c["prompt"].append(prompt)
        c["response"].append(response)
        c["task"].append(task)
        c["source"].append(source)
        c["line"].append(line)
        c["context"].append(context)
        self.rows += 1
        if len(c["row_id"]) >= FLUSH_ROWS or self.in_part + len(c["row_id"]) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        n = len(self.cols["row_id"])
        if not n:
            return
        table = pa.Table.from_pydict(self.cols, schema=SCHEMA)
        self.cols = {k: [] for k in SCHEMA.names}
        start = 0
        while start < n:  # split across the part boundary when needed
            if self.writer is None:
                path = self.folder.child(f"part-{self.prefix}{len(self.files):05d}.parquet").path
                self.folder.fs.create_dir(self.folder.path, recursive=True)
                self.writer = pq.ParquetWriter(path, SCHEMA, filesystem=self.folder.fs)
                self.files.append(path)
                self.in_part = 0
            take = min(n - start, self.rows_per_part - self.in_part)
            self.writer.write_table(table.slice(start, take))
            self.in_part += take
            start += take
            if self.in_part >= self.rows_per_part:
                self.writer.close()
                self.writer = None

    def close(self) -> list[str]:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.files


class Sink:
    """Where one ingest worker puts its rows: pool parts, held-out parts and quarantine lines.

    ``hold_out`` is the share of rows sent to the held-out parts (``pool.eval_fraction``), chosen
    by a hash of ``seed`` and the row_id: the same row is held out in every run and every worker.
    """

    def __init__(
        self,
        run: Store,
        prefix: str,
        split: str,
        rows_per_part: int,
        hold_out: float = 0.0,
        seed: int = 0,
        pool_folder: Store | None = None,
        bar=None,
    ):
        self.split = split
        self.pool = PartWriter(pool_folder or run.child("pool.parquet"), prefix, rows_per_part)
        self.held = PartWriter(run.child(STAGING, "heldout"), prefix, rows_per_part)
        self.hold_out = hold_out
        self.seed = seed
        self.qstore = run.child(STAGING, f"quarantine-{split}-{prefix}.jsonl")
        self.qstore._mkparent()
        self._q = self.qstore.fs.open_output_stream(self.qstore.path)
        self.read = 0
        self.by_reason: Counter = Counter()
        self.unreadable: list[dict] = []
        self.bar = bar
        self._pending = 0

    def _held_out(self, row_id: str) -> bool:
        h = hashlib.blake2b(f"{self.seed}\x1f{row_id}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64 < self.hold_out

    def bad(self, source: str, line: int, b: Bad) -> None:
        self.by_reason[b.reason] += 1
        if b.reason == "unreadable_file":
            self.unreadable.append({"path": source, "line": line, "detail": b.detail})
        rec = {"split": self.split, "source": source, "line": line, "reason": b.reason, "detail": b.detail, "raw": b.raw}
        self._q.write(quarantine_line(rec))

    def consume(self, source: str, records: Iterable[tuple[int, Any]], mapping: RecordMapping) -> None:
        """Map and route every record of one input (``source`` is its origin)."""
        for line, rec in records:
            self.read += 1
            out = rec if isinstance(rec, Bad) else mapping.map(rec)
            if isinstance(out, Bad):
                self.bad(source, line, out)
            else:
                row_id, prompt, response, task, *context = out  # context: conversations only
                target = self.held if self.hold_out and self._held_out(row_id) else self.pool
                target.add(row_id, prompt, response, task, source, line, *context)
            self._pending += 1
            if self.bar is not None and self._pending >= 4096:
                self.bar.update(self._pending)
                self._pending = 0

    def close(self) -> dict:
        if self.bar is not None and self._pending:
            self.bar.update(self._pending)
            self._pending = 0
        self._q.close()
        return {
            "rows_read": self.read,
            "rows_kept": self.pool.rows,
            "rows_held_out": self.held.rows,
            "quarantine_by_reason": dict(self.by_reason),
            "unreadable_files": self.unreadable,
            "parts": self.pool.close(),
            "held_parts": self.held.close(),
            "quarantine": self.qstore.path,
        }
