"""A run that lives on S3 (moto on 127.0.0.1), end to end, then resumed; and no secret leaks.

The pool is read from s3://, every artifact, the Ray Train checkpoints
(``training.storage_path``), the Tune experiment and the MLflow/TensorBoard files are written to
s3://, and a second run skips every stage. Endpoint and region come from the config; the
credentials only from the environment, with a distinctive secret that must appear in no object
of the bucket, no local output and no Ray log.

The pipeline runs as users run it, in its own process (`edsft run`), which starts its own local
Ray cluster: its workers inherit the credentials from the environment, and its session logs go
to a temp dir of ours (RAY_TMPDIR) that we scan.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, child_env, kill_processes_of  # tests/cluster/conftest.py

pytestmark = pytest.mark.slow

BUCKET = "edsft-e2e"


def _keys(client, prefix: str = "") -> dict[str, str]:
    """key -> ETag of every object under prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["ETag"]
    return out


def _edsft(args: list[str], env: dict, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edsft", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_s3_run_resume_and_no_secret(s3_secret_server, tmp_path):
    from edsft.pools.builtin_tasks import generate_tasks

    s3 = s3_secret_server["client"]
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": s3_secret_server["region"]})
    # A file pool in two JSONL parts under a prefix, and a held-out eval file.
    rows = generate_tasks(160, seed=3)
    for i, part in enumerate((rows[:90], rows[90:])):
        body = "".join(json.dumps(r) + "\n" for r in part).encode()
        s3.put_object(Bucket=BUCKET, Key=f"pools/tasks/part-{i}.jsonl", Body=body)
    evals = generate_tasks(20, seed=3, split="eval")
    s3.put_object(Bucket=BUCKET, Key="pools/eval.jsonl", Body="".join(json.dumps(r) + "\n" for r in evals).encode())

    run_uri = f"s3://{BUCKET}/runs/smoke"
    overrides = [
        f"pool.path=s3://{BUCKET}/pools/tasks/",
        f"pool.eval_path=s3://{BUCKET}/pools/eval.jsonl",
        f"storage.endpoint_url={s3_secret_server['endpoint_url']}",
        f"storage.region={s3_secret_server['region']}",
        f"output.dir={run_uri}",
        "output.report_to=[mlflow, tensorboard]",
        "output.progress=false",
        f"training.storage_path=s3://{BUCKET}/checkpoints",
        "sweep.enabled=true",
        "sweep.selectors=[random]",
        "sweep.budgets=[24]",
        "sweep.seeds=[0]",
        "sweep.max_concurrent_trials=1",
        "evaluation.max_examples=20",
    ]
    ray_tmp = tempfile.mkdtemp(prefix="edsft-s3ray-", dir="/tmp")  # short: Unix socket paths
    work = tmp_path / "cwd"
    work.mkdir()
    # Credentials: the environment only (set by the fixture); no AWS_ENDPOINT_URL, the config has it.
    env = child_env(RAY_TMPDIR=ray_tmp, **s3_secret_server["env"])
    env.pop("AWS_ENDPOINT_URL", None)
    try:
        first = _edsft(["run", "--config", str(ROOT / "jobs/configs/smoke.yaml"), *overrides], env, work)
        log1 = first.stdout + first.stderr
        assert first.returncode == 0, log1[-8000:]
        after_first = _keys(s3)

        # -- artifacts on s3 ----------------------------------------------------------------
        run_prefix = "runs/smoke/"
        for artifact in (
            "pool.parquet",
            "eval.parquet",
            "scores.parquet",
            "sweep/results.parquet",
            "report/report.md",
            "manifest.json",
        ):
            assert any(k.startswith(run_prefix + artifact) for k in after_first), f"no {artifact} on s3"
        # (pyarrow also writes empty "folder/" marker objects: skip those)
        trials = {k.split("/")[4] for k in after_first if k.startswith(run_prefix + "sweep/trials/") and k.count("/") > 4}
        trials.discard("")
        assert len(trials) == 1, sorted(after_first)
        trial = trials.pop()
        for artifact in ("selection.parquet", "annotated.parquet", "train/adapter/", "metrics.json"):
            assert any(k.startswith(f"{run_prefix}sweep/trials/{trial}/{artifact}") for k in after_first), (
                artifact,
                sorted(k for k in after_first if "/trials/" in k),
            )
        # the trial's training run logged its steps (rank 0), synced into the trial folder
        assert any(
            k.startswith(f"{run_prefix}sweep/trials/{trial}/mlruns/") and k.endswith("/metrics/loss") for k in after_first
        ), sorted(k for k in after_first if "mlruns" in k)
        assert any(k.startswith(f"{run_prefix}sweep/trials/{trial}/tensorboard/sft-") for k in after_first)
        # Ray Train checkpoints under training.storage_path, Tune's experiment under the run
        assert any(k.startswith("checkpoints/") and "/checkpoint_" in k for k in after_first)
        assert any(k.startswith(run_prefix + "sweep/tune/") and "experiment_state" in k for k in after_first)
        # report_to: the sweep's MLflow store and TensorBoard events, synced to the run folder
        assert any(k.startswith(run_prefix + "mlruns/") and k.endswith("meta.yaml") for k in after_first)
        assert any(k.startswith(run_prefix + "tensorboard/sweep/") and "tfevents" in k for k in after_first)
        # nothing of the run went to the local disk instead
        assert not (work / "runs").exists() and not list(work.rglob("*.parquet"))

        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=run_prefix + "manifest.json")["Body"].read())
        assert list(manifest["stages"]) == ["ingest", "score", "sweep", "report"]
        assert manifest["config"]["storage"] == {
            "endpoint_url": s3_secret_server["endpoint_url"],
            "region": s3_secret_server["region"],
        }
        assert manifest["stages"]["sweep"]["summary"]["finished"] == 1
        assert manifest["stages"]["ingest"]["summary"].get("rows_kept", 160) == 160

        # -- the second run resumes: every stage skipped, nothing rewritten --------------------
        second = _edsft(["run", "--config", str(ROOT / "jobs/configs/smoke.yaml"), *overrides], env, work)
        log2 = second.stdout + second.stderr
        assert second.returncode == 0, log2[-8000:]
        for stage in ("ingest", "score", "sweep", "report"):
            assert f"[edsft] {stage}: up to date" in log2, f"{stage} was not skipped:\n{log2[-4000:]}"

        # the command's log (logs/edsft.log) grows with every command; it is not an artifact
        def artifacts(keys: dict) -> dict:
            return {k: v for k, v in keys.items() if "/logs/" not in k}

        now = _keys(s3)
        assert artifacts(now) == artifacts(after_first), "the resumed run rewrote or added objects"
        assert (
            any(k.endswith("/logs/edsft.log") for k in now)
            and now.keys() - artifacts(now).keys() == after_first.keys() - artifacts(after_first).keys()
        )
        assert "scoring:" not in log2 and "Tune" not in log2

        # -- the secret is nowhere -----------------------------------------------------------
        secret = s3_secret_server["secret"].encode()
        leaks = [k for k in after_first if secret in s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()]
        assert not leaks, f"secret written to s3 objects: {leaks[:5]}"
        assert secret.decode() not in log1 + log2
        local_roots = [Path(ray_tmp), work]
        from edsft.config import load_config
        from edsft.distributed.tracking import tracking_local_dir

        local_roots.append(tracking_local_dir(load_config(ROOT / "jobs/configs/smoke.yaml", overrides)))
        scanned = 0
        for root in local_roots:
            for f in Path(root).rglob("*"):
                if f.is_file() and not f.is_symlink() and not f.name.endswith(".sock"):
                    scanned += 1
                    try:
                        data = f.read_bytes()
                    except OSError:
                        continue
                    assert secret not in data, f"secret written to {f}"
        session_logs = list(Path(ray_tmp).glob("ray/session_*/logs/*"))
        assert session_logs, "the run's Ray session logs were not under RAY_TMPDIR"
        assert scanned > len(session_logs)
    finally:
        kill_processes_of(ray_tmp)  # a crashed run may leave its local cluster behind
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
