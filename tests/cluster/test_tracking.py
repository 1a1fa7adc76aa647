"""output.report_to: the training logger and the Tune callbacks write real MLflow runs and TB events."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from edsft.config import Config
from edsft.distributed.tracking import (
    experiment_name,
    make_train_logger,
    make_tune_callbacks,
    mlflow_tracking_uri,
    tensorboard_dir,
)


def _cfg(tmp_path: Path, report_to=("mlflow", "tensorboard"), **more) -> Config:
    return Config().replace(**{"output.dir": str(tmp_path / "run"), "output.report_to": list(report_to), **more})


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read back every scalar of the event files under ``logdir`` with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow_client(cfg: Config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))


def test_train_logger_writes_mlflow_and_tensorboard(tmp_path):
    cfg = _cfg(tmp_path)
    assert mlflow_tracking_uri(cfg) == (tmp_path / "run" / "mlruns").as_uri()
    with make_train_logger(cfg, "train/sft 0", params={"budget": 32}) as log:
        for step, loss in enumerate([2.5, 2.0, 1.25], start=1):
            log.log({"loss": loss, "lr": 1e-4 * step, "note": "dropped", "nan": float("nan")}, step)
        run_id = log.mlflow_run_id

    client = _mlflow_client(cfg)
    exp = client.get_experiment_by_name(experiment_name(cfg))
    assert exp is not None and exp.name == "edsft-run"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train_sft_0"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 2.0), (3, 1.25)]
    assert set(run.data.metrics) == {"loss", "lr"}  # strings and NaN are not metrics
    assert run.data.params["budget"] == "32" and run.data.params["training.lr"] == "0.0002"

    logdir = tensorboard_dir(cfg) / "train_sft_0"
    assert glob.glob(str(logdir / "events.out.tfevents.*"))
    scalars = _tb_scalars(logdir)
    assert scalars["loss"] == [(1, 2.5), (2, 2.0), (3, 1.25)]


def test_report_to_empty_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, report_to=())
    log = make_train_logger(cfg, "quiet")
    log.log({"loss": 1.0}, 1)
    log.close()
    log.close()  # idempotent
    assert not (tmp_path / "run").exists()
    assert make_tune_callbacks(cfg) == []


def test_only_tensorboard(tmp_path):
    cfg = _cfg(tmp_path, report_to=("tensorboard",))
    with make_train_logger(cfg, "tb-only") as log:
        log.log({"loss": 3.0}, 7)
    assert not (tmp_path / "run" / "mlruns").exists()
    assert _tb_scalars(tensorboard_dir(cfg) / "tb-only")["loss"] == [(7, 3.0)]


def test_tune_callbacks_log_each_trial(tmp_path, ray_cluster):
    """A real two-trial Tune run with our callbacks: one MLflow run and one TB folder per trial."""
    from ray import tune

    cfg = _cfg(tmp_path)

    def trainable(config):
        for i in range(3):
            tune.report({"score": config["x"] * (i + 1)})

    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1.0, 2.0])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name="cb", storage_path=str(tmp_path / "tune"), callbacks=make_tune_callbacks(cfg), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors

    client = _mlflow_client(cfg)
    exp = client.get_experiment_by_name(experiment_name(cfg) + "-sweep")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    finals = sorted(r.data.metrics["score"] for r in runs)
    assert finals == [3.0, 6.0]
    assert sorted(r.data.params["x"] for r in runs) == ["1.0", "2.0"]

    trial_dirs = sorted(p for p in (tensorboard_dir(cfg) / "sweep").iterdir() if p.is_dir())
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        values = [v for _, v in _tb_scalars(d)["ray/tune/score"]]
        assert len(values) == 3 and values[2] == 3 * values[0]


def test_s3_run_folder_gets_the_tracking_files(tmp_path, s3_secret_server):
    """MLflow/TensorBoard write to a local scratch; close() uploads it into the s3:// run folder."""
    s3 = s3_secret_server["client"]
    bucket = "edsft-tracking"
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": s3_secret_server["region"]})
    cfg = _cfg(
        tmp_path,
        **{
            "output.dir": f"s3://{bucket}/runs/t1",
            "storage.endpoint_url": s3_secret_server["endpoint_url"],
            "storage.region": s3_secret_server["region"],
        },
    )
    assert mlflow_tracking_uri(cfg).startswith("file://") and str(tmp_path) not in mlflow_tracking_uri(cfg)
    with make_train_logger(cfg, "sft-s3") as log:
        log.log({"loss": 0.5}, 1)
        run_id = log.mlflow_run_id
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/t1/").get("Contents", [])]
    assert any(k.startswith("runs/t1/tensorboard/sft-s3/events.out.tfevents") for k in keys), keys
    assert any(k.startswith("runs/t1/mlruns/") and k.endswith(f"{run_id}/metrics/loss") for k in keys), keys
    secret = s3_secret_server["secret"].encode()
    assert not any(secret in s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)


