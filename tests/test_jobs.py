"""Every pipeline stage as a cluster job: ``ray start --head`` on this machine, each stage sent
with ``ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml``, its status read
back through the job server, its outputs checked, the cluster stopped by process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import free_port, stop_process_group, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    # The job's `python` is the head's: put this venv first on its PATH.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """Dashboard (job server) address of a `ray start --head --block` in its own session."""
    # A short temp dir: Ray's socket paths must stay under 107 characters.
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    dash = free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--port", str(free_port()),
        "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        # Every port free-chosen: another Ray on this machine (a developer's, a parallel test's)
        # holds the defaults, and a node agent that cannot bind never accepts a job.
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--num-cpus", "4",  # 2 one-CPU training workers must leave CPUs for Ray Data reads
        "--temp-dir", temp, "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp) / "head.log", "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        wait_http(
            f"{address}/api/version", proc, deadline, "ray start --head", Path(temp) / "head.log"
        )
        _wait_for_job_agent(address, proc, deadline)
        yield address
    finally:
        stop_process_group(proc, timeout=30)
        log.close()
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout
        assert not left.strip(), f"Ray processes left behind: {left}"


def _wait_for_job_agent(address: str, proc: subprocess.Popen, deadline: float) -> None:  # type: ignore[type-arg]
    """The dashboard answers before the node's job agent does ("No available agent to submit
    job"): submit a no-op job until one is accepted, and let it finish."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            assert proc.poll() is None and time.monotonic() < deadline, "no job agent came up"
            time.sleep(1)
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, client.get_job_status(job)
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)


def submit(address: str, job_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`ray job submit` from the repository root, waiting for the job to finish."""
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address,
        "--submission-id", job_id,
        "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
        "--", "python", "-m", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=400)


def job_status(address: str, job_id: str) -> str:
    """The job's final status as the job server reports it."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(job_id))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_stage_runs_as_a_submitted_job(head: str, tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    from svg_ray.checkpoint import load_bundle, read_metadata
    from svg_ray.data.digits import write_image_folder
    from svg_ray.data.manifest import load_manifest

    images, runs, latents = tmp_path / "images", tmp_path / "runs", tmp_path / "latents"
    assert write_image_folder(images, resolution=64, limit=160) == 160
    common = ["--storage-path", str(runs), "--tracking-uri", mlflow_server, "--num-workers", "2"]
    common += ["--cpus-per-worker", "0.5", "--experiment", "jobs"]

    # Stage 1: the autoencoder.
    proc = submit(
        head, "svg-train-ae", "pipelines.train_autoencoder",
        "--input", str(images), "--preset", "debug", "--dino-allow-random",
        "--steps", "6", "--global-batch", "8", "--log-every", "2", "--checkpoint-every", "3",
        "--recon-every", "0", "--perceptual-weight", "0", "--gan-weight", "0",
        "--name", "job-ae", *common,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert job_status(head, "svg-train-ae") == "SUCCEEDED"
    ae = runs / "job-ae" / "autoencoder.safetensors"
    assert json.loads(read_metadata(str(ae))["extra"])["step"] == 6
    assert f"next: svg-ray precompute --input <images> --out <latents> --autoencoder {ae}" in (
        proc.stdout
    )

    # Stage 2: precompute (the driver joins the cluster through RAY_ADDRESS).
    proc = submit(
        head, "svg-precompute", "pipelines.precompute",
        "--input", str(images), "--out", str(latents), "--autoencoder", str(ae),
        "--rows-per-shard", "64", "--decode-cpus", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert job_status(head, "svg-precompute") == "SUCCEEDED"
    manifest = load_manifest(str(latents))
    assert manifest.num_rows == 160 and manifest.latent_shape == (200, 4, 4)
    assert len(manifest.shards) == 3  # 160 rows in chunks of 64
    assert f"next: svg-ray train --data {latents}" in proc.stdout

    # Stage 3: the diffusion transformer, registered in the Model Registry.
    proc = submit(
        head, "svg-train", "pipelines.train_diffusion",
        "--data", str(latents), "--model", "debug", "--steps", "8", "--global-batch", "16",
        "--log-every", "4", "--checkpoint-every", "4", "--name", "job-dit",
        "--register-as", "svg-jobs", *common,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert job_status(head, "svg-train") == "SUCCEEDED"
    bundle = runs / "job-dit" / "bundle"
    _, _, info = load_bundle(str(bundle))
    assert info.step == 8 and info.class_names == [str(i) for i in range(10)]
    assert f"next: svg-ray serve --bundle {bundle}" in proc.stdout

    # What reached MLflow: both runs, finished, with their metrics, and the registered model.
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("jobs")
    got = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(got) == {"job-ae", "job-dit"}
    assert all(r.info.status == "FINISHED" for r in got.values())
    assert [m.step for m in client.get_metric_history(got["job-dit"].info.run_id, "loss")] == [
        4,
        8,
    ]
    versions = client.search_model_versions("name = 'svg-jobs'")
    assert [v.run_id for v in versions] == [got["job-dit"].info.run_id]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_with_bad_input_fails_with_a_message(head: str, tmp_path: Path) -> None:
    proc = submit(head, "svg-bad", "pipelines.train_diffusion", "--data", str(tmp_path / "missing"))
    assert proc.returncode != 0
    assert job_status(head, "svg-bad") == "FAILED"
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(head).get_job_logs("svg-bad")
    assert "svg-ray train: error:" in logs and str(tmp_path / "missing") in logs, logs[-2000:]
    assert "Traceback" not in logs
