"""Pretrained assets from a local path or an object-store URI, never from a hub.

Every asset is named by an option (``--dino-weights``, ...); a missing one is an error that names
that option. ``s3://`` URIs are fetched once into a local cache through boto3, configured by
``storage.s3_settings`` exactly like the pyarrow filesystem (endpoint, region, addressing,
retries); credentials come from the environment or an instance profile, never config files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from svg_ray import storage
from svg_ray.errors import SvgRayError


class AssetError(SvgRayError, RuntimeError):
    """A pretrained asset is missing, unreadable or fails its checksum."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Local cache for assets fetched from object storage (``SVG_RAY_CACHE`` overrides)."""
    root = os.environ.get("SVG_RAY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "svg_ray"
    )
    return Path(root)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise AssetError(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
    return bucket, key


def s3_client() -> Any:
    """The process's boto3 S3 client (the same settings as storage's pyarrow filesystem)."""
    return storage.s3_client()


def resolve_asset(uri: str | None, option: str, sha256: str | None = None) -> Path:
    """Return a local path for ``uri`` (local path or ``s3://``), verifying ``sha256`` if given.

    ``option`` is the user-facing name of the setting, quoted in every error.
    """
    if not uri:
        raise AssetError(
            f"no weights given: set {option} to a local path or an s3:// URI "
            "(nothing is downloaded from a hub at run time)"
        )
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        local = cache_dir() / "s3" / bucket / key
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_suffix(local.suffix + f".part{os.getpid()}")
            try:
                storage.retrying(s3_client().download_file, bucket, key, str(tmp), what=uri)
            except Exception as e:  # botocore raises many types; report them all the same way
                tmp.unlink(missing_ok=True)
                why = e if isinstance(e, storage.StorageError) else storage.storage_error(e, uri)
                raise AssetError(f"{option}: could not download {why}") from e
            os.replace(tmp, local)
        path = local
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise AssetError(f"{option}: file not found: {path}")
    if sha256:
        got = sha256_file(path)
        if got.lower() != sha256.lower():
            raise AssetError(
                f"{option}: sha256 mismatch for {uri}: expected {sha256}, got {got} "
                "(wrong or corrupted file)"
            )
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a tensor state dict from .safetensors or a torch file, never executing pickles.

    Lightning-style wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AssetError(f"could not read {path} as a weights-only torch file: {e}") from e
    for wrapper in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise AssetError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
