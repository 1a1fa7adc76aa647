from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edsft.annotation import AnnotationError, annotate
from edsft.config import load_config
from edsft.storage import get_store


@pytest.fixture
def run(tmp_path):
    pool = tmp_path / "pool.parquet"
    pool.mkdir()
    ids = [f"r{i}" for i in range(10)]
    rows = {"row_id": ids, "prompt": [f"p{i}" for i in range(10)], "response": [f"a{i}" for i in range(10)],
            "task": ["t" + str(i % 2) for i in range(10)], "source": ["x"] * 10, "line": list(range(1, 11))}
    t = pa.table(rows)
    pq.write_table(t.slice(0, 5), pool / "part-00000.parquet")  # two parts: the join must stream both
    pq.write_table(t.slice(5), pool / "part-00001.parquet")
    sel = pa.table({"row_id": ["r7", "r2", "r9"], "rank": [0, 1, 2], "gain": [1.0, 0.5, 0.2],
                    "selector": ["x"] * 3, "shard": [0, 0, 0]})
    pq.write_table(sel, tmp_path / "selection.parquet")
    return get_store(tmp_path)


def test_oracle_joins_responses_in_rank_order(run):
    cfg = load_config()
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    t = run.child("annotated.parquet").read_table()
    assert s["rows"] == 3
    assert t.column("row_id").to_pylist() == ["r7", "r2", "r9"]
    assert t.column("response").to_pylist() == ["a7", "a2", "a9"]
    assert t.column("rank").to_pylist() == [0, 1, 2]


def test_selection_from_another_run_is_a_clear_error(run):
    pq.write_table(pa.table({"row_id": ["zz"], "rank": [0]}), run.child("selection.parquet").path)
    with pytest.raises(AnnotationError, match="not in the pool"):
        annotate(load_config(), run.child("selection.parquet"), run.child("pool.parquet"), run.child("a.parquet"), run)


def test_export_then_import_reports_missing_and_unknown(run):
    cfg = load_config(None, ["annotation.mode=export"])
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    assert s["rows"] == 3 and not run.child("annotated.parquet").exists()
    exported = run.child("to_annotate.jsonl").read_jsonl()
    assert [r["row_id"] for r in exported] == ["r7", "r2", "r9"]
    assert all("response" in r and r["response"] == "" for r in exported)  # the label is not exported
    assert run.child("to_annotate.csv").read_text().splitlines()[0] == "row_id,prompt,task,response"

    done = run.child("done.jsonl")
    done.write_text("\n".join([json.dumps({"row_id": "r7", "response": "seven"}),
                               json.dumps({"row_id": "nope", "response": "x"}),
                               "{not json", json.dumps({"row_id": "r9", "response": "nine"})]) + "\n")
    cfg = load_config(None, ["annotation.mode=import", f"annotation.annotations_path={done.path}"])
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    assert s["rows"] == 2 and s["missing_ids"] == 1 and s["missing_examples"] == ["r2"]
    assert s["unknown_ids"] == 1 and s["unknown_examples"] == ["nope"] and len(s["bad_lines"]) == 1
    t = run.child("annotated.parquet").read_table()
    assert t.column("response").to_pylist() == ["seven", "nine"]


def test_import_of_a_missing_file_is_a_clear_error(run, tmp_path):
    cfg = load_config(None, ["annotation.mode=import", f"annotation.annotations_path={tmp_path}/nope.jsonl"])
    with pytest.raises(AnnotationError, match="does not exist"):
        annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("a.parquet"), run)
