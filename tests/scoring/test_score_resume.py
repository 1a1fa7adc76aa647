"""The score stage resumes inside itself: after a crash, rows of finished blocks are not scored again.

A real 2-CPU Ray cluster and the tiny Llama (float32, so scores do not depend on how rows are
batched); the crash is an exception from ``scoring.block_callbacks`` after the first committed block,
where a preempted node would have died.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edsft.config import load_config
from edsft.distributed import scoring
from edsft.pipeline import STAGING, run_stage
from edsft.scoring.uncertainty import SCORE_COLUMNS
from edsft.storage import get_store

N = 120


class Preempted(RuntimeError):
    pass


def _cfg(out):
    return load_config(
        "jobs/configs/smoke.yaml",
        [
            f"output.dir={out}",
            "output.progress=false",
            f"pool.size={N}",
            "pool.eval_size=10",
            "scoring.dtype=float32",
            "scoring.max_new_tokens=4",
            "scoring.batch_size=8",  # Ray batches of 32 rows: four blocks
        ],
    )


@pytest.mark.slow
def test_a_crashed_score_stage_resumes_without_rescoring_finished_blocks(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path)
    run_stage(cfg, "ingest")
    first = run_stage(cfg, "score")["summary"]  # uninterrupted: the reference
    assert (first["rows_resumed"], first["rows_this_attempt"]) == (0, N)
    ref = pq.read_table(tmp_path / "scores.parquet").sort_by("row_id")

    # Attempt 1 of a forced re-run: the node is lost right after its first block is committed
    def preempt(block, rows, part):
        raise Preempted(f"node lost after block {block}")

    scoring.block_callbacks.append(preempt)
    try:
        with pytest.raises(Preempted):
            run_stage(cfg, "score", force=True)
    finally:
        scoring.block_callbacks.remove(preempt)
    staging = tmp_path / STAGING / "score"
    markers = [json.loads(p.read_text()) for p in (staging / "_scores.parquet.blocks").glob("part-*.json")]
    assert len(markers) == 1
    finished = markers[0]["rows"]
    assert 0 < finished < N
    kept_parts = {p.name for p in (staging / "scores.parquet").glob("*.parquet")}
    # what a kill during a write leaves: a temporary file, and a part renamed before its marker
    (staging / "scores.parquet" / "part-dead-00009.parquet.tmp-1234").write_bytes(b"PAR1 cut")
    pq.write_table(ref.slice(0, 5), staging / "scores.parquet" / "part-dead-00010.parquet")

    # Attempt 2, same config: only the rows of no finished block reach the model
    sent = []
    scoring.block_callbacks.append(lambda block, rows, part: sent.append(rows))
    try:
        entry = run_stage(cfg, "score")
    finally:
        scoring.block_callbacks.pop()
    s = entry["summary"]
    assert (s["rows_resumed"], s["blocks_resumed"]) == (finished, 1)
    assert s["rows_this_attempt"] == sum(sent) == N - finished
    assert s["rows_in"] == N == s["rows_scored"] + s["rows_quarantined"]

    # The committed artifact: the first attempt's part, new parts with other rows, nothing else
    out = tmp_path / "scores.parquet"
    names = {p.name for p in out.iterdir()}
    assert kept_parts <= names and all(n.endswith(".parquet") and "dead" not in n for n in names)
    old_ids = set(pq.read_table(out / next(iter(kept_parts)))["row_id"].to_pylist())
    new_ids = [r for n in names - kept_parts for r in pq.read_table(out / n)["row_id"].to_pylist()]
    assert old_ids.isdisjoint(new_ids) and len(old_ids) + len(new_ids) == s["rows_scored"]
    assert not (tmp_path / STAGING).exists()

    # ... equals the uninterrupted run's: same row ids, same scores
    got = pq.read_table(out).sort_by("row_id")
    assert got.schema == ref.schema
    assert got["row_id"].to_pylist() == ref["row_id"].to_pylist()
    for c in ("generated", "prompt_tokens", "response_tokens", "task"):
        assert got[c].to_pylist() == ref[c].to_pylist(), c
    for c in [*SCORE_COLUMNS, "embedding"]:
        a = np.array(got[c].to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(a, np.array(ref[c].to_pylist(), dtype=np.float32), atol=1e-4, err_msg=c)
    assert (tmp_path / "score_quarantine.jsonl").read_text() == ""  # builtin:tasks has no bad prompt


def _block(ids: list[str], bad: set[str]) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "row_id": ids,
            "prompt_tokens": [3] * n,
            "response_tokens": [2] * n,
            "error": [("ValueError: empty" if r in bad else None) for r in ids],
            "dtype": ["float32"] * n,
        }
    )


def test_blocks_of_another_config_or_pool_are_discarded(tmp_path):
    out = get_store(tmp_path / "scores")
    blocks = scoring._Blocks(out, "config-a")
    blocks.commit(scoring.write_block(blocks.incoming, _block(["a", "b", "c"], bad={"b"})), 0)
    blocks.commit(scoring.write_block(blocks.incoming, _block(["d"], bad={"d"})), 1)  # only quarantined rows: a marker, no part
    again = scoring._Blocks(out, "config-a")
    assert sorted(again.row_ids().to_pylist()) == ["a", "b", "c", "d"]
    assert [p.name for p in (tmp_path / "scores").iterdir()] == [again.done[0]["part"]]
    other = scoring._Blocks(out, "config-b")  # a config change starts from nothing
    assert other.done == [] and len(other.row_ids()) == 0 and not out.exists()
    other.finish()
    assert not (tmp_path / "_scores.blocks").exists()
