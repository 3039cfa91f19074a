"""Test-session setup: loopback-only environment, shared Ray cluster, debug-size models."""

from __future__ import annotations

import os

# Set before anything imports ray/mlflow: keep everything on loopback, report nothing outside,
# and never reach a hub (environment.md, "Environment for tests and CI").
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["fixtures_s3", "fixtures_mlflow"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One in-process local Ray cluster for the whole session.

    4 logical CPUs on the 2-core machine: two 1-CPU training workers would otherwise starve the
    Ray Data read and hang (environment.md).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()
