"""MLflow tracking: one run per training, re-attached on resume; the model registry.

Ray Train V2 has no MLflow callback, so training logs with plain ``mlflow`` calls on world rank 0.
The driver creates (or finds) the run before any worker starts and passes its id down, so a worker
restart or a resubmitted job re-attaches to the same run instead of creating a duplicate.

What a run carries besides metrics (so a model can be traced back to everything that made it):
provenance tags (``provenance_tags``: git commit, svg-ray/Ray/torch/CUDA versions), its dataset
as an MLflow input (``log_dataset_input``), and its exported model as an MLflow pyfunc model
(``export_model``: logged model, registry version, alias). Experiments are tagged as model
training so the MLflow UI opens its training view, not the GenAI one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from svg_ray.config import ConfigError, flatten
from svg_ray.errors import SvgRayError

TAG_RUN_NAME = "svg_ray.run_name"
TAG_STORAGE = "svg_ray.storage_path"
TAG_KIND = "svg_ray.kind"
TAG_DATASET = "svg_ray.dataset"
TAG_DATASET_DIGEST = "svg_ray.dataset_digest"
TAG_AUTOENCODER_ID = "svg_ray.autoencoder_id"
TAG_REGISTERED = "svg_ray.registered"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_COMMIT_RESUMED = "svg_ray.resumed_git_commit"
VERSION_TAG_PREFIX = "svg_ray.version."
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The MLflow UI (3.x) opens experiments of this kind in its model-training view."""
GIT_COMMIT_ENV = "SVG_RAY_GIT_COMMIT"
"""The submitting checkout's commit, for drivers that run without the .git folder (a Ray job's
uploaded working dir): ``ray job submit ... -- SVG_RAY_GIT_COMMIT=$(git rev-parse HEAD) python
-m pipelines.train_diffusion ...``."""
LINEAGE_TAGS = (TAG_DATASET, TAG_DATASET_DIGEST, TAG_AUTOENCODER_ID, TAG_GIT_COMMIT, TAG_KIND)
"""Run tags copied onto the model versions a run registers."""


class RegistryError(SvgRayError, RuntimeError):
    """The MLflow tracking server is unreachable, or lacks the model, version or alias asked for."""


