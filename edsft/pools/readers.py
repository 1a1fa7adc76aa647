"""Readers: one file -> its records, each with its line, streamed; bad content never raises.

A reader is a function ``(store) -> Iterator[(line, record | Bad)]`` registered under a format
name and the extensions that select it (:func:`register_reader`). It yields a :class:`Bad`
for content it cannot parse (a malformed line, bytes that are not UTF-8) and carries on.
:func:`read_file` wraps every reader: a file that breaks off (a truncated or fake ``.gz``, a
corrupt Parquet footer) ends in one ``unreadable_file`` record at the line where reading
stopped, so the rows before it are kept and the damage is in the quarantine with the file's name.

Line numbers: 1-based lines for JSONL and CSV (the line a record starts on; the header is line
1), 0-based row indices for Parquet, Arrow and JSON arrays, 0 for a problem with a whole ``.json`` file. JSONL lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``.
"""

from __future__ import annotations

import csv
import json
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Store, get_store
from .records import Bad, PoolError, snip

__all__ = ["READERS", "EXTENSIONS", "COMPRESSED", "register_reader", "format_of", "read_file", "read_store", "iter_lines"]

Reader = Callable[[Store], Iterator[tuple[int, Any]]]

READERS: dict[str, Reader] = {}
EXTENSIONS: dict[str, str] = {}  # ".jsonl" -> "jsonl"
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")  # pyarrow decompresses these from the extension
BATCH_ROWS = 8192  # Parquet rows decoded at a time; bounds memory per reader
# JSONL bytes read at a time. Small enough that a stream breaking off (a truncated .gz fails the
# whole read that hits the cut) loses at most this much before its unreadable_file record.
_CHUNK = 1 << 16


def register_reader(fmt: str, reader: Reader, extensions: tuple[str, ...] = ()) -> None:
    """Make ``pool.format=fmt`` (and, with ``auto``, files ending in ``extensions``) use ``reader``."""
    READERS[fmt] = reader
    for ext in extensions:
        EXTENSIONS[ext.lower()] = fmt


def format_of(name: str, fmt: str = "auto") -> str | None:
    """The format of a file: ``fmt`` unless it is ``auto``, else from the extension (None: unknown)."""
    if fmt != "auto":
        return fmt
    base = name.lower()
    for ext in COMPRESSED:
        if base.endswith(ext):
            base = base[: -len(ext)]
    return EXTENSIONS.get(posixpath.splitext(base)[1])