# --------------------------------------------------------------------------------------------
# Weights & Biases (offline): the run files hold the logged metrics; the key is nowhere
# --------------------------------------------------------------------------------------------

WANDB_KEY = "edsft0secret0wandb0key0" + "x" * 17  # 40 chars, the shape of a real key


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


def _wandb_records(path: Path):
    """Every record of a W&B ``run-*.wandb`` file: a LevelDB-style log (32 KiB blocks, each record
    split into chunks with a 7-byte header: crc32, length, type full/first/middle/last) of
    ``wandb_internal_pb2.Record`` protobufs after a 7-byte ``:W&B`` file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def _finished(f: Path) -> bool:
    return any(rec.WhichOneof("record_type") == "exit" for rec in _wandb_records(f))


def _wandb_runs(root: Path, timeout: float = 60) -> dict[str, dict]:
    """{run display name: {"project", "config", "history": [{metric: value}, ...]}} of the offline runs under root.

    W&B's service process writes the files: finish() can return before the last records are on
    disk (seen under load), so wait for each run's exit record."""
    import json
    import time

    files = sorted(root.rglob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while not all(_finished(f) for f in files) and time.monotonic() < deadline:
        time.sleep(0.5)
    runs = {}
    for f in files:
        run = {"history": [], "config": {}}
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    name=rec.run.display_name,
                    project=rec.run.project,
                    config={i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.run.config.update},
                )
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        runs[run.get("name", f.name)] = run  # (a file without its run record shows up by file name)
    return runs


def _files_holding(secret: str, *roots: Path) -> list[str]:
    return [
        str(p) for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    ]


def test_train_logger_writes_wandb_offline(tmp_path, wandb_offline):
    cfg = _cfg(tmp_path, report_to=("wandb",))
    with make_train_logger(cfg, "train/sft 0", params={"budget": 32}) as log:
        for step, loss in enumerate([2.5, 2.0, 1.25], start=1):
            log.log({"loss": loss, "lr": 1e-4 * step, "note": "dropped"}, step)
    runs = _wandb_runs(wandb_offline)
    assert list(runs) == ["train_sft_0"]
    run = runs["train_sft_0"]
    assert run["project"] == "edsft-run"
    assert [(h["_step"], h["loss"]) for h in run["history"]] == [(1, 2.5), (2, 2.0), (3, 1.25)]
    assert all("note" not in h and "lr" in h for h in run["history"])
    assert run["config"]["budget"] == 32 and run["config"]["training.lr"] == "0.0002"
    assert not _files_holding(WANDB_KEY, wandb_offline, tmp_path / "run")


def test_tune_wandb_callback_logs_each_trial_and_keeps_the_key_out_of_runtime_envs(tmp_path, wandb_offline, ray_cluster):
    """A real two-trial Tune run with the W&B callback: one offline run per trial with its metrics;
    WANDB_API_KEY is in no runtime env Ray logs, no W&B file and no Ray session log."""
    from ray import tune

    cfg = _cfg(tmp_path, report_to=("wandb",))

    def trainable(config):
        for i in range(3):
            tune.report({"score": config["x"] * (i + 1)})

    cbs = make_tune_callbacks(cfg)
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1.0, 2.0])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name="wb", storage_path=str(tmp_path / "tune"), callbacks=cbs, verbose=0),
    )
    assert not tuner.fit().errors

    runs = _wandb_runs(wandb_offline)
    assert len(runs) == 2, runs.keys()
    assert {r["project"] for r in runs.values()} == {"edsft-run-sweep"}
    finals = sorted(r["history"][-1]["score"] for r in runs.values())
    assert finals == [3.0, 6.0]
    assert all(len(r["history"]) == 3 for r in runs.values())

    wandb_cb = next(cb for cb in cbs if type(cb).__name__ == "KeyFreeWandbLoggerCallback")
    env_vars = wandb_cb._remote_logger_class._default_options["runtime_env"]["env_vars"]
    assert env_vars.get("WANDB_MODE") == "offline" and "WANDB_API_KEY" not in env_vars

    import ray

    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert session_logs.is_dir()
    assert not _files_holding(WANDB_KEY, wandb_offline, tmp_path, session_logs)


def test_wandb_api_key_is_not_propagated_to_tune_trials():
    from ray.tune.execution import class_cache

    from edsft.distributed.session import keep_credentials_out_of_runtime_envs

    keep_credentials_out_of_runtime_envs()
    assert "WANDB_API_KEY" not in class_cache.ENV_VARS_TO_PROPAGATE
    assert "AWS_SECRET_ACCESS_KEY" not in class_cache.ENV_VARS_TO_PROPAGATE
