"""Pool ingestion: any JSONL / JSON / Parquet pool (local, glob, folder, s3://) or a built-in pool
-> ``pool.parquet/`` parts, ``eval.parquet`` and ``quarantine.jsonl`` in the run folder.

Streaming and bounded memory: JSONL is read line by line, Parquet by record batches, and rows go
out through ParquetWriters in parts of ``pool.rows_per_shard`` rows. JSON *arrays* are the one
exception: a ``.json`` file is parsed whole (``json.loads``), one file at a time - shard big pools
as JSONL or Parquet. (A ``.json`` file that is really JSON Lines is detected and streamed.)

Bad rows never stop the run and are never dropped silently. Each goes to ``quarantine.jsonl`` as
``{"split", "source", "line", "reason", "detail", "raw"}`` where ``line`` is the 1-based line
for JSONL and the 0-based row index for Parquet, JSON arrays and built-in pools. Reasons:

    malformed_json   the line / file is not valid JSON
    not_utf8         the bytes are not UTF-8
    wrong_type       the record is not an object, or a field has the wrong type
    empty_prompt     the prompt field is missing, null or blank
    missing_id       pool.id_field is set but the record has no id
    prompt_too_long  the prompt is longer than pool.max_prompt_chars
    duplicate_id     a row_id seen before (first kept); with content-hash ids an exact duplicate
    eval_overlap     an eval row whose row_id is also in the pool (would leak into training)

Invariant (tested): ``rows_read == rows_kept + rows_held_out + rows_quarantined`` where
``rows_held_out`` is only non-zero with ``pool.eval_fraction`` (rows moved to eval.parquet).
Blank lines of JSONL files are not rows. Duplicates need one pass over the row_id column only
(Arrow group-by), after all files are written; parts holding a duplicate are rewritten.

No torch, no ray: the Ray version (``edsft.distributed.ingest``) runs :func:`ingest_source`
once per file in Ray tasks and then the same :func:`finalize`.
"""

from __future__ import annotations

import bisect
import fnmatch
import glob as _glob
import hashlib
import io
import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import Config, PoolConfig
from ..errors import UserError
from ..storage import Store, get_store, is_remote

__all__ = [
    "PoolError",
    "SCHEMA",
    "REASONS",
    "Source",
    "ingest_pool",
    "resolve_sources",
    "ingest_source",
    "finalize",
    "content_row_id",
]

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
    ]
)
REASONS = (
    "malformed_json",
    "not_utf8",
    "wrong_type",
    "empty_prompt",
    "missing_id",
    "prompt_too_long",
    "duplicate_id",
    "eval_overlap",
)
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_FLUSH_ROWS = 8192  # rows buffered before a write (one row group); bounds memory per writer
_STAGING = "_ingest_tmp"  # per-run scratch folder, removed at the end
_RAW_CHARS = 200  # how much of a bad line the quarantine keeps


class PoolError(UserError):
    """A pool that cannot be ingested (no files, unknown format, too many bad rows). CLI: exit 2."""


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input file: ``uri`` is a local absolute path or ``s3://bucket/key``; ``fmt`` its format."""

    uri: str
    fmt: str


def _format_of(name: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    base = name.lower()
    for ext in _COMPRESSED:
        if base.endswith(ext):
            base = base[: -len(ext)]
    return _EXTENSIONS.get(posixpath.splitext(base)[1])


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/") if part)


def resolve_sources(path: str, fmt: str = "auto", endpoint_url: str | None = None, region: str | None = None) -> list[Source]:
    """The files of a pool path: a file, a glob, a folder (recursive) or an s3:// prefix; sorted."""
    has_glob = any(c in path for c in "*?[")
    if has_glob:
        if is_remote(path):
            # List below the longest glob-free prefix, then match the full key pattern.
            head = path[: min(path.index(c) for c in "*?[" if c in path)]
            base = get_store(head.rsplit("/", 1)[0], endpoint_url, region)
            pattern = path[len("s3://"):]
            infos = base.fs.get_file_info(pafs.FileSelector(base.path, recursive=True, allow_not_found=True))
            files = sorted("s3://" + i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern))
        else:
            files = sorted(str(Path(p).absolute()) for p in _glob.glob(str(Path(path).expanduser()), recursive=True) if Path(p).is_file())
        kind = f"glob {path!r}"
    else:
        store = get_store(path, endpoint_url, region)
        info = store.fs.get_file_info(store.path)
        if info.type == pafs.FileType.File:
            files = [store.uri]
        elif info.type == pafs.FileType.Directory:
            infos = store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True))
            rel = [(i.path, posixpath.relpath(i.path, store.path)) for i in infos if i.type == pafs.FileType.File]
            files = sorted(("s3://" + p if is_remote(path) else p) for p, r in rel if not _hidden(r))
        else:
            raise PoolError(f"pool.path={path!r} does not exist: point it at a file, glob, folder or s3:// prefix")
        kind = f"folder {path!r}" if info.type == pafs.FileType.Directory else f"file {path!r}"
    sources, unknown = [], []
    for f in files:
        f_fmt = _format_of(f, fmt)
        if f_fmt is None:
            unknown.append(f)
        else:
            sources.append(Source(f, f_fmt))
    if unknown and (len(files) == 1 or not has_glob and kind.startswith("file")):
        raise PoolError(
            f"cannot tell the format of {unknown[0]!r} from its extension: set pool.format to jsonl, json or parquet"
        )
    if unknown:
        log.warning("pool: skipping %d files with unknown extensions (e.g. %s); set pool.format to read them", len(unknown), unknown[0])
    if not sources:
        raise PoolError(f"{kind} holds no .jsonl/.json/.parquet files: check pool.path (and pool.format)")
    return sources


