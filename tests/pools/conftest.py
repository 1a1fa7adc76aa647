"""Fixtures for pool tests: a real S3-compatible server (moto) on a free local port.

``s3_server`` yields ``{"endpoint_url", "bucket", "client"}``; dummy credentials are set in the
environment for the session (pyarrow and boto3 both read them), and every test gets a fresh
bucket through ``s3_bucket``.
"""

from __future__ import annotations

import itertools
import logging
import os

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        yield {"endpoint_url": endpoint, "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A new empty bucket on the moto server: ``{"endpoint_url", "client", "bucket"}``."""
    name = f"edsft-test-{os.getpid()}-{next(_counter)}"
    s3_server["client"].create_bucket(Bucket=name)
    return {**s3_server, "bucket": name}
