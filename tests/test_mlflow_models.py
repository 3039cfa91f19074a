"""svg-ray models as MLflow models, against the real ``mlflow server`` fixture.

What MLflow itself can do with them: ``mlflow.pyfunc.load_model("models:/NAME/latest")`` and
``predict`` on CPU (the same images the Serve sampler makes from the same files), the autoencoder
encoding and decoding, signatures, pinned requirements, ``mlflow models serve`` answering over
HTTP; and what svg-ray adds: idempotent export, aliases and ``svg-ray promote``, resolving
registry URIs with one-line errors, provenance tags and dataset inputs on runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow_registry import AE_NAME, SAMPLER_NAME, Registry, registry_fixture  # noqa: F401
from procs import free_port, stop_process_group, wait_http

from svg_ray import tracking
from svg_ray.checkpoint import load_autoencoder
from svg_ray.errors import SvgRayError
from svg_ray.mlflow_model import pip_requirements
from svg_ray.serving import AppArgs, SamplerModel
from svg_ray.serving.schema import parse_generate
from svg_ray.serving.source import parse_registry_uri, resolve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def mlflow_uri(registry: Registry) -> Iterator[str]:
    """The fixture server as MLflow's process-wide tracking and registry URI, for this test."""
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    try:
        yield registry.tracking_uri
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# What MLflow can load
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sampler_loads_with_pyfunc_and_matches_the_serve_sampler(
    registry: Registry, mlflow_uri: str, tmp_path: Path
) -> None:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{SAMPLER_NAME}/latest")
    images = model.predict(pd.DataFrame({"label": [0, 1, 2]}))
    assert isinstance(images, np.ndarray)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8

    # The same pixels the Serve sampler makes from the bundle for seeds 0, 1, 2 (the default
    # seed of row i is i) with the server's default settings.
    served = SamplerModel.load(AppArgs(model_uri=str(registry.bundle)))
    jobs = [
        parse_generate(json.dumps({"labels": [i], "seed": i}).encode(), served.limits)
        for i in range(3)
    ]
    expected, _ = served.sample_images(jobs)
    for got, want in zip(images, expected, strict=True):
        assert int(np.abs(got.astype(int) - want[0].astype(int)).max()) <= 1
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1  # labels matter

    # Optional columns: seed and steps change the image, a row's own seed reproduces it.
    again = model.predict(pd.DataFrame({"label": [2, 2], "seed": [2, 9], "steps": [10, 3]}))
    assert np.abs(again[0].astype(int) - images[2].astype(int)).max() <= 1
    assert np.abs(again[1].astype(int) - images[2].astype(int)).mean() > 1
    with pytest.raises(Exception, match=r"row 0: labels: labels must be in \[0, 9\]"):
        model.predict(pd.DataFrame({"label": [10]}))

    # The signature, the example and the pinned requirements MLflow stores with the model.
    info = model.metadata
    sig = info.signature
    assert [c.name for c in sig.inputs.inputs] == ["label", "seed", "steps", "cfg_scale"]
    assert [c.required for c in sig.inputs.inputs] == [True, False, False, False]
    assert sig.outputs.inputs[0].shape == (-1, 64, 64, 3)
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{SAMPLER_NAME}/1", dst_path=str(tmp_path))
    )
    reqs = (local / "requirements.txt").read_text().split()
    torch_version = importlib.metadata.version("torch").split("+")[0]
    assert f"torch=={torch_version}" in reqs and f"mlflow=={mlflow.__version__}" in reqs
    assert set(pip_requirements()) <= set(reqs)
    assert json.loads((local / "input_example.json").read_text())["columns"][0] == "label"
    assert not list(local.rglob("*.pkl"))  # logged from code: nothing is unpickled at load
    # The weights are the bundle's files, byte for byte.
    for name in ("bundle.json", "dit_ema.safetensors", "autoencoder.safetensors"):
        assert _sha(local / "artifacts" / "bundle" / name) == _sha(registry.bundle / name)


