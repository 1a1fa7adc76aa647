"""Fixtures for pool tests: a real S3-compatible server (moto) on a free local port.

``s3_server`` yields ``{"endpoint_url", "bucket", "client"}``; dummy credentials are set in the
environment for the session (pyarrow and boto3 both read them), and every test gets a fresh
bucket through ``s3_bucket``.
"""

from __future__ import annotations

import itertools
import os

import pytest
from _s3 import moto_s3

_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_s3(env) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A new empty bucket on the moto server: ``{"endpoint_url", "client", "bucket"}``."""
    name = f"edsft-test-{os.getpid()}-{next(_counter)}"
    s3_server["client"].create_bucket(Bucket=name)
    return {**s3_server, "bucket": name}
