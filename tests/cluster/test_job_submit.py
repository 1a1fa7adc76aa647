"""The way cluster users run edsft: `ray job submit --working-dir .` against a real `ray start` head."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile

import pytest
from conftest import ROOT, VENV_BIN, job_api  # tests/cluster/conftest.py

pytestmark = pytest.mark.slow

SMOKE = "jobs/configs/smoke.yaml"
ARTIFACTS = (
    "pool.parquet",
    "eval.parquet",
    "scores.parquet",
    "selection.parquet",
    "annotated.parquet",
    "train/adapter",
    "metrics.json",
    "manifest.json",
)


def test_working_dir_upload_stays_small(tmp_path, monkeypatch):
    """What `ray job submit --working-dir .` uploads, computed by the same Ray code path.

    Ray adds its default excludes (.git, .venv, __pycache__) and respects .gitignore (runs/,
    mlruns/, caches); we capture the excludes Ray passes to its upload function and zip with them.
    """
    from ray._private.runtime_env.packaging import _zip_files
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    seen = {}

    def capture(working_dir, excludes, is_file=False):
        seen.update(working_dir=working_dir, excludes=list(excludes))

    upload_working_dir_if_needed({"working_dir": "."}, include_gitignore=True, upload_fn=capture)
    pkg = tmp_path / "wd.zip"
    # A run output inside the checkout (as `edsft run` makes by default) must stay behind.
    probe = ROOT / "runs" / f"upload-probe-{uuid.uuid4().hex[:8]}"
    probe.mkdir(parents=True)
    try:
        (probe / "big.bin").write_bytes(b"x" * (1 << 20))
        _zip_files(seen["working_dir"], excludes=seen["excludes"], output_path=str(pkg), include_gitignore=True)
    finally:
        shutil.rmtree(probe)
    names = zipfile.ZipFile(pkg).namelist()
    assert "jobs/run_pipeline.py" in names and "edsft/pipeline.py" in names and SMOKE in names
    leaked = [n for n in names if n.split("/")[0] in (".venv", "runs", "mlruns", ".git")]
    assert not leaked, leaked[:5]
    assert pkg.stat().st_size < 20 * 1024**2, f"working dir package is {pkg.stat().st_size / 1e6:.1f} MB"
    # runs/ is kept out by the project's .gitignore (not by Ray's defaults).
    assert "runs" not in seen["excludes"] and "runs/" in (ROOT / ".gitignore").read_text().split()


def _submit(head: dict, job_id: str, entrypoint: list[str], runtime_env: dict) -> None:
    """`ray job submit --working-dir .` from the checkout, as users run it (the venv's ray CLI)."""
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["dashboard"],
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--no-wait",
        "--",
        *entrypoint,
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _wait(head: dict, job_id: str, timeout: float) -> tuple[dict, str]:
    """Poll the job REST API over HTTP only (this process never joins the cluster with ray.init)."""
    deadline = time.time() + timeout
    while True:
        code, job = job_api(head, f"/api/jobs/{job_id}")
        assert code == 200, job
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            break
        time.sleep(5)
    logs = job_api(head, f"/api/jobs/{job_id}/logs")[1]["logs"]
    if job["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        job_api(head, f"/api/jobs/{job_id}/stop", method="POST")
    assert job["status"] == "SUCCEEDED", f"job {job_id} ended {job['status']}:\n{logs[-6000:]}"
    return job, logs


def test_ray_job_submit_smoke_pipeline(ray_head, tmp_path):
    out_dir = tmp_path / "run"
    tag = uuid.uuid4().hex[:8]
    # RAY_ADDRESS: this machine may run several Ray clusters at once (other tests); Ray Train's
    # helper actors look the cluster up without an address and give up when they find several.
    # On a real cluster there is one per node and it is not needed.
    runtime_env = {
        "env_vars": {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_ADDRESS": ray_head["gcs"],
        }
    }
    assert job_api(ray_head, "/api/jobs/", token=None)[0] == 401, "the job API must refuse requests without the token"

    # Which python does a job's `python` resolve to? The venv's: the cluster was started by the
    # venv's `ray`, and jobs inherit its PATH.
    _submit(ray_head, f"edsft-python-{tag}", ["python", "-c", "import sys; print('EDSFT_PYTHON=' + sys.executable)"], runtime_env)
    _, logs = _wait(ray_head, f"edsft-python-{tag}", 120)
    assert f"EDSFT_PYTHON={VENV_BIN / 'python'}" in logs, logs[-2000:]

    job_id = f"edsft-smoke-{tag}"
    _submit(
        ray_head,
        job_id,
        ["python", "jobs/run_pipeline.py", "--config", SMOKE, f"output.dir={out_dir}", "output.report_to=[mlflow,tensorboard]"],
        runtime_env,
    )
    job, logs = _wait(ray_head, job_id, 900)
    # The driver ran from the uploaded working dir (a gcs:// package), not from this checkout.
    assert job["runtime_env"]["working_dir"].startswith("gcs://")
    for stage in ("ingest", "score", "select", "annotate", "train", "evaluate"):
        assert f"[edsft] {stage}:" in logs, f"no '{stage}' line in the job log"

    for name in ARTIFACTS:
        assert (out_dir / name).exists(), f"missing {name}"
    assert any((out_dir / "train" / "adapter").glob("*.safetensors"))
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"ingest", "score", "select", "annotate", "train", "evaluate"}
    assert manifest["versions"]["ray"] == __import__("ray").__version__
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics, "metrics.json is empty"

    # report_to: rank 0 of the training run logged its steps to MLflow and TensorBoard
    run_name = json.loads((out_dir / "train" / "train_summary.json").read_text())["run_name"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name(f"edsft-{out_dir.name}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert losses and max(m.step for m in losses) == manifest["stages"]["train"]["summary"]["steps"]
    assert list((out_dir / "tensorboard" / run_name).glob("events.out.tfevents.*"))
