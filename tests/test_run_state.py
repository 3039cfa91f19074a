"""MLflow tells the truth about a training run: FINISHED, FAILED or KILLED, never RUNNING forever;
a resubmission continues the same run only with the settings that produced it; a cluster job never
writes its runs or its MLflow store into the job's temporary working directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from latent_data import make_latent_dataset

from svg_ray import tracking
from svg_ray.checkpoint import save_autoencoder
from svg_ray.config import ConfigError
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.training.common import RunSettings
from svg_ray.training.diffusion import DiffusionTrainConfig, launch, plan
from svg_ray.training.trainer import TrainingFailedError

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ae_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("ae") / "ae.safetensors")
    save_autoencoder(SVGAutoencoder(ae_preset("debug")).eval(), uri)
    return uri


@pytest.fixture(scope="module")
def data(ae_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("latents") / "data")
    make_latent_dataset(root, ae_uri, rows=64, shards=2)
    return root


def _cfg(data: str, **kw: Any) -> DiffusionTrainConfig:
    base: dict[str, Any] = dict(
        data=data, model="debug", steps=4, global_batch=16, log_every=2, checkpoint_every=2,
        sample_steps=1,
    )  # fmt: skip
    return DiffusionTrainConfig(**{**base, **kw})


def _run(tmp_path: Path, name: str = "r", **kw: Any) -> RunSettings:
    base: dict[str, Any] = dict(
        name=name, storage_path=str(tmp_path / "runs"), num_workers=1, cpus_per_worker=0.5,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="state",
    )  # fmt: skip
    return RunSettings(**{**base, **kw})


def _status(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri).get_run(run_id).info.status)


# --------------------------------------------------------------------------------------------
# No Ray: the checks happen before anything starts
# --------------------------------------------------------------------------------------------


def test_on_a_cluster_the_default_local_stores_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="--storage-path s3://bucket/runs"):
        RunSettings()
    with pytest.raises(ConfigError, match="--tracking-uri http://mlflow:5000"):
        RunSettings(storage_path="s3://bucket/runs")
    # Given explicitly (a shared path, a server, even a sqlite file the user chose): accepted.
    run = RunSettings(storage_path="/shared/runs", tracking_uri="sqlite:////shared/mlflow.db")
    assert run.run_uri == "/shared/runs/svg-run"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert RunSettings(storage_path="s3://bucket/runs").resolved_tracking_uri().startswith("http")
    monkeypatch.delenv("RAY_ADDRESS")
    assert RunSettings().storage_uri.endswith("outputs/runs")  # on a laptop: the default


def test_a_resubmission_that_changes_the_result_is_refused(data: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    run = _run(tmp_path)
    uri = run.resolved_tracking_uri()
    run_id, _ = tracking.find_or_create_run(uri, run.experiment, run.name, run.run_uri, "diffusion")
    tracking.log_params_or_refuse_changes(uri, run_id, plan(_cfg(data), run).params)
    # Settings that change what is computed: refused before any worker starts, each named.
    with pytest.raises(ConfigError) as e:
        launch(_cfg(data, lr=2e-4, model="demo"), run)
    msg = str(e.value)
    assert "train.lr: '0.0001' -> '0.0002'" in msg and "train.model: 'debug' -> 'demo'" in msg
    assert "dit.width: '64' -> '192'" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"run.num_workers: '1' -> '2'"):
        launch(_cfg(data, global_batch=16), _run(tmp_path, num_workers=2))
    # Length and cadence may change: recorded as tags, the params keep the original values.
    tracking.log_params_or_refuse_changes(
        uri, run_id, plan(_cfg(data, steps=40, log_every=5), run).params
    )
    r = MlflowClient(uri).get_run(run_id)
    assert r.data.tags[tracking.TAG_OVERRIDE + "train.steps"] == "40"
    assert r.data.tags[tracking.TAG_OVERRIDE + "train.log_every"] == "5"
    assert r.data.params["train.steps"] == "4"


def test_run_state_transitions(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.find_or_create_run(uri, "e", "n", "/runs/n", "diffusion")
    tracking.end_run(uri, run_id, "FAILED")
    assert _status(uri, run_id) == "FAILED"
    tracking.start_run(uri, run_id, {"k": "v"})  # a resubmission resumes it
    assert _status(uri, run_id) == "RUNNING"
    tracking.end_run(uri, run_id, "KILLED")
    assert _status(uri, run_id) == "KILLED"


# --------------------------------------------------------------------------------------------
# Ray: a run that fails, a run that is stopped
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_run_ends_failed_and_a_fixed_resubmission_finishes(
    ray_session: None, ae_uri: str, tmp_path: Path
) -> None:
    # Shards whose latents do not have the shape the manifest promises: the workers fail.
    other = ae_preset("debug")
    other.residual.out_dim = 4
    bad_ae = str(tmp_path / "ae-196.safetensors")
    save_autoencoder(SVGAutoencoder(other).eval(), bad_ae)
    root = tmp_path / "data"
    make_latent_dataset(str(root), bad_ae, rows=64, shards=2, shape=(196, 4, 4))
    good = make_latent_dataset(str(tmp_path / "good"), ae_uri, rows=64, shards=2)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(
        autoencoder_uri=ae_uri, latent_shape=[200, 4, 4], latent_stats=good.latent_stats.to_dict()
    )
    (root / "manifest.json").write_text(json.dumps(manifest))
    run = _run(tmp_path, "fails", max_failures=0)
    with pytest.raises(
        TrainingFailedError, match=r"training failed after 0 restart\(s\): .*size"
    ) as e:
        launch(_cfg(str(root)), run)
    assert "\n" not in str(e.value)  # the CLI prints it as one line
    uri = run.resolved_tracking_uri()
    [r] = _runs(uri)
    assert r.info.status == "FAILED"
    # The same run, with its data fixed, resumes (RUNNING again) and finishes.
    for f in (tmp_path / "good" / "shards").iterdir():
        (root / "shards" / f.name).write_bytes(f.read_bytes())
    result = launch(_cfg(str(root)), run)
    assert result.resumed and result.run_id == r.info.run_id and result.step == 4
    assert _status(uri, r.info.run_id) == "FINISHED"


def _runs(uri: str) -> list[Any]:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("state")
    assert exp is not None
    return list(c.search_runs([exp.experiment_id]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_job_ends_killed(data: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--data", data, "--model", "debug", "--steps", "100000", "--global-batch", "16",
        "--log-every", "1", "--checkpoint-every", "100000", "--num-workers", "1",
        "--cpus-per-worker", "0.5", "--storage-path", str(tmp_path / "runs"),
        "--tracking-uri", uri, "--experiment", "state", "--name", "stopped",
    ]  # fmt: skip
    log = (tmp_path / "job.log").open("wb")
    # Its own session, as `ray job stop` signals a driver: SIGTERM, then the job's processes go.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train_diffusion", *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not _logged_a_step(uri):
            assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job never logged a step"
            time.sleep(1)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    [r] = _runs(uri)
    assert r.info.status == "KILLED", (tmp_path / "job.log").read_text()[-2000:]
    assert proc.returncode != 0


def _logged_a_step(uri: str) -> bool:
    from mlflow import MlflowClient

    try:
        runs = _runs(uri)
    except (AssertionError, Exception):  # the store does not exist yet
        return False
    return bool(runs) and bool(MlflowClient(uri).get_metric_history(runs[0].info.run_id, "loss"))
