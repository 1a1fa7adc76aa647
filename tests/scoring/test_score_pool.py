"""score_pool on a real local Ray cluster (2 CPUs) with the tiny Llama."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from edsft.config import Config
from edsft.scoring.scorer import Scorer
from edsft.scoring.uncertainty import SCORE_COLUMNS
from edsft.storage import get_store

N = 30
BAD = 11  # this row's prompt is empty: it must be quarantined, not fail the run


def _pool(n: int, responses: list[str]) -> pa.Table:
    prompts = [f"Question {i}: what is {i} plus {3 * i}?" + " Think." * (i % 5) for i in range(n)]
    prompts[BAD] = ""
    return pa.table(
        {
            "row_id": [f"id{i:03d}" for i in range(n)],
            "prompt": prompts,
            "response": responses,
            "task": ["arithmetic" if i % 2 else "other" for i in range(n)],
            "source": ["test"] * n,
            "line": list(range(n)),
        }
    )


def _cfg(tmp_path, **over) -> Config:
    """The tiny Llama in float32 (batching changes no score), 6 new tokens, 4-row micro-batches."""
    base = {
        "scoring.model": "builtin:tiny-llama",
        "scoring.dtype": "float32",
        "scoring.max_new_tokens": 6,
        "scoring.batch_size": 4,
        "scoring.max_prompt_tokens": 64,
        "output.dir": str(tmp_path),
    }
    return Config().replace(**{**base, **over})


@pytest.mark.slow
def test_score_pool_on_ray(ray_cluster, tmp_path):
    # a 30-row pool: scoring.mode auto would score it in this process
    cfg = _cfg(tmp_path, **{"scoring.num_actors": 2, "scoring.cpus_per_actor": 0.5, "scoring.mode": "distributed"})
    # the same pool twice: once with real labels, once with the label column scrambled
    pq.write_table(_pool(N, [str(4 * i) for i in range(N)]), tmp_path / "pool.parquet")
    scrambled = tmp_path / "scrambled"
    scrambled.mkdir()
    rng = np.random.default_rng(0)
    labels = ["".join(rng.choice(list("xyz0123456789"), 20)) for _ in range(N)]
    t = _pool(N, labels)
    pq.write_table(t.slice(0, 17), scrambled / "part-0.parquet")  # a folder of parts works too
    pq.write_table(t.slice(17), scrambled / "part-1.parquet")

    s1 = score_pool_run(cfg, tmp_path / "pool.parquet", tmp_path / "scores")
    s2 = score_pool_run(cfg, scrambled, tmp_path / "scores2")

    for s in (s1, s2):
        assert s["rows_in"] == N == s["rows_scored"] + s["rows_quarantined"]
        assert s["rows_quarantined"] == 1 and s["rows_per_s"] > 0 and s["tokens_per_s"] > 0
        assert s["dtype"] == "float32"  # what the actors ran in lands in the stage summary (manifest.json)
    q = [json.loads(x) for x in (tmp_path / "scores.quarantine.jsonl").read_text().splitlines()]
    assert q == [{"row_id": f"id{BAD:03d}", "reason": "ValueError: prompt is empty after truncation"}]

    a = pq.read_table(tmp_path / "scores").sort_by("row_id")
    b = pq.read_table(tmp_path / "scores2").sort_by("row_id")
    assert len(list((tmp_path / "scores").glob("*.parquet"))) >= 2  # sharded by the actors
    assert a.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert "response" not in a.column_names and "error" not in a.column_names
    assert a["row_id"].to_pylist() == [f"id{i:03d}" for i in range(N) if i != BAD]
    # the label column is never read: scrambling it changes nothing
    # (Ray may batch the two pools differently: floats agree to padding noise, the rest exactly)
    for c in SCORE_COLUMNS:
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=1e-4, err_msg=c)
    for c in ("generated", "prompt_tokens", "response_tokens", "task"):
        assert a[c].to_pylist() == b[c].to_pylist(), c
    emb = np.array(a["embedding"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # Ray and the direct scorer agree (different batching, same numbers)
    pool = _pool(N, [""] * N)
    pool = pool.filter(pc.not_equal(pool["row_id"], f"id{BAD:03d}"))
    direct = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=6, max_prompt_tokens=64, batch_size=16)(
        {c: pool[c].to_numpy(zero_copy_only=False) for c in ("row_id", "prompt", "task")}
    )
    for c in SCORE_COLUMNS:
        np.testing.assert_allclose(a[c].to_numpy(), direct[c], atol=1e-4, err_msg=c)
    np.testing.assert_allclose(emb, direct["embedding"], atol=1e-4)


@pytest.mark.slow
def test_a_small_pool_is_scored_in_process_with_the_same_scores(ray_cluster, tmp_path):
    # scoring.mode auto: up to local_max_rows prompts on CPU are scored in the driver's process, one
    # model load and no actors; the scores equal the Ray Data actors' (float32: batching changes nothing)
    cfg = _cfg(tmp_path, **{"scoring.local_max_rows": N})
    pq.write_table(_pool(N, [str(4 * i) for i in range(N)]), tmp_path / "pool.parquet")
    local = score_pool_run(cfg, tmp_path / "pool.parquet", tmp_path / "local")
    assert (local["mode"], local["actors"], local["device"]) == ("local", 0, "cpu")
    assert local["rows_in"] == N == local["rows_scored"] + local["rows_quarantined"] and local["rows_quarantined"] == 1
    assert len(list((tmp_path / "local").glob("*.parquet"))) == 2  # blocks of 4 x batch_size rows, committed one by one
    ray_run = score_pool_run(cfg.replace(**{"scoring.local_max_rows": N - 1}), tmp_path / "pool.parquet", tmp_path / "ray")
    assert ray_run["mode"] == "distributed" and ray_run["actors"] >= 1  # one row over the limit
    a = pq.read_table(tmp_path / "local").sort_by("row_id")
    b = pq.read_table(tmp_path / "ray").sort_by("row_id")
    assert a.schema == b.schema and a["row_id"].to_pylist() == b["row_id"].to_pylist()
    for c in ("generated", "prompt_tokens", "response_tokens"):
        assert a[c].to_pylist() == b[c].to_pylist(), c
    for c in [*SCORE_COLUMNS, "embedding"]:
        np.testing.assert_allclose(
            np.array(a[c].to_pylist(), dtype=np.float32), np.array(b[c].to_pylist(), dtype=np.float32), atol=1e-4, err_msg=c
        )
    assert (tmp_path / "local.quarantine.jsonl").read_text() == (tmp_path / "ray.quarantine.jsonl").read_text()


def score_pool_run(cfg, pool_path, out_path):
    from edsft.distributed.scoring import score_pool

    return score_pool(cfg, get_store(pool_path), get_store(out_path), progress=False)


def test_score_pool_rejects_a_pool_without_prompts(tmp_path):
    from edsft.distributed.scoring import score_pool

    pq.write_table(pa.table({"row_id": ["a"], "text": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['prompt'\]"):
        score_pool(Config(), get_store(tmp_path / "p.parquet"), get_store(tmp_path / "out"))
    with pytest.raises(ValueError, match="no Parquet file"):
        score_pool(Config(), get_store(tmp_path / "missing"), get_store(tmp_path / "out"))


def test_actor_plan_one_actor_per_gpu_or_fractional_cpus():
    from edsft.config import ScoringConfig
    from edsft.distributed.runtime import model_actor_plan

    cpu = model_actor_plan(ScoringConfig(num_actors=3, min_actors=1, cpus_per_actor=0.5), gpus=0)
    assert (cpu.num_cpus, cpu.num_gpus, cpu.concurrency, cpu.device, cpu.num_threads) == (0.5, 0.0, (1, 3), "cpu", 1)
    gpu = model_actor_plan(ScoringConfig(num_actors=1, min_actors=1), gpus=4)
    assert (gpu.num_gpus, gpu.concurrency, gpu.device, gpu.num_threads) == (1.0, (1, 4), "cuda", None)
    half = model_actor_plan(ScoringConfig(num_actors=2, min_actors=2, num_gpus_per_actor=0.5), gpus=1)
    assert (half.num_gpus, half.concurrency) == (0.5, (2, 2))
    # CPU actors split the node's cores as torch threads: a lone actor on 2 cores runs 2 threads
    assert model_actor_plan(ScoringConfig(num_actors=1), gpus=0, node_cpus=2).num_threads == 2
    assert model_actor_plan(ScoringConfig(num_actors=2), gpus=0, node_cpus=2).num_threads == 1
    assert model_actor_plan(ScoringConfig(num_actors=3), gpus=0, node_cpus=2).num_threads == 1


def _adapter(folder):
    """A LoRA adapter for the tiny Llama with random (not zero) B matrices: it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edsft.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_model("builtin:tiny-llama", dtype="float32", device="cpu"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    model.save_pretrained(folder)
    return get_store(folder)


@pytest.mark.slow
def test_rescoring_with_an_adapter_embeds_the_chosen_rows_and_resumes(ray_cluster, tmp_path):
    from edsft.distributed import scoring
    from edsft.distributed.scoring import score_pool

    cfg = _cfg(tmp_path, **{"scoring.mode": "distributed"})
    pq.write_table(_pool(N, [""] * N), tmp_path / "pool.parquet")
    pool, adapter = get_store(tmp_path / "pool.parquet"), _adapter(tmp_path / "adapter")
    chosen = [f"id{i:03d}" for i in (0, 3, 4, 20)]
    out, emb_out = get_store(tmp_path / "scores"), get_store(tmp_path / "chosen")

    class Preempted(RuntimeError):
        pass

    def preempt(block, rows, part):
        raise Preempted(block)

    scoring.block_callbacks.append(preempt)
    try:
        with pytest.raises(Preempted):
            score_pool(cfg, pool, out, progress=False, adapter=adapter, chosen=chosen, chosen_out=emb_out)
    finally:
        scoring.block_callbacks.remove(preempt)
    s = score_pool(cfg, pool, out, progress=False, adapter=adapter, chosen=chosen, chosen_out=emb_out)
    assert s["rows_resumed"] > 0 and s["rows_in"] == N
    assert (s["rows_scored"], s["rows_embedded"], s["rows_quarantined"], s["rows_chosen"]) == (N - 5, 4, 1, 4)
    scores = pq.read_table(tmp_path / "scores").sort_by("row_id")
    assert set(scores["row_id"].to_pylist()).isdisjoint(chosen) and scores.num_rows == N - 5
    got = pq.read_table(tmp_path / "chosen").sort_by("row_id")
    assert got.column_names == ["row_id", "task", "embedding"] and got["row_id"].to_pylist() == chosen

    # the same numbers as the scorer with the adapter, directly: scores of the rest, embeddings of the chosen
    rows = _pool(N, [""] * N).filter(pc.not_equal(pc.field("row_id"), f"id{BAD:03d}"))
    tuned = Scorer(
        "builtin:tiny-llama",
        dtype="float32",
        max_new_tokens=6,
        max_prompt_tokens=64,
        batch_size=16,
        adapter=str(tmp_path / "adapter"),
    )
    direct = tuned({c: rows[c].to_numpy(zero_copy_only=False) for c in ("row_id", "prompt", "task")})
    pos = {r: i for i, r in enumerate(direct["row_id"])}
    rest = [pos[r] for r in scores["row_id"].to_pylist()]
    for c in SCORE_COLUMNS:
        np.testing.assert_allclose(scores[c].to_numpy(), direct[c][rest], atol=1e-4, err_msg=c)
    np.testing.assert_allclose(np.array(got["embedding"].to_pylist()), direct["embedding"][[pos[r] for r in chosen]], atol=1e-4)
    # ... and not the base model's
    base = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=6, max_prompt_tokens=64, batch_size=16)(
        {c: rows[c].to_numpy(zero_copy_only=False) for c in ("row_id", "prompt", "task")}
    )
    assert not np.allclose(direct["embedding"], base["embedding"], atol=1e-3)

    # without chosen_out the chosen rows are simply not scored
    s2 = score_pool(cfg, pool, get_store(tmp_path / "scores2"), progress=False, adapter=adapter, chosen=chosen)
    assert (s2["rows_in"], s2["rows_scored"], s2["rows_embedded"]) == (N - 4, N - 5, 0)


