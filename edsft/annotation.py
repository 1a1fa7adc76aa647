"""The annotation step: selected prompts get their responses.

Three modes (``annotation.mode``):

* ``oracle`` - experiments: join ``selection.parquet`` with the pool's response column, the
  simulated annotator. This is the first place in the pipeline that reads that column.
* ``export`` - real use: write the selected prompts for annotators as JSONL and CSV (with row_id),
  then stop; annotators fill in ``response``. The same rows also go to ``to_annotate/`` as alpaca,
  ``messages`` and the pool's own layout (edsft.exports); oracle and import write the annotated rows
  that way to ``annotated/``, with LLaMA-Factory's ``dataset_info.json``. In the CSV, a cell
  that a spreadsheet would run as a formula (it starts with ``= + - @``, tab or CR; OWASP "CSV
  injection") is written with a leading ``'``, as is a cell that itself starts with ``'``, so that
  import can undo it exactly.
* ``import`` - read the annotators' file back: JSONL (one ``{"row_id": ..., "response": ...}`` a
  line, or an exported alpaca / messages / sharegpt record with its ``output`` / final assistant turn
  filled in) or the exported CSV with its ``response`` column filled in; UTF-8, with or without a BOM.
  Every problem is counted and reported (console, stage summary, hence the manifest): bad lines
  (all counted, the first few quoted), ids that are not in the selection (ignored), ids given more
  than once (the same answer: used once; different answers: an error naming the lines, since
  which one is right is the annotators' call), and selected ids without an answer: an error naming
  how many and which, unless ``annotation.allow_missing=true`` trains on the ones that have one.

Pure pyarrow: no torch, no ray.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from .config import Config
from .errors import UserError
from .exports import SubsetError, pool_fields, response_of, subset_rows, write_subsets
from .storage import Store, get_store

__all__ = ["annotate", "AnnotationError", "ANNOTATED_SCHEMA", "escape_cell", "unescape_cell", "read_annotations"]

# context: a conversation pool's earlier turns and system prompt (JSON messages), null for flat rows;
# training applies the chat template to the whole conversation, so it must survive annotation
ANNOTATED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("task", pa.string()),
        ("rank", pa.int64()),
        ("context", pa.string()),
    ]
)
EXPORT_FIELDS = ["row_id", "prompt", "task", "response"]
EXAMPLES = 10  # how many bad lines / ids a summary quotes; the counts are always complete

# A spreadsheet runs a cell starting with one of these as a formula (OWASP, CSV injection);
# "'" is escaped too, so that un-escaping is exact: escape(s) starts with "'" iff it was escaped.
_FORMULA_LEAD = ("=", "+", "-", "@", "\t", "\r")
_ESCAPE = "'"


def escape_cell(text: str) -> str:
    """``=HYPERLINK(..)`` -> ``'=HYPERLINK(..)``: read as text by spreadsheets, undone by import."""
    return _ESCAPE + text if text.startswith(_FORMULA_LEAD + (_ESCAPE,)) else text


def unescape_cell(text: str) -> str:
    """The inverse of :func:`escape_cell`."""
    if text.startswith(_ESCAPE) and text[1:].startswith(_FORMULA_LEAD + (_ESCAPE,)):
        return text[1:]
    return text


class AnnotationError(UserError):
    """Annotations that cannot be used (exit code 2 in the CLI)."""


def _annotated(rows: pa.Table) -> pa.Table:
    """The annotated table in its schema; flat pools have no context column, so it is all null."""
    if "context" not in rows.column_names:
        rows = rows.append_column("context", pa.nulls(rows.num_rows, pa.string()))
    return rows.select(ANNOTATED_SCHEMA.names).cast(ANNOTATED_SCHEMA)


def _selected_pool_rows(selection: Store, pool: Store, with_response: bool) -> pa.Table:
    """The selected rows of the pool, in selection rank order."""
    try:
        return subset_rows(selection.read_table(columns=["row_id", "rank"]), pool, with_response)
    except SubsetError as e:
        raise AnnotationError(str(e)) from None


def _write_formats(cfg: Config, rows: pa.Table, folder: Store, name: str) -> dict:
    """The subset in alpaca, messages and the pool's own layout, with its dataset_info.json."""
    return write_subsets(folder, {name: rows}, cfg.pool.format, pool_fields(cfg.pool))


