"""The whole pipeline on the smoke config (tiny Llama, real Ray cluster), through the CLI."""

from __future__ import annotations

import json
import random

import pytest

from edsft.cli import main
from edsft.config import load_config
from edsft.pipeline import run_pipeline
from edsft.pools.builtin_tasks import iter_tasks
from edsft.storage import get_store

pytestmark = pytest.mark.slow

SMOKE = "jobs/configs/smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert main(["run", "--config", SMOKE, f"output.dir={out}"]) == 0
    return out


def test_every_stage_writes_its_artifact(smoke_run):
    run = get_store(smoke_run)
    for artifact in [
        "pool.parquet",
        "eval.parquet",
        "quarantine.jsonl",
        "scores.parquet",
        "selection.parquet",
        "annotated.parquet",
        "train/adapter/adapter_model.safetensors",
        "metrics.json",
        "manifest.json",
    ]:
        assert run.child(artifact).exists(), artifact
    m = run.child("manifest.json").read_json()
    assert list(m["stages"]) == ["ingest", "score", "select", "annotate", "train", "evaluate"]
    assert m["versions"]["ray"].startswith("2.60") and m["config"]["selection"]["budget"] == 32
    assert m["stages"]["ingest"]["summary"]["rows_kept"] == 200
    assert run.child("selection.parquet").read_table().num_rows == 32
    sel = set(run.child("selection.parquet").read_table().column("row_id").to_pylist())
    assert sel == set(run.child("annotated.parquet").read_table().column("row_id").to_pylist())


def test_every_stage_records_its_compute_and_the_run_totals_them(smoke_run):
    from edsft.compute import KINDS, run_compute

    run = get_store(smoke_run)
    stages = run.child("manifest.json").read_json()["stages"]
    for name, kind in [("score", "scoring"), ("select", "selection"), ("train", "training"), ("evaluate", "evaluation")]:
        c = stages[name]["compute"]
        # one-shot stages do not split their time: all of the wall time is their kind's, no GPU on CPU
        assert list(c["compute_s"]) == [kind] and c["gpu_s"] == {}, (name, c)
        assert 0 < c["compute_s"][kind] == pytest.approx(stages[name]["wall_s"], abs=2e-3), name
    for name in ("ingest", "annotate"):  # reading the pool and the oracle's labels are not compute
        assert stages[name]["compute"] == {"compute_s": {}, "gpu_s": {}}
    total = run_compute(run)
    assert all(total["compute_s"][k] > 0 for k in KINDS) and total["gpu_total_s"] == 0
    assert total["total_s"] == pytest.approx(sum(stages[n]["wall_s"] for n in ("score", "select", "train", "evaluate")), abs=1e-2)


def test_rerun_skips_finished_stages_and_force_recomputes_downstream(smoke_run, capsys):
    cfg = load_config(SMOKE, [f"output.dir={smoke_run}"])
    results = run_pipeline(cfg)
    assert all(r.get("skipped") for r in results.values())
    before = get_store(smoke_run).child("manifest.json").read_json()["stages"]
    # A changed selection budget invalidates select and everything after it, not scoring.
    cfg2 = load_config(SMOKE, [f"output.dir={smoke_run}", "selection.budget=16"])
    results = run_pipeline(cfg2, stages=["ingest", "score", "select", "annotate"])
    assert results["ingest"].get("skipped") and results["score"].get("skipped")
    assert not results["select"].get("skipped") and not results["annotate"].get("skipped")
    assert get_store(smoke_run).child("annotated.parquet").read_table().num_rows == 16
    after = get_store(smoke_run).child("manifest.json").read_json()["stages"]
    assert after["score"]["finished_at"] == before["score"]["finished_at"]


def _write_pool(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_selection_never_reads_the_responses(ray_cluster, tmp_path):
    """Scramble the label column: scores and selection must not change (only annotation reads it)."""
    rows = [dict(r, id=f"q{i}") for i, r in enumerate(next(iter_tasks(60, seed=3)))]
    scrambled = [dict(r) for r in rows]
    answers = [r["output"] for r in rows]
    random.Random(0).shuffle(answers)
    for r, a in zip(scrambled, answers):
        r["output"] = "SCRAMBLED " + a
    picks = []
    for name, data in [("a", rows), ("b", scrambled)]:
        _write_pool(tmp_path / f"{name}.jsonl", data)
        out = tmp_path / f"run_{name}"
        overrides = [
            f"output.dir={out}",
            f"pool.path={tmp_path / name}.jsonl",
            "pool.id_field=id",
            "pool.eval_fraction=0.1",
            "selection.budget=12",
            "selection.mode=local",
        ]
        for verb in ["ingest", "score", "select"]:
            assert main([verb, "--config", SMOKE, *overrides]) == 0
        run = get_store(out)
        picks.append(run.child("selection.parquet").read_table().column("row_id").to_pylist())
        scores = run.child("scores.parquet").read_table().sort_by("row_id")
        picks.append(scores.column("mean_entropy").to_pylist())
    assert picks[0] == picks[2] and len(picks[0]) == 12
    assert picks[1] == picks[3]
