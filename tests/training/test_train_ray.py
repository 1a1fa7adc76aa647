"""SFT through a real Ray cluster (2 CPUs): DDP and DeepSpeed ZeRO-2 workers, checkpoints,
a worker killed mid-run, a crashed run continued by re-running the same command, and a finished
run returned without retraining. tiny-llama keeps each run to seconds of actual training."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
from _ckpt import assert_no_pickle
from safetensors.torch import load_file

from edsft.config import Config

pytestmark = pytest.mark.slow

# The kill callback runs inside Ray workers, which cannot import this test module: ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's vendored cloudpickle


def _data(tmp_path: Path, n: int = 64) -> str:
    # A learnable task: whatever the prompt, answer "yes".
    rows = [{"row_id": f"r{i}", "prompt": f"Is {i} a number?", "response": "yes", "task": "const"} for i in range(n)]
    path = tmp_path / "annotated.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _cfg(**over) -> Config:
    base = {
        "training.model": "builtin:tiny-llama",
        "training.num_workers": 2,
        "training.resources_per_worker": {"CPU": 1},
        "training.micro_batch_size": 4,
        "training.max_steps": 12,
        "training.lr": 1e-2,
        "training.schedule": "constant",
        "training.warmup_ratio": 0.0,
        "training.checkpoint_every": 4,
        "training.log_every": 4,
        "training.max_seq_len": 64,
        # fp32: these tests are about restarts and resumes; LoRA on tiny-llama's random weights at
        # lr 1e-2 is too noisy in bf16 for the loss thresholds below (bf16 resumes exactly, and bf16
        # training quality is checked on SmolLM2 in test_evaluate.py / test_bf16_training.py)
        "training.precision": "fp32",
        "training.lora_dropout": 0.1,  # dropout draws random numbers: resumes must restore the RNG state too
    }
    base.update(over)
    return Config().replace(**base)


class KillOnce:
    """Kill rank ``rank`` right after the checkpoint of ``step``, once (a lock file remembers)."""

    def __init__(self, lock: str, step: int = 4, rank: int = 1):
        self.lock, self.step, self.rank = lock, step, rank

    def __call__(self, *, step, rank, metrics, checkpoint_dir):
        if step == self.step and rank == self.rank and checkpoint_dir is not None:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # killed before: let the resumed run finish
            os.close(fd)
            os._exit(1)  # a hard crash: no exception, no cleanup


def test_ddp_crash_then_rerun_continues_then_finished_run_is_skipped(ray_cluster, tmp_path):
    from ray.train import TrainingFailedError

    from edsft.distributed.train import train_sft

    data, out = _data(tmp_path), tmp_path / "out"
    # full finetuning: tiny-llama's frozen random norms cap what LoRA can learn; the full model
    # learns the constant answer quickly
    cfg = _cfg(**{"training.backend": "ddp", "training.lora": False, "training.lr": 3e-3, "training.max_failures": 0})
    lock = str(tmp_path / "killed")
    with pytest.raises(TrainingFailedError):
        train_sft(cfg, data, str(out), progress=False, callbacks=[KillOnce(lock)])
    assert Path(lock).exists()
    assert not (out / "train_summary.json").exists()

    # the same command again: the run continues from the step-4 checkpoint instead of restarting
    summary = train_sft(cfg, data, str(out), progress=False, callbacks=[KillOnce(lock)])
    assert summary["steps"] == 12 and summary["resumed_from_steps"] == [4]
    assert [s for s, _ in summary["loss_curve"]] == [4, 8, 12]  # step counter continued
    assert summary["final_loss"] < summary["first_loss"] - 1.0, summary["loss_curve"]  # measured 6.52 -> 3.73
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["run_name"] == summary["run_name"] and saved["skipped"] is False

    # finished: a third call returns the recorded result without starting workers
    t0 = time.time()
    again = train_sft(cfg, data, str(out), progress=False)
    assert again["skipped"] is True and again["final_loss"] == summary["final_loss"]
    assert time.time() - t0 < 5


def test_deepspeed_zero2_lora_survives_a_killed_worker(ray_cluster, tmp_path):
    from edsft.distributed.train import train_sft

    data, out = _data(tmp_path), tmp_path / "out"
    cfg = _cfg(**{"training.backend": "deepspeed", "training.zero_stage": 2, "training.lora": True, "training.max_failures": 1})
    lock = str(tmp_path / "killed")
    summary = train_sft(cfg, data, str(out), progress=False, callbacks=[KillOnce(lock)])
    assert Path(lock).exists()  # the worker was killed ...
    assert summary["resumed_from_steps"] == [4]  # ... and the restarted group loaded the step-4 checkpoint
    assert summary["steps"] == 12 and [s for s, _ in summary["loss_curve"]] == [4, 8, 12]
    assert summary["final_loss"] < summary["first_loss"] - 0.3, summary["loss_curve"]
    assert summary["backend"] == "deepspeed" and summary["zero_stage"] == 2 and summary["world_size"] == 2

    # the adapter: safetensors with LoRA weights only, plus its config and the tokenizer
    adapter = out / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == cfg.training.lora_r
    assert (adapter / "tokenizer.json").exists()

    # each rank wrote its own ZeRO optimizer shard into the (merged) Ray checkpoint of the last step
    from edsft.distributed.train import _latest_checkpoint
    from edsft.storage import get_store

    last = Path(_latest_checkpoint(get_store(str(out / summary["run_name"]))).path)
    assert json.loads((last / "trainer_state.json").read_text())["state"]["step"] == 12
    # (as safetensors + JSON since #14: DeepSpeed's own .pt shards are pickles, which run code when loaded)
    shards = sorted(p.name for p in last.glob("zero_rank*"))
    assert shards == ["zero_rank0.json", "zero_rank0.safetensors", "zero_rank1.json", "zero_rank1.safetensors"]
    assert {p.name for p in last.glob("rng_rank*.safetensors")} == {"rng_rank0.safetensors", "rng_rank1.safetensors"}
    assert_no_pickle(last)  # what a resume reads from training.storage_path holds no pickle


def test_single_worker_summary_says_where_the_fixed_cost_goes(ray_cluster, tmp_path):
    """One worker (the CPU default): the summary's phases_s is the run's timeline and adds up to its wall time."""
    from edsft.distributed.train import train_sft

    data, out = _data(tmp_path, n=16), tmp_path / "out"
    cfg = _cfg(
        **{
            "training.num_workers": 1,
            "training.mode": "distributed",  # auto would train in this process (test_train_local.py)
            "training.resources_per_worker": {"CPU": 2},
            "training.max_steps": 4,
            "training.checkpoint_every": 2,
            "training.log_every": 2,
        }
    )
    summary = train_sft(cfg, data, str(out), progress=False)
    phases = summary["phases_s"]
    timeline = [
        "driver_prepare",
        "worker_start",
        "worker_import",
        "worker_prepare",
        "tokenize",
        "model_load",
        "engine_init",
        "first_step",
        "train",
        "checkpoint",
        "export",
        "finish",
        "upload",
    ]
    assert list(phases) == timeline, phases
    assert all(v >= 0 for v in phases.values()), phases
    # consecutive marks: the phases cover the whole call (rounding and the summary write aside)
    assert abs(sum(phases.values()) - summary["wall_time_s"]) < 0.5, (sum(phases.values()), summary["wall_time_s"])
    assert summary["fixed_cost_s"] == pytest.approx(summary["wall_time_s"] - summary["train_time_s"], abs=0.01)
    assert json.loads((out / "train_summary.json").read_text())["phases_s"] == phases


def test_training_continues_from_an_earlier_adapter(ray_cluster, tmp_path):
    """round_training: continue. Trained at lr 0 from an adapter, the exported adapter is that adapter,
    bit for bit (fresh LoRA adapters start with B = 0, so they would differ); at lr > 0 it moves on."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edsft.distributed.train import train_sft
    from edsft.models import load_model

    cfg = _cfg(**{"training.num_workers": 1, "training.backend": "ddp", "training.max_steps": 2, "training.checkpoint_every": 0})
    torch.manual_seed(1)
    peft_model = get_peft_model(
        load_model("builtin:tiny-llama", dtype="float32", device="cpu"),
        LoraConfig(
            r=cfg.training.lora_r,
            lora_alpha=cfg.training.lora_alpha,
            lora_dropout=cfg.training.lora_dropout,
            target_modules="all-linear",
            init_lora_weights=False,
        ),
    )
    peft_model.save_pretrained(tmp_path / "init")
    init = load_file(tmp_path / "init" / "adapter_model.safetensors")
    data = _data(tmp_path, n=16)

    frozen = train_sft(
        cfg.replace(**{"training.lr": 0.0}), data, str(tmp_path / "lr0"), progress=False, init_adapter=str(tmp_path / "init")
    )
    out = load_file(tmp_path / "lr0" / "adapter" / "adapter_model.safetensors")
    assert frozen["init_adapter"] == str(tmp_path / "init") and set(out) == set(init)
    assert all(torch.equal(out[k], init[k]) for k in init)

    moved = train_sft(cfg, data, str(tmp_path / "lr"), progress=False, init_adapter=str(tmp_path / "init"))
    out = load_file(tmp_path / "lr" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(out[k], init[k]) for k in init)
    assert moved["run_name"] != frozen["run_name"]  # lr differs; and the init adapter is part of the name
    fresh = train_sft(cfg, data, str(tmp_path / "fresh"), progress=False)
    assert fresh["run_name"] != moved["run_name"]
    with pytest.raises(ValueError, match="not a LoRA adapter folder"):
        train_sft(cfg, data, str(tmp_path / "bad"), progress=False, init_adapter=str(tmp_path))
