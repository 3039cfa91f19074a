"""One storage abstraction for local paths and ``s3://`` URIs (pyarrow filesystems).

S3 settings come from the standard AWS environment: ``AWS_ENDPOINT_URL`` (for S3-compatible
servers such as SeaweedFS or MinIO), ``AWS_REGION``/``AWS_DEFAULT_REGION`` and credentials from the
environment or an instance profile. Nothing here reads keys from config files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring AWS_ENDPOINT_URL (path-style, http if the URL says so)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or ``s3://bucket/key``."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def absolute(uri: str) -> str:
    """``s3://`` URIs unchanged; local paths made absolute (Ray workers run in other folders)."""
    return uri if is_s3(uri) or not uri else str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """Whole file as bytes."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; on a local path via a temp file + rename, so readers never see half."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:  # S3 PUT is atomic
        f.write(data)


def read_json(uri: str) -> Any:
    """Parse a JSON file."""
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below ``uri`` (recursive) ending with ``suffix``, as full URIs/paths, sorted."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )


def download(uri: str, local: str | Path) -> Path:
    """Copy a remote file (or a local one) to ``local``; returns the local path."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(read_bytes(uri))
    return local
