"""Where a served model comes from: a bundle directory (local or S3) or the MLflow model registry.

Contract for ``models:/<name>/<version>`` (and ``models:/<name>@<alias>``): the registered model
version's artifacts ARE a sampler bundle directory (bundle.json, dit_ema.safetensors,
autoencoder.safetensors; see ``svg_ray.checkpoint``). A training job registers one with e.g.

    mlflow.log_artifacts(bundle_dir, artifact_path="bundle")
    client.create_registered_model(name)            # once
    client.create_model_version(name, source=f"{run.info.artifact_uri}/bundle", run_id=run_id)

The version's download URI is resolved with the MLflow client; an ``s3://`` or local location is
read in place, anything else (``mlflow-artifacts:/``, ``runs:/``, ...) is downloaded through the
tracking server into a temporary directory that is removed once the weights are in memory.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from svg_ray.checkpoint import CheckpointError

T = TypeVar("T")

_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


@dataclass
class ModelSource:
    """What was asked for and where the bundle actually came from (reported by GET /v1/model)."""

    uri: str
    """The URI as configured."""
    location: str
    """The bundle directory the weights were read from (before any download)."""
    registered_model: dict[str, Any] = field(default_factory=dict)
    """name, version, run_id and source of an MLflow model version; empty otherwise."""


def is_registry_uri(uri: str) -> bool:
    """True for ``models:/...`` URIs."""
    return uri.startswith("models:/")


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/n/3`` -> ('n', '3', None); ``models:/n@prod`` -> ('n', None, 'prod')."""
    m = _MODELS_RE.match(uri)
    if not m:
        raise CheckpointError(
            f"bad model registry URI {uri!r}: expected models:/<name>/<version> or "
            "models:/<name>@<alias>"
        )
    return m["name"], m["version"], m["alias"]


def _reads_in_place(location: str) -> str | None:
    """A path/URI ``svg_ray.storage`` reads directly, or None when MLflow must download it."""
    if location.startswith("s3://"):
        return location
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" and Path(location).is_absolute():
        return location
    return None


def with_bundle(
    uri: str, load: Callable[[str], T], tracking_uri: str = ""
) -> tuple[T, ModelSource]:
    """Call ``load(bundle_dir)`` on the bundle ``uri`` names; returns (result, its source)."""
    if not is_registry_uri(uri):
        return load(uri), ModelSource(uri=uri, location=uri)

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_registry_uri(uri)
    client = MlflowClient(tracking_uri=tracking_uri or None, registry_uri=tracking_uri or None)
    try:
        mv = (
            client.get_model_version(name, version)
            if version is not None
            else client.get_model_version_by_alias(name, str(alias))
        )
        location = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as e:
        raise CheckpointError(f"cannot resolve {uri} in the MLflow registry: {e}") from e
    source = ModelSource(
        uri=uri,
        location=location,
        registered_model={
            "name": name,
            "version": str(mv.version),
            "run_id": mv.run_id,
            "source": mv.source,
        },
    )
    direct = _reads_in_place(location)
    if direct is not None:
        return load(direct), source
    with tempfile.TemporaryDirectory(prefix="svg-bundle-") as tmp:
        try:
            local = download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri or None
            )
        except MlflowException as e:
            raise CheckpointError(f"cannot download {location} ({uri}): {e}") from e
        return load(local), source
