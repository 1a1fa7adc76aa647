"""SFT on Ray Train: a TorchTrainer around the Ray-free loop in edsft.training.loop.

Resumability, at two levels:

- inside one call, ``FailureConfig(max_failures)`` restarts the worker group after a worker dies
  and ``ray.train.get_checkpoint()`` hands the latest checkpoint to the new workers, which load
  weights, optimizer, scheduler, step and RNG and continue from that step;
- across calls, the run name is derived from the training config, the model and the data
  (``sft-<hash>``), so re-running the same command with the same ``out`` finds the same Ray run
  folder: Train V2 reloads its checkpoint snapshot and the loop continues where it stopped. A
  finished run (``out/train_summary.json`` with the same run name) returns at once.

Outputs under ``out``: ``adapter/`` (safetensors + adapter_config.json + tokenizer files; ``model/``
for full finetuning), ``merged/`` when ``merge_weights``, ``train_summary.json``, and the Ray run
folder ``<run_name>/`` holding the checkpoints (unless ``training.storage_path`` points elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from edsft.config import Config, config_from_dict, config_hash, config_to_dict
from edsft.storage import Store, get_store, is_remote, s3_filesystem, set_default_storage
from edsft.storage import join as _join
from edsft.training.loop import TRAINER_STATE

__all__ = ["train_sft", "run_name_for"]

# Fields that change how a run is executed or logged, not what it learns: left out of the run name
# so that e.g. raising max_failures and re-running still resumes the same run.
_NOT_IDENTITY = ("storage_path", "max_failures", "log_every", "run_name", "checkpoints_to_keep", "resources_per_worker")


def _as_store(x: Store | str, cfg: Config) -> Store:
    if isinstance(x, Store):
        return x
    return get_store(x, cfg.storage.endpoint_url, cfg.storage.region)


def _data_fingerprint(rows: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: str(r["row_id"])):
        h.update(json.dumps([str(r["row_id"]), r["prompt"], r["response"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def run_name_for(cfg: Config, rows: Sequence[dict]) -> str:
    """``training.run_name`` or ``sft-<hash of training config, model and data>``."""
    if cfg.training.run_name:
        return cfg.training.run_name
    training = {k: v for k, v in config_to_dict(cfg.training).items() if k not in _NOT_IDENTITY}
    return "sft-" + config_hash({"training": training, "model": cfg.training_model}, extra=_data_fingerprint(rows))


def _train_worker(config: dict) -> dict:
    """Runs on every Ray Train worker: load data, resume if there is a checkpoint, train."""
    import torch

    from edsft.distributed.tracking import make_train_logger
    from edsft.training.data import load_examples
    from edsft.training.loop import train_loop

    cfg = config_from_dict(config["cfg"])
    # as many torch threads as whole CPUs the worker reserved (at least 1): more oversubscribe the
    # node, fewer leave reserved cores idle (a single worker with {CPU: 2} used to run one thread)
    torch.set_num_threads(max(1, int(dict(cfg.training.resources_per_worker).get("CPU", 1))))
    set_default_storage(cfg.storage.endpoint_url, cfg.storage.region)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    rows = load_examples(get_store(config["data_uri"], cfg.storage.endpoint_url, cfg.storage.region))
    device = ray.train.torch.get_device() if cfg.training.use_gpu else torch.device("cpu")
    scratch = Path(tempfile.mkdtemp(prefix=f"edsft-train-r{rank}-"))
    # rank 0 sends every logged step to output.report_to (MLflow / TensorBoard); nothing when empty
    tracker = make_train_logger(cfg, config.get("run_name") or "train") if rank == 0 and cfg.output.report_to else None
    callbacks = list(config.get("callbacks") or ())
    if tracker is not None:
        callbacks.append(lambda step, metrics, **_: tracker.log(metrics, step))

    def checkpoint_dir(step: int) -> str:
        return str(scratch / f"step{step:06d}-rank{rank}")

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        # every rank reports its own folder: ZeRO shards and RNG files differ per rank and Ray
        # merges them into one checkpoint directory in storage
        if ckpt_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir))
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # persisted by now

    kwargs: dict[str, Any] = dict(
        rank=rank,
        world_size=world_size,
        report=report,
        checkpoint_dir_fn=checkpoint_dir,
        callbacks=callbacks,
        device=device,
        progress=config.get("progress", False),
    )
    try:
        found = _latest_checkpoint(get_store(config["run_uri"], cfg.storage.endpoint_url, cfg.storage.region))
        checkpoint = ray.train.get_checkpoint()
        if found is not None:
            # Ray only knows checkpoints its controller registered; one reported just before a
            # worker died (or before a crash of the whole run) can be in storage but not in Ray's
            # snapshot. The scan finds it; it also sees every checkpoint Ray knows.
            folder = found.download_to(scratch / "resume")
            return train_loop(cfg.training, cfg.training_model, rows, resume_from=folder, **kwargs)
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                return train_loop(cfg.training, cfg.training_model, rows, resume_from=folder, **kwargs)
        return train_loop(cfg.training, cfg.training_model, rows, **kwargs)
    finally:
        if tracker is not None:  # FAILED when an exception is on its way out
            tracker.close("FINISHED" if sys.exc_info()[0] is None else "FAILED")
        shutil.rmtree(scratch, ignore_errors=True)


def _latest_checkpoint(run: Store) -> Store | None:
    """The complete checkpoint with the highest step under a Ray run folder, or None.

    Complete: rank 0's trainer_state.json and every rank's RNG file (each rank writes its RNG
    file after its model/optimizer shard) are there.
    """
    best: tuple[int, Store] | None = None
    for name in run.list():
        if not name.startswith("checkpoint_"):
            continue
        ck = run.child(name)
        state_file = ck.child(TRAINER_STATE)
        if not state_file.exists():
            continue
        blob = state_file.read_json()
        world = int(blob["plan"]["world_size"])
        if not all(ck.child(f"rng_rank{r}.safetensors").exists() for r in range(world)):
            continue
        step = int(blob["state"]["step"])
        if best is None or step > best[0]:
            best = (step, ck)
    return best[1] if best else None


def _storage(cfg: Config, out: Store) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: training.storage_path, else ``out``."""
    uri = cfg.training.storage_path or out.uri
    if is_remote(uri):
        # pyarrow ignores AWS_ENDPOINT_URL: pass a filesystem with the configured endpoint
        return uri[len("s3://") :].rstrip("/"), s3_filesystem(cfg.storage.endpoint_url, cfg.storage.region)
    Path(uri).mkdir(parents=True, exist_ok=True)
    return str(Path(uri).absolute()), None