def annotate(cfg: Config, selection: Store, pool: Store, out: Store, export_dir: Store) -> dict:
    """Run the configured annotation mode; writes ``out`` (annotated.parquet), or for ``export``
    the files for annotators under ``export_dir``."""
    mode = cfg.annotation.mode
    if mode == "export":
        rows = _selected_pool_rows(selection, pool, with_response=False)
        target = export_dir
        recs = [
            {"row_id": r["row_id"], "prompt": r["prompt"], "task": r["task"], "response": ""}
            for r in rows.select(["row_id", "prompt", "task"]).to_pylist()
        ]
        target.child("to_annotate.jsonl").write_jsonl(recs)
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS)
        w.writeheader()
        w.writerows({k: escape_cell(str(v or "")) for k, v in r.items()} for r in recs)
        target.child("to_annotate.csv").write_text(buf.getvalue())
        formats = _write_formats(cfg, rows, target.child("to_annotate"), "to_annotate")
        return {
            "mode": "export",
            "rows": len(recs),
            "exported": [target.child("to_annotate.jsonl").uri, target.child("to_annotate.csv").uri],
            "formats": formats,
            "next": "fill in `response`, then run with annotation.mode=import annotation.annotations_path=<the JSONL or CSV>",
        }

    if mode == "oracle":
        rows = _selected_pool_rows(selection, pool, with_response=True)
        missing = pc.sum(pc.is_null(rows.column("response"))).as_py() or 0
        if missing:
            raise AnnotationError(
                f"{missing} selected rows have no response in the pool: the oracle needs pool.response_field; "
                "use annotation.mode=export for real annotation"
            )
        table = _annotated(rows)
        out.write_table(table)
        formats = _write_formats(cfg, rows, export_dir.child("annotated"), "annotated")
        return {"mode": "oracle", "rows": table.num_rows, "out": out.uri, "formats": formats}

    # import: read the annotators' file back
    rows = _selected_pool_rows(selection, pool, with_response=False)
    src = get_store(cfg.annotation.annotations_path, cfg.storage.endpoint_url, cfg.storage.region)
    if not src.exists():
        raise AnnotationError(
            f"annotation.annotations_path={cfg.annotation.annotations_path!r} does not exist: "
            "point it at the JSONL of {row_id, response} (or the filled-in to_annotate.csv) your annotators returned"
        )
    got = read_annotations(src)
    selected = rows.column("row_id").to_pylist()
    report = _reconcile(got, selected)
    summary = {"mode": "import", "source": src.uri, "format": got.format, "selected": len(selected), **report}
    _log_import(summary)
    if report["conflicting_ids"]:
        ex = "; ".join(f"{rid!r} on lines {lines}" for rid, lines in report["conflicting_examples"])
        raise AnnotationError(
            f"{report['conflicting_ids']} row_ids have different responses on different lines of {src.uri} ({ex}): "
            "keep one line per row_id (the right answer), then import again"
        )
    missing = report["missing_ids"]
    if missing and (missing == len(selected) or not cfg.annotation.allow_missing):
        raise AnnotationError(
            f"{missing} of the {len(selected)} selected row_ids have no usable annotation in {src.uri} "
            f"(e.g. {report['missing_examples']}; {got.bad_total} bad lines, {report['unknown_ids']} unknown ids, "
            f"format {got.format}): annotate them"
            + (
                ""
                if missing == len(selected)
                else f", or set annotation.allow_missing=true to train on the {len(selected) - missing} that have one"
            )
        )
    keep = [i for i, r in enumerate(selected) if r in got.answers]
    rows = rows.take(pa.array(keep, pa.int64()))
    rows = rows.append_column("response", pa.array([got.answers[r][0] for r in rows.column("row_id").to_pylist()], pa.string()))
    table = _annotated(rows)
    out.write_table(table)
    formats = _write_formats(cfg, rows, export_dir.child("annotated"), "annotated")
    return {**summary, "rows": table.num_rows, "out": out.uri, "formats": formats}


# ---- reading annotators' files ------------------------------------------------------------


@dataclass
class Annotations:
    """What an annotations file holds: the first answer of each id, and every problem in it."""

    format: str  # jsonl | csv
    answers: dict[str, tuple[str, int]] = field(default_factory=dict)  # row_id -> (response, line)
    repeats: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # row_id -> later (response, line)
    bad_examples: list[str] = field(default_factory=list)  # the first EXAMPLES bad lines, with reasons
    bad_total: int = 0

    def bad(self, line: int, reason: str) -> None:
        self.bad_total += 1
        if len(self.bad_examples) < EXAMPLES:
            self.bad_examples.append(f"line {line}: {reason}")

    def add(self, line: int, row_id, response) -> None:
        if row_id is None or str(row_id).strip() == "":
            return self.bad(line, "no row_id")
        if not isinstance(response, str):
            return self.bad(line, f"response must be a string, got {type(response).__name__}")
        if not response.strip():
            return self.bad(line, "empty response")
        rid = str(row_id)
        try:  # a lone surrogate ("\ud800" is valid JSON) cannot be written to Parquet
            rid.encode("utf-8"), response.encode("utf-8")
        except UnicodeEncodeError:
            return self.bad(line, "row_id or response is not valid Unicode (a lone surrogate)")
        if rid in self.answers:
            self.repeats.setdefault(rid, []).append((response, line))
        else:
            self.answers[rid] = (response, line)


