"""The Ray version (one task per file on a real local cluster) matches the in-process ingestion."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from pool_data import _broken_jsonl, _invariant, _jsonl, _rows

from edsft.config import Config
from edsft.distributed.ingest import ingest_pool_ray
from edsft.pools.ingest import ingest_pool
from edsft.storage import get_store


def test_ray_matches_in_process(tmp_path, ray_cluster):
    pool = tmp_path / "pool"
    pool.mkdir()
    for k in range(4):
        _jsonl(pool / f"shard-{k}.jsonl", _rows(40, 40 * k))
    _broken_jsonl(pool / "shard-9-broken.jsonl")
    # a Parquet shard that repeats rows of shard-0 (exact duplicates across files) and one new row
    pq.write_table(pa.Table.from_pylist(_rows(3) + _rows(1, 1000)), pool / "shard-5.parquet")
    (pool / "shard-6.json").write_text(json.dumps(_rows(5, 2000)))
    cfg = Config().replace(**{"pool.path": str(pool), "pool.rows_per_shard": 25, "pool.eval_fraction": 0.1})

    local = ingest_pool(cfg, get_store(tmp_path / "local"), progress=False)
    run = get_store(tmp_path / "ray")
    dist = ingest_pool_ray(cfg, run, progress=False)
    _invariant(dist)
    for key in (
        "rows_read",
        "rows_kept",
        "rows_held_out",
        "rows_quarantined",
        "quarantine_by_reason",
        "eval_rows",
        "tasks",
        "files",
    ):
        assert dist[key] == local[key], key
    # the broken file repeats rows 0-9 of shard-0 (10) and its own line 1 (1); shard-5 repeats 3 rows
    assert dist["quarantine_by_reason"]["duplicate_id"] == 10 + 1 + 3
    ids = lambda r: r.child("pool.parquet").read_table().column("row_id").to_pylist()  # noqa: E731
    assert ids(run) == ids(get_store(tmp_path / "local"))
    ev = lambda r: sorted(r.child("eval.parquet").read_table().column("row_id").to_pylist())  # noqa: E731
    assert ev(run) == ev(get_store(tmp_path / "local"))
    q = lambda r: sorted((x["source"], x["line"], x["reason"]) for x in r.child("quarantine.jsonl").read_jsonl())  # noqa: E731
    assert q(run) == q(get_store(tmp_path / "local"))
    # one set of parts per file, named so that they sort in file order
    names = run.child("pool.parquet").list()
    assert names[0].startswith("part-00000-") and len({n.split("-")[1] for n in names}) == 7
    assert not run.child("_ingest_tmp").exists()


# ---------------------------------------------------------------------------------------------
# Hostile inputs on Ray: quarantined as in-process, user errors without a Ray traceback
# ---------------------------------------------------------------------------------------------


def _hostile_folder(tmp_path):
    import gzip

    pool = tmp_path / "hostile"
    pool.mkdir()
    _jsonl(pool / "a.jsonl", _rows(30))
    (pool / "b-surrogate.jsonl").write_text(
        '{"instruction": "cut \\ud83d", "output": "a"}\n{"instruction": "fine", "output": "b"}\r'
        '{"instruction": "nan", "output": NaN}\r{"instruction": "\\u200b", "output": "c"}\r'
    )
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in _rows(3000, 100)).encode())
    (pool / "c-truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (pool / "d-fake.jsonl.gz").write_bytes(b"not gzip\n")
    (pool / "e-corrupt.parquet").write_bytes(b"PAR1 no footer")
    (pool / "_SUCCESS").write_text("")
    return pool


def test_ray_hostile_inputs_match_in_process(tmp_path, ray_cluster):
    cfg = Config().replace(**{"pool.path": str(_hostile_folder(tmp_path)), "pool.max_bad_fraction": 1.0})
    local = ingest_pool(cfg, get_store(tmp_path / "local"), progress=False)
    run = get_store(tmp_path / "ray")
    dist = ingest_pool_ray(cfg, run, progress=False)
    _invariant(dist)
    for key in ("rows_read", "rows_kept", "quarantine_by_reason", "files", "skipped_files", "unreadable_files"):
        assert dist[key] == local[key], key
    assert dist["quarantine_by_reason"] == {"unreadable_file": 3, "not_utf8": 1, "wrong_type": 1, "empty_prompt": 1}
    assert [s["path"].rsplit("/", 1)[-1] for s in dist["skipped_files"]] == ["_SUCCESS"]
    q = lambda r: sorted((x["source"], x["line"], x["reason"]) for x in r.child("quarantine.jsonl").read_jsonl())  # noqa: E731
    assert q(run) == q(get_store(tmp_path / "local"))


def test_ray_failed_ingest_is_a_plain_pool_error_and_leaves_no_pool(tmp_path, ray_cluster):
    from edsft.pools.ingest import PoolError

    pool = tmp_path / "pool"
    pool.mkdir()
    for k in range(3):
        _broken_jsonl(pool / f"broken-{k}.jsonl")
    run_dir = tmp_path / "ray"
    cfg = Config().replace(
        **{"pool.path": str(pool), "pool.max_bad_fraction": 0.3, "pool.rows_per_shard": 4, "pool.eval_fraction": 0.2}
    )
    try:
        ingest_pool_ray(cfg, get_store(run_dir), progress=False)
        raise AssertionError("expected a PoolError")
    except PoolError as e:
        assert type(e) is PoolError and "max_bad_fraction" in str(e) and "Traceback" not in str(e)
    assert sorted(p.name for p in run_dir.iterdir()) == ["quarantine.jsonl"]


def test_ray_user_error_inside_a_task_reaches_the_caller_unwrapped(tmp_path, ray_cluster, monkeypatch):
    """A reader registered on the driver only: the task's PoolError comes back as itself."""
    from edsft.pools import readers
    from edsft.pools.ingest import PoolError

    monkeypatch.setitem(readers.READERS, "lines", lambda store: iter(()))
    monkeypatch.setitem(readers.EXTENSIONS, ".lines", "lines")
    pool = tmp_path / "pool"
    pool.mkdir()
    _jsonl(pool / "a.jsonl", _rows(50))
    (pool / "b.lines").write_text("one\n")
    run_dir = tmp_path / "ray"
    try:
        ingest_pool_ray(
            Config().replace(**{"pool.path": str(pool), "pool.rows_per_shard": 5}), get_store(run_dir), progress=False
        )
        raise AssertionError("expected a PoolError")
    except PoolError as e:
        assert type(e) is PoolError and str(pool / "b.lines") in str(e) and "register_reader" in str(e)
        assert "Traceback" not in str(e) and "RayTaskError" not in str(e)
    assert not run_dir.exists() or not list(run_dir.iterdir())


def test_cli_exit_2_names_the_damaged_file(tmp_path, ray_cluster, capsys):
    from edsft.cli import main

    pool = _hostile_folder(tmp_path)
    rc = main(["ingest", f"pool.path={pool / 'd-fake.jsonl.gz'}", f"output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(pool / "d-fake.jsonl.gz") in err and "unreadable_file" in err
    assert "Traceback" not in err and "RayTaskError" not in err
    assert not (tmp_path / "run" / "pool.parquet").exists()
