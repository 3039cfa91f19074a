"""One Ray bring-up for every job: join the cluster in RAY_ADDRESS or start a local one.

Every entry point (training, precompute, evaluation, serve, the demo) starts Ray through
``ensure_ray`` and checks what it asks for with ``check_resources``, so a local run always gets
the same logical CPU count and a request the cluster can never schedule fails in a second with
the flags to change, instead of waiting forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from svg_ray.config import ConfigError, require


def local_cpus() -> int:
    """Logical CPUs of a local cluster: at least 4, twice the cores.

    More logical CPUs than cores: training workers and actor pools must never starve Ray Data's
    read tasks of a CPU (two 1-CPU workers on a 2-core machine hang the read forever).
    """
    return max(4, 2 * (os.cpu_count() or 1))


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Join ``address`` (default: RAY_ADDRESS) or start a local cluster; True if started here.

    A caller that gets True owns the cluster and shuts it down; with Ray already initialised
    nothing happens and the caller owns nothing.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address if address is not None else os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        # address="local": never attach to a stale cluster file left by a killed head.
        ray.init(address="local", num_cpus=num_cpus or local_cpus())
    return True


def joined_cluster() -> bool:
    """Whether the Ray in use was joined (RAY_ADDRESS): it may autoscale, a local one cannot."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_resources(
    need_cpu: float, need_gpu: float, what: str, fix: str, can_grow: bool | None = None
) -> None:
    """Refuse (or, on a joined cluster that may autoscale, warn about) a request the cluster
    cannot schedule now: Ray would wait for the resources forever.

    ``what`` says what asks for them, ``fix`` which flags lower the request; ``can_grow``
    (default: whether RAY_ADDRESS is set) turns the refusal into a warning.
    """
    import ray

    res = ray.cluster_resources()
    have_cpu, have_gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    problems = []
    if need_cpu > have_cpu + 1e-9:
        problems.append(f"{what} needs {need_cpu:g} CPUs but the Ray cluster has {have_cpu:g}")
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"{what} needs {need_gpu:g} GPUs but the Ray cluster has {have_gpu:g}")
    if not problems:
        return
    if not (joined_cluster() if can_grow is None else can_grow):
        raise ConfigError(f"{'; '.join(problems)}: {fix}")
    for p in problems:
        print(f"warning: {p} (waiting for the autoscaler to add nodes)", flush=True)


@dataclass
class RayConnection:
    """Which Ray a job runs on (the same flags for every command that starts one)."""

    ray_address: str = ""
    """Ray cluster to join (default: $RAY_ADDRESS, which `ray job submit` sets; empty: start a
    local in-process cluster)."""
    num_cpus: int = 0
    """Logical CPUs of a local cluster (0: max(4, 2 x cores): stages and workers overlap, and
    oversubscribing a small machine keeps them all scheduled)."""

    def __post_init__(self) -> None:
        require(self.num_cpus >= 0, "ray.num_cpus must be >= 0")

    def connect(self) -> bool:
        """``ensure_ray`` with these settings; True if this call started the cluster."""
        return ensure_ray(self.num_cpus or None, self.ray_address or None)

    @property
    def can_grow(self) -> bool:
        """Whether the cluster is joined (it may autoscale; a local one cannot)."""
        return bool(self.ray_address) or joined_cluster()
