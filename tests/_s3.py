"""A real S3 protocol endpoint for tests: moto's threaded server on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest


@contextlib.contextmanager
def moto_s3(env: dict[str, str], region: str = "us-east-1"):
    """Start the server with ``env`` (credentials) in os.environ; restore both on exit.

    Yields ``{"endpoint_url", "client"}`` (a boto3 client on the server).
    """
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
    )
    try:
        yield {"endpoint_url": endpoint, "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
