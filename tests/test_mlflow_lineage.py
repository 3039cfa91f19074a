"""Evaluations of registered models close the lineage chain (real Ray, real MLflow server).

``svg-ray eval generation --bundle models:/NAME@prod`` and ``svg-ray eval probe --autoencoder
models:/NAME/1``: the models are resolved (and downloaded through the tracking server), the
evaluation run is linked to the version and the training run, the version gets the headline
metrics, and ``svg-ray status --model`` shows the evaluation in the chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow_registry import AE_NAME, SAMPLER_NAME, Registry, registry_fixture  # noqa: F401

from svg_ray.data.digits import write_image_folder
from svg_ray.errors import SvgRayError
from svg_ray.evaluation.config import EvalRun, GenerationEval, InceptionSettings, ProbeEval
from svg_ray.evaluation.inception import random_inception_state
from svg_ray.evaluation.launch import launch
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.status import lineage

pytestmark = [pytest.mark.slow]
EXPERIMENT = "svg-lineage-eval"


def _run(name: str, tmp_path: Path, uri: str) -> EvalRun:
    return EvalRun(
        name=name, out=str(tmp_path / "eval"), tracking_uri=uri, experiment=EXPERIMENT,
        chunk_size=4, batch_size=4, decode_cpus=0.25, cpus_per_worker=0.5,
    )  # fmt: skip


@pytest.mark.timeout(600)
def test_evaluations_of_registered_models_tag_the_versions_and_link_the_runs(
    ray_session: None, registry: Registry, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    uri = registry.tracking_uri
    client = MlflowClient(uri, uri)
    digits = tmp_path / "digits"
    write_image_folder(digits, resolution=64, limit=40)
    inception = tmp_path / "inception.pth"
    torch.save(random_inception_state(seed=0), inception)

    # FID/IS of the sampler the @prod alias points at.
    gen = launch(
        "generation",
        _run("lineage-gen", tmp_path, uri),
        generation=GenerationEval(
            bundle=f"models:/{SAMPLER_NAME}@prod", reference=str(digits), num_images=4,
            is_splits=2, reference_limit=4, preview=2,
        ),
        inception=InceptionSettings(inception_weights=str(inception)),
        sampler=SamplerConfig(steps=2),
    )  # fmt: skip
    mv = client.get_model_version(SAMPLER_NAME, "1")
    assert mv.tags["fid"] == f"{gen['metrics']['fid']:.6g}"
    assert mv.tags["is"] == f"{gen['metrics']['inception_score']:.6g}"
    assert mv.tags["eval_run_id"] == gen["run_id"] and "inception_score_std" not in mv.tags
    run = client.get_run(gen["run_id"])
    assert run.data.tags["svg_ray.model_version"] == f"{SAMPLER_NAME}/1"
    assert run.data.tags["svg_ray.model_uri"] == f"models:/{SAMPLER_NAME}@prod"
    assert run.data.tags["svg_ray.training_run"] == registry.dit_run
    assert [m.model_id for m in run.inputs.model_inputs] == [registry.sampler["model_id"]]
    assert not (tmp_path / "eval" / "lineage-gen" / "model").exists()  # local: no staged copy

    chain = lineage(uri, f"{SAMPLER_NAME}@prod")
    (ev,) = [e for e in chain["evaluations"] if e["run_id"] == gen["run_id"]]
    assert ev["task"] == "generation" and ev["metrics"]["fid"] == pytest.approx(
        gen["metrics"]["fid"]
    )
    assert chain["model"]["evaluation"]["eval_run_id"] == gen["run_id"]
    assert chain["training_run"]["run_id"] == registry.dit_run

    # A linear probe of the registered autoencoder (its file, through the registry).
    probe = launch(
        "probe",
        _run("lineage-probe", tmp_path, uri),
        probe=ProbeEval(autoencoder=f"models:/{AE_NAME}/1", input=str(digits), max_iter=50),
    )
    ae = client.get_model_version(AE_NAME, "1")
    both = probe["metrics"]["probe_both_test_accuracy"]
    assert ae.tags["probe_both_test_accuracy"] == f"{both:.6g}"
    assert ae.tags["eval_run_id"] == probe["run_id"]
    assert client.get_run(probe["run_id"]).data.tags["svg_ray.training_run"] == registry.ae_run

    # A version that does not exist: one line, before any work, no MLflow run.
    with pytest.raises(SvgRayError, match="has no version 9"):
        launch(
            "probe",
            _run("lineage-missing", tmp_path, uri),
            probe=ProbeEval(autoencoder=f"models:/{AE_NAME}/9", input=str(digits)),
        )
    exp = client.get_experiment_by_name(EXPERIMENT)
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert names == {"lineage-gen", "lineage-probe"}


@pytest.mark.timeout(300)
def test_a_download_is_staged_on_s3_for_workers_and_removed(
    s3: Any, registry: Registry, tmp_path: Path
) -> None:
    """Files served only by the tracking server (mlflow-artifacts:/) are copied under the S3
    results for the evaluation's workers, and removed when it ends; local results use the
    driver's temporary download."""
    from svg_ray import storage
    from svg_ray.evaluation.launch import _readable_everywhere
    from svg_ray.serving.source import resolve

    model = resolve(f"models:/{SAMPLER_NAME}@prod", registry.tracking_uri, "sampler")
    assert model.weights.startswith("mlflow-artifacts:/")  # the fixture server proxies artifacts
    run = EvalRun(name="staged", out=s3.uri("eval"), tracking_uri=registry.tracking_uri)
    with _readable_everywhere(model, run) as folder:
        assert folder == f"{run.results_uri}/model"
        want = (registry.bundle / "bundle.json").read_bytes()
        assert storage.read_bytes(f"{folder}/bundle.json") == want
        assert storage.exists(f"{folder}/dit_ema.safetensors")
    assert not storage.exists(f"{run.results_uri}/model")
    local = EvalRun(name="local", out=str(tmp_path / "eval"), tracking_uri=registry.tracking_uri)
    with _readable_everywhere(model, local) as folder:
        assert Path(folder, "bundle.json").is_file() and not folder.startswith(str(tmp_path))
    assert not Path(folder).exists()
