"""SFT: a Ray Train TorchTrainer, or the calling process, around the Ray-free loop in edsft.training.loop.

``training.mode``: ``distributed`` starts a Ray Train worker group (``num_workers`` workers, each
with ``resources_per_worker``); ``local`` runs the same loop in this process with world size 1 (a
gloo, or NCCL on GPU, process group of one). ``auto`` is local for one CPU worker: on a 2-core
node a Ray Train run spent ~10 s of fixed cost starting its controller and worker group
(``phases_s.worker_start``, benchmarks/results/cpu_overhead.md) before the worker imported
anything, a large share of a small-budget trial. Both modes write the same checkpoints
(``trainer_state.json``, per-rank RNG and optimizer files) under the same run folder, so either
resumes what the other left.

Resumability, at two levels:

- inside one call, ``FailureConfig(max_failures)`` restarts the worker group after a worker dies
  and ``ray.train.get_checkpoint()`` hands the latest checkpoint to the new workers, which load
  weights, optimizer, scheduler, step and RNG and continue from that step (local mode: an
  exception other than a user error is retried up to ``max_failures`` times from the latest
  checkpoint; a crash of the process itself is the next level);
- across calls, the run name is derived from the training config, the model and the data
  (``sft-<hash>``), so re-running the same command with the same ``out`` finds the same Ray run
  folder: Train V2 reloads its checkpoint snapshot and the loop continues where it stopped. A
  finished run (``out/train_summary.json`` with the same run name) returns at once.

Outputs under ``out``: ``adapter/`` (safetensors + adapter_config.json + tokenizer files; ``model/``
for full finetuning), ``merged/`` when ``merge_weights``, ``train_summary.json``, and the Ray run
folder ``<run_name>/`` holding the checkpoints (unless ``training.storage_path`` points elsewhere).
"""

from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # a Ray Train worker imports this module to unpickle _train_worker

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from edsft import console
from edsft.config import Config, config_from_dict, config_hash, config_to_dict
from edsft.errors import UserError
from edsft.storage import Store, get_store, is_remote, s3_filesystem, set_default_storage
from edsft.storage import join as _join
from edsft.training.loop import TRAINER_STATE, Phases

_IMPORTED = time.time()
_worker_calls = 0  # how often _train_worker ran in this process (the import counts for the first)

__all__ = ["train_sft", "run_name_for"]

# Fields that change how a run is executed or logged, not what it learns: left out of the run name
# so that e.g. raising max_failures and re-running still resumes the same run.
_NOT_IDENTITY = ("storage_path", "max_failures", "log_every", "run_name", "checkpoints_to_keep", "resources_per_worker", "mode")


def _as_store(x: Store | str, cfg: Config) -> Store:
    if isinstance(x, Store):
        return x
    return get_store(x, cfg.storage.endpoint_url, cfg.storage.region)