def default_tracking_uri(create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` or a local sqlite store under ./outputs (the embedded default);
    ``create=False`` names that store without making its folder (for lookups)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path("outputs").resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for ``name``, created if needed (artifacts beside a local sqlite store) and
    tagged as model training (``mlflow.experimentKind``) unless it already has a kind."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(exp.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Without a server, a sqlite store's default artifact root is relative to whichever
        # process's cwd logs first (a Ray worker's session dir): pin it beside the database.
        location = Path(tracking_uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    return str(
        client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    )


def find_or_create_run(
    tracking_uri: str, experiment: str, run_name: str, storage_path: str, kind: str
) -> tuple[str, bool]:
    """(run id, resumed?) of the run tagged with this Ray run name and storage path."""
    client = _client(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    flt = f"tags.`{TAG_RUN_NAME}` = '{run_name}' and tags.`{TAG_STORAGE}` = '{storage_path}'"
    found = client.search_runs([exp_id], filter_string=flt, max_results=1)
    if found:
        other = found[0].data.tags.get(TAG_KIND, kind)
        if other != kind:  # the two jobs' checkpoints and metrics must never mix
            raise ConfigError(
                f"run {run_name!r} at {storage_path} belongs to a {other} job, not this {kind} "
                "job: choose another --name or --storage-path"
            )
        return str(found[0].info.run_id), True
    run = client.create_run(
        exp_id,
        run_name=run_name,
        tags={TAG_RUN_NAME: run_name, TAG_STORAGE: storage_path, TAG_KIND: kind},
    )
    return str(run.info.run_id), False


# Flattened params that only change how long a run goes or how often it reports, never what
# it computes: a resubmission may change them (the new values are recorded as tags).
RESUMABLE_PARAMS = frozenset(
    {
        "train.steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
        "train.sample_steps", "train.sample_cfg", "train.recon_every", "train.recon_images",
        "train.decode_cpus", "run.max_failures", "run.keep_checkpoints", "run.register_as",
        "run.cpus_per_worker", "run.tracking_uri", "run.storage_path", "run.async_checkpoint",
        "train.compile",
    }
)  # fmt: skip
TAG_OVERRIDE = "svg_ray.resubmitted."
"""Prefix of the tags that record a resumable setting changed by a resubmission."""


def _param_values(params: dict[str, Any]) -> dict[str, str]:
    """Flattened params as MLflow stores them (strings of at most 6,000 characters)."""
    return {k: str(v)[:6000] for k, v in flatten(params).items()}


def log_params_or_refuse_changes(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log a new run's params; for a resumed run, refuse settings that would change its result.

    MLflow params are immutable and describe the run: continuing it with another learning rate,
    dataset or model would make them lie. Length and cadence settings (``RESUMABLE_PARAMS``) may
    change; their new values are recorded as tags.
    """
    client = _client(tracking_uri)
    new = _param_values(params)
    old = dict(client.get_run(run_id).data.params)
    if not old:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(flat), 100):  # the REST API takes at most 100 params per batch
            client.log_batch(run_id, params=flat[i : i + 100])
        return
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    refused = [k for k in changed if k not in RESUMABLE_PARAMS]
    if refused:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise ConfigError(
            f"this run already exists with other settings that change its result ({shown}): "
            "resubmit with the original values to resume it, or choose another --name"
        )
    for k in changed:
        client.set_tag(run_id, TAG_OVERRIDE + k, new.get(k, "None"))


def start_run(tracking_uri: str, run_id: str, tags: dict[str, str] | None = None) -> None:
    """Mark the run RUNNING (again, for a resumed run) and set ``tags``."""
    client = _client(tracking_uri)
    client.update_run(run_id, status="RUNNING")
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """End the run FINISHED, FAILED or KILLED; never masks the error that ended it."""
    try:
        _client(tracking_uri).set_terminated(run_id, status)
    except Exception as e:  # the tracking server may be what failed
        print(f"warning: could not mark MLflow run {run_id} {status}: {e}", file=sys.stderr)


class RunLogger:
    """Metrics and images to one MLflow run (used on rank 0 only)."""

    # Shown on the job's stdout (`ray job logs`, the demo) each time metrics are logged.
    PROGRESS_KEYS = ("loss", "l1", "perceptual", "g_loss", "d_loss", "images_per_s")

    def __init__(self, tracking_uri: str, run_id: str, label: str = "", total_steps: int = 0):
        self.client = _client(tracking_uri)
        self.run_id = run_id
        self.label = label
        self.total_steps = total_steps

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log a dict of scalars at ``step``; print a progress line when the logger has a label."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)
        if self.label and any(k in values for k in self.PROGRESS_KEYS):
            shown = ", ".join(
                f"{k} {float(values[k]):.4g}" for k in self.PROGRESS_KEYS if k in values
            )
            of = f"/{self.total_steps}" if self.total_steps else ""
            print(f"[{self.label}] step {step}{of}: {shown}", flush=True)

    def image(self, image: Any, key: str, step: int) -> None:
        """Log a uint8 (H, W, 3) array as image ``key`` at ``step`` (the UI's step slider)."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Upload a directory."""
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        """Set a run tag."""
        self.client.set_tag(self.run_id, key, value)

    def finish(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id, "FINISHED")


# --------------------------------------------------------------------------------------------
# Provenance: code, environment and data
# --------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """The commit of the checkout this code runs from: SVG_RAY_GIT_COMMIT, else ``git`` in the
    svg_ray package's folder; None without either (an installed copy, no git)."""
    import subprocess

    env = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def provenance_tags() -> dict[str, str]:
    """``mlflow.source.git.commit`` (when known) and the versions of svg-ray, Ray, torch, CUDA,
    MLflow and Python, as run tags."""
    import importlib.metadata
    import platform

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    import torch

    tags = {
        f"{VERSION_TAG_PREFIX}svg_ray": version("svg-ray"),
        f"{VERSION_TAG_PREFIX}ray": version("ray"),
        f"{VERSION_TAG_PREFIX}torch": torch.__version__,
        f"{VERSION_TAG_PREFIX}cuda": torch.version.cuda or "none",
        f"{VERSION_TAG_PREFIX}mlflow": version("mlflow"),
        f"{VERSION_TAG_PREFIX}python": platform.python_version(),
    }
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    # The run page's "Source" field (with the commit beside it).
    tags["mlflow.source.name"] = _source_name()
    tags["mlflow.source.type"] = "JOB" if os.environ.get("RAY_ADDRESS") else "LOCAL"
    return tags


def _source_name() -> str:
    """What started this process: ``svg-ray train``, ``pipelines/train_diffusion.py``, ..."""
    import sys

    argv = sys.argv or [""]
    path = Path(argv[0])
    if path.name == "svg-ray" and len(argv) > 1:
        return f"svg-ray {argv[1]}"
    return "/".join(path.parts[-2:]) if path.suffix == ".py" else path.name or "python"


def record_provenance(tracking_uri: str, run_id: str) -> dict[str, str]:
    """Set ``provenance_tags()`` on a run; returns them.

    A resumed run keeps the commit it started from in ``mlflow.source.git.commit``; a different
    commit that resumes it is recorded as ``svg_ray.resumed_git_commit``.
    """
    from mlflow.entities import RunTag

    client = _client(tracking_uri)
    tags = provenance_tags()
    first = client.get_run(run_id).data.tags.get(TAG_GIT_COMMIT)
    if first and tags.get(TAG_GIT_COMMIT, first) != first:
        tags[TAG_GIT_COMMIT_RESUMED] = tags.pop(TAG_GIT_COMMIT)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return tags


def manifest_digest(manifest: Any) -> str:
    """16-hex content digest of a latent dataset's manifest (its shards, stats and sources)."""
    import hashlib
    import json

    text = json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _log_input(
    tracking_uri: str,
    run_id: str,
    uri: str,
    digest: str,
    profile: dict[str, Any],
    schema: dict[str, Any],
) -> None:
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    source_type = "s3" if uri.startswith("s3://") else "local"
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type=source_type,
        source=json.dumps({"uri": uri}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    # The same dataset logged again (a resumed run) is one input, not two: MLflow dedupes it.
    ctx = InputTag("mlflow.data.context", "training")
    _client(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[ctx])])


def log_dataset_input(tracking_uri: str, run_id: str, manifest: Any, uri: str) -> str:
    """Record a latent dataset (a ``DatasetManifest`` at ``uri``) as the run's training input
    and tag the run with its URI, digest and autoencoder id; returns the digest."""
    from mlflow.entities import RunTag

    from svg_ray import storage

    uri = storage.absolute(uri)  # the same dataset from any working directory
    digest = manifest_digest(manifest)
    c, h, w = manifest.latent_shape
    profile = {
        "num_rows": manifest.num_rows,
        "num_classes": len(manifest.class_names),
        "num_skipped": manifest.num_skipped,
        "autoencoder_id": manifest.autoencoder_id,
        "autoencoder_uri": manifest.autoencoder_uri,
        "encoder": manifest.encoder,
        "resolution": manifest.resolution,
        "latent_shape": [c, h, w],
        "latent_dtype": manifest.dtype,
        "has_flip": manifest.has_flip,
        "source_uri": manifest.source_uri,
        "created": manifest.created,
    }
    latent = {"type": "tensor", "tensor-spec": {"dtype": manifest.dtype, "shape": [-1, c, h, w]}}
    schema = {
        "mlflow_colspec": [
            {"name": "id", "type": "string", "required": True},
            {"name": "label", "type": "long", "required": True},
            {"name": "latent", **latent, "required": True},
        ]
    }
    _log_input(tracking_uri, run_id, uri, digest, profile, schema)
    tags = {
        TAG_DATASET: uri,
        TAG_DATASET_DIGEST: digest,
        TAG_AUTOENCODER_ID: manifest.autoencoder_id,
    }
    _client(tracking_uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return digest


def log_images_input(
    tracking_uri: str, run_id: str, uri: str, files: list[str], inputs: int, source_format: str
) -> str:
    """Record an image input (folder tree or Parquet, the autoencoder's training data) as the
    run's dataset; the digest covers the sorted list of files read. Returns the digest."""
    import hashlib

    from mlflow.entities import RunTag

    from svg_ray import storage

    uri = storage.absolute(uri)
    digest = hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]
    profile = {"num_inputs": inputs, "num_files": len(files), "format": source_format}
    schema = {"mlflow_colspec": [{"name": "image", "type": "binary", "required": True}]}
    _log_input(tracking_uri, run_id, uri, digest, profile, schema)
    tags = [RunTag(TAG_DATASET, uri), RunTag(TAG_DATASET_DIGEST, digest)]
    _client(tracking_uri).log_batch(run_id, tags=tags)
    return digest


# --------------------------------------------------------------------------------------------
# Models: log, register, promote
# --------------------------------------------------------------------------------------------


def check_registration(register_as: str | None, alias: str | None) -> None:
    """Refuse a registry name or alias MLflow would refuse, before any work starts."""
    if register_as is not None and (not register_as.strip() or any(c in register_as for c in "/:")):
        raise ConfigError(f"run.register_as {register_as!r}: a model name cannot contain / or :")
    if alias is None:
        return
    if register_as is None:
        raise ConfigError(
            "run.alias needs run.register_as: name the model to register (--register-as)"
        )
    check_alias(alias)


def check_alias(alias: str) -> None:
    """An alias MLflow accepts: letters, digits, _ and -, not 'latest' and not v<digits>."""
    import re

    if (
        not re.fullmatch(r"[\w-]{1,255}", alias)
        or alias.lower() == "latest"
        or re.fullmatch(r"[vV]\d+", alias)
    ):
        raise ConfigError(
            f"alias {alias!r} is not allowed: use letters, digits, _ and - (not 'latest', not "
            "v<number>), e.g. prod or staging"
        )


def _find_logged_model(client: Any, run_id: str, kind: str, step: int) -> str | None:
    """The id of a model this run already logged for ``step`` (a rerun of a finished job)."""
    from svg_ray.mlflow_model import MODEL_KIND_TAG, STEP_TAG

    run = client.get_run(run_id)
    for out in (run.outputs.model_outputs if run.outputs else None) or []:
        model = client.get_logged_model(out.model_id)
        if model.tags.get(MODEL_KIND_TAG) == kind and model.tags.get(STEP_TAG) == str(step):
            return str(model.model_id)
    return None


def export_model(
    tracking_uri: str,
    run_id: str,
    kind: str,
    path: str,
    step: int,
    register_as: str | None = None,
    alias: str | None = None,
) -> dict[str, Any]:
    """Log ``path`` as the run's pyfunc model (``svg_ray.mlflow_model``), register it as a new
    version of ``register_as`` and point ``alias`` at it; idempotent for a rerun of a finished
    job. ``kind`` is 'sampler' (a bundle directory) or 'autoencoder' (its .safetensors file).

    Returns ``model_id``, ``model_uri`` (``models:/<id>``) and ``version`` (None: not registered).
    """
    from svg_ray import mlflow_model

    client = _client(tracking_uri)
    run_tags = client.get_run(run_id).data.tags
    lineage = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    if kind == mlflow_model.AUTOENCODER:
        from svg_ray.checkpoint import autoencoder_id

        # The id precompute writes into a dataset manifest: it links datasets to this version.
        lineage[TAG_AUTOENCODER_ID] = autoencoder_id(path)
    model_id = _find_logged_model(client, run_id, kind, step)
    if model_id is None:
        model_id = mlflow_model.log_model(tracking_uri, run_id, kind, path, step, lineage)
    version = None
    if register_as:
        version = register_model(tracking_uri, run_id, model_id, register_as, step)
        if alias:
            set_alias(tracking_uri, register_as, version, alias)
        client.set_tag(run_id, TAG_REGISTERED, f"{register_as}/{version}")
    return {"model_id": model_id, "model_uri": f"models:/{model_id}", "version": version}


def register_model(
    tracking_uri: str,
    run_id: str,
    model_id: str,
    name: str,
    step: int,
    tags: dict[str, str] | None = None,
) -> int:
    """A new version of ``name`` for the logged model ``model_id`` (the registered model is
    created if needed); the version already registered for this run and step, if there is one.

    The version carries the logged model's kind and lineage tags, plus ``tags``.
    """
    from mlflow.exceptions import MlflowException

    from svg_ray.mlflow_model import MODEL_KIND_TAG, STEP_TAG, _tracking

    client = _client(tracking_uri)
    logged = client.get_logged_model(model_id).tags
    inherited = {k: v for k, v in logged.items() if k in (MODEL_KIND_TAG, *LINEAGE_TAGS)}
    try:
        client.create_registered_model(name)
    except MlflowException as e:  # already exists
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.run_id == run_id and mv.tags.get(STEP_TAG) == str(step):
            return int(mv.version)  # idempotent: a rerun of a finished job registers nothing new
    # A sqlite registry resolves the models:/ source through the process-wide tracking URI.
    with _tracking(tracking_uri):
        mv = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags={**inherited, STEP_TAG: str(step), **(tags or {})},
            model_id=model_id,
        )
    return int(mv.version)


def set_alias(tracking_uri: str, name: str, version: int | str, alias: str) -> None:
    """Point ``models:/<name>@<alias>`` at ``version``."""
    check_alias(alias)
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))
