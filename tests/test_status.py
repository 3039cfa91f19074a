"""`svg-ray status` on hand-made storage layouts (the full layout is checked in test_demo.py) and
on the MLflow registry fixture (``mlflow_registry``): both model kinds and one version's lineage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from latent_data import make_latent_dataset
from mlflow_registry import AE_NAME, SAMPLER_NAME, Registry, registry_fixture  # noqa: F401

from svg_ray.status import lineage, render, scan_mlflow, scan_storage


def test_incomplete_dataset_and_unfinished_run_are_reported(tmp_path: Path) -> None:
    lat = tmp_path / "latents"
    (lat / "chunks").mkdir(parents=True)
    (lat / "job.json").write_text("{}")
    for i in range(3):
        (lat / "chunks" / f"chunk-{i:06d}.json").write_text("{}")
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    snapshot = {
        "checkpoint_results": [{"metrics": {"step": 10}}, {"metrics": {"step": 20}}],
        "latest_checkpoint_result": {
            "checkpoint_dir_name": "checkpoint_x",
            "metrics": {"step": 20, "loss": 0.5},
        },
    }
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))

    report = scan_storage(str(tmp_path))
    (ds,) = report.datasets
    assert ds["path"] == str(lat) and not ds["complete"]
    assert ds["committed_chunk_records"] == 3
    (r,) = report.runs
    assert r["name"] == "r1" and r["checkpoints"] == 2 and r["metrics"]["step"] == 20
    assert r["bundle"] is None and r["autoencoder"] is None
    text = render(report, None)
    assert "INCOMPLETE (3 chunks committed)" in text and "rerun the same precompute" in text
    assert "latest step 20, loss 0.5" in text


@pytest.mark.integration  # runs `svg-ray status` in a subprocess
def test_empty_storage_and_missing_store_are_not_created(tmp_path: Path) -> None:
    report = scan_storage(str(tmp_path / "nothing"))
    assert not (report.datasets or report.runs or report.bundles)
    db = tmp_path / "mlflow.db"
    ml = scan_mlflow(f"sqlite:///{db}")
    assert ml["missing"] and not db.exists()  # looking never creates a store
    assert "svg-ray demo" in render(report, ml)
    cmd = [sys.executable, "-m", "svg_ray.cli", "status", "--storage", str(tmp_path / "nothing")]
    proc = subprocess.run(
        [*cmd, "--tracking-uri", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "no store yet" in proc.stdout, proc.stderr
    assert not db.exists()


# --------------------------------------------------------------------------------------------
# Complete datasets, finished runs, both registered model kinds, one version's lineage
# --------------------------------------------------------------------------------------------


def test_complete_dataset_reports_its_skipped_inputs(tmp_path: Path) -> None:
    from svg_ray.data.manifest import SkippedInput

    manifest = make_latent_dataset(str(tmp_path / "clean"), "ae.safetensors", rows=20, shards=1)
    manifest.skipped = [SkippedInput("a/1.png", "undecodable"), SkippedInput("b/2", "empty")]
    manifest.save(str(tmp_path / "dirty"))
    report = scan_storage(str(tmp_path))
    by_path = {Path(d["path"]).name: d for d in report.datasets}
    assert by_path["clean"]["skipped"] == 0 and by_path["clean"]["rows"] == 20
    assert by_path["dirty"]["skipped"] == 2 and by_path["clean"]["classes"] == 10
    text = render(report, None)
    assert "None skipped" not in text
    assert "20 rows, latent [200, 4, 4], 10 classes, 0 skipped" in text
    assert "2 skipped" in text and f"next: svg-ray train --data {tmp_path / 'clean'}" in text


def test_finished_runs_suggest_the_next_stage(tmp_path: Path) -> None:
    snapshot = {
        "checkpoint_results": [{"metrics": {"step": 8}}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "c", "metrics": {"step": 8}},
    }
    dit = tmp_path / "runs" / "dit"
    (dit / "bundle").mkdir(parents=True)
    (dit / "bundle" / "bundle.json").write_text("{}")
    ae = tmp_path / "runs" / "ae"
    ae.mkdir(parents=True)
    (ae / "autoencoder.safetensors").write_bytes(b"x")
    for run in (dit, ae):
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    report = scan_storage(str(tmp_path))
    runs = {r["name"]: r for r in report.runs}
    assert runs["dit"]["bundle"] == str(dit / "bundle") and runs["dit"]["autoencoder"] is None
    assert runs["ae"]["autoencoder"] == str(ae / "autoencoder.safetensors")
    text = render(report, None)
    assert f"next: svg-ray serve --model-uri {dit / 'bundle'}" in text
    assert f"--autoencoder {ae / 'autoencoder.safetensors'}" in text


def test_registered_models_by_kind_with_aliases(registry: Registry) -> None:
    ml = scan_mlflow(registry.tracking_uri)
    models = {m["name"]: m for m in ml["registered_models"]}
    sampler, ae = models[SAMPLER_NAME], models[AE_NAME]
    assert sampler["kind"] == "sampler" and sampler["aliases"]["prod"] == 1
    assert ae["kind"] == "autoencoder" and ae["versions"][0]["run_id"] == registry.ae_run
    assert ae["run_storage"] and ae["run_storage"].endswith("runs/ae")
    lines = {
        name: next(
            x for x in render(scan_storage("/nonexistent"), ml).splitlines() if f" {name} [" in x
        )
        for name in (SAMPLER_NAME, AE_NAME)
    }
    assert f"serve: svg-ray serve --model-uri models:/{SAMPLER_NAME}@prod" in lines[SAMPLER_NAME]
    assert "@prod -> 1" in lines[SAMPLER_NAME]
    assert "svg-ray serve" not in lines[AE_NAME]  # an autoencoder is not a sampler
    assert f"--autoencoder {ae['run_storage']}/autoencoder.safetensors" in lines[AE_NAME]
    assert f"svg-ray eval reconstruction --autoencoder models:/{AE_NAME}/" in lines[AE_NAME]


def test_lineage_of_a_model_version(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    from svg_ray.cli import main
    from svg_ray.tracking import manifest_digest

    chain = lineage(registry.tracking_uri, f"{SAMPLER_NAME}@prod")
    assert chain["model"]["uri"] == f"models:/{SAMPLER_NAME}/1"
    assert chain["model"]["kind"] == "sampler" and "prod" in chain["model"]["aliases"]
    run = chain["training_run"]
    assert run["run_id"] == registry.dit_run and run["status"] == "FINISHED"
    assert run["git_commit"] and len(run["git_commit"]) == 40
    assert run["versions"]["torch"] and run["metrics"]["step"] == 2
    data = chain["dataset"]
    assert data["uri"] == str(registry.latents)
    assert data["digest"] == manifest_digest(registry.manifest)
    assert data["num_rows"] == 64 and data["num_classes"] == 10
    ae = chain["autoencoder"]
    assert ae["id"] == registry.manifest.autoencoder_id
    assert ae["registered"] == [{"name": AE_NAME, "version": 1, "run_id": registry.ae_run}]
    # The other way: the autoencoder version knows which diffusion runs used its latents.
    ae_chain = lineage(registry.tracking_uri, f"models:/{AE_NAME}/1")
    assert ae_chain["model"]["kind"] == "autoencoder"
    assert [u["run_id"] for u in ae_chain["used_by"]] == [registry.dit_run]
    assert ae_chain["training_run"]["datasets"][0]["profile"]["num_inputs"] == 1

    capsys.readouterr()
    uri = ["--tracking-uri", registry.tracking_uri]
    assert main(["status", "--model", f"{SAMPLER_NAME}@prod", *uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training_run"]["run_id"] == registry.dit_run
    assert main(["status", "--model", f"{SAMPLER_NAME}/1", *uri]) == 0
    text = capsys.readouterr().out
    assert f"model      models:/{SAMPLER_NAME}/1 [sampler] @prod" in text
    assert f"trained  by run dit ({registry.dit_run})" in text
    assert (
        f"on data  {registry.latents} (digest {manifest_digest(registry.manifest)}, 64 rows" in text
    )
    assert f"encoded  by autoencoder {ae['id']} = models:/{AE_NAME}/1" in text
    assert main(["status", "--model", f"{SAMPLER_NAME}@nope", *uri]) == 2
    assert "has no alias 'nope'" in capsys.readouterr().err
