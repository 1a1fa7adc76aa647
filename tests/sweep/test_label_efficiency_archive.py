"""The label-efficiency experiment outlives its machine: finished trials go to the committed archive,
and a run on a fresh machine (an empty run folder) restores them and runs only the rest.

Real stages on the 2-CPU ray_cluster with the tiny Llama (the experiment's --tiny mode, cut to 3 trials)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def _events(run_dir: Path, trial: str) -> list[str]:
    path = run_dir / "sweep" / "trials" / trial / "events.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_a_fresh_machine_restores_the_archived_trials_and_runs_only_the_rest(le, ray_cluster, tmp_path):
    (plan,) = le.plans("tiny", pools=("tasks",), seeds=[0], selectors=["typiclust"])
    first_plan = dataclasses.replace(plan, budgets=(8,), random_budgets=())  # random-b8, typiclust-b8
    out, pub = tmp_path / "runs", tmp_path / "results"
    run_dir = out / "label_efficiency_tiny_tasks"
    le.run_plan("tiny", first_plan, out, pub)
    archive = le.archive_path(pub, "tiny", "tasks")
    rows = {r["trial_id"]: r for r in pq.read_table(archive).to_pylist()}
    assert set(rows) == {"random-b8-s0", "typiclust-b8-s0", le.BASE_ID}
    preds = [json.loads(line) for line in rows["typiclust-b8-s0"]["predictions"].splitlines()]
    assert len({p["row_id"] for p in preds if p["variant"] == "finetuned"}) == 40  # every eval prompt
    before = pq.read_table(pub / "label_efficiency_tiny_tasks_results.parquet").to_pandas().set_index("trial_id")

    # the machine is gone: only the committed archive (and results) remain
    shutil.rmtree(out)
    second_plan = dataclasses.replace(plan, budgets=(8,), random_budgets=(16,))  # one trial more
    le.run_plan("tiny", second_plan, out, pub)
    for trial in ("random-b8-s0", "typiclust-b8-s0"):
        assert _events(run_dir, trial) == ["restored", "invoked", "reused"], trial  # not trained again
        assert not (run_dir / "sweep" / "trials" / trial / "selection.parquet").exists()
    assert "computed" in _events(run_dir, "random-b16-s0")
    after = pq.read_table(pub / "label_efficiency_tiny_tasks_results.parquet").to_pandas().set_index("trial_id")
    assert set(after.index) == {"random-b8-s0", "typiclust-b8-s0", "random-b16-s0"} and set(after.status) == {"TERMINATED"}
    for trial in before.index:
        for col in ("exact_match", "rouge_l", "loss", "train_steps", "compute_training_s", "compute_evaluation_s"):
            assert after.loc[trial, col] == before.loc[trial, col], (trial, col)
    # the bootstrap reads the restored per-prompt results: intervals over seeds *and* eval prompts
    md = (pub / "label_efficiency_tiny_tasks.md").read_text()
    assert "bootstrap over seeds and eval prompts" in md
    assert "![exact_match vs budget" in md and (pub / "label_efficiency_tiny_tasks_exact_match.png").stat().st_size > 0
    rows = {r["trial_id"] for r in pq.read_table(archive).to_pylist()}
    assert rows == {"random-b8-s0", "typiclust-b8-s0", "random-b16-s0", le.BASE_ID}


def test_an_archived_trial_of_another_recipe_is_not_restored(le, tmp_path):
    """A trial archived under another training recipe (its trial hash differs) is run again, not restored."""
    import pyarrow as pa

    (plan,) = le.plans("tiny", pools=("tasks",), seeds=[0], selectors=["typiclust"])
    plan = dataclasses.replace(plan, budgets=(8,), random_budgets=())
    cfg = le.build_config("tiny", "tasks", str(tmp_path / "run"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    parent = {"ingest": "a" * 16, "score": "b" * 16}
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {k: {"state": "done", "hash": v} for k, v in parent.items()}}))
    from edsft.distributed.sweep import trial_config, trial_hash
    from edsft.storage import get_store

    (spec, c), (spec2, c2) = le.planned_trials(cfg, plan)
    store = get_store(str(run_dir))

    def row(spec, c, hash_):
        rec = {"trial_hash": hash_, "parent": parent, "spec": spec, "report": {"exact_match": 0.5}}
        return {
            "trial_id": spec["name"],
            "trial_hash": hash_,
            "parent": json.dumps(parent, sort_keys=True),
            "result": json.dumps(rec),
            "metrics": "{}",
            "manifest": "{}",
            "predictions": json.dumps({"row_id": "r1", "variant": "finetuned", "exact_match": 1.0}),
        }

    good = trial_hash(trial_config(c, spec, store.child("sweep", "trials", spec["name"])))
    stale = trial_hash(trial_config(c2.replace(**{"training.lr": 1.0}), spec2, store.child("sweep", "trials", spec2["name"])))
    archive = tmp_path / "archive.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [row(spec, c, good), row(spec2, c2, stale)], schema=pa.schema([(k, pa.string()) for k in le.ARCHIVE_COLUMNS])
        ),
        archive,
    )
    assert le.restore_trials(cfg, plan, archive) == 1
    assert (run_dir / "sweep" / "trials" / spec["name"] / "result.json").exists()
    assert not (run_dir / "sweep" / "trials" / spec2["name"]).exists()
    # a trial folder some trial has started in is never overwritten
    (run_dir / "sweep" / "trials" / spec["name"] / "result.json").unlink()
    assert le.restore_trials(cfg, plan, archive) == 0


def test_every_committed_cpu_trial_is_still_restorable_by_the_current_code(le, tmp_path):
    """The committed archive holds hours of CPU trials: a change to what a trial's hash covers (a new
    config field, a renamed default) must not silently invalidate them. Every archived trial's hash is
    recomputed from today's plan and config (the embedding the run used is read from its manifest)."""
    from edsft.distributed.sweep import trial_config, trial_hash
    from edsft.storage import get_store

    rows = le._read_archive(le.archive_path(le.RESULTS_DIR, "cpu", "tasks"))
    trials = {k: v for k, v in rows.items() if k != le.BASE_ID}
    assert len(trials) >= 51
    embedding = {json.loads(r["manifest"])["config"]["selection"]["embedding"] for r in trials.values()}
    assert len(embedding) == 1, embedding
    specs = {json.loads(r["result"])["spec"]["name"]: json.loads(r["result"])["spec"] for r in trials.values()}
    budgets = sorted({s["budget"] for s in specs.values() if s["selector"] != "random"})
    (plan,) = le.plans(
        "cpu",
        pools=("tasks",),
        selectors=sorted({s["selector"] for s in specs.values()} - {"random"}),
        budgets=budgets,
        random_budgets=sorted({s["budget"] for s in specs.values()} - set(budgets)),
    )
    cfg = le.build_config("cpu", "tasks", str(tmp_path), embedding.pop())
    store = get_store(str(tmp_path))
    planned = {spec["name"]: (spec, c) for spec, c in le.planned_trials(cfg, plan)}
    stale = [
        name
        for name, row in trials.items()
        if row["trial_hash"] != trial_hash(trial_config(planned[name][1], planned[name][0], store.child("sweep", "trials", name)))
    ]
    assert not stale, f"{len(stale)} of {len(trials)} archived trials would run again, e.g. {stale[:3]}"