def iter_lines(f, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The lines of a binary stream, endings kept, split at ``\\n``, ``\\r\\n`` and a lone ``\\r``.

    ``bytes.splitlines`` has exactly that rule; reading in chunks keeps memory bounded even for a
    file without a single ``\\n``. A chunk ending in ``\\r`` is held back: its ``\\n`` may follow.
    """
    carry = b""
    while True:
        buf = f.read(chunk)
        if not buf:
            break
        lines = (carry + buf).splitlines(keepends=True)
        carry = lines.pop()
        if carry.endswith(b"\n"):
            lines.append(carry)
            carry = b""
        yield from lines
    if carry:
        yield carry


def _jsonl_lines(lines: Iterator[bytes], first_line: int = 1) -> Iterator[tuple[int, Any]]:
    for lineno, raw in enumerate(lines, start=first_line):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
            raw = raw[3:]
        if not raw.strip():
            continue  # blank lines are not rows
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, Bad("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8", snip(raw))
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, Bad("malformed_json", f"{e.msg} at column {e.colno}", snip(text))


def read_jsonl(store: Store) -> Iterator[tuple[int, Any]]:
    with store.fs.open_input_stream(store.path) as f:  # compression detected from the extension
        yield from _jsonl_lines(iter_lines(f))


def read_json(store: Store) -> Iterator[tuple[int, Any]]:
    """A JSON array, parsed whole (one file at a time); a ``.json`` that is JSON Lines is streamed."""
    with store.fs.open_input_stream(store.path) as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield 0, Bad("not_utf8", f"the file is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})", snip(data[: e.start]))
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
            yield from _jsonl_lines(iter(data.splitlines(keepends=True)))
            return
        yield 0, Bad("malformed_json", f"the file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", snip(text))
        return
    if not isinstance(obj, list):
        yield 0, Bad("wrong_type", f"a .json pool must hold an array of objects, got {type(obj).__name__}", snip(text))
        return
    yield from enumerate(obj)


def read_parquet(store: Store) -> Iterator[tuple[int, Any]]:
    with store.fs.open_input_file(store.path) as f:
        i = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
            for rec in batch.to_pylist():
                yield i, rec
                i += 1


def read_csv(store: Store) -> Iterator[tuple[int, Any]]:
    """CSV with a header row, streamed: every cell is text (``007`` stays ``007``), an empty cell is
    null, a cell holding a JSON list (``messages``, ``history``) is parsed by the record mapping.

    Python's ``csv`` keeps quoted newlines inside a cell; ``line`` is the 1-based physical line a
    record starts on. Bytes that are not UTF-8 spoil only the record that holds them.
    """
    with store.fs.open_input_stream(store.path) as f:
        # surrogateescape keeps undecodable bytes as lone surrogates, found per record below.
        lines = (raw.decode("utf-8", errors="surrogateescape") for raw in iter_lines(f))
        reader = csv.reader(lines)
        header, start = None, 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if header is None:
                header = [h.lstrip("\ufeff") for h in cells]
                continue
            if not cells:
                continue  # a blank line is not a row
            text = ",".join(cells)
            if not text.isascii() and any("\udc80" <= c <= "\udcff" for c in text):
                at = next(i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff")
                yield (
                    line,
                    Bad(
                        "not_utf8",
                        f"byte 0x{ord(text[at]) - 0xDC00:02x} in this record is not UTF-8",
                        snip(text.encode("utf-8", "surrogateescape")),
                    ),
                )
                continue
            if len(cells) != len(header):
                yield (
                    line,
                    Bad(
                        "malformed_csv",
                        f"the record has {len(cells)} cells, the header {len(header)}: quote cells that hold a comma",
                        snip(text),
                    ),
                )
                continue
            yield line, {k: (v if v != "" else None) for k, v in zip(header, cells)}


def read_arrow(store: Store) -> Iterator[tuple[int, Any]]:
    """Arrow IPC: the file format (``.arrow`` / ``.feather`` v2) or the stream format (what
    ``datasets``' ``save_to_disk`` writes), batch by batch."""
    with store.fs.open_input_file(store.path) as f:
        try:
            ipc = pa.ipc.open_file(f)
            batches = (ipc.get_batch(k) for k in range(ipc.num_record_batches))
        except pa.ArrowInvalid:  # not the file format: the stream format has no footer
            f.seek(0)
            batches = pa.ipc.open_stream(f)
        i = 0
        for batch in batches:
            for rec in batch.to_pylist():
                yield i, rec
                i += 1


register_reader("jsonl", read_jsonl, (".jsonl", ".ndjson"))
register_reader("csv", read_csv, (".csv",))
register_reader("arrow", read_arrow, (".arrow", ".feather", ".ipc"))
register_reader("json", read_json, (".json",))
register_reader("parquet", read_parquet, (".parquet", ".pq"))


def _damaged(e: BaseException) -> bool:
    """Errors that mean "this file's bytes are broken", not "the storage failed".

    Decompression (``Truncated compressed stream``, ``zlib inflate failed``), Parquet footers and
    pages and local I/O surface as ``ArrowInvalid`` / ``OSError``; an S3 failure is an ``OSError``
    too but says ``AWS Error``: that one propagates (the task is retried, or the stage fails).
    """
    if isinstance(e, (pa.ArrowInvalid, EOFError)):
        return True
    # The hub's HTTP errors are OSErrors too (requests' IOError): a failed download, not a bad file.
    remote = "AWS Error" in str(e) or type(e).__module__.split(".")[0] in ("huggingface_hub", "requests", "httpx", "urllib3")
    return isinstance(e, OSError) and not remote


def read_file(uri: str, fmt: str, endpoint_url: str | None = None, region: str | None = None) -> Iterator[tuple[int, Any]]:
    """The records of one file, streamed, ending in one ``unreadable_file`` record if it breaks off."""
    return read_store(get_store(uri, endpoint_url, region), fmt)


def read_store(store: Store, fmt: str) -> Iterator[tuple[int, Any]]:
    """:func:`read_file` on a file of any filesystem (``store.uri`` names it in messages)."""
    uri = store.uri
    reader = READERS.get(fmt)
    if reader is None:  # config validation guards the built-in formats; a registered one may be missing here
        raise PoolError(
            f"no reader for format {fmt!r} of {uri} in this process (known: {', '.join(READERS)}): a reader added with "
            f"register_reader must be registered in a module that every Ray worker imports too"
        )
    n, line_rec = 0, (-1, None)
    try:
        for n, line_rec in enumerate(reader(store), start=1):
            yield line_rec
    except Exception as e:  # noqa: BLE001 - narrowed by _damaged; anything else re-raises
        if not _damaged(e):
            raise
        where = f"after {n} record(s)" if n else "before the first record"
        yield (
            line_rec[0] + 1,
            Bad(
                "unreadable_file",
                f"{uri} is damaged ({type(e).__name__}: {e}) {where}; re-create or re-download it, or move it out of the pool",
            ),
        )