@pytest.mark.timeout(300)
def test_autoencoder_loads_with_pyfunc_and_encodes_and_decodes(
    registry: Registry, mlflow_uri: str
) -> None:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{AE_NAME}/latest")
    images = np.random.default_rng(0).random((3, 64, 64, 3), dtype=np.float32)
    latents = model.predict(images)
    assert latents.shape == (3, 200, 4, 4) and latents.dtype == np.float32
    ae = load_autoencoder(str(registry.ae_file))
    with torch.no_grad():
        want = ae.encode(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).numpy()
    np.testing.assert_allclose(latents, want, atol=1e-4)
    decoded = model.predict(latents, params={"mode": "decode"})
    assert decoded.shape == (3, 64, 64, 3) and 0.0 <= decoded.min() and decoded.max() <= 1.0
    with torch.no_grad():
        want_img = ((ae.decode(torch.from_numpy(want)).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    np.testing.assert_allclose(decoded, want_img.numpy(), atol=1e-4)
    with pytest.raises(Exception, match=r"encode takes images \(N, 64, 64, 3\)"):
        model.predict(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_a_request(registry: Registry, tmp_path: Path) -> None:
    """``mlflow models serve --env-manager local`` on loopback: one request, one image."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve",
        "-m", f"models:/{SAMPLER_NAME}@prod", "--env-manager", "local",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs the venv's uvicorn by name
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "SVG_RAY_DEVICE": "cpu",
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/ping", proc, time.monotonic() + 180, "mlflow models serve", log_path)
            import urllib.request

            body = {"dataframe_split": {"columns": ["label", "seed"], "data": [[3, 5]]}}
            req = urllib.request.Request(
                f"{base}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                answer: dict[str, Any] = json.loads(r.read())
        finally:
            stop_process_group(proc)
    image = np.asarray(answer["predictions"], dtype=np.uint8)
    assert image.shape == (1, 64, 64, 3)
    served = SamplerModel.load(AppArgs(model_uri=str(registry.bundle)))
    job = parse_generate(b'{"labels": [3], "seed": 5}', served.limits)
    want = served.sample_images([job])[0][0][0]
    assert int(np.abs(image[0].astype(int) - want.astype(int)).max()) <= 1


# --------------------------------------------------------------------------------------------
# Export, registry, aliases
# --------------------------------------------------------------------------------------------


def test_export_is_idempotent_and_tags_the_version(registry: Registry) -> None:
    from mlflow import MlflowClient

    again = tracking.export_model(
        registry.tracking_uri, registry.dit_run, "sampler", str(registry.bundle), 1234,
        register_as=SAMPLER_NAME, alias="prod",
    )  # fmt: skip
    assert again == registry.sampler  # a rerun of a finished job logs and registers nothing new
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    mv = client.get_model_version(SAMPLER_NAME, str(registry.sampler["version"]))
    assert mv.run_id == registry.dit_run and mv.source == registry.sampler["model_uri"]
    assert mv.tags["svg_ray.model_kind"] == "sampler" and mv.tags["svg_ray.step"] == "1234"
    assert mv.tags["svg_ray.dataset_digest"] == tracking.manifest_digest(registry.manifest)
    assert mv.tags["svg_ray.autoencoder_id"] == registry.manifest.autoencoder_id
    ae = client.get_model_version(AE_NAME, str(registry.autoencoder["version"]))
    assert ae.tags["svg_ray.autoencoder_id"] == registry.manifest.autoencoder_id
    assert client.get_registered_model(SAMPLER_NAME).aliases == {"prod": "1"}
    run = client.get_run(registry.dit_run)
    assert run.data.tags["svg_ray.registered"] == f"{SAMPLER_NAME}/1"
    assert [o.model_id for o in run.outputs.model_outputs] == [registry.sampler["model_id"]]


def _promote(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``svg-ray promote ARGS`` through the CLI entry point: (exit code, stdout, stderr)."""
    from svg_ray.cli import main

    capsys.readouterr()
    code = main(["promote", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_promote_moves_an_alias_and_refuses_what_does_not_exist(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    # A second version (the same logged model registered for a later step), promoted to
    # @staging as "latest" through the CLI.
    version = tracking.register_model(
        registry.tracking_uri, registry.dit_run, registry.sampler["model_id"], SAMPLER_NAME, 2000
    )
    assert version == 2
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    tags = client.get_model_version(SAMPLER_NAME, "2").tags  # inherited from the logged model
    assert tags["svg_ray.model_kind"] == "sampler" and tags["svg_ray.step"] == "2000"
    assert tags["svg_ray.dataset_digest"] == tracking.manifest_digest(registry.manifest)
    uri = ["--tracking-uri", registry.tracking_uri]
    code, out, err = _promote(capsys, SAMPLER_NAME, "latest", "staging", *uri)
    assert code == 0 and f"models:/{SAMPLER_NAME}@staging -> version 2" in out, err
    assert resolve(f"models:/{SAMPLER_NAME}@staging", registry.tracking_uri).version == "2"
    assert resolve(f"models:/{SAMPLER_NAME}/latest", registry.tracking_uri).version == "2"
    assert resolve(f"models:/{SAMPLER_NAME}@prod", registry.tracking_uri).version == "1"
    # Back to version 1: the output says what it replaced.
    code, out, err = _promote(capsys, SAMPLER_NAME, "1", "staging", *uri)
    assert code == 0 and "-> version 1 (was version 2)" in out, err
    assert client.get_registered_model(SAMPLER_NAME).aliases == {"prod": "1", "staging": "1"}

    for args, message in [
        ((SAMPLER_NAME, "7", "prod"), "has no version 7"),
        (("no-such-model", "1", "prod"), "no registered model 'no-such-model'"),
        ((SAMPLER_NAME, "1", "latest"), "alias 'latest' is not allowed"),
        ((SAMPLER_NAME, "1", "v2"), "alias 'v2' is not allowed"),
    ]:
        code, out, err = _promote(capsys, *args, *uri)
        assert code == 2 and err.startswith("svg-ray promote: error: "), (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert client.get_registered_model(SAMPLER_NAME).aliases == {"prod": "1", "staging": "1"}


def test_registry_uris_resolve_or_fail_in_one_line(registry: Registry) -> None:
    uri = registry.tracking_uri
    assert parse_registry_uri("models:/svg-xl/3") == ("svg-xl", "3", None)
    assert parse_registry_uri("models:/svg-xl/Latest") == ("svg-xl", "latest", None)
    assert parse_registry_uri("models:/svg-xl@prod") == ("svg-xl", None, "prod")
    sampler = resolve(f"models:/{SAMPLER_NAME}@prod", uri, "sampler")
    assert sampler.kind == "sampler" and sampler.run_id == registry.dit_run
    assert sampler.model_id == registry.sampler["model_id"] and "prod" in sampler.aliases
    ae = resolve(f"models:/{AE_NAME}/1", uri)
    assert ae.kind == "autoencoder" and ae.run_id == registry.ae_run
    cases = [
        (f"models:/{AE_NAME}/1", "is an autoencoder, not a sampler bundle"),
        (f"models:/{SAMPLER_NAME}/99", "has no version 99"),
        (f"models:/{SAMPLER_NAME}@canary", "has no alias 'canary'"),
        ("models:/nope/latest", "no registered model 'nope'"),
        ("models:/nope", "bad model registry URI"),
        (f"models:/{SAMPLER_NAME}/Production", "bad model registry URI"),
    ]
    for bad, message in cases:
        with pytest.raises(SvgRayError, match=message) as e:
            resolve(bad, uri, "sampler")
        assert "\n" not in str(e.value)
    t0 = time.monotonic()
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SvgRayError, match="cannot reach the MLflow tracking server"):
        resolve(f"models:/{SAMPLER_NAME}/1", down)
    assert time.monotonic() - t0 < 10


def test_a_plain_bundle_folder_registered_by_hand_still_resolves(registry: Registry) -> None:
    """Versions registered before models were MLflow models: the source is the bundle folder."""
    from mlflow import MlflowClient

    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    run = client.create_run(client.get_experiment_by_name("svg-registry-test").experiment_id)
    client.log_artifacts(run.info.run_id, str(registry.bundle), artifact_path="bundle")
    client.create_registered_model("svg-test-legacy")
    client.create_model_version(
        "svg-test-legacy", source=f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id
    )
    model = resolve("models:/svg-test-legacy/latest", registry.tracking_uri, "sampler")
    assert model.kind == "sampler" and model.weights.endswith("/bundle")


# --------------------------------------------------------------------------------------------
# Provenance and dataset inputs
# --------------------------------------------------------------------------------------------


def test_runs_carry_commit_versions_and_their_dataset(registry: Registry) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(registry.tracking_uri)
    run = client.get_run(registry.dit_run)
    tags = run.data.tags
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["svg_ray.version.torch"] == torch.__version__
    assert tags["svg_ray.version.cuda"] == (torch.version.cuda or "none")
    assert tags["svg_ray.version.ray"] == importlib.metadata.version("ray")
    assert tags["svg_ray.version.svg_ray"] == importlib.metadata.version("svg-ray")
    (inp,) = run.inputs.dataset_inputs
    ds = inp.dataset
    assert (
        ds.digest == tracking.manifest_digest(registry.manifest) == tags["svg_ray.dataset_digest"]
    )
    assert json.loads(ds.source)["uri"] == str(registry.latents) == tags["svg_ray.dataset"]
    profile = json.loads(ds.profile)
    assert profile["num_rows"] == 64 and profile["num_classes"] == 10
    assert profile["autoencoder_id"] == registry.manifest.autoencoder_id
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    # Logged again (a resumed run): still one input.
    tracking.log_dataset_input(
        registry.tracking_uri, registry.dit_run, registry.manifest, str(registry.latents)
    )
    assert len(client.get_run(registry.dit_run).inputs.dataset_inputs) == 1
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_commit_comes_from_the_env_var_or_is_absent_without_git(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "f" * 40)
    assert tracking.provenance_tags()["mlflow.source.git.commit"] == "f" * 40
    monkeypatch.delenv(tracking.GIT_COMMIT_ENV)
    monkeypatch.setenv("PATH", "/nonexistent")  # no git executable
    assert tracking.git_commit() is None
    assert "mlflow.source.git.commit" not in tracking.provenance_tags()
    # A resumed run keeps the commit it started from and records the resuming one.
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "e" * 40)
    run_id, _ = tracking.find_or_create_run(
        registry.tracking_uri, "svg-registry-test", "prov", "/prov", "diffusion"
    )
    tracking.record_provenance(registry.tracking_uri, run_id)
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "d" * 40)
    tracking.record_provenance(registry.tracking_uri, run_id)
    tags = MlflowClient(registry.tracking_uri).get_run(run_id).data.tags
    assert tags["mlflow.source.git.commit"] == "e" * 40
    assert tags["svg_ray.resumed_git_commit"] == "d" * 40


def test_registration_settings_are_checked_before_work() -> None:
    tracking.check_registration("svg-xl", "prod")
    tracking.check_registration(None, None)
    for register_as, alias, message in [
        (None, "prod", "run.alias needs run.register_as"),
        ("svg-xl", "latest", "not allowed"),
        ("svg-xl", "v3", "not allowed"),
        ("svg-xl", "pro d", "not allowed"),
        ("svg/xl", None, "cannot contain"),
    ]:
        with pytest.raises(SvgRayError, match=message):
            tracking.check_registration(register_as, alias)


def test_the_progress_line_shows_the_perceptual_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The AE loss logs 'perceptual' (svg_ray/losses.py): the job's stdout shows it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.find_or_create_run(uri, "progress", "r", str(tmp_path), "autoencoder")
    logger = tracking.RunLogger(uri, run_id, "train-ae", 10)
    capsys.readouterr()
    logger.metrics({"l1": 0.5, "perceptual": 0.25, "gan_g": 1.0, "g_loss": 0.9}, 3)
    line = capsys.readouterr().out.strip()
    assert line == "[train-ae] step 3/10: l1 0.5, perceptual 0.25, g_loss 0.9"
