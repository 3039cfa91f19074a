"""Test-session setup: loopback-only environment, shared Ray cluster, debug-size models, tiers.

Every test belongs to one tier (``-m unit``, ``-m integration``, ``-m system``):

- unit: no Ray, no subprocess, no server; the whole tier runs in under a minute
  (``make test-fast``). Enforced: a unit test that starts Ray or a process fails.
- integration: one in-process Ray, the S3 server, the MLflow server.
- system: whole jobs (``ray job submit``, the demo, autoscaling, the browser).

A test's explicit marker wins; otherwise the fixtures it uses decide (``_tier``).
"""

from __future__ import annotations

import os
import sys

# Set before anything imports ray/mlflow: keep everything on loopback, report nothing outside,
# and never reach a hub.
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from svg_ray.testing.procs import start_local_ray  # noqa: E402

pytest_plugins = ["fixtures_s3", "fixtures_mlflow"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ae_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The debug-size autoencoder (random tiny DINO, 64px) saved as a checkpoint."""
    from svg_ray.checkpoint import save_autoencoder
    from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_autoencoder(SVGAutoencoder(ae_preset("debug")).eval(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One in-process local Ray cluster for the whole session.

    4 logical CPUs on a 2-core machine: two 1-CPU training workers would otherwise starve the
    Ray Data read and hang.
    """
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield
    ray.shutdown()


# --------------------------------------------------------------------------------------------
# Tiers
# --------------------------------------------------------------------------------------------

TIERS = ("unit", "integration", "system")
SYSTEM_FILES = {"test_jobs.py", "test_demo.py", "test_autoscaling.py"}
"""Whole-job tests: each starts its own Ray cluster, job server or browser."""
SERVER_FIXTURES = {"ray_session", "s3", "s3_ray", "mlflow_server"}
"""Fixtures that start Ray or a server: a test using one is at least integration."""
SYSTEM_FIXTURES = {"chromium"}
"""Fixtures that drive a whole product surface (a browser on a page): the test is system."""


def _tier(item: pytest.Item) -> str:
    explicit = [t for t in TIERS if item.get_closest_marker(t)]
    if explicit:
        return explicit[0]
    uses = set(getattr(item, "fixturenames", ()))
    if item.path.name in SYSTEM_FILES or uses & SYSTEM_FIXTURES:
        return "system"
    if uses & SERVER_FIXTURES or item.get_closest_marker("slow"):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test its tier marker."""
    for item in items:
        item.add_marker(_tier(item))


class StartsSomethingError(RuntimeError):
    """A unit test tried to start a process or Ray."""


HARMLESS_COMMANDS = {"uname"}
"""What libraries run on their own to describe the platform (``platform.processor()``)."""


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit test that starts Ray or a process fails: mark it integration (or system)."""
    if request.node.get_closest_marker("unit") is None:
        return
    import subprocess

    def refuse(*args: object, **kwargs: object) -> None:
        raise StartsSomethingError(
            f"{request.node.nodeid} is a unit test but starts a process or Ray: "
            "mark it @pytest.mark.integration"
        )

    original = subprocess.Popen.__init__

    def popen(self: subprocess.Popen, cmd: object, *args: object, **kwargs: object) -> None:  # type: ignore[type-arg]
        argv = [cmd] if isinstance(cmd, str) else list(cmd)  # type: ignore[call-overload]
        if os.path.basename(str(argv[0]).split()[0]) in HARMLESS_COMMANDS:
            original(self, cmd, *args, **kwargs)  # type: ignore[arg-type]
            return
        refuse()

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    if "ray" in sys.modules:
        monkeypatch.setattr(sys.modules["ray"], "init", refuse)
