"""Fixtures for the cluster tests: a real `ray start` head over HTTP, and an S3 server with a secret.

Neither connects the pytest process to Ray: the tests talk to the head through the job API
(HTTP) or run the pipeline in a subprocess, so the session-wide ``ray_cluster`` fixture (a
separate ``ray.init`` cluster) is untouched. We never run ``ray stop``: it kills every Ray
process on the machine (other test clusters included); the head started here is stopped by
killing exactly the processes of its own temp dir.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _s3 import moto_s3

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv's bin: its `ray`, its `python`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for Ray processes we start: venv first on PATH, offline hub, no stray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def kill_processes_of(*markers: str) -> list[int]:
    """SIGTERM (then SIGKILL) every process whose command line mentions a marker, and their children.

    The markers (our cluster's own temp dir and GCS address) appear only in the command lines of
    the processes we started, so this stops exactly those.
    """
    import psutil

    procs = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            args = p.info["cmdline"] or []
            if p.pid != os.getpid() and any(m in a for a in args for m in markers):
                procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in list(procs.values()):
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return sorted(procs)


@pytest.fixture
def ray_head():
    """A real local cluster from the venv's ``ray start --head``; yields its addresses.

    Dashboard (and job API) on 127.0.0.1 only, 2 CPUs, its own short temp dir (Unix socket paths
    must stay under ~100 chars) that we also scan for secrets. Stopped in a finally, even on failure.
    """
    temp_dir = tempfile.mkdtemp(prefix="edsft-rh-", dir="/tmp")
    gcs_port, dash_port = free_port(), free_port()
    # Ray 2.60 protects the job API with a token (on by default once ~/.ray/auth_token exists).
    # We make it explicit with a token of our own, so the test does not depend on that file and
    # can check that a request without the token is refused.
    token = secrets.token_hex(32)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={600 * 1024**2}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    info = {
        "temp_dir": temp_dir,
        "gcs": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dash_port}",
        "token": token,
        "env": child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
    }
    try:
        out = subprocess.run(cmd, env=info["env"], cwd=temp_dir, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            pytest.fail(f"ray start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        _wait_for_job_api(info)
        # The GCS address as Ray wrote it (node IP, not necessarily 127.0.0.1).
        info["gcs"] = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
        yield info
    finally:
        kill_processes_of(temp_dir, f":{gcs_port}", f"--port={dash_port}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_api(head: dict, path: str, method: str = "GET", token: str | None = "head") -> tuple[int, object]:
    """One call of Ray's job REST API (what `ray job` and JobSubmissionClient speak), over HTTP only."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(head["dashboard"] + path, method=method)
    if token:
        req.add_header("Authorization", "Bearer " + (head["token"] if token == "head" else token))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if body.strip().startswith(("{", "[")) else body
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _wait_for_job_api(head: dict, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = job_api(head, "/api/jobs/")
            if last[0] == 200:
                return
        except OSError as e:  # not listening yet
            last = e
        time.sleep(1)
    raise TimeoutError(f"job API {head['dashboard']} did not come up in {timeout:.0f} s: {last}")


@pytest.fixture(scope="session")
def s3_secret_server():
    """A moto S3 server on 127.0.0.1 and a distinctive secret key in the environment.

    Same approach as tests/pools/conftest.py (ThreadedMotoServer on a free port), but the secret
    is random and recognisable so a test can prove it was written nowhere.
    """
    secret = "edsftSECRET" + secrets.token_hex(12)
    env = {"AWS_ACCESS_KEY_ID": "AKIAEDSFTTESTKEY0001", "AWS_SECRET_ACCESS_KEY": secret}
    with moto_s3(env, region="eu-west-1") as server:
        yield {**server, "region": "eu-west-1", "secret": secret, "env": env}