def _data_fingerprint(rows: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: str(r["row_id"])):
        h.update(json.dumps([str(r["row_id"]), r["prompt"], r["response"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def run_name_for(cfg: Config, rows: Sequence[dict], init: str | None = None) -> str:
    """``training.run_name`` or ``sft-<hash of training config, model and data>`` (and of the adapter
    training continues from, ``init``: its fingerprint)."""
    if cfg.training.run_name:
        return cfg.training.run_name
    training = {k: v for k, v in config_to_dict(cfg.training).items() if k not in _NOT_IDENTITY}
    data = _data_fingerprint(rows) if init is None else [_data_fingerprint(rows), init]
    return "sft-" + config_hash({"training": training, "model": cfg.training_model}, extra=data)


def _tracked(cfg: Config, name: str, callbacks: Sequence[Callable[..., None]], rank: int = 0) -> tuple[Any, list]:
    """(tracker, callbacks + its logging hook): rank 0 sends every logged step to output.report_to
    (MLflow / TensorBoard); no tracker when that is empty."""
    from edsft.distributed.tracking import make_train_logger

    hooks = list(callbacks)
    tracker = make_train_logger(cfg, name) if rank == 0 and cfg.output.report_to else None
    if tracker is not None:
        hooks.append(lambda step, metrics, **_: tracker.log(metrics, step))
    return tracker, hooks


def _close(tracker: Any) -> None:
    if tracker is not None:  # FAILED when an exception is on its way out
        tracker.close("FINISHED" if sys.exc_info()[0] is None else "FAILED")


def _train_worker(config: dict) -> dict:
    """Runs on every Ray Train worker: load data, resume if there is a checkpoint, train."""
    global _worker_calls
    _worker_calls += 1
    # the phase timer: from this module's import when it happened for this call (a fresh worker)
    phases = Phases(_IMPORT_STARTED).mark("worker_import") if _worker_calls == 1 else Phases(time.time())
    import torch

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
    tracker, callbacks = _tracked(cfg, config.get("run_name") or "train", config.get("callbacks") or (), rank)
    if rank == 0 and config.get("progress_sink") is not None:  # the caller's progress sink (a sweep trial's file)
        console.set_sink(config["progress_sink"])
        console.stage(config.get("progress_stage") or "train")
    phases.mark("worker_prepare")  # data download, tracker, device

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
        phases=phases,
    )
    try:
        if config.get("init_adapter_uri"):  # continue from an earlier adapter (round_training: continue)
            init = get_store(config["init_adapter_uri"], cfg.storage.endpoint_url, cfg.storage.region)
            kwargs["init_adapter"] = str(init.download_to(scratch / "init_adapter"))
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
        _close(tracker)
        shutil.rmtree(scratch, ignore_errors=True)


def _driver_phases(
    summary: dict, t0: float, t_fit: float, t_fit_end: float, t_end: float, start: str = "worker_start"
) -> dict[str, float]:
    """The whole run's timeline in seconds: the driver's parts around the worker's ``phases_s``.

    driver_prepare (read the data, name the run) -> worker_start (Ray Train controller, worker
    group, torch process group) -> the rank-0 worker's phases
    (worker_import, worker_prepare, tokenize, model_load, engine_init, [resume], first_step, train, checkpoint,
    export) -> finish (last report: the checkpoint persisted, the worker group shut down) ->
    upload (the exported adapter copied to ``out``). Worker and driver clocks are compared, so on a
    multi-node cluster worker_start and finish are as good as the nodes' clock sync.
    A run resumed after a worker failure counts the failed attempts in worker_start. Local mode
    names that part ``setup`` (the process group, and failed attempts when there were any).
    """
    worker = summary.get("phases_s") or {}
    started, ended = summary.get("phases_started_at"), summary.get("phases_ended_at")
    out = {"driver_prepare": t_fit - t0}
    if started is not None:
        out[start] = started - t_fit
    out.update(worker)
    if ended is not None:
        out["finish"] = t_fit_end - ended
    out["upload"] = t_end - t_fit_end
    return {k: round(v, 3) for k, v in out.items()}


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


LOCAL_CHECKPOINT = "checkpoint_step"  # local mode's checkpoint folders: checkpoint_step000012


def _single_process_group(device: Any) -> None:
    """A torch.distributed group of this one process (DeepSpeed needs one): created once per process
    and kept, so that later runs in the process (rounds, sweep trials) reuse it."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise UserError(
                f"training.mode='local' inside a {dist.get_world_size()}-process torch.distributed group: "
                "set training.mode=distributed (or auto)"
            )
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _commit_checkpoint(folder: Path, run: Store, step: int, keep: int | None) -> Store:
    """Copy a local checkpoint folder into the run folder, trainer_state.json last.

    ``_latest_checkpoint`` counts a folder only once its trainer_state.json is there, and a single
    file write is atomic (a rename locally, one PUT on S3): a crash mid-copy leaves a folder that
    is never resumed from. Then the oldest complete local checkpoints beyond ``keep`` are removed."""
    target = run.child(f"{LOCAL_CHECKPOINT}{step:06d}")
    if target.exists():
        target.remove()  # an earlier attempt's incomplete copy of this step
    marker = folder / TRAINER_STATE
    state = marker.read_bytes()
    marker.unlink()
    target.upload_from(folder)
    target.child(TRAINER_STATE).write_bytes(state)
    if keep is not None:
        done = [n for n in run.list() if n.startswith(LOCAL_CHECKPOINT) and run.child(n, TRAINER_STATE).exists()]
        for name in sorted(done)[:-keep]:  # zero-padded steps: name order is step order
            run.child(name).remove()
    return target


def _train_local(
    cfg: Config,
    rows: list[dict],
    run: Store,
    name: str,
    callbacks: Sequence[Callable[..., None]],
    progress: bool,
    init_adapter: Store | None,
) -> dict:
    """train_loop in this process on the run folder ``run``; retried from its latest checkpoint."""
    import torch

    from edsft.training.loop import train_loop

    tc = cfg.training
    device = torch.device("cuda") if tc.use_gpu else torch.device("cpu")
    threads_before = torch.get_num_threads()
    # as many torch threads as the worker would reserve (the sweep trial reserves them itself)
    torch.set_num_threads(max(1, int(dict(tc.resources_per_worker).get("CPU", 1))))
    scratch = Path(tempfile.mkdtemp(prefix="edsft-train-local-"))
    tracker, hooks = _tracked(cfg, name, callbacks)

    def checkpoint_dir(step: int) -> str:
        return str(scratch / f"step{step:06d}")

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        if ckpt_dir is not None:
            _commit_checkpoint(Path(ckpt_dir), run, int(metrics["step"]), tc.checkpoints_to_keep)
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    failures = 0
    # what torchrun would set for a world of one: DeepSpeed reads them (LOCAL_RANK it requires); set
    # only while training and only where absent, so no later process started from here inherits them
    launcher_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    launcher_env = {k: v for k, v in launcher_env.items() if k not in os.environ}
    os.environ.update(launcher_env)
    try:
        _single_process_group(device)
        init = str(init_adapter.download_to(scratch / "init_adapter")) if init_adapter is not None else None
        while True:
            found = _latest_checkpoint(run)
            resume = found.download_to(scratch / f"resume{failures}") if found is not None else None
            try:
                return train_loop(
                    tc,
                    cfg.training_model,
                    rows,
                    resume_from=resume,
                    report=report,
                    checkpoint_dir_fn=checkpoint_dir,
                    callbacks=hooks,
                    device=device,
                    progress=progress,
                    phases=Phases(time.time()),
                    init_adapter=init,
                )
            except (UserError, ValueError):
                raise  # bad config or data: the same on every attempt
            except Exception as e:
                failures += 1
                if 0 <= tc.max_failures < failures:
                    raise
                limit = "unlimited" if tc.max_failures < 0 else str(tc.max_failures)
                console.note(
                    f"train: attempt {failures} failed ({type(e).__name__}: {e}); retrying from the latest checkpoint "
                    f"(retry {failures} of {limit}, training.max_failures)"
                )
    finally:
        for k in launcher_env:
            os.environ.pop(k, None)
        torch.set_num_threads(threads_before)
        _close(tracker)
        shutil.rmtree(scratch, ignore_errors=True)


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
    init_adapter: Store | str | None = None,
) -> dict:
    """Finetune ``cfg.training_model`` on the annotated Parquet ``train_data``; write to ``out``.

    Returns the training summary (also ``out/train_summary.json``): steps, final loss, loss curve,
    tokens/s, examples truncated/dropped, wall time, run name and whether it resumed or skipped.
    ``callbacks`` run on every worker after each report (``cb(step=, rank=, metrics=,
    checkpoint_dir=)``); they must be picklable. ``init_adapter``: a LoRA adapter folder (an earlier
    run's ``adapter/``) that training continues from instead of fresh adapters.
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
    init = None
    if init_adapter is not None:
        init_adapter = _as_store(init_adapter, cfg)
        weights = init_adapter.child("adapter_model.safetensors")
        if not (tc.lora and weights.exists() and init_adapter.child("adapter_config.json").exists()):
            raise ValueError(
                f"init_adapter {init_adapter.uri!r} is not a LoRA adapter folder (adapter_config.json + adapter_model.safetensors), "
                "or training.lora is false: continue from the train stage's out/adapter with LoRA on"
            )
        init = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    name = run_name_for(cfg, rows, init)

    summary_store = out.child("train_summary.json")
    if summary_store.exists() and out.child("adapter" if tc.lora else "model").exists():
        previous = summary_store.read_json()
        if previous.get("run_name") == name and previous.get("steps") == previous.get("batch", {}).get("total_steps"):
            previous["skipped"] = True  # finished before: nothing to do
            return previous

    storage_path, storage_fs = _storage(cfg, out)
    storage_uri = "s3://" + storage_path if storage_fs is not None else storage_path
    mode = tc.resolved_mode
    if mode == "local":
        run = get_store(_join(storage_uri, name), cfg.storage.endpoint_url, cfg.storage.region)
        t_fit = time.time()
        local = _train_local(cfg, rows, run, name, callbacks, progress, init_adapter)
        t_fit_end = time.time()
        final = _latest_checkpoint(run)
        if final is None or local.get("steps") != json.loads(final.child(TRAINER_STATE).read_text())["state"]["step"]:
            raise RuntimeError(f"training run {name!r} finished without its final checkpoint under {run.uri}")
        with tempfile.TemporaryDirectory(prefix="edsft-final-") as tmp:
            summary = _export(final.download_to(tmp), out)
        checkpoint_uri = final.uri
    else:
        summary, checkpoint_uri, t_fit, t_fit_end = _fit_distributed(
            cfg, data, out, name, storage_path, storage_fs, storage_uri, callbacks, progress, init_adapter
        )
    wall = time.time() - t0
    summary["phases_s"] = _driver_phases(
        summary, t0, t_fit, t_fit_end, t0 + wall, start="setup" if mode == "local" else "worker_start"
    )
    summary["fixed_cost_s"] = round(wall - summary["train_time_s"], 3)
    summary.update(
        run_name=name,
        wall_time_s=round(wall, 3),
        checkpoint=checkpoint_uri,
        storage_path=storage_path,
        skipped=False,
        num_workers=tc.num_workers,
        mode=mode,
    )
    if init_adapter is not None:
        summary["init_adapter"] = init_adapter.uri
    summary_store.write_json(summary)
    return summary


def _export(folder: Path, out: Store) -> dict:
    """The final checkpoint's exports (adapter/, model/, merged/) copied to ``out``; its summary."""
    summary = json.loads((folder / "train_summary.json").read_text())
    for sub in ("adapter", "model", "merged"):
        if (folder / sub).is_dir():
            target = out.child(sub)
            if target.exists():
                target.remove()  # a stale export from an older run must not leave files behind
            target.upload_from(folder / sub)
    return summary


def _fit_distributed(
    cfg: Config,
    data: Store,
    out: Store,
    name: str,
    storage_path: str,
    storage_fs: Any,
    storage_uri: str,
    callbacks: Sequence[Callable[..., None]],
    progress: bool,
    init_adapter: Store | None,
) -> tuple[dict, str, float, float]:
    """A Ray Train run; (its summary, the final checkpoint's path, fit start, fit end)."""
    tc = cfg.training
    # Ray's 60 s default for starting the worker group is too short on a busy 2-core node where
    # each worker imports torch/transformers/deepspeed; the driver's value reaches the controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # The controller polls the workers every 2 s by default, so a finished run waited up to 2 s
    # before the worker group was shut down (measured: 2.4 s of a 37 s single-worker run); a poll is
    # a small actor call, cheap at 0.5 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    resources = dict(tc.resources_per_worker) or {"CPU": 1}
    # A progress sink in this process (a sweep trial's progress.json) hears the steps from rank 0 too,
    # if it travels (a sink that does not pickle stays here: the trial then reports its stage only).
    sink, sink_stage = console.current_sink()
    try:
        ray.cloudpickle.dumps(sink)
    except Exception:  # noqa: BLE001 - whatever stops it pickling
        sink = None
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": config_to_dict(cfg),
            "data_uri": data.uri,
            "run_uri": _join(storage_uri, name),
            "run_name": name,
            "callbacks": list(callbacks),
            "progress": progress,
            "init_adapter_uri": init_adapter.uri if init_adapter is not None else None,
            "progress_sink": sink,
            "progress_stage": sink_stage,
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
    t_fit = time.time()
    result = trainer.fit()  # raises TrainingFailedError once max_failures restarts are used up
    t_fit_end = time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint: see the Ray logs under {storage_path}")

    with result.checkpoint.as_directory() as folder:
        summary = _export(Path(folder), out)
    return summary, result.checkpoint.path, t_fit, t_fit_end
