"""Metrics to MLflow, TensorBoard and Weights & Biases (``output.report_to``), for training runs and Tune sweeps.

Two entry points:

* :func:`make_train_logger` - a tiny logger the training loop calls on rank 0 once per logged
  step (``logger.log({"loss": ...}, step)``, ``logger.close()``). It is a no-op when
  ``output.report_to`` is empty, so the training code calls it unconditionally.
* :func:`make_tune_callbacks` - Ray Tune callbacks for the sweep: Ray's own
  ``MLflowLoggerCallback``, ``TBXLoggerCallback`` and ``WandbLoggerCallback`` (one MLflow run /
  TB folder / W&B run per trial).

Where things go (``<run>`` is ``output.dir``):

* MLflow: ``output.mlflow_tracking_uri`` when set (a tracking server, ``http://...``), else a file
  store ``file://<run>/mlruns``. MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE``
  is set, so we set it for the file store we chose (the venv has mlflow-skinny without
  SQLAlchemy, so ``sqlite://`` is not an option).
* TensorBoard: ``<run>/tensorboard/<run name>/events.out.tfevents.*``
  (``tensorboard --logdir <run>/tensorboard``).
* W&B: through Ray's integration (``ray.air.integrations.wandb``: ``setup_wandb`` for training,
  ``WandbLoggerCallback`` for Tune), project ``edsft-<run>`` (``-sweep`` for the sweep), local files
  in ``$WANDB_DIR`` or else ``<run>/wandb``. ``WANDB_MODE=offline`` works without an account
  (``wandb sync <run>/wandb/offline-run-*`` uploads later); online, the key comes from
  ``WANDB_API_KEY`` or ``wandb login``. The key is never put into a Ray runtime env (Ray logs
  those verbatim): the W&B logging actors inherit it like every other worker (see
  :mod:`edsft.distributed.session`).

Neither MLflow's file store nor TensorBoard writes to ``s3://`` with our endpoint settings, so
for an ``s3://`` run folder both write to a local scratch folder and :func:`sync_tracking`
(called by ``close()`` and at the end of a sweep) uploads it to ``<run>/mlruns`` and
``<run>/tensorboard``. Nothing from the environment is logged: params come from the config only.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config, config_to_dict
from ..storage import get_store, is_remote

__all__ = [
    "tracking_local_dir",
    "mlflow_tracking_uri",
    "tensorboard_dir",
    "wandb_dir",
    "experiment_name",
    "make_train_logger",
    "make_tune_callbacks",
    "sync_tracking",
    "TrainLogger",
]


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def tracking_local_dir(cfg: Config) -> Path:
    """The local folder MLflow's file store and TensorBoard write to.

    The run folder itself when it is local; for ``s3://`` a scratch folder keyed by the run URI
    (the same on every call, so successive loggers of one run share it and one sync uploads all).
    """
    if not is_remote(cfg.output.dir):
        return Path(get_store(cfg.output.dir).path)
    key = hashlib.sha256(cfg.output.dir.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "edsft-tracking" / key


def mlflow_tracking_uri(cfg: Config) -> str:
    """``output.mlflow_tracking_uri``, else a file store under the run folder (or its scratch)."""
    if cfg.output.mlflow_tracking_uri:
        return cfg.output.mlflow_tracking_uri
    return (tracking_local_dir(cfg) / "mlruns").absolute().as_uri()


def tensorboard_dir(cfg: Config) -> Path:
    return tracking_local_dir(cfg) / "tensorboard"


def wandb_dir(cfg: Config) -> Path:
    """Where W&B writes its run folders (``<dir>/wandb/``): ``$WANDB_DIR``, else the run folder."""
    return Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else tracking_local_dir(cfg)


def experiment_name(cfg: Config) -> str:
    """One MLflow experiment per run folder: ``edsft-<last part of output.dir>``."""
    tail = cfg.output.dir.rstrip("/").rsplit("/", 1)[-1] or "run"
    return f"edsft-{tail}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "run"


def _prepare_mlflow(uri: str) -> None:
    # MLflow >= 3.x raises on file stores unless this opt-out is set; we picked the file store
    # deliberately (no server, no SQLAlchemy), so opt out for file:// URIs only.
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        Path(uri[len("file://") :]).mkdir(parents=True, exist_ok=True)


def _flat_params(cfg: Config) -> dict[str, str]:
    """Hyperparameters worth seeing next to the curves: training, selection, scoring model.

    Config values only (the config holds no secrets: credentials come from the environment).
    MLflow caps param values at 6000 chars; ours are short.
    """
    d = config_to_dict(cfg)
    out = {"scoring.model": str(d["scoring"]["model"]), "pool.path": str(d["pool"]["path"])}
    for section in ("selection", "training"):
        for k, v in d[section].items():
            out[f"{section}.{k}"] = str(v)[:500]
    return out


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only (tensors and numpy scalars become floats; strings and NaN dropped)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and callable(v.item):
            try:
                v = v.item()
            except (ValueError, RuntimeError):
                continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if v == v and abs(v) != float("inf"):
            out[str(k)] = v
    return out


# --------------------------------------------------------------------------------------------
# Training: one logger per training run, used on rank 0
# --------------------------------------------------------------------------------------------


class TrainLogger:
    """``log(metrics, step)`` to every sink in ``output.report_to``; ``close()`` flushes and syncs.

    With ``report_to`` empty it does nothing, so callers need no ``if``. Safe to ``close()``
    twice; usable as a context manager.
    """

    def __init__(self, cfg: Config, run_name: str, params: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self.run_name = _safe_name(run_name)
        self.sinks = tuple(cfg.output.report_to)
        self._mlflow = None  # (client, run_id)
        self._tb = None
        self._wandb = None
        self._closed = False
        if "mlflow" in self.sinks:
            self._mlflow = self._open_mlflow(params)
        if "tensorboard" in self.sinks:
            self._tb = self._open_tensorboard()
        if "wandb" in self.sinks:
            self._wandb = self._open_wandb(params)

    # -- sinks ------------------------------------------------------------------------------
    def _open_mlflow(self, params: Mapping[str, Any] | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = mlflow_tracking_uri(self.cfg)
        _prepare_mlflow(uri)
        client = MlflowClient(tracking_uri=uri)
        name = experiment_name(self.cfg)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name)
            except MlflowException:  # another trial created it between our two calls
                exp_id = client.get_experiment_by_name(name).experiment_id
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=self.run_name, tags={"edsft.output_dir": self.cfg.output.dir})
        merged = {**_flat_params(self.cfg), **{str(k): str(v)[:500] for k, v in (params or {}).items()}}
        items = [Param(k, v) for k, v in merged.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        return client, run.info.run_id

    def _open_tensorboard(self):
        logdir = tensorboard_dir(self.cfg) / self.run_name
        logdir.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # torch ships a writer too (it needs the tensorboard package)
            from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(logdir), flush_secs=30)

    def _open_wandb(self, params: Mapping[str, Any] | None):
        from ray.air.integrations.wandb import setup_wandb

        folder = wandb_dir(self.cfg)
        folder.mkdir(parents=True, exist_ok=True)
        # One W&B run per training run: its id is derived from the run folder and the run name,
        # so a training run resumed from its checkpoint continues the same W&B run.
        run_id = hashlib.sha256(f"{self.cfg.output.dir}|{self.run_name}".encode()).hexdigest()[:16]
        return setup_wandb(
            config={**_flat_params(self.cfg), **{str(k): v for k, v in (params or {}).items()}},
            rank_zero_only=False,  # the caller creates the logger on rank 0 only
            trial_id=run_id,
            trial_name=self.run_name,
            group=experiment_name(self.cfg),
            project=experiment_name(self.cfg),
            dir=str(folder),
            resume="allow",
        )

    # -- API --------------------------------------------------------------------------------
    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow[1] if self._mlflow else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._closed or not self.sinks:
            return
        values = _numeric(metrics)
        if not values:
            return
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, int(step)) for k, v in values.items()])
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if status == "FINISHED" else 1)
            if is_remote(self.cfg.output.dir):
                import wandb

                wandb.teardown()  # W&B's service process writes the run files: let it finish before the upload
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id, status=status)
        if self.sinks:
            sync_tracking(self.cfg)

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


def make_train_logger(cfg: Config, run_name: str, params: Mapping[str, Any] | None = None) -> TrainLogger:
    """The logger the training function creates on rank 0 (other ranks: don't, or pass report_to=())."""
    return TrainLogger(cfg, run_name, params)


# --------------------------------------------------------------------------------------------
# Sweep: Ray Tune callbacks (the Tune driver process runs them)
# --------------------------------------------------------------------------------------------


def make_tune_callbacks(cfg: Config) -> list:
    """Callbacks for ``tune.RunConfig(callbacks=...)``: one MLflow run and one TB folder per trial.

    Always ends with a callback that uploads the local tracking scratch to an ``s3://`` run
    folder when the experiment ends (a no-op for local runs).
    """
    from ray.tune import Callback

    callbacks: list = []
    if "mlflow" in cfg.output.report_to:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = mlflow_tracking_uri(cfg)
        _prepare_mlflow(uri)
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=uri,
                experiment_name=experiment_name(cfg) + "-sweep",
                tags={"edsft.output_dir": cfg.output.dir},
                save_artifact=False,
            )
        )
    if "tensorboard" in cfg.output.report_to:
        callbacks.append(_run_dir_tbx_callback(tensorboard_dir(cfg) / "sweep"))
    if "wandb" in cfg.output.report_to:
        callbacks.append(_wandb_callback(cfg))

    class _SyncTracking(Callback):
        def on_experiment_end(self, trials, **info):  # noqa: ARG002 - Tune's signature
            sync_tracking(cfg)

    if callbacks:
        callbacks.append(_SyncTracking())
    return callbacks


