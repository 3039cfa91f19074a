"""Starting and stopping the servers tests and benchmarks run: by process group, never leaving
anything running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:  # type: ignore[type-arg]
    """SIGTERM the process group of ``proc`` (started with start_new_session=True); SIGKILL it
    if it has not exited within ``timeout`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    proc: subprocess.Popen,  # type: ignore[type-arg]
    deadline: float,
    what: str,
    log: Path,
) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of ``log`` if ``proc`` exits or the
    ``time.monotonic()`` deadline passes first."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up at {url}: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def start_local_ray(env_vars: dict[str, str] | None = None, **runtime_env: Any) -> None:
    """An in-process Ray for tests and benchmarks: 4 logical CPUs (on a 2-core machine two 1-CPU
    training workers would otherwise starve Ray Data's reads), no dashboard, worker output not
    echoed. ``env_vars`` and ``runtime_env`` reach every worker from its start."""
    import ray

    if env_vars:
        runtime_env["env_vars"] = env_vars
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env=runtime_env or None,
    )
