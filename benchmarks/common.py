"""What the benchmarks share: the loopback-only environment, a machine description, JSON output.

Call ``set_env()`` before anything imports ray, mlflow or timm (Ray reads its settings at import):
the same loopback-only settings as tests/conftest.py and the Makefile; values already in the
environment win.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def set_env() -> None:
    """Loopback-only Ray, no usage reports, no hub downloads (existing values are kept)."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(**extra: Any) -> dict[str, Any]:
    """Cores, CPU model, platform, torch version/threads and the load average, plus ``extra``."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }


def process_table(reaped: bool = True) -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds), from /proc; ``reaped``: plus the CPU of
    its exited children (right for differences of two snapshots; per-process series want
    False, or a child's CPU is counted again in its parent when it exits)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after "(comm)": [1] ppid, [11:15] utime stime cutime cstime (clock ticks)
            cpu = fields[11:15] if reaped else fields[11:13]
            procs[int(d)] = (int(fields[1]), sum(int(x) for x in cpu) / tick)
    return procs


def ancestor_in(procs: dict[int, tuple[int, float]], pid: int, roots: set[int]) -> int | None:
    """The first of ``roots`` found walking up from ``pid`` (itself included), or None."""
    while pid in procs and pid not in (0, 1):
        if pid in roots:
            return pid
        pid = procs[pid][0]
    return None


def process_cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds (children reaped included) of this process (``"self"``), of each
    process tree in ``roots`` (name -> pid), and of all other descendants (``"other"``: Ray's
    raylet, GCS and workers), read from /proc. Differences of two calls give a phase's CPU
    cost whatever share of the machine it got."""
    procs, me = process_table(), os.getpid()
    names = {pid: name for name, pid in roots.items()}
    out = {"self": procs.get(me, (0, 0.0))[1], "other": 0.0, **dict.fromkeys(roots, 0.0)}
    for pid, (_, cpu) in procs.items():
        if pid != me and ancestor_in(procs, pid, {me}) == me:
            root = ancestor_in(procs, pid, set(names))
            out[names[root] if root is not None else "other"] += cpu
    return out


def write_json(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as indented JSON, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


def loop_ema_update(ema: Any, model: Any) -> None:
    """The per-tensor EMA update ``svg_ray.models.ema.EMA`` used before it went foreach: the
    baseline of the EMA measurements (one ``lerp_`` per parameter, looked up by name)."""
    import torch

    with torch.no_grad():
        src = dict(model.named_parameters())
        for name, p in ema.model.named_parameters():
            p.lerp_(src[name].detach().to(p.dtype), 1.0 - ema.decay)
        src_b = dict(model.named_buffers())
        for name, b in ema.model.named_buffers():
            b.copy_(src_b[name])
