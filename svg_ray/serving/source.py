"""Where a served model comes from: a bundle directory (local or S3) or the MLflow model registry.

Registry URIs: ``models:/<name>/<version>``, ``models:/<name>/latest`` (the highest version) and
``models:/<name>@<alias>``. ``resolve`` turns one into a ``RegistryModel`` (version, run, files)
with a one-line ``RegistryError`` when the server is unreachable or the model, version or alias
does not exist; it fails within seconds, so the CLI runs it before Ray starts.

A version's files are found two ways:

- an MLflow pyfunc model (what ``svg-ray train``/``train-ae --register-as`` log, see
  ``svg_ray.mlflow_model``): its MLmodel file names the artifact holding the weights, e.g.
  ``artifacts/bundle`` (bundle.json, dit_ema.safetensors, autoencoder.safetensors);
- a plain folder registered as the version's source (a bundle directory, or a folder holding
  ``autoencoder.safetensors``), e.g.
  ``client.create_model_version(name, source=f"{run.info.artifact_uri}/bundle", run_id=...)``.

An ``s3://`` or local location is read in place; anything else (``mlflow-artifacts:/``, ...) is
downloaded through the tracking server into a temporary directory that is removed once the
weights are in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from svg_ray import storage
from svg_ray.checkpoint import CheckpointError
from svg_ray.mlflow_model import AE_FILE, AUTOENCODER, SAMPLER, weights_from_mlmodel
from svg_ray.tracking import RegistryError

T = TypeVar("T")

_MODELS_RE = re.compile(
    r"^models:/(?P<name>[^/@:]+)(?:/(?P<version>\d+|[lL][aA][tT][eE][sS][tT])|@(?P<alias>[\w-]+))/?$"
)
LATEST = "latest"
KIND_NAMES = {SAMPLER: "sampler bundle", AUTOENCODER: "autoencoder"}
REGISTERED_BY = {
    SAMPLER: "svg-ray train --register-as",
    AUTOENCODER: "svg-ray train-ae --register-as",
}


@dataclass
class ModelSource:
    """What was asked for and where the bundle actually came from (reported by GET /v1/model)."""

    uri: str
    """The URI as configured."""
    location: str
    """The bundle directory the weights were read from (before any download)."""
    registered_model: dict[str, Any] = field(default_factory=dict)
    """name, version, run_id and source of an MLflow model version; empty otherwise."""


@dataclass
class RegistryModel:
    """A registry URI resolved to one model version and the folder holding its weights."""

    uri: str
    """The URI as given."""
    tracking_uri: str
    """The MLflow server or store it was resolved against."""
    name: str
    version: str
    run_id: str | None
    """The training run that logged the version (None for a hand-registered folder)."""
    source: str
    """The version's source (``models:/<model id>`` for a logged model)."""
    model_id: str | None
    """The MLflow LoggedModel id, when the version is one."""
    kind: str
    """'sampler' or 'autoencoder'."""
    weights: str
    """Artifact URI (or path) of the folder holding the weights."""
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def pinned_uri(self) -> str:
        """``models:/<name>/<version>``: this exact version."""
        return f"models:/{self.name}/{self.version}"

    def describe(self) -> dict[str, Any]:
        """name, version, run_id, source, model_id and aliases (for GET /v1/model and status)."""
        keys = ("name", "version", "run_id", "source", "model_id", "aliases")
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keys}