def train_sft(
    cfg: Config,
    train_data: Store | str,
    out: Store | str,
    progress: bool = True,
    callbacks: Sequence[Callable[..., None]] = (),
) -> dict:
    """Finetune ``cfg.training_model`` on the annotated Parquet ``train_data``; write to ``out``.

    Returns the training summary (also ``out/train_summary.json``): steps, final loss, loss curve,
    tokens/s, examples truncated/dropped, wall time, run name and whether it resumed or skipped.
    ``callbacks`` run on every worker after each report (``cb(step=, rank=, metrics=,
    checkpoint_dir=)``); they must be picklable.
    """
    from edsft.training.data import load_examples

    t0 = time.time()
    tc = cfg.training
    if tc.checkpoints_to_keep is not None and tc.checkpoints_to_keep < 1:
        raise ValueError(f"training.checkpoints_to_keep={tc.checkpoints_to_keep} must be >= 1, or null to keep every checkpoint")
    data, out = _as_store(train_data, cfg), _as_store(out, cfg)
    rows = load_examples(data)
    if not rows:
        raise ValueError(f"training data {data.uri!r} has no rows: select and annotate a budget > 0 first")
    name = run_name_for(cfg, rows)

    summary_store = out.child("train_summary.json")
    if summary_store.exists() and out.child("adapter" if tc.lora else "model").exists():
        previous = summary_store.read_json()
        if previous.get("run_name") == name and previous.get("steps") == previous.get("batch", {}).get("total_steps"):
            previous["skipped"] = True  # finished before: nothing to do
            return previous

    storage_path, storage_fs = _storage(cfg, out)
    # Ray's 60 s default for starting the worker group is too short on a busy 2-core node where
    # each worker imports torch/transformers/deepspeed; the driver's value reaches the controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    storage_uri = "s3://" + storage_path if storage_fs is not None else storage_path
    resources = dict(tc.resources_per_worker) or {"CPU": 1}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": config_to_dict(cfg),
            "data_uri": data.uri,
            "run_uri": _join(storage_uri, name),
            "run_name": name,
            "callbacks": list(callbacks),
            "progress": progress,
        },
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
        ),
    )
    result = trainer.fit()  # raises TrainingFailedError once max_failures restarts are used up
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint: see the Ray logs under {storage_path}")

    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        summary = json.loads((folder / "train_summary.json").read_text())
        for sub in ("adapter", "model", "merged"):
            if (folder / sub).is_dir():
                target = out.child(sub)
                if target.exists():
                    target.remove()  # a stale export from an older run must not leave files behind
                target.upload_from(folder / sub)
    summary.update(
        run_name=name,
        wall_time_s=round(time.time() - t0, 3),
        checkpoint=result.checkpoint.path,
        storage_path=storage_path,
        skipped=False,
        num_workers=tc.num_workers,
    )
    summary_store.write_json(summary)
    return summary
