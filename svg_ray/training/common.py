"""What both Ray Train jobs share below the loop: settings, the trainer, checkpoints, seeds."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from svg_ray import storage
from svg_ray.config import require


@dataclass
class TrainConfig:
    """Settings every training job has (defaults: the SVG paper's DiT recipe).

    A job's config inherits these and redeclares a field only where its default differs.
    """

    steps: int = 400_000
    """Total optimiser steps; a resumed run stops exactly here."""
    global_batch: int = 256
    """Images per step over all workers (must divide evenly)."""
    lr: float = 1e-4
    """Learning rate (constant)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    grad_clip: float = 0.0
    """Max gradient norm; 0 disables clipping (the reference does not clip)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto' (bf16 autocast + TF32 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the model's repeated blocks: 'auto' on GPU only (on a CPU the compile costs
    more than a short run gains), 'on' or 'off'. Checkpoints are the same either way."""
    seed: int = 0
    """Seed of the initial weights, the data order and every random choice (per step and rank)."""
    log_every: int = 50
    """Log metrics every N steps (averaged over ranks)."""
    checkpoint_every: int = 2000
    """Checkpoint every N steps (and at the end)."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "train.steps must be >= 1")
        require(self.global_batch >= 1, "train.global_batch must be >= 1")
        require(self.lr > 0, "train.lr must be positive")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2 must be in [0,1)")
        require(self.grad_clip >= 0, "train.grad_clip must be >= 0")
        for name in ("log_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, f"train.{name} must be >= 1")

    def per_worker_batch(self, world: int) -> int:
        """Images per step on one of ``world`` workers; refuses a batch that does not divide."""
        require(
            self.global_batch % world == 0,
            f"train.global_batch {self.global_batch} is not divisible by run.num_workers {world}",
        )
        return self.global_batch // world


def on_cluster() -> bool:
    """Whether this driver joins a Ray cluster (``RAY_ADDRESS``, which `ray job submit` sets)."""
    return bool(os.environ.get("RAY_ADDRESS"))


LOCAL_STORAGE = "outputs/runs"
"""Where runs live when no --storage-path is given on a laptop."""


@dataclass
class RunSettings:
    """Where a training run lives and what it runs on."""

    name: str = "svg-run"
    """Run name: the same name and storage path resume the run."""
    storage_path: str | None = None
    """Local folder or s3:// prefix for checkpoints and the exported model (default: outputs/runs
    on a laptop; on a cluster give a location every node shares, e.g. s3://bucket/runs)."""
    num_workers: int = 1
    """Ray Train workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL); CPU workers use gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (0.5 on a 2-core machine keeps a CPU free for Ray Data reads)."""
    max_failures: int = 3
    """Worker-group restarts from the last checkpoint before the run fails."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage (older ones are deleted)."""
    async_checkpoint: bool = True
    """Upload checkpoints in the background (the workers wait only while rank 0 writes the file
    locally, not for the upload); --no-async-checkpoint waits for every upload."""
    experiment: str = "svg-ray"
    """MLflow experiment name."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default: MLFLOW_TRACKING_URI, else (on a laptop only) a sqlite store
    in ./outputs."""
    register_as: str | None = None
    """Register the final model under this MLflow model name (None: do not register)."""
    alias: str | None = None
    """With register_as: point this registry alias (e.g. 'prod') at the new version."""

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "run.name must be a non-empty name")
        require(self.num_workers >= 1, "run.num_workers must be >= 1")
        require(self.cpus_per_worker > 0, "run.cpus_per_worker must be positive")
        require(self.max_failures >= 0, "run.max_failures must be >= 0")
        require(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        from svg_ray.tracking import check_registration

        check_registration(self.register_as, self.alias)
        if on_cluster():
            # The job's working directory is a temporary folder on the head node: a default
            # local store would be deleted with it, and workers on other nodes never see it.
            require(
                self.storage_path is not None,
                "on a cluster (RAY_ADDRESS is set) runs need a storage every node shares: pass "
                "--storage-path s3://bucket/runs (or an explicit shared filesystem path)",
            )
            require(
                bool(self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")),
                "on a cluster (RAY_ADDRESS is set) the default sqlite MLflow store would be lost "
                "with the job's working directory: pass --tracking-uri http://mlflow:5000 or set "
                "MLFLOW_TRACKING_URI (an explicit sqlite:/// path is accepted)",
            )

    @property
    def storage_uri(self) -> str:
        """Absolute local path or the s3:// prefix."""
        return storage.absolute(self.storage_path or LOCAL_STORAGE).rstrip("/")

    @property
    def run_uri(self) -> str:
        """Folder of this run (checkpoints, exported models)."""
        return storage.join(self.storage_uri, self.name)

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI this run logs to."""
        from svg_ray.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri()


def fit(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    run: RunSettings,
    datasets: dict[str, Any],
) -> Any:
    """Build and run a TorchTrainer; resubmitting with the same run settings resumes it."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_kwargs: dict[str, Any] = {"storage_path": run.storage_uri}
    if storage.is_s3(run.storage_uri):
        # The bucket's own filesystem (its region, our retry strategy), not pyarrow's default.
        fs, path = storage.filesystem(run.storage_uri)
        storage_kwargs = {"storage_path": path, "storage_filesystem": fs}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={
                "CPU": run.cpus_per_worker,
                **({"GPU": 1} if run.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run.name,
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=run.max_failures),
            **storage_kwargs,
        ),
        datasets=datasets,
        # Unsplit: each rank reads its own named dataset in a fixed order (training/data.py);
        # preserve_order keeps parallel reads from reordering blocks between runs.
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    return trainer.fit()


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of one rank's step: all randomness (t, noise, label drop, flips) is a function of
    (seed, step, rank), so a resumed run replays exactly what an uninterrupted one would do."""
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**63 - 1)


def epoch_seed(seed: int, epoch: int, rank: int, lap: int = 0) -> int:
    """Seed of one rank's data order in one epoch (``lap``: a rank re-reading its inputs)."""
    return (seed * 100_003 + epoch * 1_009 + rank * 31 + lap) % (2**63 - 1)


def device_and_precision(precision: str) -> tuple[torch.device, torch.dtype | None]:
    """Worker device, and the autocast dtype (bf16 on GPU for 'auto'/'bf16', none on CPU)."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device, (None if precision == "fp32" else torch.bfloat16)
    return device, None


def save_checkpoint(state: dict[str, Any], metrics: dict[str, Any], upload_async: bool) -> float:
    """Report ``metrics`` from every rank; rank 0 attaches ``state`` as a checkpoint.

    All ranks must call this at the same step (``ray.train.report`` synchronises them). With
    ``upload_async`` rank 0 writes the file to a local folder and Ray Train uploads it in the
    background (and deletes the folder afterwards): the ranks wait for the local write only.
    Returns the seconds this rank stalled (the write and the report barrier).
    """
    import ray.train

    t0 = time.perf_counter()
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return time.perf_counter() - t0
    if upload_async:
        d = tempfile.mkdtemp(prefix="svg-ray-checkpoint-")
        torch.save(state, os.path.join(d, "state.pt"))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        )
        return time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "state.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    return time.perf_counter() - t0


def load_checkpoint() -> dict[str, Any] | None:
    """The latest checkpoint's state (weights-only unpickling), or None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)


class Throughput:
    """Wall time split into waiting for data and computing, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.t0 = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def window(self) -> tuple[float, float, float]:
        """(seconds, samples/s, data-wait fraction) of the window so far."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return dt, self.samples / dt, self.wait / dt