def is_registry_uri(uri: str) -> bool:
    """True for ``models:/...`` URIs."""
    return uri.startswith("models:/")


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/n/3`` -> ('n', '3', None); ``models:/n/latest`` -> ('n', 'latest', None);
    ``models:/n@prod`` -> ('n', None, 'prod')."""
    m = _MODELS_RE.match(uri)
    if not m:
        raise RegistryError(
            f"bad model registry URI {uri!r}: expected models:/<name>/<version>, "
            "models:/<name>/latest or models:/<name>@<alias>"
        )
    version = m["version"].lower() if m["version"] else None
    return m["name"], version, m["alias"]


def registry_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI registry lookups use: the one given, MLFLOW_TRACKING_URI, or svg-ray's
    default sqlite store (./outputs/mlflow.db; never created by looking)."""
    from svg_ray.tracking import default_tracking_uri

    return tracking_uri or default_tracking_uri(create=False)


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    # MLflow retries a refused request for minutes by default; a lookup should answer in seconds
    # (and print no progress bar for the one small file it may read).
    keys = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    before = {k: os.environ.get(k) for k in keys}
    for k, v in keys.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, old in before.items():
            if old is None:
                os.environ.pop(k, None)


def check_reachable(tracking_uri: str, option: str = "--tracking-uri") -> None:
    """Raise RegistryError unless the tracking server answers (or the sqlite store exists)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.exists():
            raise RegistryError(
                f"no MLflow store at {db}: pass the tracking URI that holds the model ({option} "
                "or MLFLOW_TRACKING_URI)"
            )
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = str(getattr(e, "reason", e))
    raise RegistryError(
        f"cannot reach the MLflow tracking server at {tracking_uri} ({reason}): start it, or "
        f"pass the right one ({option} or MLFLOW_TRACKING_URI)"
    )


def _one_line(e: Exception) -> str:
    return " ".join(str(getattr(e, "message", e)).split())[:300]


def resolve(
    uri: str,
    tracking_uri: str | None = None,
    kind: str | None = None,
    option: str = "--tracking-uri",
) -> RegistryModel:
    """Resolve a ``models:/`` URI to its model version and weights folder, checking that the
    version holds a model of ``kind`` ('sampler', 'autoencoder' or None: either)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_registry_uri(uri)
    tracking_uri = registry_tracking_uri(tracking_uri)
    check_reachable(tracking_uri, option)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    where = f"in the MLflow registry at {tracking_uri}"
    with _fail_fast():
        try:
            rm = client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"cannot look up {uri} {where}: {_one_line(e)}") from None
            names = sorted(m.name for m in client.search_registered_models(max_results=20))
            raise RegistryError(
                f"no registered model {name!r} {where} (models there: "
                f"{', '.join(names) or 'none'}): register one with `{_registered_by(kind)} "
                f"{name}`"
            ) from None
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        try:
            if alias is not None:
                mv = client.get_model_version_by_alias(name, alias)
            elif version == LATEST:
                if not versions:
                    raise RegistryError(f"model {name!r} {where} has no versions yet")
                mv = client.get_model_version(name, str(versions[-1]))
            else:
                mv = client.get_model_version(name, str(version))
        except MlflowException:
            if alias is not None:
                aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(rm.aliases.items()))
                raise RegistryError(
                    f"model {name!r} has no alias {alias!r} {where} (aliases: {aliases or 'none'}"
                    f"): set it with `svg-ray promote {name} <version> {alias}`"
                ) from None
            have = ", ".join(map(str, versions)) or "none"
            raise RegistryError(
                f"model {name!r} has no version {version} {where} (versions: {have}); "
                f"models:/{name}/latest is the newest"
            ) from None
        location = client.get_model_version_download_uri(name, mv.version)
        found_kind, weights = _inspect(location, tracking_uri, uri)
    if kind is not None and found_kind != kind:
        raise RegistryError(
            f"{uri} (version {mv.version}) is an {KIND_NAMES[found_kind]}, not a "
            f"{KIND_NAMES[kind]}: use a model registered by `{_registered_by(kind)}`"
        )
    return RegistryModel(
        uri=uri,
        tracking_uri=tracking_uri,
        name=name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        source=str(mv.source),
        model_id=getattr(mv, "model_id", None) or _model_id(str(mv.source)),
        kind=found_kind,
        weights=weights,
        aliases=list(mv.aliases or []),
        tags=dict(mv.tags or {}),
    )