def _decode(src: Store) -> str:
    data = src.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8", Notepad) is not part of line 1
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise AnnotationError(
            f"{src.uri} line {line} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}): "
            "save the file as UTF-8 (a spreadsheet's 'CSV UTF-8', or e.g. `iconv -f latin1 -t utf-8 IN > OUT`) "
            "and import that"
        ) from None


def read_annotations(src: Store) -> Annotations:
    """Parse a JSONL or CSV annotations file (CSV by its name or by a header line naming row_id)."""
    text = _decode(src)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    is_csv = src.path.lower().endswith(".csv") or (not first.startswith("{") and "row_id" in first)
    return _read_csv(src, text) if is_csv else _read_jsonl(text)


def _read_jsonl(text: str) -> Annotations:
    got = Annotations("jsonl")
    # split on "\n" only (a U+2028 inside a JSON string is data), or on CR in an old-Mac CR-only file
    for i, line in enumerate(text.split("\n" if "\n" in text or "\r" not in text else "\r"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            got.bad(i, f"not JSON ({e})")
            continue
        # {row_id, response}, or an exported alpaca / messages / sharegpt record filled in
        response = response_of(rec) if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or "row_id" not in rec or ("response" not in rec and response is None):
            got.bad(i, 'expected an object with "row_id" and "response"')
            continue
        got.add(i, rec["row_id"], response)
    return got


def _read_csv(src: Store, text: str) -> Annotations:
    got = Annotations("csv")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return got
    except csv.Error as e:
        raise AnnotationError(f"{src.uri} line 1: not a CSV header ({e}): export again with annotation.mode=export") from None
    header = [h.strip() for h in header]
    if "row_id" not in header or "response" not in header:
        raise AnnotationError(
            f"{src.uri} line 1: the CSV header {header} lacks row_id and/or response: "
            f"keep the header of the exported to_annotate.csv ({','.join(EXPORT_FIELDS)})"
        )
    c_id, c_resp = header.index("row_id"), header.index("response")
    line = reader.line_num + 1  # the physical line a record starts on (a quoted cell may span lines)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a NUL byte; the reader continues with the next line
            got.bad(line, f"not CSV ({e})")
            line = reader.line_num + 1
            continue
        if cells and any(c.strip() for c in cells):
            if len(cells) != len(header):
                got.bad(line, f"{len(cells)} cells, the header has {len(header)}")
            else:
                got.add(line, unescape_cell(cells[c_id]), unescape_cell(cells[c_resp]))
        line = reader.line_num + 1
    return got


def _reconcile(got: Annotations, selected: list[str]) -> dict:
    """The counts and examples of the stage summary; ids in selection order, lines in file order."""
    chosen = set(selected)
    unknown = [r for r in got.answers if r not in chosen]
    missing = [r for r in selected if r not in got.answers]
    conflicts, duplicates = [], []
    for rid, later in got.repeats.items():
        if rid not in chosen:  # an id outside the selection is ignored, however often it comes
            continue
        first, line = got.answers[rid]
        if any(resp != first for resp, _ in later):
            conflicts.append((rid, [line] + [ln for _, ln in later]))
        else:
            duplicates.append(rid)
    return {
        "annotated": len(selected) - len(missing),
        "missing_ids": len(missing),
        "missing_examples": missing[:EXAMPLES],
        "unknown_ids": len(unknown),
        "unknown_examples": unknown[:EXAMPLES],
        "duplicate_ids": len(duplicates),
        "duplicate_examples": duplicates[:EXAMPLES],
        "conflicting_ids": len(conflicts),
        "conflicting_examples": conflicts[:EXAMPLES],
        "bad_lines": got.bad_examples,  # the first EXAMPLES, with line and reason
        "bad_lines_total": got.bad_total,
    }


def _log_import(s: dict) -> None:
    """One console line with every count, so a partial import never passes for a complete one."""
    parts = [f"{s['annotated']} of {s['selected']} selected ids annotated in {s['source']} ({s['format']})"]
    for key, what in (
        ("missing_ids", "missing"),
        ("unknown_ids", "unknown (ignored)"),
        ("duplicate_ids", "repeated with the same response"),
        ("conflicting_ids", "with conflicting responses"),
    ):
        if s[key]:
            ex = [e[0] if isinstance(e, tuple) else e for e in s[key.replace("_ids", "_examples")][:3]]
            parts.append(f"{s[key]} {what} (e.g. {', '.join(map(str, ex))})")
    if s["bad_lines_total"]:
        parts.append(f"{s['bad_lines_total']} bad lines (first: {s['bad_lines'][0]})")
    print("[edsft] annotate: " + "; ".join(parts), file=sys.stderr, flush=True)
