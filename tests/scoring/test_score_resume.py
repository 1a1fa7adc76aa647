"""The score stage resumes inside itself: after a crash, rows of finished blocks are not scored again.

A real 2-CPU Ray cluster and the tiny Llama (float32, so scores do not depend on how rows are
batched). Two crashes: an exception from ``scoring.block_callbacks`` after the first committed block,
where a preempted node would have died; and a real ``edsft score`` process SIGKILLed while its
actors are writing blocks, at a moment picked by watching the blocks folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edsft.config import load_config
from edsft.distributed import scoring
from edsft.pipeline import STAGING, Run, run_stage, why_not_done
from edsft.scoring.uncertainty import SCORE_COLUMNS
from edsft.storage import get_store

N = 120


class Preempted(RuntimeError):
    pass


def _overrides(out, n=N):
    return [
        f"output.dir={out}",
        "output.progress=false",
        f"pool.size={n}",
        "pool.eval_size=10",
        "scoring.dtype=float32",
        "scoring.max_new_tokens=4",
        "scoring.batch_size=8",  # Ray batches of 32 rows: four blocks for N rows
    ]


def _cfg(out, n=N, *more):
    return load_config("jobs/configs/smoke.yaml", [*_overrides(out, n), *more])


def _assert_same_scores(got: pa.Table, ref: pa.Table) -> None:
    assert got.schema == ref.schema
    assert got["row_id"].to_pylist() == ref["row_id"].to_pylist()
    for c in ("generated", "prompt_tokens", "response_tokens", "task"):
        assert got[c].to_pylist() == ref[c].to_pylist(), c
    for c in [*SCORE_COLUMNS, "embedding"]:
        a = np.array(got[c].to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(a, np.array(ref[c].to_pylist(), dtype=np.float32), atol=1e-4, err_msg=c)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distributed", "local"])  # Ray Data actors, or in this process (scoring.mode)
def test_a_crashed_score_stage_resumes_without_rescoring_finished_blocks(ray_cluster, tmp_path, mode):
    cfg = _cfg(tmp_path, N, f"scoring.mode={mode}")
    run_stage(cfg, "ingest")
    first = run_stage(cfg, "score")["summary"]  # uninterrupted: the reference
    assert (first["rows_resumed"], first["rows_this_attempt"]) == (0, N)
    assert first["mode"] == mode and (first["actors"] == 0) == (mode == "local")
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
    _assert_same_scores(pq.read_table(out).sort_by("row_id"), ref)
    assert (tmp_path / "score_quarantine.jsonl").read_text() == ""  # builtin:tasks has no bad prompt


ROOT = Path(__file__).resolve().parents[2]
N_KILL = 256  # two actors, Ray batches of 32 rows: eight blocks


def _edsft_score(out: Path) -> subprocess.Popen:
    """A real `edsft score` process on the session's Ray cluster (RAY_ADDRESS, pinned by the fixture)."""
    cmd = [sys.executable, "-m", "edsft", "score", "--config", "jobs/configs/smoke.yaml", *_overrides(out, N_KILL)]
    cmd.append("scoring.num_actors=2")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def _files(folder: Path, pattern: str = "*") -> list[str]:
    try:
        return sorted(p.name for p in folder.glob(pattern))
    except FileNotFoundError:  # the folder is being renamed or removed
        return []


@pytest.mark.slow
def test_a_sigkilled_edsft_score_resumes_from_its_committed_blocks(ray_cluster, tmp_path):
    assert os.environ.get("RAY_ADDRESS"), "the ray_cluster fixture pins RAY_ADDRESS for the child processes"
    ref_dir, out = tmp_path / "reference", tmp_path / "killed"
    run_stage(_cfg(ref_dir, N_KILL, "scoring.num_actors=2"), "ingest")
    run_stage(_cfg(ref_dir, N_KILL, "scoring.num_actors=2"), "score")  # uninterrupted: the reference
    ref = pq.read_table(ref_dir / "scores.parquet").sort_by("row_id")
    cfg = _cfg(out, N_KILL, "scoring.num_actors=2")
    run_stage(cfg, "ingest")
    pool_ids = sorted(pq.read_table(out / "pool.parquet", columns=["row_id"])["row_id"].to_pylist())
    assert pool_ids == ref["row_id"].to_pylist()

    # Watch the blocks folder; SIGKILL the driver once two blocks are committed while an actor's block
    # is written but not committed yet (in incoming/, or in the out folder without its marker), or
    # failing that moment, once more than half of the blocks are committed.
    staging = out / STAGING / "score"
    blocks, parts = staging / "_scores.parquet.blocks", staging / "scores.parquet"
    proc = _edsft_score(out)
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, f"edsft score ended before the kill (rc {proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no block was committed in 10 minutes"
        markers = _files(blocks, "part-*.json")
        in_flight = _files(blocks / "incoming") or set(_files(parts)) - {m[: -len(".json")] + ".parquet" for m in markers}
        if (len(markers) >= 2 and in_flight) or len(markers) > 4:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(2)  # the killed job's actors may still finish a write: they may add to incoming/, never a marker

    # What the kill left: committed blocks (part + marker) and blocks no marker names
    marked = [json.loads((blocks / m).read_text()) for m in _files(blocks, "part-*.json")]
    committed_rows = sum(b["rows"] for b in marked)
    named = {b["part"] for b in marked if b["part"]}
    unmarked = _files(blocks / "incoming") + [n for n in _files(parts) if n not in named]
    assert 2 <= len(marked) and 0 < committed_rows < N_KILL
    assert why_not_done(Run.open(cfg), "score") is not None and not (out / "scores.parquet").exists()

    # The re-run: the same command
    again = _edsft_score(out)
    assert again.wait(timeout=900) == 0, again.stderr.read()[-3000:]
    s = json.loads((out / "manifest.json").read_text())["stages"]["score"]["summary"]
    # exactly the marked blocks were taken over (a block without its marker never counts) ...
    assert (s["rows_resumed"], s["blocks_resumed"]) == (committed_rows, len(marked))
    # ... and their rows were not scored again
    assert 0 < s["rows_this_attempt"] == N_KILL - committed_rows < N_KILL
    assert s["rows_in"] == N_KILL == s["rows_scored"] + s["rows_quarantined"]

    # Every row exactly once, and the scores are the uninterrupted run's
    got = pq.read_table(out / "scores.parquet")
    ids = got["row_id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_KILL and sorted(ids) == pool_ids
    _assert_same_scores(got.sort_by("row_id"), ref)
    assert not (out / STAGING).exists()
    print(f"\nkilled with {len(marked)} blocks committed ({committed_rows} rows), {len(unmarked)} written but not committed")


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
