"""Shared fixtures: a real S3-compatible server on 127.0.0.1 (moto's server mode) and tiny
models."""

from __future__ import annotations

import os
import uuid

import pytest
from ports import free_port


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server on a free loopback port; point every AWS client at it via env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its ``s3://name`` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A real local Ray cluster for one test module (one cluster at a time on this machine).

    It starts after the S3 server so that its workers inherit the S3 endpoint variables.
    """
    import ray

    from react_ray.ray_utils import start_local

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_local(2)
    yield ray
    ray.shutdown()