def _model_id(source: str) -> str | None:
    """The LoggedModel id in a ``models:/m-...`` source (stores that do not return it)."""
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)", source)
    return m[1] if m else None


def _registered_by(kind: str | None) -> str:
    return REGISTERED_BY.get(kind or SAMPLER, REGISTERED_BY[SAMPLER])


def _join(location: str, rel: str) -> str:
    return location.rstrip("/") + "/" + rel.strip("/")


def _inspect(location: str, tracking_uri: str, uri: str) -> tuple[str, str]:
    """(kind, weights folder) of a model version's files, reading at most its MLmodel file."""
    import yaml
    from mlflow.artifacts import download_artifacts, list_artifacts
    from mlflow.exceptions import MlflowException

    direct = reads_in_place(location)
    try:
        if direct is not None:
            names = {p.rsplit("/", 1)[-1] for p in _list_dir(direct)}
        else:
            names = {
                a.path.rsplit("/", 1)[-1]
                for a in list_artifacts(artifact_uri=location, tracking_uri=tracking_uri)
            }
        if "MLmodel" in names:
            if direct is not None:
                text = storage.read_bytes(storage.join(direct, "MLmodel")).decode()
            else:
                with tempfile.TemporaryDirectory(prefix="svg-mlmodel-") as tmp:
                    local = download_artifacts(
                        artifact_uri=_join(location, "MLmodel"),
                        dst_path=tmp,
                        tracking_uri=tracking_uri,
                    )
                    text = Path(local).read_text()
            kind, rel = weights_from_mlmodel(yaml.safe_load(text))
            return kind, _join(direct if direct is not None else location, rel)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"cannot read the files of {uri} at {location}: {_one_line(e)}") from e
    except ValueError as e:
        raise RegistryError(f"{uri}: {e}") from None
    if "bundle.json" in names:
        return SAMPLER, direct if direct is not None else location
    if AE_FILE in names:
        return AUTOENCODER, direct if direct is not None else location
    raise RegistryError(
        f"{uri} at {location} holds neither an svg-ray MLflow model nor a sampler bundle "
        f"(bundle.json) nor an {AE_FILE}"
    )


def _list_dir(path: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(path)
    info = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return [i.path for i in info]


def reads_in_place(location: str) -> str | None:
    """A path/URI ``svg_ray.storage`` reads directly, or None when MLflow must download it."""
    if location.startswith("s3://"):
        return location
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" and Path(location).is_absolute():
        return location
    return None


@contextlib.contextmanager
def local_files(model: RegistryModel) -> Iterator[str]:
    """A path ``svg_ray.storage`` can read holding the version's weights folder: the folder
    itself when it is on S3 or local, else a temporary download removed on exit."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    direct = reads_in_place(model.weights)
    if direct is not None:
        yield direct
        return
    with tempfile.TemporaryDirectory(prefix="svg-model-") as tmp:
        try:
            local = download_artifacts(
                artifact_uri=model.weights, dst_path=tmp, tracking_uri=model.tracking_uri
            )
        except MlflowException as e:
            raise CheckpointError(
                f"cannot download {model.weights} ({model.uri}): {_one_line(e)}"
            ) from e
        yield local


def with_model(
    uri: str, kind: str, load: Callable[[str], T], tracking_uri: str = ""
) -> tuple[T, ModelSource]:
    """Call ``load(weights_folder)`` on the model ``uri`` names; returns (result, its source)."""
    if not is_registry_uri(uri):
        return load(uri), ModelSource(uri=uri, location=uri)
    model = resolve(uri, tracking_uri or None, kind)
    source = ModelSource(uri=uri, location=model.weights, registered_model=model.describe())
    with local_files(model) as path:
        return load(path), source


def with_bundle(
    uri: str, load: Callable[[str], T], tracking_uri: str = ""
) -> tuple[T, ModelSource]:
    """Call ``load(bundle_dir)`` on the sampler bundle ``uri`` names; returns (result, source)."""
    return with_model(uri, SAMPLER, load, tracking_uri)
