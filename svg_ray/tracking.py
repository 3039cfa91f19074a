"""MLflow tracking: one run per training, re-attached on resume; the model registry.

Ray Train V2 has no MLflow callback, so training logs with plain ``mlflow`` calls on world rank 0.
The driver creates (or finds) the run before any worker starts and passes its id down, so a worker
restart or a resubmitted job re-attaches to the same run instead of creating a duplicate.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from svg_ray.config import ConfigError, flatten

TAG_RUN_NAME = "svg_ray.run_name"
TAG_STORAGE = "svg_ray.storage_path"
TAG_KIND = "svg_ray.kind"
BUNDLE_ARTIFACT = "bundle"
AUTOENCODER_ARTIFACT = "autoencoder"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or a local sqlite store under ./outputs (the embedded default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path("outputs").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for ``name``, created if needed (artifacts beside a local sqlite store)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Without a server, a sqlite store's default artifact root is relative to whichever
        # process's cwd logs first (a Ray worker's session dir): pin it beside the database.
        location = Path(tracking_uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


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
        "run.cpus_per_worker", "run.tracking_uri", "run.storage_path",
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
    PROGRESS_KEYS = ("loss", "l1", "lpips", "g_loss", "d_loss", "images_per_s")

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

    def image(self, image: Any, artifact_file: str) -> None:
        """Log a uint8 (H, W, 3) array as a PNG artifact."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Upload a directory."""
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        """Set a run tag."""
        self.client.set_tag(self.run_id, key, value)

    def finish(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id, "FINISHED")


def register_bundle(
    tracking_uri: str, run_id: str, model_name: str, step: int, artifact: str = BUNDLE_ARTIFACT
) -> int:
    """Register the run's ``artifact`` directory as a new version of ``model_name``.

    By default that is the sampler bundle directory (bundle.json + weights), which the Serve
    deployment loads from ``models:/<name>/<version>``; the autoencoder job registers its
    ``autoencoder`` directory (AUTOENCODER_ARTIFACT) the same way.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:  # already exists
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact}"
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.run_id == run_id and mv.tags.get("svg_ray.step") == str(step):
            return int(mv.version)  # idempotent: a rerun of a finished job registers nothing new
    mv = client.create_model_version(
        model_name, source=source, run_id=run_id, tags={"svg_ray.step": str(step)}
    )
    return int(mv.version)
