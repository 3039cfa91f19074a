"""What both Ray Train jobs share: run settings, the trainer, checkpoints, seeding, devices."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from svg_ray import storage
from svg_ray.config import require


@dataclass
class RunSettings:
    """Where a training run lives and what it runs on."""

    name: str = "svg-run"
    """Run name: the same name and storage path resume the run."""
    storage_path: str = "outputs/runs"
    """Local folder or s3:// prefix for checkpoints and the final bundle."""
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
    experiment: str = "svg-ray"
    """MLflow experiment name."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default: MLFLOW_TRACKING_URI or a sqlite store in ./outputs."""
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

    @property
    def storage_uri(self) -> str:
        """Absolute local path or the s3:// prefix."""
        return storage.absolute(self.storage_path).rstrip("/")

    @property
    def run_uri(self) -> str:
        """Folder of this run (checkpoints, bundle)."""
        return storage.join(self.storage_uri, self.name)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # Logical CPUs above the core count: training workers must never starve Ray Data's
        # read tasks of a CPU (a known hang with 1-CPU workers on a 2-core machine).
        # address="local": never attach to a stale cluster file left by a killed head.
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)))


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
        storage_kwargs = {
            "storage_path": run.storage_uri[len("s3://") :],
            "storage_filesystem": storage.s3_filesystem(),
        }
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


def device_and_precision(precision: str) -> tuple[torch.device, torch.dtype | None]:
    """Worker device, and the autocast dtype (bf16 on GPU for 'auto'/'bf16', none on CPU)."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device, (None if precision == "fp32" else torch.bfloat16)
    return device, None


def save_checkpoint(state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Report ``metrics`` from every rank; rank 0 attaches ``state`` as a checkpoint.

    All ranks must call this at the same step (``ray.train.report`` synchronises them).
    """
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "state.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


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
