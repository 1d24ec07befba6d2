"""An S3-compatible server for the tests (moto's server mode, in this process, on
127.0.0.1) and the standard AWS variables pointing at it. Set the variables before Ray starts:
a local Ray cluster's workers inherit the driver's environment when it is started."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_s3(*buckets: str) -> Iterator[str]:
    """Start moto on a free loopback port, point the AWS variables at it, create ``buckets``;
    yields the endpoint URL. Everything is undone on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3",
              "VCC_DIST_S3_BACKEND"):
        mp.delenv(k, raising=False)
    endpoint = f"http://127.0.0.1:{port}"
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing
    try:
        client = boto3.client("s3")
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield endpoint
    finally:
        mp.undo()
        server.stop()
