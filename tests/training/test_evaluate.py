"""Evaluation end to end: SmolLM2-135M + LoRA beats the base model on held-out examples of the
task it was finetuned on; Ray Data actors give the same numbers as the in-process path."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edsft.config import Config
from edsft.storage import get_store

pytestmark = pytest.mark.slow

COLORS = ["red", "green", "blue", "black", "white", "pink", "brown", "gray", "orange", "purple"]


def _rows(start: int, n: int) -> list[dict]:
    # A simple, learnable task the base model does not do by itself: answer in a fixed format.
    rows = []
    for i in range(start, start + n):
        c = COLORS[i % len(COLORS)]
        rows.append(
            {
                "row_id": f"c{i}",
                "prompt": f"Item {i} is {c}. Reply with its colour code.",
                "response": f"COLOUR={c.upper()}",
                "task": "colour",
            }
        )
    return rows


def _parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _train_adapter(cfg: Config, rows: list[dict], folder: Path) -> tuple[dict, Path]:
    from edsft.training.loop import train_loop

    summary = train_loop(cfg.training, cfg.training_model, rows, checkpoint_dir_fn=lambda step: str(folder / f"step{step}"))
    return summary, folder / f"step{summary['steps']}" / "adapter"


def test_smollm2_lora_lowers_held_out_loss(tmp_path):
    from edsft.distributed.evaluate import evaluate_models

    cfg = Config().replace(
        **{
            "training.model": "builtin:smollm2-135m",
            "training.backend": "ddp",  # in-process, one worker: no process group needed
            "training.max_steps": 6,
            "training.micro_batch_size": 4,
            "training.lr": 2e-3,
            "training.warmup_ratio": 0.0,
            "training.lora_r": 8,
            "training.max_seq_len": 64,
            "training.log_every": 2,
            "evaluation.max_new_tokens": 6,
            "evaluation.batch_size": 6,
            "evaluation.mode": "local",
        }
    )
    summary, adapter = _train_adapter(cfg, _rows(0, 24), tmp_path / "ckpt")
    assert summary["final_loss"] < summary["first_loss"]
    assert (adapter / "adapter_model.safetensors").exists()

    eval_path = _parquet(tmp_path / "eval.parquet", _rows(1000, 6))  # held out: other items
    m = evaluate_models(cfg, eval_path, get_store(str(adapter)), get_store(str(tmp_path / "metrics.json")), progress=False)
    assert m["n"] == 6 and m["variants"] == ["base", "finetuned"]
    assert m["finetuned"]["loss"] < 0.5 * m["base"]["loss"], (m["base"], m["finetuned"])
    assert m["finetuned"]["rouge_l"] >= m["base"]["rouge_l"]
    assert m["per_task"]["colour"]["finetuned"]["loss"] == pytest.approx(m["finetuned"]["loss"])
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["finetuned"]["loss"] == pytest.approx(m["finetuned"]["loss"])
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {p["variant"] for p in preds} == {"base", "finetuned"}


def test_ray_data_actors_match_in_process_evaluation(ray_cluster, tmp_path):
    from edsft.distributed.evaluate import evaluate_models

    cfg = Config().replace(
        **{
            "training.model": "builtin:tiny-llama",
            "training.backend": "ddp",
            "training.max_steps": 3,
            "training.micro_batch_size": 4,
            "training.max_seq_len": 64,
            "evaluation.max_new_tokens": 4,
            "evaluation.batch_size": 4,
            "evaluation.num_actors": 2,
            "evaluation.dtype": "float32",  # exact parity: Ray batches rows differently, bf16 rounding would show
        }
    )
    _, adapter = _train_adapter(cfg, _rows(0, 8), tmp_path / "ckpt")
    eval_path = _parquet(tmp_path / "eval.parquet", _rows(100, 10))
    local = evaluate_models(
        cfg.replace(**{"evaluation.mode": "local"}), eval_path, str(adapter), str(tmp_path / "local.json"), progress=False
    )
    dist = evaluate_models(
        cfg.replace(**{"evaluation.mode": "distributed"}),
        eval_path,
        str(adapter),
        str(tmp_path / "d" / "metrics.json"),
        progress=False,
    )
    assert dist["settings"]["mode"] == "distributed" and local["settings"]["mode"] == "local"
    assert dist["settings"]["dtype"] == local["settings"]["dtype"] == "float32"  # recorded in metrics.json
    for variant in ("base", "finetuned"):
        for key in ("loss", "exact_match", "rouge_l", "n_tokens"):
            assert dist[variant][key] == pytest.approx(local[variant][key], rel=1e-4), (variant, key)
    assert dist["n"] == local["n"] == 10


def test_distributed_evaluation_needs_no_whole_cpu(ray_cluster, tmp_path):
    """A sweep on 2 CPUs: each Tune trial holds a sliver of a CPU, each eval actor half of one.
    No step of the evaluation may then wait for a whole free CPU (the label-efficiency experiment
    hung there for 30 minutes when evaluation repartitioned its rows with 1-CPU tasks)."""
    import ray

    from edsft.distributed.evaluate import evaluate_models

    @ray.remote
    class Held:
        def ping(self):
            return True

    # Two trials' slivers plus the other trial's 0.5-CPU eval actor and a bit more: under a whole CPU
    # stays free, so the hang (a 1-CPU task) is certain rather than a race with the actors' start.
    trials = [Held.options(num_cpus=c).remote() for c in (0.01, 0.01, 0.99)]
    ray.get([t.ping.remote() for t in trials])
    cfg = Config().replace(
        **{
            "training.model": "builtin:tiny-llama",
            "evaluation.mode": "distributed",
            "evaluation.max_new_tokens": 2,
            "evaluation.batch_size": 2,
            "evaluation.num_actors": 1,
            "evaluation.cpus_per_actor": 0.5,
        }
    )
    eval_path = _parquet(tmp_path / "eval.parquet", _rows(0, 12))
    try:
        ref = ray.remote(num_cpus=0)(evaluate_models).remote(cfg, eval_path, None, str(tmp_path / "m.json"), False)
        ready, _ = ray.wait([ref], timeout=180)
        assert ready, "distributed evaluation hung waiting for a whole CPU"
        assert ray.get(ref)["n"] == 12
    finally:
        for t in trials:
            ray.kill(t)
