"""The annotation step: selected prompts get their responses.

Three modes (``annotation.mode``):

* ``oracle`` - experiments: join ``selection.parquet`` with the pool's response column, the
  simulated annotator. This is the first place in the pipeline that reads that column.
* ``export`` - real use: write the selected prompts for annotators as JSONL and CSV (with row_id),
  then stop; annotators fill in ``response``.
* ``import`` - read the annotators' JSONL back (one ``{"row_id": ..., "response": ...}`` a line),
  reporting ids that are missing or unknown.

Pure pyarrow: no torch, no ray.
"""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .errors import UserError
from .storage import Store, get_store

__all__ = ["annotate", "AnnotationError", "ANNOTATED_SCHEMA"]

ANNOTATED_SCHEMA = pa.schema(
    [("row_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("task", pa.string()), ("rank", pa.int64())]
)


class AnnotationError(UserError):
    """Annotations that cannot be used (exit code 2 in the CLI)."""


def _selected_pool_rows(selection: Store, pool: Store, with_response: bool) -> pa.Table:
    """The selected rows of the pool, in selection rank order."""
    sel = selection.read_table(columns=["row_id", "rank"])
    wanted = set(sel.column("row_id").to_pylist())
    cols = ["row_id", "prompt", "task"] + (["response"] if with_response else [])
    parts = []
    # Stream the pool part by part, keeping only selected rows: the pool never sits whole in memory.
    for path in pool.parquet_files():
        t = pq.read_table(path, filesystem=pool.fs, columns=cols)
        mask = pc.is_in(t.column("row_id"), value_set=pa.array(sorted(wanted), pa.string()))
        parts.append(t.filter(mask))
    rows = pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in cols})
    found = set(rows.column("row_id").to_pylist())
    missing = wanted - found
    if missing:
        raise AnnotationError(
            f"{len(missing)} selected row_ids are not in the pool (e.g. {sorted(missing)[:3]}): "
            "selection.parquet and pool.parquet come from different runs; re-run `edsft select`"
        )
    rank = dict(zip(sel.column("row_id").to_pylist(), sel.column("rank").to_pylist()))
    order = sorted(range(rows.num_rows), key=lambda i: rank[rows.column("row_id")[i].as_py()])
    rows = rows.take(pa.array(order, pa.int64()))
    return rows.append_column("rank", pa.array([rank[r] for r in rows.column("row_id").to_pylist()], pa.int64()))


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
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["row_id", "prompt", "task", "response"])
        w.writeheader()
        w.writerows(recs)
        target.child("to_annotate.csv").write_text(buf.getvalue())
        return {
            "mode": "export",
            "rows": len(recs),
            "exported": [target.child("to_annotate.jsonl").uri, target.child("to_annotate.csv").uri],
            "next": "fill in `response`, then run with annotation.mode=import "
            "annotation.annotations_path=<the JSONL>",
        }

    if mode == "oracle":
        rows = _selected_pool_rows(selection, pool, with_response=True)
        missing = pc.sum(pc.is_null(rows.column("response"))).as_py() or 0
        if missing:
            raise AnnotationError(
                f"{missing} selected rows have no response in the pool: the oracle needs pool.response_field; "
                "use annotation.mode=export for real annotation"
            )
        table = rows.select(["row_id", "prompt", "response", "task", "rank"]).cast(ANNOTATED_SCHEMA)
        out.write_table(table)
        return {"mode": "oracle", "rows": table.num_rows, "out": out.uri}

    # import: read annotators' JSONL back
    rows = _selected_pool_rows(selection, pool, with_response=False)
    src = get_store(cfg.annotation.annotations_path, cfg.storage.endpoint_url, cfg.storage.region)
    if not src.exists():
        raise AnnotationError(
            f"annotation.annotations_path={cfg.annotation.annotations_path!r} does not exist: "
            "point it at the JSONL of {row_id, response} your annotators returned"
        )
    answers: dict[str, str] = {}
    bad_lines = []
    for i, line in enumerate(src.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid, resp = str(rec["row_id"]), rec["response"]
            if not isinstance(resp, str) or not resp.strip():
                raise ValueError("empty response")
        except (ValueError, KeyError, TypeError) as e:
            bad_lines.append(f"line {i}: {e}")
            continue
        answers[rid] = resp
    selected = rows.column("row_id").to_pylist()
    unknown = sorted(set(answers) - set(selected))
    missing = [r for r in selected if r not in answers]
    keep = [i for i, r in enumerate(selected) if r in answers]
    rows = rows.take(pa.array(keep, pa.int64()))
    rows = rows.append_column("response", pa.array([answers[r] for r in rows.column("row_id").to_pylist()], pa.string()))
    if rows.num_rows == 0:
        raise AnnotationError(
            f"no usable annotations in {src.uri}: {len(missing)} selected ids missing, {len(unknown)} unknown ids, "
            f"{len(bad_lines)} bad lines"
        )
    table = rows.select(["row_id", "prompt", "response", "task", "rank"]).cast(ANNOTATED_SCHEMA)
    out.write_table(table)
    return {
        "mode": "import",
        "rows": table.num_rows,
        "missing_ids": len(missing),
        "missing_examples": missing[:5],
        "unknown_ids": len(unknown),
        "unknown_examples": unknown[:5],
        "bad_lines": bad_lines[:10],
        "out": out.uri,
    }
