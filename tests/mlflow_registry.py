"""A small model registry on the real ``mlflow server`` fixture, built the way training builds it.

An autoencoder run and a diffusion run, each with provenance tags and its dataset as an MLflow
input, each exporting its model with ``tracking.export_model`` (a pyfunc model, registered, the
sampler aliased @prod). The latent dataset's manifest names the registered autoencoder's content
id, so the lineage runs dataset -> autoencoder version -> diffusion run -> sampler version.
Shared by the test modules that import the ``registry`` fixture: built once per session (each
importing module gets its own fixture definition, so the instance is cached here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from latent_data import make_latent_dataset
from test_serve_lib import make_bundle

from svg_ray import tracking
from svg_ray.checkpoint import autoencoder_id
from svg_ray.data.manifest import DatasetManifest, load_manifest

SAMPLER_NAME = "svg-test-sampler"
AE_NAME = "svg-test-ae"
EXPERIMENT = "svg-registry-test"


@dataclass
class Registry:
    tracking_uri: str
    bundle: Path
    """The sampler bundle that was exported (its files are the model's artifacts)."""
    ae_file: Path
    latents: Path
    manifest: DatasetManifest
    ae_run: str
    dit_run: str
    sampler: dict
    """export_model's answer for the sampler (model_id, model_uri, version)."""
    autoencoder: dict


_BUILT: dict[str, Registry] = {}


@pytest.fixture(scope="session", name="registry")
def registry_fixture(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The registry described above, on the session's MLflow server."""
    if mlflow_server not in _BUILT:
        _BUILT[mlflow_server] = _build(mlflow_server, tmp_path_factory.mktemp("registry"))
    return _BUILT[mlflow_server]


def _build(mlflow_server: str, root: Path) -> Registry:
    bundle = make_bundle(root / "bundle")
    ae_file = bundle / "autoencoder.safetensors"
    images = root / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not used: only listed")

    # Stage 1: the autoencoder run (its input: an image folder).
    ae_run, _ = tracking.find_or_create_run(
        mlflow_server, EXPERIMENT, "ae", str(root / "runs/ae"), "autoencoder"
    )
    tracking.record_provenance(mlflow_server, ae_run)
    tracking.log_images_input(
        mlflow_server, ae_run, str(images), [str(images / "a.png")], 1, "folder"
    )
    logger = tracking.RunLogger(mlflow_server, ae_run)
    for step in (1, 2):  # reconstruction grids at two steps: the UI's step slider
        logger.image(np.full((8, 16, 3), 60 * step, np.uint8), "reconstructions", step)
    autoencoder = tracking.export_model(
        mlflow_server, ae_run, "autoencoder", str(ae_file), 2, register_as=AE_NAME
    )
    logger.finish()

    # Precompute: a latent dataset encoded by that autoencoder.
    latents = root / "latents"
    manifest = make_latent_dataset(str(latents), str(ae_file), rows=64, shards=2)
    manifest.autoencoder_id = autoencoder_id(str(ae_file))
    manifest.save(str(latents))
    manifest = load_manifest(str(latents))

    # Stage 2: the diffusion run on those latents, exporting the sampler bundle.
    dit_run, _ = tracking.find_or_create_run(
        mlflow_server, EXPERIMENT, "dit", str(root / "runs/dit"), "diffusion"
    )
    tracking.record_provenance(mlflow_server, dit_run)
    tracking.log_dataset_input(mlflow_server, dit_run, manifest, str(latents))
    logger = tracking.RunLogger(mlflow_server, dit_run)
    logger.metrics({"loss": 0.9, "step": 1}, 1)
    logger.metrics({"loss": 0.7, "step": 2}, 2)
    for step in (1, 2):
        logger.image(np.full((8, 16, 3), 100 * step, np.uint8), "samples", step)
    sampler = tracking.export_model(
        mlflow_server, dit_run, "sampler", str(bundle), 1234, register_as=SAMPLER_NAME, alias="prod"
    )
    logger.finish()
    return Registry(
        mlflow_server, bundle, ae_file, latents, manifest, ae_run, dit_run, sampler, autoencoder
    )
