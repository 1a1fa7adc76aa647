"""Multi-round active learning in the pipeline (smoke config, tiny Llama, real Ray cluster): two
rounds, the second re-scored by the first round's adapter, a crash in round 2 resumed in round 2,
the compute each round spent; and one round giving exactly the one-shot selection.

One run serves the module: ingest, score and round 1 commit; then round 2's re-scoring is cut
after its first block (``scoring.block_callbacks``, where a preempted node would die); then the
same command finishes the run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from edsft.config import config_hash, load_config
from edsft.distributed import scoring
from edsft.distributed.coresets import SELECTION_SCHEMA, select_subset
from edsft.pipeline import STAGING, Run, run_pipeline, run_stage, stage_plan, why_not_done
from edsft.storage import get_store

pytestmark = pytest.mark.slow

SMOKE = "jobs/configs/smoke.yaml"
OVERRIDES = [
    "pool.size=80",
    "pool.eval_size=20",
    "scoring.dtype=float32",  # the direct re-scoring check below compares numbers across batchings
    "scoring.batch_size=8",  # Ray batches of 32 rows: the re-scoring is cut after its first of three blocks
    "training.max_steps=4",
    "training.checkpoint_every=2",
    "evaluation.max_examples=20",
    "output.progress=false",
]


class Preempted(RuntimeError):
    pass


def _cfg(out, *more):
    return load_config(SMOKE, [f"output.dir={out}", *OVERRIDES, *more])


def _ids(path):
    return pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist()


@pytest.fixture(scope="module")
def two_rounds(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds")
    cfg = _cfg(out, "selection.rounds=2")
    run_pipeline(cfg, stages=["ingest", "score", "round1"], summary=False)
    manifest = lambda: json.loads((out / "manifest.json").read_text())["stages"]  # noqa: E731
    round1 = manifest()["round1"]
    adapter1 = (out / "rounds" / "1" / "train" / "adapter" / "adapter_model.safetensors").read_bytes()

    def preempt(block, rows, part):
        raise Preempted(f"node lost after block {block} of round 2's re-scoring")

    scoring.block_callbacks.append(preempt)
    try:
        with pytest.raises(Preempted):
            run_pipeline(cfg, summary=False)
    finally:
        scoring.block_callbacks.remove(preempt)
    crashed = manifest()
    assert "round2" not in crashed and crashed["round1"] == round1
    blocks = list((out / STAGING / "round2" / "rounds" / "2").glob("_scores.parquet.blocks/part-*.json"))
    assert len(blocks) == 1  # the finished block, kept for the next attempt

    results = run_pipeline(cfg, summary=False)
    return {"out": out, "cfg": cfg, "round1": round1, "adapter1": adapter1, "results": results, "stages": manifest()}


def test_two_rounds_pick_disjoint_batches_that_add_up_to_the_budget(two_rounds):
    out, cfg, stages = two_rounds["out"], two_rounds["cfg"], two_rounds["stages"]
    assert stage_plan(cfg) == ["ingest", "score", "round1", "round2", "select", "annotate", "train", "evaluate"]
    assert list(stages) == ["ingest", "score", "round1", "round2", "select", "annotate", "train", "evaluate"]
    b1, b2 = _ids(out / "rounds" / "1" / "selection.parquet"), _ids(out / "rounds" / "2" / "selection.parquet")
    assert (len(b1), len(b2)) == cfg.selection.batch_sizes == (16, 16)
    assert not set(b1) & set(b2)
    sel = pq.read_table(out / "selection.parquet")
    assert sel.column("row_id").to_pylist() == b1 + b2  # the union, in pick order
    assert sel.column("round").to_pylist() == [1] * 16 + [2] * 16 and sel.column("rank").to_pylist() == list(range(32))
    assert set(_ids(out / "annotated.parquet")) == set(b1 + b2)
    assert stages["select"]["summary"]["batches"] == [16, 16] and stages["select"]["summary"]["budget"] == 32
    # the final model and evaluation come from the pipeline's own stages, on the union
    assert (out / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert stages["train"]["summary"]["steps"] == 4 and stages["annotate"]["summary"]["rows"] == 32
    assert json.loads((out / "metrics.json").read_text())["n"] == 20
    # round 1 trained on its batch; round 2, the last, leaves training to the train stage
    assert (out / "rounds" / "1" / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "rounds" / "2" / "train").exists()
    assert all(why_not_done(Run.open(cfg), s) is None for s in stages)


def test_round_two_is_scored_by_round_ones_adapter(two_rounds):
    from edsft.scoring.scorer import Scorer

    out = two_rounds["out"]
    b1 = _ids(out / "rounds" / "1" / "selection.parquet")
    base = pq.read_table(out / "scores.parquet").sort_by("row_id")
    again = pq.read_table(out / "rounds" / "2" / "scores.parquet").sort_by("row_id")
    # the remaining rows only, every one of them
    assert set(again.column("row_id").to_pylist()) == set(base.column("row_id").to_pylist()) - set(b1)
    # their scores and embeddings are not the base model's ...
    same = base.filter(
        np.isin(base.column("row_id").to_numpy(zero_copy_only=False), again.column("row_id").to_numpy(zero_copy_only=False))
    )
    e_base, e_again = np.array(same.column("embedding").to_pylist()), np.array(again.column("embedding").to_pylist())
    assert np.abs(e_base - e_again).max() > 1e-3
    assert np.abs(same.column("mean_entropy").to_numpy() - again.column("mean_entropy").to_numpy()).max() > 1e-6
    # ... but those of the base model with round 1's adapter, computed directly
    pool = pq.read_table(out / "pool.parquet").sort_by("row_id")
    pool = pool.filter(
        np.isin(pool.column("row_id").to_numpy(zero_copy_only=False), again.column("row_id").to_numpy(zero_copy_only=False)[:12])
    )
    sc = two_rounds["cfg"].scoring
    direct = Scorer(
        sc.model,
        dtype="float32",
        max_new_tokens=sc.max_new_tokens,
        max_prompt_tokens=sc.max_prompt_tokens,
        batch_size=sc.batch_size,
        adapter=str(out / "rounds" / "1" / "train" / "adapter"),
    )({c: pool.column(c).to_numpy(zero_copy_only=False) for c in ("row_id", "prompt", "task")})
    np.testing.assert_allclose(direct["embedding"], e_again[:12], atol=1e-4)
    np.testing.assert_allclose(direct["mean_entropy"], again.column("mean_entropy").to_numpy()[:12], atol=1e-4)
    # the chosen rows were embedded by the same model: facility location started from them
    chosen = pq.read_table(out / "rounds" / "2" / "chosen.parquet")
    assert sorted(chosen.column("row_id").to_pylist()) == sorted(b1)
    assert two_rounds["stages"]["round2"]["summary"]["rescored"]["rows_embedded"] == 16


def test_a_crash_in_round_two_resumes_in_round_two(two_rounds):
    out, stages = two_rounds["out"], two_rounds["stages"]
    # round 1 was not redone: the same commit, the same adapter
    assert stages["round1"]["finished_at"] == two_rounds["round1"]["finished_at"]
    assert two_rounds["results"]["round1"].get("skipped")
    assert (out / "rounds" / "1" / "train" / "adapter" / "adapter_model.safetensors").read_bytes() == two_rounds["adapter1"]
    # round 2 took the block its killed attempt finished and scored only the rest
    rescored = stages["round2"]["summary"]["rescored"]
    assert 0 < rescored["rows_resumed"] < rescored["rows_in"]
    assert rescored["rows_scored"] + rescored["rows_embedded"] + rescored["rows_quarantined"] == rescored["rows_in"] == 80
    assert not (out / STAGING).exists()


def test_rounds_say_what_they_spent(two_rounds):
    s1, s2 = two_rounds["stages"]["round1"]["summary"], two_rounds["stages"]["round2"]["summary"]
    assert set(s1["compute_s"]) == {"selection", "training"} and set(s2["compute_s"]) == {"scoring", "selection"}
    assert all(v > 0 for s in (s1, s2) for v in s["compute_s"].values())
    assert s1["compute_s"]["training"] <= s1["wall_s"] + 1e-6
    assert "gpu_s" not in s1 and "gpu_s" not in s2  # CPU only
    assert two_rounds["stages"]["select"]["summary"]["compute_s"]["selection"] >= 0
    assert (s1["train"]["examples"], s1["train"]["steps"]) == (16, 4)


def test_one_round_gives_exactly_the_one_shot_selection(two_rounds, tmp_path):
    """selection.rounds = 1 (the default) is today's design: same plan, same identity, same picks."""
    src = two_rounds["out"]
    out = tmp_path / "one"
    out.mkdir()
    for name in ("pool.parquet", "eval.parquet", "scores.parquet", "score_quarantine.jsonl", "quarantine.jsonl", "manifest.json"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, out / name)
    cfg = _cfg(out)  # rounds = 1
    assert cfg.selection.rounds == 1
    assert stage_plan(cfg) == ["ingest", "score", "select", "annotate", "train", "evaluate"]
    run = Run.open(cfg)
    # the select stage's identity is what it was before rounds existed: its section and the scores
    assert run.hash("select") == config_hash(cfg, ("selection",), extra={"score": run.hash("score")})
    entry = run_stage(cfg, "select")
    assert set(entry["inputs"]) == {"score"}
    got = pq.read_table(out / "selection.parquet")
    assert got.schema == SELECTION_SCHEMA  # no round column
    ref_path = tmp_path / "reference.parquet"
    select_subset(cfg, get_store(out / "scores.parquet"), get_store(ref_path), progress=False)
    ref = pq.read_table(ref_path)
    assert got.column("row_id").to_pylist() == ref.column("row_id").to_pylist()  # same rows, same order
    assert got.equals(ref)
    assert not (out / "rounds").exists()