def test_scoring_needs_no_whole_cpu(ray_cluster, tmp_path):
    """A multi-round sweep trial (in its placement group of a sliver of a CPU) re-scores the pool on 2
    CPUs while the other trial holds its sliver and actors: under a whole CPU stays free, so no step of
    scoring (read, filters, block split) may ask for one. The rows are still split into blocks."""
    import ray

    from edsft.distributed.scoring import score_pool

    @ray.remote
    class Held:
        def ping(self):
            return True

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    held = [Held.options(num_cpus=c).remote() for c in (0.01, 0.99)]  # the other trial's sliver and actors
    ray.get([h.ping.remote() for h in held])
    trial = placement_group([{"CPU": 0.01}])  # this trial's sliver, as Tune holds it
    ray.get(trial.ready())
    cfg = _cfg(
        tmp_path,
        **{"scoring.max_new_tokens": 2, "scoring.num_actors": 1, "scoring.cpus_per_actor": 0.5, "scoring.mode": "distributed"},
    )
    pq.write_table(_pool(N, [""] * N), tmp_path / "pool.parquet")
    chosen = [f"id{i:03d}" for i in (0, 1, 2)]  # a later round: the chosen rows are filtered out
    try:
        in_trial = PlacementGroupSchedulingStrategy(placement_group=trial)
        ref = (
            ray.remote(score_pool)
            .options(num_cpus=0.01, scheduling_strategy=in_trial)
            .remote(cfg, get_store(tmp_path / "pool.parquet"), get_store(tmp_path / "scores"), progress=False, chosen=chosen)
        )
        ready, _ = ray.wait([ref], timeout=240)
        assert ready, "scoring hung waiting for a whole CPU"
        s = ray.get(ref)
    finally:
        for h in held:
            ray.kill(h)
        remove_placement_group(trial)
    assert s["rows_in"] == N - 3 == s["rows_scored"] + s["rows_quarantined"]
    assert len(list((tmp_path / "scores").glob("*.parquet"))) >= 2  # the one file was split into blocks
