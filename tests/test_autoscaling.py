"""Autoscaling with cluster/local-fake.yaml: Ray's fake multi-node provider on this one machine.

A head started with `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` in its own
process session (loopback, short temp dir, free ports; never `ray stop`, which would stop every
Ray on the machine). A driver in a subprocess (this file run as a script) then shows that
  (a) a task asking for a GPU makes the autoscaler add a `gpu-1x` node, the task runs there, and
      the idle node is removed after idle_timeout_minutes;
  (b) a Serve deployment scaling out beyond the head's CPUs adds a `cpu-decode` node (not a GPU
      one), and the node goes away once the load stops and Serve scales back in.
Everything is stopped by process group; fake nodes the autoscaler started are found by the temp
dir in their command lines, and the test checks that nothing with that temp dir is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FAKE_CONFIG = REPO / "cluster" / "local-fake.yaml"
IDLE_TIMEOUT_MIN = 0.1  # 6 s: the removal is part of what the test waits for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

# The loopback-only test settings (tests/conftest.py) plus Ray's fake multi-node provider, with
# the autoscaler polling every second (docs/cluster.md, "Autoscaling on a laptop").
ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
    "HF_HUB_OFFLINE": "1",
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "OMP_NUM_THREADS": "1",
}


def _pids_with(text: str) -> list[int]:
    """Our processes: those whose command line names this test's unique temp dir."""
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def _rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes (Linux /proc; 0 for any that already exited)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _stop(proc: subprocess.Popen, temp_dir: str) -> dict[str, Any]:  # type: ignore[type-arg]
    """Stop the head's process group, then anything else still naming our temp dir."""
    from procs import stop_process_group

    t0 = time.monotonic()
    stop_process_group(proc, timeout=30)
    deadline = time.monotonic() + 20
    while _pids_with(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = _pids_with(temp_dir)
    for pid in leftover:  # fake nodes outside the group that did not follow the head down
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    return {"stop_s": round(time.monotonic() - t0, 1), "killed_after_stop": leftover}


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[dict[str, Any]]:
    """A fake-provider head on loopback, in its own session; yields address, temp dir, env."""
    from procs import free_port

    temp_dir = tempfile.mkdtemp(prefix="rfk", dir="/tmp")  # socket paths must stay short
    port = free_port()
    config = yaml.safe_load(FAKE_CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    config_path = Path(temp_dir) / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"]["CPU"]
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)  # the driver names its cluster explicitly
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={config_path}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        # Every port chosen free: other Rays on this machine (developers', parallel tests') hold
        # the defaults. The fake worker nodes pick random ports themselves.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "head.log", "wb")  # closed in the finally below
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    info: dict[str, Any] = {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "env": env}
    try:
        _wait_for_head(info, proc)
        info["head_ready_s"] = round(time.monotonic() - t0, 1)
        info["head_rss_mib"] = round(_rss_bytes(_pids_with(temp_dir)) / 2**20)
        yield info
    finally:
        info.update(_stop(proc, temp_dir))
        log.close()
        print(f"\n[autoscaling] {json.dumps({k: v for k, v in info.items() if k != 'env'})}")
        left = _pids_with(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def _wait_for_head(info: dict[str, Any], proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """The head is up when the GCS answers a driver (checked in a subprocess, like the tests)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (Path(info["temp_dir"]) / "head.log").read_text()[-3000:]
        probe = _driver(info, "ping", timeout=30, check=False)
        if probe.get("ok"):
            return
        time.sleep(1)
    pytest.fail("the fake-provider head did not come up in 60 s")


def _driver(
    info: dict[str, Any], scenario: str, timeout: float, check: bool = True
) -> dict[str, Any]:
    """Run one scenario of this file as a driver process; return its JSON result + peak memory."""
    cmd = [sys.executable, __file__, scenario, info["address"], info["temp_dir"]]
    # Output to files, not pipes: Serve's chatter on stderr would fill a pipe and block the driver.
    out_path = Path(info["temp_dir"]) / f"driver-{scenario}.out"
    err_path = Path(info["temp_dir"]) / f"driver-{scenario}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, env=info["env"], stdout=out, stderr=err, start_new_session=True
        )
        peak = 0
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, _rss_bytes(_pids_with(info["temp_dir"])))
            time.sleep(0.5)
        if proc.poll() is None:
            from procs import stop_process_group

            stop_process_group(proc, timeout=10)
    lines = [line for line in out_path.read_text().splitlines() if line.startswith("{")]
    if not lines:
        if check:
            tail = err_path.read_text()[-4000:]
            pytest.fail(f"driver {scenario} gave no result (rc {proc.returncode}):\n{tail}")
        return {}
    result = json.loads(lines[-1])
    result["peak_rss_mib"] = round(peak / 2**20)
    return result


def test_gpu_task_adds_a_gpu_node_and_idle_node_goes(fake_cluster: dict[str, Any]) -> None:
    """(a) GPU demand -> a gpu-1x node (task runs there) -> removed after the idle timeout."""
    gpu_type = yaml.safe_load(FAKE_CONFIG.read_text())["available_node_types"]["gpu-1x"]
    r = _driver(fake_cluster, "gpu", timeout=100)
    print(f"\n[autoscaling] gpu task: {json.dumps(r)}")
    assert r["task_node_type"] == "gpu-1x", r
    assert r["task_node"] == r["added_node"] != r["head_node"], r
    expected = {k: float(v) for k, v in gpu_type["resources"].items()}
    assert {k: r["added_resources"].get(k) for k in expected} == expected, r
    assert r["removed"], f"the idle GPU node was not removed: {r}"
    fake_cluster["gpu"] = r


def test_serve_scale_out_adds_a_cpu_node(fake_cluster: dict[str, Any]) -> None:
    """(b) Serve replicas beyond the head's CPUs -> a cpu-decode node; back to one node after."""
    r = _driver(fake_cluster, "serve", timeout=120)
    print(f"\n[autoscaling] serve: {json.dumps(r)}")
    assert r["max_replicas_seen"] == 3, r
    assert r["added_node_type"] == "cpu-decode", r  # CPU demand never launches a GPU node
    assert r["replica_nodes"] >= 2, r
    assert r["removed"], f"the node was not removed after scale-in: {r}"
    fake_cluster["serve"] = r


# --------------------------------------------------------------------------------------------
# Driver side: `python tests/test_autoscaling.py <scenario> <address> <temp dir>`
# --------------------------------------------------------------------------------------------


def _alive(ray: Any) -> dict[str, dict[str, Any]]:
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def _wait(pred: Any, timeout: float, step: float = 0.2) -> float | None:
    """Seconds until ``pred()`` holds, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return round(time.monotonic() - t0, 1)
        time.sleep(step)
    return None


def _scenario_gpu(ray: Any) -> dict[str, Any]:
    """Submit one GPU task; time the node's arrival, the task, and the idle node's removal."""
    head = ray.get_runtime_context().get_node_id()
    before = set(_alive(ray))

    @ray.remote(num_cpus=1, num_gpus=1)
    def where() -> tuple[str, str]:
        # The fake provider starts each node's raylet with RAY_NODE_TYPE_NAME=<node type>.
        return ray.get_runtime_context().get_node_id(), os.environ.get("RAY_NODE_TYPE_NAME", "")

    t0 = time.monotonic()
    ref = where.remote()
    add_s = _wait(lambda: set(_alive(ray)) - before, 60)
    new = {i: n for i, n in _alive(ray).items() if i not in before}
    added = next(iter(new), None)
    task_node, task_type = ray.get(ref, timeout=60)
    task_s = round(time.monotonic() - t0, 1)
    remove_s = _wait(lambda: added not in _alive(ray), 60, step=0.5)
    return {
        "head_node": head,
        "added_node": added,
        "added_resources": new[added]["Resources"] if added else {},
        "task_node": task_node,
        "task_node_type": task_type,
        "add_node_s": add_s,
        "task_done_s": task_s,
        "remove_after_task_s": remove_s,
        "removed": remove_s is not None,
    }


def _scenario_serve(ray: Any) -> dict[str, Any]:
    """Load a 1-CPU deployment until it has 3 replicas (head: 2 CPUs), then let it scale in."""
    import asyncio

    from ray import serve

    before = set(_alive(ray))

    @serve.deployment(
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=2,
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 2,
            "look_back_period_s": 1,
            "metrics_interval_s": 0.5,
        },
    )
    class Slow:
        async def __call__(self) -> str:
            await asyncio.sleep(0.3)
            return ray.get_runtime_context().get_node_id()

    serve.start(proxy_location="Disabled")  # handles only: no HTTP port to collide with
    handle = serve.run(Slow.bind(), name="scale", route_prefix=None)

    def replicas() -> int:
        status = serve.status().applications["scale"].deployments["Slow"]
        return int(status.replica_states.get("RUNNING", 0))

    t0 = time.monotonic()
    replica_nodes: set[str] = set()
    added: str | None = None
    added_type = None
    add_s = full_s = None
    max_seen = 0
    # Until the new node is up, three replicas run, and requests were answered on two nodes.
    while time.monotonic() - t0 < 60 and (
        added is None or full_s is None or len(replica_nodes) < 2
    ):
        batch = [handle.remote() for _ in range(8)]  # 8 concurrent slow requests
        replica_nodes.update(r.result(timeout_s=60) for r in batch)
        new = {i: n for i, n in _alive(ray).items() if i not in before}
        if new and added is None:
            added, add_s = next(iter(new)), round(time.monotonic() - t0, 1)
            added_type = "gpu-1x" if new[added]["Resources"].get("GPU") else "cpu-decode"
        max_seen = max(max_seen, replicas())
        if max_seen == 3 and full_s is None:
            full_s = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    scale_in_s = _wait(lambda: replicas() == 1, 60, step=0.5)
    removed = _wait(lambda: added not in _alive(ray), 60, step=0.5) if added else None
    serve.shutdown()
    return {
        "add_node_s": add_s,
        "three_replicas_s": full_s,
        "max_replicas_seen": max_seen,
        "replica_nodes": len(replica_nodes),
        "added_node_type": added_type,
        "scale_in_s": scale_in_s,
        "remove_after_load_s": round(time.monotonic() - t1, 1) if removed is not None else None,
        "removed": removed is not None,
    }


def _main(scenario: str, address: str) -> None:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        result = (
            {"ok": True}
            if scenario == "ping"
            else {"gpu": _scenario_gpu, "serve": _scenario_serve}[scenario](ray)
        )
    finally:
        ray.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
