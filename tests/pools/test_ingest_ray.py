"""The Ray version (one task per file on a real local cluster) matches the in-process ingestion."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from edsft.config import Config
from edsft.distributed.ingest import ingest_pool_ray
from edsft.pools.ingest import ingest_pool
from edsft.storage import get_store

from pool_data import _broken_jsonl, _invariant, _jsonl, _rows


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
    for key in ("rows_read", "rows_kept", "rows_held_out", "rows_quarantined", "quarantine_by_reason", "eval_rows", "tasks", "files"):
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
