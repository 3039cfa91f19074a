"""Ray Train, stage 2: 2 CPU workers on gloo, real MLflow server, real S3, failures and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from latent_data import make_latent_dataset

from svg_ray import storage
from svg_ray.checkpoint import load_bundle, save_autoencoder
from svg_ray.config import ConfigError
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.training.common import RunSettings
from svg_ray.training.diffusion import DiffusionTrainConfig, launch

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def local_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("latents")
    ae_uri = str(root / "ae.safetensors")
    save_autoencoder(SVGAutoencoder(ae_preset("debug")).eval(), ae_uri)
    make_latent_dataset(str(root / "data"), ae_uri)
    return str(root / "data")


def _cfg(data: str, **kw: Any) -> DiffusionTrainConfig:
    base: dict[str, Any] = dict(
        data=data, model="debug", steps=12, global_batch=32, lr=3e-3, log_every=3,
        checkpoint_every=4, sample_steps=2,
    )  # fmt: skip
    base.update(kw)
    return DiffusionTrainConfig(**base)


def _run(name: str, storage_path: str, tracking: str, **kw: Any) -> RunSettings:
    return RunSettings(
        name=name, storage_path=storage_path, num_workers=2, cpus_per_worker=0.5,
        tracking_uri=tracking, experiment=f"exp-{name}", **kw,
    )  # fmt: skip


def _mlflow_runs(tracking: str, experiment: str) -> list[Any]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def _final_state(run_uri: str) -> dict[str, Any]:
    ckpts = [u for u in storage.list_files(run_uri, "state.pt") if "/checkpoint_" in u]
    states = [
        torch.load(storage.download(u, Path(f"/tmp/svg-state-{os.getpid()}.pt")), weights_only=True)
        for u in ckpts
    ]
    return max(states, key=lambda s: s["step"])


@pytest.mark.timeout(420)
def test_trains_on_s3_latents_with_mlflow_and_registry(
    s3_ray: Any, mlflow_server: str, local_data: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    s3_root = s3_ray.uri("train-e2e")
    ae_uri = f"{s3_root}/ae.safetensors"
    save_autoencoder(SVGAutoencoder(ae_preset("debug")).eval(), ae_uri)
    make_latent_dataset(f"{s3_root}/latents", ae_uri, rows=256, shards=4)
    # Streamed from S3 every epoch (cache_mb=0), as a dataset larger than memory would be.
    cfg = _cfg(
        f"{s3_root}/latents", steps=40, lr=1e-2, log_every=5, checkpoint_every=20, cache_mb=0
    )
    run = _run("e2e", f"{s3_root}/runs", mlflow_server, register_as="svg-e2e")
    summary = launch(cfg, run)
    assert summary.metrics["step"] == 40 and not summary.resumed

    runs = _mlflow_runs(mlflow_server, "exp-e2e")
    assert len(runs) == 1
    r = runs[0]
    client = MlflowClient(tracking_uri=mlflow_server)
    loss = [m.value for m in client.get_metric_history(r.info.run_id, "loss")]
    assert len(loss) == 8  # every 5 steps to 40
    # it learns (a 0.2M-parameter DiT on 3,200-dim latents: a slow but steady descent)
    assert sum(loss[-2:]) / 2 < 0.95 * sum(loss[:2]) / 2, loss
    for key in ("grad_norm", "lr", "images_per_s", "data_wait_fraction"):
        assert key in r.data.metrics
    # Checkpoints upload in the background; what the ranks waited for is logged per checkpoint.
    stalls = client.get_metric_history(r.info.run_id, "checkpoint_stall_s")
    assert [m.step for m in stalls] == [20, 40] and all(0 <= m.value < 60 for m in stalls)
    assert r.data.params["train.model"] == "debug" and r.data.params["run.num_workers"] == "2"
    assert r.data.tags["svg_ray.run_name"] == "e2e"
    assert r.data.tags["svg_ray.storage_path"] == f"{s3_root}/runs/e2e"
    assert r.info.status == "FINISHED"
    grids = [a.path for a in client.list_artifacts(r.info.run_id, "images")]
    assert next(p for p in grids if p.endswith(".png")).startswith("images/samples+step+40+")
    assert r.data.tags["mlflow.source.git.commit"] and r.data.tags["svg_ray.dataset_digest"]
    versions = client.search_model_versions("name = 'svg-e2e'")
    assert len(versions) == 1 and versions[0].source.startswith("models:/m-")
    assert versions[0].tags["svg_ray.model_kind"] == "sampler"
    # checkpoints (2 kept) and the bundle live in the S3 bucket
    keys = [o["Key"] for o in s3_ray.client().list_objects_v2(
        Bucket=s3_ray.bucket, Prefix="train-e2e/runs/e2e/")["Contents"]]  # fmt: skip
    assert sum(k.endswith("state.pt") for k in keys) == 2
    dit, _, info = load_bundle(f"{s3_root}/runs/e2e/bundle")
    assert info.step == 40 and dit.cfg.in_channels == 200 and info.class_names[0] == "0"


@pytest.mark.timeout(420)
@pytest.mark.parametrize("cache_mb", [1024, 0], ids=["in-memory", "streamed"])
def test_resubmission_resumes_to_the_same_weights(
    ray_session: None, local_data: str, tmp_path: Path, cache_mb: int
) -> None:
    # 8 steps per epoch: the resubmission resumes at step 4, mid-epoch (streamed: the reader
    # seeks to the window holding batch 4 instead of replaying batches 0-3).
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = str(tmp_path / "runs")
    launch(_cfg(local_data, steps=12, cache_mb=cache_mb), _run("straight", store, tracking))
    first = launch(_cfg(local_data, steps=4, cache_mb=cache_mb), _run("resumed", store, tracking))
    assert first.metrics["step"] == 4
    second = launch(_cfg(local_data, steps=12, cache_mb=cache_mb), _run("resumed", store, tracking))
    assert second.resumed and second.metrics["step"] == 12
    a = _final_state(f"{store}/straight")
    b = _final_state(f"{store}/resumed")
    assert a["step"] == b["step"] == 12
    assert a["data_position"] == b["data_position"]
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-5), k
    for k, v in a["ema"].items():
        assert torch.allclose(v, b["ema"][k], atol=1e-5), k
    assert len(_mlflow_runs(tracking, "exp-resumed")) == 1


def _train_worker_pids() -> list[int]:
    """Pids of live Ray Train worker processes (their process title names the actor)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(p.info["pid"])
    return sorted(pids)