def _run_dir_tbx_callback(root: Path):
    """Ray's TBXLoggerCallback, writing to ``<root>/<trial>`` instead of the trial's Tune folder.

    Tune's folder lives under the sweep's storage path (possibly s3://); one TensorBoard root per
    run folder is what people point ``tensorboard --logdir`` at.
    """
    from ray.tune.logger import TBXLoggerCallback

    class RunDirTBXLoggerCallback(TBXLoggerCallback):
        def log_trial_start(self, trial):
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            logdir = root / _safe_name(str(trial))
            logdir.mkdir(parents=True, exist_ok=True)
            self._trial_writer[trial] = self._summary_writer_cls(str(logdir), flush_secs=30)
            self._trial_result[trial] = {}

    return RunDirTBXLoggerCallback()


def _wandb_callback(cfg: Config):
    """Ray's WandbLoggerCallback, minus one thing: Ray puts ``WANDB_API_KEY`` into the runtime env
    of its logging actors, and Ray's runtime-env agent logs runtime envs verbatim. Here the actors'
    runtime env carries W&B's other settings (``WANDB_MODE``, ``WANDB_DIR``, ...: a cluster started
    before they were set does not have them) and the key travels as an argument of the actor
    (``wandb.Settings(api_key=...)``, in the object store, never logged)."""
    import ray
    from ray.air.integrations.wandb import WandbLoggerCallback, _force_on_current_node

    class KeyFreeWandbLoggerCallback(WandbLoggerCallback):
        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            if not self._remote_logger_class:
                env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k not in _WANDB_SECRETS}
                self._remote_logger_class = ray.remote(
                    num_cpus=0, **_force_on_current_node(), runtime_env={"env_vars": env}, max_restarts=-1, max_task_retries=-1
                )(self._logger_actor_cls)
            if os.environ.get("WANDB_API_KEY") and "settings" not in wandb_init_kwargs:
                import wandb

                wandb_init_kwargs["settings"] = wandb.Settings(api_key=os.environ["WANDB_API_KEY"])
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    folder = wandb_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    return KeyFreeWandbLoggerCallback(
        project=experiment_name(cfg) + "-sweep", group=experiment_name(cfg), dir=str(folder), upload_checkpoints=False
    )


_WANDB_SECRETS = frozenset({"WANDB_API_KEY"})


# --------------------------------------------------------------------------------------------
# s3:// run folders
# --------------------------------------------------------------------------------------------


def sync_tracking(cfg: Config) -> list[str]:
    """Upload the local MLflow file store and TensorBoard folder to an ``s3://`` run folder.

    Returns the URIs written (empty for a local run folder or a remote MLflow server, where the
    files already are where they belong).
    """
    if not is_remote(cfg.output.dir):
        return []
    local = tracking_local_dir(cfg)
    run = get_store(cfg.output.dir, cfg.storage.endpoint_url, cfg.storage.region)
    written = []
    targets = [("tensorboard", tensorboard_dir(cfg))]
    if wandb_dir(cfg) == local:  # W&B's files, unless $WANDB_DIR sends them elsewhere
        targets.append(("wandb", local / "wandb"))
    if not cfg.output.mlflow_tracking_uri:
        targets.append(("mlruns", local / "mlruns"))
    for name, folder in targets:
        if folder.is_dir() and any(folder.rglob("*")):
            run.child(name).upload_from(folder)
            written.append(run.child(name).uri)
    return written
