"""Hostile inputs (issue 14): each ends in a quarantine row with a reason, or a PoolError naming
the file and the fix; a failed ingest leaves no pool behind. The Ray driver's side is in
test_ingest_ray.py."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pool_data import _broken_jsonl, _invariant, _jsonl, _rows

from edsft.config import Config
from edsft.pools.ingest import PoolError, ingest_pool
from edsft.pools.readers import iter_lines
from edsft.storage import get_store


def _cfg(path, **kw):
    return Config().replace(**{"pool.path": str(path), **{f"pool.{k}": v for k, v in kw.items()}})


def _ingest(cfg, folder):
    run = get_store(folder)
    return ingest_pool(cfg, run, progress=False), run


def _quarantine(run):
    return {(r["source"].rsplit("/", 1)[-1], r["line"]): r for r in run.child("quarantine.jsonl").read_jsonl()}


def _lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------
# A failed ingest leaves nothing that passes for a pool
# ---------------------------------------------------------------------------------------------


def test_failed_ingest_removes_pool_and_staging(tmp_path):
    src = _broken_jsonl(tmp_path / "broken.jsonl")  # 9 of 19 rows bad
    run_dir = tmp_path / "run"
    s, run = _ingest(_cfg(src, max_bad_fraction=0.5, rows_per_shard=3), run_dir)  # a finished earlier ingest
    assert run.child("pool.parquet").exists() and s["parts"] == 4
    with pytest.raises(PoolError, match="max_bad_fraction"):
        _ingest(_cfg(src, max_bad_fraction=0.3, rows_per_shard=3, eval_fraction=0.2), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["quarantine.jsonl"]  # it explains the failure
    assert len(run.child("quarantine.jsonl").read_jsonl()) == 9


# ---------------------------------------------------------------------------------------------
# Lone surrogates, NaN/Infinity, invisible prompts: one quarantined row each, the rest kept
# ---------------------------------------------------------------------------------------------


def test_lone_surrogates_are_quarantined(tmp_path):
    src = _lines(
        tmp_path / "s.jsonl",
        [
            json.dumps({"instruction": "fine", "output": "a"}),
            '{"instruction": "cut emoji \\ud83d", "output": "a"}',  # valid JSON, not text
            '{"instruction": "ok", "input": "\\udc00", "output": "a"}',
            '{"instruction": "ok2", "output": "\\ud800"}',
            '{"instruction": "ok3", "output": "a", "task": "\\udfff"}',
            '{"instruction": "pair \\ud83d\\ude00", "output": "a"}',  # a proper surrogate pair is an emoji
        ],
    )
    s, run = _ingest(_cfg(src, max_bad_fraction=1.0), tmp_path / "run")
    _invariant(s)
    assert (s["rows_kept"], s["quarantine_by_reason"]) == (2, {"not_utf8": 4})
    q = _quarantine(run)
    assert {line: r["reason"] for (_, line), r in q.items()} == {2: "not_utf8", 3: "not_utf8", 4: "not_utf8", 5: "not_utf8"}
    assert "'instruction'" in q[("s.jsonl", 2)]["detail"] and "surrogate" in q[("s.jsonl", 2)]["detail"]
    assert "'input'" in q[("s.jsonl", 3)]["detail"] and "'output'" in q[("s.jsonl", 4)]["detail"]
    assert [r["prompt"] for r in run.child("pool.parquet").read_table().to_pylist()] == ["fine", "pair \U0001f600"]

    ids = _lines(tmp_path / "ids.jsonl", ['{"id": "\\ud800", "instruction": "q"}', '{"id": "b", "instruction": "q"}'])
    s, run = _ingest(_cfg(ids, id_field="id", max_bad_fraction=1.0), tmp_path / "run-ids")
    assert s["quarantine_by_reason"] == {"not_utf8": 1} and "'id'" in _quarantine(run)[("ids.jsonl", 1)]["detail"]


def test_nan_and_infinity_are_not_responses(tmp_path):
    src = _lines(
        tmp_path / "n.jsonl",
        [
            '{"instruction": "a", "output": NaN}',
            '{"instruction": "b", "output": Infinity}',
            '{"instruction": "c", "output": -Infinity}',
            '{"instruction": "d", "output": 1e999}',  # overflows to inf
            '{"instruction": "e", "output": "x", "task": NaN}',
            '{"instruction": "f", "output": 42}',
            '{"instruction": "g", "output": 0.5}',
            '{"instruction": "h", "output": null}',
        ],
    )
    s, run = _ingest(_cfg(src, max_bad_fraction=1.0), tmp_path / "run")
    _invariant(s)
    assert s["quarantine_by_reason"] == {"wrong_type": 5}
    q = _quarantine(run)
    assert sorted(line for _, line in q) == [1, 2, 3, 4, 5]
    assert "'output' is nan" in q[("n.jsonl", 1)]["detail"] and "finite" in q[("n.jsonl", 2)]["detail"]
    assert "'task' is nan" in q[("n.jsonl", 5)]["detail"]
    assert [r["response"] for r in run.child("pool.parquet").read_table().to_pylist()] == ["42", "0.5", None]
    # the same from a Parquet float column (pandas writes missing values as NaN)
    pq.write_table(pa.table({"instruction": ["p", "q"], "output": [float("nan"), 1.5]}), tmp_path / "n.parquet")
    s, run = _ingest(_cfg(tmp_path / "n.parquet", max_bad_fraction=1.0), tmp_path / "run-pq")
    assert s["quarantine_by_reason"] == {"wrong_type": 1} and list(_quarantine(run)) == [("n.parquet", 0)]


def test_invisible_prompts_are_empty(tmp_path):
    invisible = ["\u200b", "\u200b\u200c\u200d\ufeff", "\x00\x07\x1b", " \t\u2060\u00ad ", "\u202e"]
    rows = [{"instruction": p, "output": "x"} for p in invisible]
    rows += [
        {"instruction": "\u200bvisible", "output": "x"},
        {"instruction": "\u200b", "input": "the input", "output": "x"},
        {"instruction": "real", "input": "\u200b\u200b", "output": "x"},
    ]
    s, run = _ingest(_cfg(_jsonl(tmp_path / "z.jsonl", rows), max_bad_fraction=1.0), tmp_path / "run")
    _invariant(s)
    assert s["quarantine_by_reason"] == {"empty_prompt": len(invisible)}
    assert all("zero-width or control" in r["detail"] for r in _quarantine(run).values())
    assert [r["prompt"] for r in run.child("pool.parquet").read_table().to_pylist()] == ["\u200bvisible", "the input", "real"]


# ---------------------------------------------------------------------------------------------
# Damaged files: one unreadable_file row naming the file; rows before the damage are kept
# ---------------------------------------------------------------------------------------------


def _damaged_folder(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    _jsonl(d / "a-good.jsonl", _rows(10))
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in _rows(3000, 100)).encode())
    (d / "b-truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (d / "c-fake.jsonl.gz").write_bytes(b'{"instruction": "plain text named .gz"}\n')
    (d / "d-garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(_rows(50, 5000)), buf)
    (d / "e-cut.parquet").write_bytes(buf.getvalue()[:-20])
    return d


def test_damaged_files_are_quarantined_by_name(tmp_path):
    d = _damaged_folder(tmp_path)
    s, run = _ingest(_cfg(d, max_bad_fraction=1.0), tmp_path / "run")
    _invariant(s)
    assert s["quarantine_by_reason"] == {"unreadable_file": 4}
    q = {name: r for (name, _), r in _quarantine(run).items()}
    assert sorted(q) == ["b-truncated.jsonl.gz", "c-fake.jsonl.gz", "d-garbage.parquet", "e-cut.parquet"]
    for name, r in q.items():
        assert r["reason"] == "unreadable_file" and str(d / name) in r["detail"] and "re-download" in r["detail"]
    assert "before the first record" in q["c-fake.jsonl.gz"]["detail"] and q["c-fake.jsonl.gz"]["line"] == 0
    assert [u["path"] for u in s["unreadable_files"]] == [str(d / n) for n in sorted(q)]
    # the truncated gzip keeps the complete lines before the cut, in order, and says where it stopped
    pool = run.child("pool.parquet").read_table().to_pylist()
    lines = [r["line"] for r in pool if r["source"].endswith("b-truncated.jsonl.gz")]
    assert 0 < len(lines) < 3000 and lines == list(range(1, len(lines) + 1))
    assert (
        q["b-truncated.jsonl.gz"]["line"] == len(lines) + 1
        and f"after {len(lines)} record(s)" in q["b-truncated.jsonl.gz"]["detail"]
    )
    assert s["rows_kept"] == 10 + len(lines)


@pytest.mark.parametrize("name", ["c-fake.jsonl.gz", "d-garbage.parquet"])
def test_a_pool_of_one_damaged_file_is_a_pool_error(tmp_path, name):
    d = _damaged_folder(tmp_path)
    with pytest.raises(PoolError) as e:
        _ingest(_cfg(d / name), tmp_path / "run")
    msg = str(e.value)
    assert "1 of 1 rows" in msg and str(d / name) in msg and "re-download" in msg
    assert not (tmp_path / "run" / "pool.parquet").exists()


# ---------------------------------------------------------------------------------------------
# Paths and lines
# ---------------------------------------------------------------------------------------------


def test_skipped_files_are_listed_with_a_reason(tmp_path):
    d = tmp_path / "pool"
    (d / "_tmp").mkdir(parents=True)
    _jsonl(d / "a.jsonl", _rows(5))
    (d / "_SUCCESS").write_text("")
    _jsonl(d / ".hidden.jsonl", _rows(5, 10))
    _jsonl(d / "_tmp" / "b.jsonl", _rows(5, 20))
    (d / "notes.txt").write_text("x")
    s, _ = _ingest(_cfg(d), tmp_path / "run")
    assert s["files"] == [str(d / "a.jsonl")] and s["rows_kept"] == 5
    reasons = {
        x["path"].rsplit("/", 2)[-1] if "_tmp" not in x["path"] else "_tmp/b.jsonl": x["reason"] for x in s["skipped_files"]
    }
    assert set(reasons) == {"_SUCCESS", ".hidden.jsonl", "_tmp/b.jsonl", "notes.txt"}
    assert all(r.startswith("hidden") for k, r in reasons.items() if k != "notes.txt")
    assert reasons["notes.txt"].startswith("unknown extension") and "pool.format" in reasons["notes.txt"]
    # a folder of hidden files only: the error says what was skipped
    (d / "a.jsonl").unlink()
    (d / "notes.txt").unlink()
    with pytest.raises(PoolError, match=r"no \.jsonl.*3 skipped"):
        _ingest(_cfg(d), tmp_path / "run2")


def test_literal_path_with_brackets_wins_over_glob(tmp_path):
    d = tmp_path / "data[1]"
    d.mkdir()
    _jsonl(d / "p[0].jsonl", _rows(4))
    _jsonl(tmp_path / "shard-a.jsonl", _rows(3, 10))
    _jsonl(tmp_path / "shard-b.jsonl", _rows(3, 20))
    s, _ = _ingest(_cfg(d), tmp_path / "run-folder")
    assert s["rows_kept"] == 4 and s["files"] == [str(d / "p[0].jsonl")]
    s, _ = _ingest(_cfg(d / "p[0].jsonl"), tmp_path / "run-file")
    assert s["rows_kept"] == 4
    s, _ = _ingest(_cfg(tmp_path / "shard-[ab].jsonl"), tmp_path / "run-glob")  # no such file: a glob
    assert s["rows_kept"] == 6 and len(s["files"]) == 2


@pytest.mark.parametrize("ending", [b"\r", b"\r\n", b"\n"])
def test_line_endings_split_rows(tmp_path, ending):
    lines = [json.dumps(r).encode() for r in _rows(5)]
    lines.insert(2, b"")  # a blank line still counts for the numbering
    (tmp_path / "p.jsonl").write_bytes(ending.join(lines) + ending)
    s, run = _ingest(_cfg(tmp_path / "p.jsonl"), tmp_path / "run")
    assert (s["rows_read"], s["rows_kept"]) == (5, 5)
    assert run.child("pool.parquet").read_table().column("line").to_pylist() == [1, 2, 4, 5, 6]


def test_iter_lines_matches_splitlines_at_any_chunk_size():
    data = b'{"a": 1}\r\n{"b": 2}\r{"c": 3}\n\r\n\r\r{"d": 4}'
    for chunk in range(1, len(data) + 2):
        assert list(iter_lines(io.BytesIO(data), chunk)) == data.splitlines(keepends=True), chunk


def test_s3_damaged_file_and_literal_brackets(tmp_path, s3_bucket):
    """On a real S3 protocol server: a fake .gz is quarantined by name (not taken for a storage
    failure), and a prefix containing [ is read as written."""
    client, bucket, endpoint = s3_bucket["client"], s3_bucket["bucket"], s3_bucket["endpoint_url"]
    client.put_object(Bucket=bucket, Key="pool[1]/a.jsonl", Body=_jsonl(tmp_path / "a.jsonl", _rows(6)).read_bytes())
    client.put_object(Bucket=bucket, Key="pool[1]/b.jsonl.gz", Body=b"not gzip\n")
    client.put_object(Bucket=bucket, Key="pool[1]/_SUCCESS", Body=b"")
    cfg = Config().replace(
        **{"pool.path": f"s3://{bucket}/pool[1]/", "pool.max_bad_fraction": 1.0, "storage.endpoint_url": endpoint}
    )
    run = get_store(f"s3://{bucket}/runs/r1", endpoint)
    s = ingest_pool(cfg, run, progress=False)
    _invariant(s)
    assert (s["rows_kept"], s["quarantine_by_reason"]) == (6, {"unreadable_file": 1})
    assert s["unreadable_files"][0]["path"] == f"s3://{bucket}/pool[1]/b.jsonl.gz"
    assert s["skipped_files"] == [{"path": f"s3://{bucket}/pool[1]/_SUCCESS", "reason": s["skipped_files"][0]["reason"]}]