def _kill_a_worker_when(pred: Any, killed: list[int], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not killed:
        pids = _train_worker_pids()
        if pred() and pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            return
        time.sleep(0.2)


@pytest.mark.timeout(420)
def test_killed_worker_is_replaced_and_training_finishes(
    ray_session: None, local_data: str, tmp_path: Path
) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = str(tmp_path / "runs")
    run_dir = Path(store) / "chaos"
    killed: list[int] = []
    has_ckpt = lambda: any(run_dir.glob("checkpoint_*/state.pt"))  # noqa: E731
    killer = threading.Thread(target=_kill_a_worker_when, args=(has_ckpt, killed), daemon=True)
    killer.start()
    summary = launch(_cfg(local_data, steps=24, log_every=4), _run("chaos", store, tracking))
    killer.join(timeout=5)
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert summary.metrics["step"] == 24
    assert _final_state(str(run_dir))["step"] == 24
    runs = _mlflow_runs(tracking, "exp-chaos")
    assert len(runs) == 1  # the restarted workers re-attached to the same MLflow run
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient(tracking).get_metric_history(runs[0].info.run_id, "loss")]
    assert max(steps) == 24 and set(range(4, 25, 4)) <= set(steps)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.train_diffusion", *args],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_bad_config_fails_before_any_worker(local_data: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    cases = [
        (["--data", str(tmp_path / "nothing")], "manifest.json is missing"),
        (["--data", local_data, "--model", "SVG-XXL"], "train.model must be one of"),
        (["--data", local_data, "--steps", "ten"], "train.steps: expected an integer"),
        (["--data", local_data, "--global-batch", "33", "--num-workers", "2"], "not divisible"),
        (["--data", local_data, "--bogus", "1"], "unrecognized arguments: --bogus"),
    ]
    for args, message in cases:
        proc = _cli(*args, "--storage-path", str(tmp_path / "runs"))
        assert proc.returncode == 2, (args, proc.stdout[-500:], proc.stderr[-1500:])
        assert message in proc.stderr, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    assert time.monotonic() - t0 < 200


def test_latent_shape_must_match_the_autoencoder(local_data: str, tmp_path: Path) -> None:
    other = tmp_path / "ae-other.safetensors"
    cfg = ae_preset("debug")
    cfg.residual.out_dim = 4  # 196-channel latents, the dataset has 200
    save_autoencoder(SVGAutoencoder(cfg).eval(), str(other))
    make_latent_dataset(str(tmp_path / "data"), str(other), rows=32, shards=1)
    with pytest.raises(ConfigError, match=r"produces \(196, 4, 4\)"):
        launch(_cfg(str(tmp_path / "data")), _run("shape", str(tmp_path / "r"), "sqlite:///x.db"))