def test_continue_trains_the_last_adapter_on_the_new_batch(ray_cluster, tmp_path):
    """round_training: continue, with a selector that does not start from the chosen rows (uncertainty):
    round 2 re-scores the rest without embedding the chosen rows, and the final training continues
    round 1's adapter on round 2's batch only."""
    cfg = _cfg(
        tmp_path,
        "selection.rounds=2",
        "selection.round_budgets=[20, 12]",
        "selection.round_training=continue",
        "selection.name=uncertainty",
        "selection.mode=local",
    )
    results = run_pipeline(cfg, stages=stage_plan(cfg)[:-1], summary=False)  # up to train
    b1, b2 = _ids(tmp_path / "rounds" / "1" / "selection.parquet"), _ids(tmp_path / "rounds" / "2" / "selection.parquet")
    assert (len(b1), len(b2)) == (20, 12) and not set(b1) & set(b2)
    r2 = results["round2"]["summary"]
    assert r2["rescored"]["rows_embedded"] == 0 and not (tmp_path / "rounds" / "2" / "chosen.parquet").exists()
    assert set(_ids(tmp_path / "rounds" / "2" / "scores.parquet")).isdisjoint(b1)
    # uncertainty per round: round 2's batch is the top of the re-scored rest
    again = pq.read_table(tmp_path / "rounds" / "2" / "scores.parquet").to_pandas()
    top = again.sort_values("mean_entropy", ascending=False, kind="stable").row_id.tolist()[:12]
    assert sorted(top) == sorted(b2)
    train = results["train"]["summary"]
    assert train["init_adapter"] == str(tmp_path / "rounds" / "1" / "train" / "adapter")
    assert train["examples"]["examples"] == 12  # the last batch only
    assert set(results["train"]["inputs"]) == {"annotate", "round1"}
    assert results["round1"]["summary"]["train"]["examples"] == 20