# ------------------------------------------------------------------------------------------------
# Reading records: (line, record) or (line, _Bad) - never raises on bad content
# ------------------------------------------------------------------------------------------------


@dataclass
class _Bad:
    reason: str
    detail: str
    raw: str = ""


def _snip(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: _RAW_CHARS * 4].decode("utf-8", errors="replace")
    return raw[:_RAW_CHARS]


def _jsonl_lines(lines: Iterator[bytes], first_line: int = 1) -> Iterator[tuple[int, Any]]:
    for lineno, raw in enumerate(lines, start=first_line):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
            raw = raw[3:]
        if not raw.strip():
            continue  # blank lines are not rows
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, _Bad("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8", _snip(raw))
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, _Bad("malformed_json", f"{e.msg} at column {e.colno}", _snip(text))


def iter_records(src: Source, endpoint_url: str | None = None, region: str | None = None) -> Iterator[tuple[int, Any]]:
    """The records of one file, streamed (see the module docstring for line numbering)."""
    store = get_store(src.uri, endpoint_url, region)
    if src.fmt == "jsonl":
        with store.fs.open_input_stream(store.path) as f:  # compression detected from the extension
            yield from _jsonl_lines(io.BufferedReader(f, 1 << 20))
    elif src.fmt == "json":
        with store.fs.open_input_stream(store.path) as f:
            data = f.read()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield 0, _Bad("not_utf8", f"the file is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})", _snip(data[: e.start]))
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
                yield from _jsonl_lines(iter(data.splitlines(keepends=True)))
                return
            yield 0, _Bad("malformed_json", f"the file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", _snip(text))
            return
        if not isinstance(obj, list):
            yield 0, _Bad("wrong_type", f"a .json pool must hold an array of objects, got {type(obj).__name__}", _snip(text))
            return
        for i, rec in enumerate(obj):
            yield i, rec
    elif src.fmt == "parquet":
        with store.fs.open_input_file(store.path) as f:
            pf = pq.ParquetFile(f)
            i = 0
            for batch in pf.iter_batches(batch_size=_FLUSH_ROWS):
                for rec in batch.to_pylist():
                    yield i, rec
                    i += 1
    else:  # guarded by config validation
        raise PoolError(f"pool.format={src.fmt!r} is not one of jsonl, json, parquet")


# ------------------------------------------------------------------------------------------------
# Mapping and validating one record
# ------------------------------------------------------------------------------------------------


def content_row_id(prompt: str, response: str | None) -> str:
    """Stable id of a row without an id field: the same content gives the same id everywhere."""
    blob = prompt + "\x1f" + (response if response is not None else "")
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=8).hexdigest()


@dataclass(frozen=True)
class _Fields:
    prompt: str
    input: str | None
    response: str | None
    task: str | None
    id: str | None
    max_prompt_chars: int

    @classmethod
    def from_pool(cls, p: PoolConfig, builtin: bool = False) -> "_Fields":
        if builtin:  # built-in pools have fixed columns whatever the field mapping says
            return cls("instruction", "input", "output", "task", None, p.max_prompt_chars)
        return cls(p.prompt_field, p.input_field or None, p.response_field or None, p.task_field or None, p.id_field or None, p.max_prompt_chars)


