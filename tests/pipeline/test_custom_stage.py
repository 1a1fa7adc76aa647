"""Worked example: adding a stage. A stage is a function of (run, staging store, progress) that
reads committed upstream artifacts through ``run.input`` and writes only into its staging store;
the pipeline hashes its config sections, commits its outputs atomically and skips it when done."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from edsft import pipeline
from edsft.config import Config
from edsft.pipeline import STAGES, Run, Stage, run_stage


def _family_counts(run: Run, out, progress: bool) -> dict:
    """Rows per task family of the ingested pool (a stage needs nothing more than this)."""
    tasks = run.input("pool.parquet").read_table(columns=["task"]).column("task").to_pylist()
    counts = {t: tasks.count(t) for t in sorted(set(tasks))}
    out.child("family_counts.json").write_json(counts)
    return {"families": len(counts), "rows": len(tasks)}


@pytest.fixture
def family_stage(monkeypatch):
    calls = []

    def counted(run, out, progress):
        calls.append(1)
        return _family_counts(run, out, progress)

    # registering is one dict entry; monkeypatch keeps the registry clean for other tests
    monkeypatch.setitem(
        STAGES,
        "family_counts",
        Stage(
            "family_counts",
            sections=("pool",),
            upstream=("ingest",),
            outputs=("family_counts.json",),
            fn=counted,
            needs=("pool.parquet",),
        ),
    )
    return calls


def test_a_new_stage_commits_and_skips_like_the_built_in_ones(tmp_path, family_stage):
    cfg = Config().replace(**{"pool.size": 120, "pool.eval_size": 14, "output.dir": str(tmp_path / "run")})
    # the stage declares what it needs: before ingest it refuses to start, naming the file
    with pytest.raises(ValueError, match="pool.parquet"):
        run_stage(cfg, "family_counts")
    run_stage(cfg, "ingest")
    entry = run_stage(cfg, "family_counts", skip_done=True)
    counts = json.loads((tmp_path / "run" / "family_counts.json").read_text())
    assert entry["summary"]["rows"] == sum(counts.values()) == pq.read_table(tmp_path / "run" / "pool.parquet").num_rows
    assert not (tmp_path / "run" / pipeline.STAGING / "family_counts").exists()  # committed, staging gone
    assert run_stage(cfg, "family_counts", skip_done=True).get("skipped") is True and len(family_stage) == 1
    # a changed pool section invalidates it, exactly like a built-in stage's config
    cfg2 = cfg.replace(**{"pool.size": 130})
    run_stage(cfg2, "ingest", skip_done=True)
    run_stage(cfg2, "family_counts", skip_done=True)
    assert len(family_stage) == 2