def _as_text(value: Any) -> str | None:
    """Strings stay, numbers become text (answers like 42 are common), anything else is None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError handled by the caller
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _optional_text(rec: dict, field: str | None) -> "str | None | _Bad":
    """An optional text field (response, task): absent or null is None, a wrong type is bad."""
    if not field:
        return None
    raw = rec.get(field)
    text = _as_text(raw)
    if raw is not None and text is None:
        return _Bad("wrong_type", f"field {field!r} must be a string, number or null, got {type(raw).__name__}")
    return text


def map_record(rec: Any, f: _Fields) -> tuple | _Bad:
    """A raw record -> (row_id, prompt, response, task) or the reason it is bad."""
    if not isinstance(rec, dict):
        return _Bad("wrong_type", f"a row must be a JSON object, got {type(rec).__name__}", _snip(json.dumps(rec, default=str)))
    try:
        prompt = rec.get(f.prompt)
        if prompt is None:
            return _Bad("empty_prompt", f"field {f.prompt!r} is missing or null (set pool.prompt_field)")
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        if not isinstance(prompt, str):
            return _Bad("wrong_type", f"field {f.prompt!r} must be a string, got {type(prompt).__name__}")
        if f.input:
            extra = rec.get(f.input)
            if isinstance(extra, bytes):
                extra = extra.decode("utf-8")
            if extra is not None and not isinstance(extra, str):
                return _Bad("wrong_type", f"field {f.input!r} must be a string or null, got {type(extra).__name__}")
            if extra and extra.strip():
                prompt = f"{prompt}\n\n{extra}" if prompt.strip() else extra
        if not prompt.strip():
            return _Bad("empty_prompt", f"field {f.prompt!r} is empty")
        if len(prompt) > f.max_prompt_chars:
            return _Bad("prompt_too_long", f"prompt has {len(prompt)} characters > pool.max_prompt_chars={f.max_prompt_chars}")
        response = _optional_text(rec, f.response)
        if isinstance(response, _Bad):
            return response
        task = _optional_text(rec, f.task)
        if isinstance(task, _Bad):
            return task
        if f.id:
            raw = rec.get(f.id)
            if raw is None or raw == "":
                return _Bad("missing_id", f"field {f.id!r} (pool.id_field) is missing or empty")
            if isinstance(raw, float) or not isinstance(raw, (str, int)) or isinstance(raw, bool):
                return _Bad("wrong_type", f"field {f.id!r} must be a string or an integer, got {type(raw).__name__}")
            row_id = str(raw)
        else:
            row_id = content_row_id(prompt, response)
    except UnicodeDecodeError as e:
        return _Bad("not_utf8", f"a field holds bytes that are not UTF-8: {e.reason}")
    return row_id, prompt, response, task


# ------------------------------------------------------------------------------------------------
# Writing: rolling Parquet parts + a quarantine stream, per sink
# ------------------------------------------------------------------------------------------------


class _Parts:
    """Rows -> part-<prefix><k>.parquet files of at most ``rows_per_part`` rows, written incrementally."""

    def __init__(self, folder: Store, prefix: str, rows_per_part: int):
        self.folder, self.prefix, self.rows_per_part = folder, prefix, rows_per_part
        self.cols: dict[str, list] = {n: [] for n in SCHEMA.names}
        self.files: list[str] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_part = 0  # rows written to the open part
        self.rows = 0

    def add(self, row_id: str, prompt: str, response, task, source: str, line: int) -> None:
        c = self.cols
        c["row_id"].append(row_id)
        c["prompt"].append(prompt)
        c["response"].append(response)
        c["task"].append(task)
        c["source"].append(source)
        c["line"].append(line)
        self.rows += 1
        if len(c["row_id"]) >= _FLUSH_ROWS or self.in_part + len(c["row_id"]) >= self.rows_per_part:
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
    """Where one ingestion worker puts its rows: pool parts, held-out parts and quarantine lines."""

    def __init__(self, cfg: Config, run: Store, prefix: str, split: str = "pool", pool_folder: Store | None = None, bar=None):
        p = cfg.pool
        self.split = split
        self.pool = _Parts(pool_folder or run.child("pool.parquet"), prefix, p.rows_per_shard)
        self.held = _Parts(run.child(_STAGING, "heldout"), prefix, p.rows_per_shard)
        self.eval_fraction = p.eval_fraction if (split == "pool" and not p.eval_path and not p.path.startswith("builtin:")) else 0.0
        self.seed = p.seed
        self.qstore = run.child(_STAGING, f"quarantine-{split}-{prefix}.jsonl")
        self.qstore._mkparent()
        self._q = self.qstore.fs.open_output_stream(self.qstore.path)
        self.read = 0
        self.by_reason: Counter = Counter()
        self.bar = bar
        self._pending = 0

    def _held_out(self, row_id: str) -> bool:
        h = hashlib.blake2b(f"{self.seed}\x1f{row_id}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64 < self.eval_fraction

    def bad(self, source: str, line: int, b: _Bad) -> None:
        self.by_reason[b.reason] += 1
        rec = {"split": self.split, "source": source, "line": line, "reason": b.reason, "detail": b.detail, "raw": b.raw}
        self._q.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))

    def consume(self, source: str, records, fields: _Fields) -> None:
        for line, rec in records:
            self.read += 1
            out = rec if isinstance(rec, _Bad) else map_record(rec, fields)
            if isinstance(out, _Bad):
                self.bad(source, line, out)
            else:
                row_id, prompt, response, task = out
                target = self.held if self.eval_fraction and self._held_out(row_id) else self.pool
                target.add(row_id, prompt, response, task, source, line)
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
            "parts": self.pool.close(),
            "held_parts": self.held.close(),
            "quarantine": self.qstore.path,
        }


def ingest_source(cfg: Config, run: Store, src: Source, prefix: str, split: str = "pool", pool_folder: Store | None = None, bar=None) -> dict:
    """Parse one file into its own parts (the unit of work of the Ray version)."""
    sink = Sink(cfg, run, prefix, split, pool_folder, bar)
    sink.consume(src.uri, iter_records(src, cfg.storage.endpoint_url, cfg.storage.region), _Fields.from_pool(cfg.pool))
    return sink.close()


# ------------------------------------------------------------------------------------------------
# Built-in pools
# ------------------------------------------------------------------------------------------------


def _builtin_chunks(cfg: Config, split: str) -> Iterator[list[dict]]:
    if cfg.pool.path == "builtin:tasks":
        from .builtin_tasks import iter_tasks

        n = cfg.pool.size if split == "train" else cfg.pool.eval_size
        yield from iter_tasks(n, seed=cfg.pool.seed, split=split)
    else:
        from .builtin_pydocs import iter_pydocs

        rows = [r for chunk in iter_pydocs(split) for r in chunk]
        if split == "eval":
            rows = rows[: cfg.pool.eval_size]
        yield rows


def _builtin_records(cfg: Config, split: str) -> Iterator[tuple[int, dict]]:
    i = 0
    for chunk in _builtin_chunks(cfg, split):
        for rec in chunk:
            yield i, rec
            i += 1


# ------------------------------------------------------------------------------------------------
# The global pass: duplicates, eval, quarantine merge, checks
# ------------------------------------------------------------------------------------------------


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
                for rid, s, ln, o in zip(gone.column("row_id").to_pylist(), gone.column("source").to_pylist(), gone.column("line").to_pylist(), over):
                    if o:
                        records.append({"split": split, "source": s, "line": ln, "reason": "eval_overlap", "detail": f"row_id {rid} is also in the pool", "raw": ""})
                    else:
                        records.append({"split": split, "source": s, "line": ln, "reason": "duplicate_id", "detail": rid, "raw": ""})
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
            out.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return q


def _merge_results(results: list[dict]) -> dict:
    total = {"rows_read": 0, "rows_kept": 0, "rows_held_out": 0, "quarantine_by_reason": Counter(), "parts": [], "held_parts": [], "quarantine": []}
    for r in results:
        for k in ("rows_read", "rows_kept", "rows_held_out"):
            total[k] += r[k]
        total["quarantine_by_reason"].update(r["quarantine_by_reason"])
        total["parts"] += r["parts"]
        total["held_parts"] += r["held_parts"]
        total["quarantine"].append(r["quarantine"])
    return total


def ingest_eval(cfg: Config, run: Store, progress: bool = False) -> dict:
    """The eval split of a built-in pool, or ``pool.eval_path`` ingested like the pool, into staging."""
    if cfg.pool.eval_path:
        sources = resolve_sources(cfg.pool.eval_path, cfg.pool.format, cfg.storage.endpoint_url, cfg.storage.region)
        folder = run.child(_STAGING, "eval")
        return _merge_results([ingest_source(cfg, run, s, f"{i:05d}-", "eval", folder) for i, s in enumerate(sources)])
    if cfg.pool.path.startswith("builtin:"):
        sink = Sink(cfg, run, "00000-", "eval", run.child(_STAGING, "eval"))
        sink.consume(f"{cfg.pool.path}/eval", _builtin_records(cfg, "eval"), _Fields.from_pool(cfg.pool, builtin=True))
        return _merge_results([sink.close()])
    return _merge_results([])


def finalize(cfg: Config, run: Store, pool_results: list[dict], eval_result: dict, t0: float, files: list[str]) -> dict:
    """Global duplicate-id pass, eval.parquet, quarantine.jsonl, the bad-fraction check, the summary."""
    fs = run.fs
    pool = _merge_results(pool_results)
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
    run.child(_STAGING).remove()

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
        "files": files,
    }
    # The invariant every later stage relies on; a failure here is a bug in this module.
    if summary["rows_read"] != summary["rows_kept"] + summary["rows_held_out"] + quarantined:
        raise RuntimeError(f"ingest lost rows: {summary}")
    _check_bad_fraction(cfg, summary)
    if eval_rows == 0:
        log.warning("ingest: no eval rows; set pool.eval_path or pool.eval_fraction to evaluate on held-out prompts")
    return summary


def _check_bad_fraction(cfg: Config, s: dict) -> None:
    limit = cfg.pool.max_bad_fraction
    if s["rows_read"] == 0:
        raise PoolError(f"pool.path={cfg.pool.path!r} holds no rows: check the path and pool.format")
    frac = s["rows_quarantined"] / s["rows_read"]
    if frac > limit or s["rows_kept"] == 0:
        top = ", ".join(f"{r}={c}" for r, c in list(s["quarantine_by_reason"].items())[:3])
        raise PoolError(
            f"{s['rows_quarantined']} of {s['rows_read']} rows ({frac:.1%}) of pool.path={cfg.pool.path!r} are bad, "
            f"more than pool.max_bad_fraction={limit:g} (top reasons: {top}); see {s['quarantine_path']} "
            f"for the source, line and reason of each, fix the pool or the field mapping "
            f"(pool.prompt_field={cfg.pool.prompt_field!r}, pool.response_field={cfg.pool.response_field!r}), "
            f"or raise pool.max_bad_fraction"
        )


def prepare_run(run: Store) -> None:
    """Remove outputs of an earlier ingestion so stale parts never mix with new ones."""
    for name in ("pool.parquet", "eval.parquet", "quarantine.jsonl", _STAGING):
        run.child(name).remove()


def _bar(progress: bool, total: int | None, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, mininterval=1.0, smoothing=0.1)


def ingest_pool(cfg: Config, run: Store, progress: bool = True) -> dict:
    """Ingest ``cfg.pool`` into the run folder ``run`` (in-process, file after file).

    Writes ``pool.parquet/part-*.parquet``, ``eval.parquet`` and ``quarantine.jsonl``; returns
    the summary ``{rows_read, rows_kept, rows_held_out, rows_quarantined, quarantine_by_reason,
    eval_rows, tasks, wall_s, files, ...}``. Raises :class:`PoolError` for a missing or empty
    pool and when more than ``pool.max_bad_fraction`` of the rows are bad.
    """
    t0 = time.perf_counter()
    prepare_run(run)
    p = cfg.pool
    if p.eval_path and p.eval_fraction:
        log.warning("pool.eval_path is set: pool.eval_fraction=%g is ignored", p.eval_fraction)
    if p.path.startswith("builtin:"):
        bar = _bar(progress, p.size if p.path == "builtin:tasks" else None, f"ingest {p.path}")
        sink = Sink(cfg, run, "", "pool", bar=bar)
        sink.consume(p.path, _builtin_records(cfg, "train"), _Fields.from_pool(p, builtin=True))
        results, files = [sink.close()], [p.path]
    else:
        sources = resolve_sources(p.path, p.format, cfg.storage.endpoint_url, cfg.storage.region)
        bar = _bar(progress, None, f"ingest {len(sources)} file(s)")
        # One sink for all files: parts roll over at rows_per_shard rows whatever the file sizes.
        sink = Sink(cfg, run, "", "pool", bar=bar)
        fields = _Fields.from_pool(p)
        for src in sources:
            sink.consume(src.uri, iter_records(src, cfg.storage.endpoint_url, cfg.storage.region), fields)
        results, files = [sink.close()], [s.uri for s in sources]
    if bar is not None:
        bar.close()
    summary = finalize(cfg, run, results, ingest_eval(cfg, run), t0, files)
    report_summary(summary, progress)
    return summary


def report_summary(s: dict, echo: bool = True) -> str:
    """One line with the counts by reason; printed (progress on) and logged."""
    reasons = ", ".join(f"{r}={c}" for r, c in s["quarantine_by_reason"].items()) or "none"
    line = (
        f"ingest: {s['rows_read']} rows read, {s['rows_kept']} kept, {s['rows_held_out']} held out, "
        f"{s['rows_quarantined']} quarantined ({reasons}), {s['eval_rows']} eval rows, {s['wall_s']:.1f} s"
    )
    log.info(line)
    if echo:
        print(line, flush=True)
    return line
