"""Training benchmark: the Ray Train job against the same step in a plain loop, and precomputed
latents against online encoding.

    python -m benchmarks.train [--models debug,SVG-B-narrow] [--batch 32] [--threads 1]
        [--steps debug=300:20,SVG-B-narrow=16:4] [--out outputs/bench/train.json]

1. Ray Train vs plain PyTorch, per DiT size. The real job, ``launch(DiffusionTrainConfig(...),
   RunSettings(num_workers=1, cpus_per_worker=--threads))``, on a synthetic latent dataset
   (``svg_ray.testing.latents``: debug-autoencoder latents (200, 4, 4) fp16 with flips), its
   shards rewritten by the precompute job's own Parquet writer, streamed (``cache_mb=0``) as an
   ImageNet-size dataset is; MLflow in a sqlite store in a temp dir. The job logs images/s and
   the data-wait fraction per logging window; the first window (start-up) is skipped and the
   median of the rest is kept. The baseline is the job's own pieces in this process: the same
   ``LatentReader`` (same order and flips), ``make_parts`` and ``diffusion_step``, per-step
   seeding and normalisation, timed in windows of the same length, run just before and just
   after the Ray runs of that size (pooled: the load of a shared machine drifts). Overhead =
   1 - ray images/s / plain images/s. Wall-clock rates move with the machine's load, so CPU
   seconds per image are measured too: the plain loop's own CPU time, and the Ray Train worker's
   (and all Ray processes') CPU inside each logged window, sampled from /proc. One more run
   locates the overhead: the plain loop inside a Ray worker (the worker process alone). Sizes:
   ``debug`` (depth 2, width 64) and ``SVG-B-narrow``, SVG-B's depth 12 at width 192 (3 heads of
   64), added to the DiT size table here and in the Ray workers through
   ``worker_process_setup_hook``; any name of ``svg_ray.models.dit.DIT_SIZES`` works too.
2. Precomputed vs online encoding (the reference code encodes every step): per-step time of the
   DiT step on read latents against ``SVGAutoencoder(ae_preset("debug")).encode`` (frozen DINO
   + residual, no grad) of the batch's 64 px images followed by the same step. Windows of the
   two sides alternate; medians.

The latent reader alone (local and S3, against the Ray Data path) is ``benchmarks.data_order``.
Ray: an in-process cluster per phase, ``ray.init(address="local", num_cpus=4)``. Writes JSON and
prints a one-line summary.
"""

from __future__ import annotations

from benchmarks.common import (
    ancestor_in,
    machine,
    process_table,
    set_env,
    write_json,
)

set_env()  # before anything imports ray, mlflow or timm

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from svg_ray.data.latents import latents_to_tokens  # noqa: E402
from svg_ray.data.manifest import DatasetManifest  # noqa: E402
from svg_ray.models.dit import DIT_SIZES, DiT, DiTConfig, count_params  # noqa: E402
from svg_ray.testing.latents import make_latent_dataset  # noqa: E402
from svg_ray.testing.procs import start_local_ray  # noqa: E402
from svg_ray.training import data as tdata  # noqa: E402
from svg_ray.training.common import RunSettings, step_seed  # noqa: E402
from svg_ray.training.diffusion import (  # noqa: E402
    DiffusionTrainConfig,
    diffusion_step,
    launch,
    make_parts,
    reader,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_SIZES = frozenset(DIT_SIZES)
NARROW_B = "SVG-B-narrow"
NARROW_B_DIMS = {"depth": 12, "width": 192, "heads": 3}


def register_sizes() -> None:
    """Add the benchmark's narrow SVG-B to the DiT size table (driver and, as the setup hook,
    every Ray worker: the job validates its model name on both sides). The module is imported
    here, not captured: the hook is pickled by value, and a captured dict would be a copy."""
    from svg_ray.models import dit

    dit.DIT_SIZES.setdefault(NARROW_B, dict(NARROW_B_DIMS))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _quiet_ray_data() -> None:
    """Ray Data logs two INFO lines per execution; keep the console to our own lines."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# Data and the plain side (parts 1 and 2)
# --------------------------------------------------------------------------------------------


def make_train_data(
    root: str, ae_uri: str, rows: int, shape: tuple[int, int, int], flip: bool
) -> Any:
    """The synthetic latent dataset (manifest, stats, class structure), its shards rewritten by
    the precompute job's writer so the trainer reads the layout the real job produces."""
    from svg_ray.data.precompute import WriteChunk

    manifest = make_latent_dataset(root, ae_uri, rows=rows, shards=4, shape=shape, flip=flip)
    writer = WriteChunk(root, "float16", flip)
    for rel in manifest.shards:
        writer._write_shard(pq.read_table(f"{root}/{rel}"), rel)
    return manifest


class PlainLoop:
    """The job's step without Ray: the same reader, parts, seeding and ``diffusion_step``."""

    def __init__(
        self,
        cfg: DiffusionTrainConfig,
        dcfg: DiTConfig,
        manifest: DatasetManifest,
        index: tdata.ShardIndex,
    ) -> None:
        self.cfg, self.stats = cfg, manifest.latent_stats
        self.parts = make_parts(cfg, dcfg, torch.device("cpu"))
        self.reader = reader(cfg, manifest, index, 0, 1)
        self.step = 0
        self._batches = self._stream()

    def _stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch in range(sys.maxsize):
            for b in self.reader.epoch(epoch):
                z, y = b.to("cpu")
                yield latents_to_tokens(self.stats.normalize(z)), y

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, as the job's task yields it."""
        return next(self._batches)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Seed the step as the loop does, then ``diffusion_step``."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, 0))
        loss = diffusion_step(self.parts, x, y)["loss"]
        self.step += 1
        return loss


def timed_windows(loop: PlainLoop, steps: int, window: int) -> dict[str, list[float]]:
    """Train ``steps`` steps. Per window of ``window`` steps: wall seconds, the fraction spent
    waiting for batches, and this process's CPU seconds. The first window is included; callers
    drop it, as for the Ray job."""
    out: dict[str, list[float]] = {"seconds": [], "wait": [], "cpu_s": []}
    t0, c0, wait = time.perf_counter(), time.process_time(), 0.0
    for s in range(steps):
        tw = time.perf_counter()
        x, y = loop.batch()
        wait += time.perf_counter() - tw
        loop.train_step(x, y)
        if (s + 1) % window == 0:
            t1, c1 = time.perf_counter(), time.process_time()
            out["seconds"].append(t1 - t0)
            out["wait"].append(wait / (t1 - t0))
            out["cpu_s"].append(c1 - c0)
            t0, c0, wait = t1, c1, 0.0
    return out


def plain_in_ray_worker(
    cfg: DiffusionTrainConfig,
    dcfg: DiTConfig,
    manifest: DatasetManifest,
    index: tdata.ShardIndex,
    cpus: int,
) -> dict[str, list[float]]:
    """The plain loop inside a Ray worker holding ``cpus`` CPUs: the cost of the Ray worker
    process itself (threads, environment, neighbours), without Ray Train."""
    import ray

    @ray.remote(num_cpus=cpus)
    def run(manifest_d: dict[str, Any]) -> dict[str, list[float]]:
        loop = PlainLoop(cfg, dcfg, DatasetManifest.from_dict(manifest_d), index)
        return timed_windows(loop, cfg.steps, cfg.log_every)

    ref = run.remote(manifest.to_dict())
    return dict(ray.get(ref, timeout=1800))  # type: ignore[arg-type]


def online_vs_precomputed(
    cfg: DiffusionTrainConfig,
    dcfg: DiTConfig,
    manifest: DatasetManifest,
    index: tdata.ShardIndex,
    windows: int,
    window: int,
) -> dict[str, Any]:
    """Part 2: seconds per step with read latents vs latents encoded from images every step."""
    from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset

    torch.manual_seed(cfg.seed)
    ae = SVGAutoencoder(ae_preset("debug")).eval().requires_grad_(False)
    b = cfg.global_batch
    images = torch.rand(b, 3, ae.cfg.resolution, ae.cfg.resolution) * 2 - 1
    loop = PlainLoop(cfg, dcfg, manifest, index)
    labels = loop.batch()[1]
    enc_s: list[float] = []

    def pre() -> None:
        loop.train_step(*loop.batch())

    def online() -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            z = ae.encode(images)
        enc_s.append(time.perf_counter() - t0)
        loop.train_step(latents_to_tokens(manifest.latent_stats.normalize(z)), labels)

    for f in (pre, online, pre, online):  # warm-up: first calls allocate and pick kernels
        f()
    enc_s.clear()
    per_step: dict[str, list[float]] = {"precomputed": [], "online": []}
    for i in range(windows):
        sides = [("precomputed", pre), ("online", online)]
        for name, f in sides if i % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            for _ in range(window):
                f()
            per_step[name].append((time.perf_counter() - t0) / window)
    pre_s, onl_s, enc = (
        _median(per_step["precomputed"]),
        _median(per_step["online"]),
        _median(enc_s),
    )
    return {
        "batch": b,
        "image_px": ae.cfg.resolution,
        "latent_shape": list(ae.latent_shape),
        "precomputed_step_ms": 1000 * pre_s,
        "online_step_ms": 1000 * onl_s,
        "encode_ms": 1000 * enc,
        "encode_share_of_online_step": enc / onl_s,
        "ratio_online_over_precomputed": onl_s / pre_s,
        "precomputed_images_per_s": b / pre_s,
        "online_images_per_s": b / onl_s,
        "windows_s_per_step": per_step,
    }


# --------------------------------------------------------------------------------------------
# Ray side (part 1)
# --------------------------------------------------------------------------------------------


class CpuSampler:
    """Samples the CPU seconds of every descendant process, by pid, in a background thread, so
    the CPU a Ray Train worker spends inside each logged window can be read afterwards."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.series: dict[int, list[tuple[float, float]]] = {}
        self.names: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            t, procs = time.time(), process_table(reaped=False)
            for pid, (_, cpu) in procs.items():
                if pid == me or ancestor_in(procs, pid, {me}) != me:
                    continue
                self.series.setdefault(pid, []).append((t, cpu))
                try:  # Ray retitles a worker when it becomes an actor: keep every title seen
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()[:120]
                    title = raw.replace(b"\0", b" ").decode(errors="replace").strip()
                    self.names.setdefault(pid, set()).add(title)
                except OSError:
                    pass
            self._stop.wait(self.interval)

    def cpu_between(self, t0: float, t1: float, pids: set[int] | None = None) -> float:
        """CPU seconds the processes ``pids`` (None: all) used between two wall times (each
        process's samples interpolated; clamped at its first and last sample)."""
        total = 0.0
        for pid, pts in self.series.items():
            if pids is None or pid in pids:
                ts, cs = np.array(pts).T
                total += float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs))
        return total

    def train_worker(self) -> int | None:
        """Pid of the Ray Train worker (its process title names RayTrainWorker)."""
        for pid, names in self.names.items():
            if any("RayTrainWorker" in n for n in names):
                return pid
        return None


def ray_job(cfg: DiffusionTrainConfig, run: RunSettings, tracking_uri: str) -> dict[str, Any]:
    """Run the real job: wall time, the per-window metrics it logged to MLflow, and the CPU
    seconds per window of its training worker and of all Ray processes (sampled from /proc)."""
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    with CpuSampler() as sampler:
        out = launch(cfg, run)
    wall = time.perf_counter() - t0
    client = MlflowClient(tracking_uri=tracking_uri)

    def history(key: str) -> list[Any]:
        return sorted(client.get_metric_history(out.run_id, key), key=lambda m: int(m.step))

    ips = history("images_per_s")
    worker = sampler.train_worker()
    images = cfg.global_batch * cfg.log_every
    cpu_worker, cpu_all = [], []
    for m in ips:  # window = the images_per_s it reports, ending when it was logged
        t1 = m.timestamp / 1000
        t0w = t1 - images / m.value
        cpu_all.append(sampler.cpu_between(t0w, t1))
        if worker is not None:
            cpu_worker.append(sampler.cpu_between(t0w, t1, {worker}))
    return {
        "run_id": out.run_id,
        "wall_s": wall,
        "images_per_s": [float(m.value) for m in ips],
        "data_wait": [float(m.value) for m in history("data_wait_fraction")],
        "cpu_s_train_worker": cpu_worker,
        "cpu_s_all_ray": cpu_all,
        "train_worker_process": sorted(sampler.names.get(worker, set())) if worker else [],
    }


def ray_worker_threads(cpus: int) -> dict[str, Any]:
    """torch threads and OMP_NUM_THREADS inside a Ray actor holding ``cpus`` CPUs (what a Ray
    Train worker with ``cpus_per_worker=cpus`` gets: Ray sets OMP_NUM_THREADS from it)."""
    import ray

    @ray.remote(num_cpus=cpus)
    class Probe:
        def threads(self) -> tuple[int, str | None]:
            return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    actor = Probe.remote()  # type: ignore[attr-defined]
    n, omp = ray.get(actor.threads.remote(), timeout=120)
    ray.kill(actor)
    return {"torch_threads": n, "OMP_NUM_THREADS": omp}


@contextmanager
def ray_cluster(threads: int, setup_hook: Callable[[], None] | None) -> Iterator[None]:
    """An in-process Ray cluster with 4 logical CPUs (training workers never starve Ray Data's
    reads on 2 cores). OMP_NUM_THREADS is set in every worker from its start: a setup hook that
    imports torch before Ray sets it would otherwise leave torch with one thread per core."""
    import ray
    import ray.data

    env: dict[str, Any] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    if setup_hook is not None:
        env["worker_process_setup_hook"] = setup_hook
    start_local_ray(**env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_steps(spec: str) -> dict[str, tuple[int, int]]:
    """'debug=300:20,SVG-B-narrow=16:4' -> {model: (steps, steps per logged window)}."""
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, sw = item.partition("=")
        steps, _, window = sw.partition(":")
        out[name.strip()] = (int(steps), int(window))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run both parts in one process, write the JSON, print a one-line summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=f"debug,{NARROW_B}", help="DiT sizes for part 1")
    p.add_argument(
        "--steps",
        default=f"debug=300:20,{NARROW_B}=16:4",
        help="per model STEPS:WINDOW (training steps, steps per logged window); others 30:5",
    )
    p.add_argument(
        "--breakdown-models",
        default="debug",
        help="sizes that also run the plain loop in a Ray worker",
    )
    p.add_argument("--batch", type=int, default=32, help="images per step (one worker)")
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per Ray worker")
    p.add_argument("--online-models", default=f"debug,{NARROW_B}", help="DiT sizes for part 2")
    p.add_argument("--online-windows", type=int, default=4, help="part 2 windows per side")
    p.add_argument("--online-window", type=int, default=3, help="part 2 steps per window")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="outputs/bench/train.json")
    a = p.parse_args(argv)

    # A SIGTERM must still run the finally blocks (shut Ray down).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    register_sizes()
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    online_models = [m.strip() for m in a.online_models.split(",") if m.strip()]
    breakdown = {m.strip() for m in a.breakdown_models.split(",") if m.strip()}
    spec = parse_steps(a.steps)
    plan = {m: spec.get(m, (30, 5)) for m in [*models, *online_models]}
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    machine_start = machine()

    from svg_ray.checkpoint import save_autoencoder
    from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset

    with tempfile.TemporaryDirectory(prefix="svg-bench-train-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        ae = SVGAutoencoder(ae_preset("debug")).eval()
        ae_uri = str(work / "ae.safetensors")
        save_autoencoder(ae, ae_uri)
        data_root = str(work / "latents")
        rows = a.batch * max(s for s, _ in plan.values())  # every run stays within one epoch
        c, h, w = ae.latent_shape
        manifest = make_train_data(data_root, ae_uri, rows, (c, h, w), a.flip)
        index = tdata.index_shards(manifest, data_root)
        tracking = f"sqlite:///{work / 'mlflow.db'}"

        def configs(m: str) -> tuple[DiffusionTrainConfig, RunSettings, DiTConfig]:
            steps, window = plan[m]
            cfg = DiffusionTrainConfig(
                data=data_root, model=m, steps=steps, global_batch=a.batch, log_every=window,
                checkpoint_every=steps, sample_steps=2, use_flip=a.flip,
                cache_mb=0,  # measure the streaming reader, which ImageNet-size data uses
            )  # fmt: skip
            run = RunSettings(
                name=f"bench-{m}", storage_path=str(work / "runs"), num_workers=1,
                cpus_per_worker=float(a.threads), max_failures=0, keep_checkpoints=1,
                experiment="bench-train", tracking_uri=tracking,
            )  # fmt: skip
            return cfg, run, validate(cfg, run)[1]

        phase_s: dict[str, float] = {"setup": time.perf_counter() - t_start}
        tp = time.perf_counter()
        print(f"part 2: online encode vs precomputed latents (load {_load()})", flush=True)
        online: dict[str, Any] = {}
        for m in online_models:
            cfg, _, dcfg = configs(m)
            online[m] = r = online_vs_precomputed(
                cfg, dcfg, manifest, index, a.online_windows, a.online_window
            )
            print(
                f"  {m}: precomputed {r['precomputed_step_ms']:.1f} ms/step, online "
                f"{r['online_step_ms']:.1f} ms/step (x{r['ratio_online_over_precomputed']:.1f})",
                flush=True,
            )

        plain: dict[str, list[dict[str, list[float]]]] = {m: [] for m in models}

        def baseline(m: str, tag: str) -> None:
            cfg, _, dcfg = configs(m)
            loop = PlainLoop(cfg, dcfg, manifest, index)
            plain[m].append(w := timed_windows(loop, cfg.steps, cfg.log_every))
            ips = _median([a.batch * cfg.log_every / s for s in w["seconds"][1:]])
            print(f"part 1: plain {m} ({tag}): {ips:.1f} img/s, load {_load()}", flush=True)

        phase_s["part2"] = time.perf_counter() - tp
        ray_runs: dict[str, dict[str, Any]] = {}
        for m in models:
            tp = time.perf_counter()
            # Per model: plain, then on a fresh cluster the Ray Train job and the plain loop
            # inside a Ray worker, then plain again (the load of a shared machine drifts; the two
            # plain runs bracket the rest). The size-table hook only where a custom size needs
            # it: it makes every Ray worker import torch at start.
            cfg, run, dcfg = configs(m)
            baseline(m, "before")
            with ray_cluster(a.threads, None if m in BUILTIN_SIZES else register_sizes):
                r = {"worker": ray_worker_threads(a.threads)}
                print(f"part 1: Ray Train {m} (load {_load()})", flush=True)
                r.update(ray_job(cfg, run, tracking))
                print(
                    f"  ray train {m}: {_median(r['images_per_s'][1:]):.1f} img/s, data wait "
                    f"{_median(r['data_wait'][1:]):.1%}, wall {r['wall_s']:.0f} s",
                    flush=True,
                )
                if m in breakdown:
                    r["in_worker"] = plain_in_ray_worker(cfg, dcfg, manifest, index, a.threads)
                    ips = _median(
                        [a.batch * cfg.log_every / s for s in r["in_worker"]["seconds"][1:]]
                    )
                    print(f"  plain loop in a Ray worker: {ips:.1f} img/s, load {_load()}")
            baseline(m, "after")
            r["params_m"] = count_params(DiT(dcfg)) / 1e6
            ray_runs[m] = r
            phase_s[f"part1_{m}"] = time.perf_counter() - tp

    part1: dict[str, Any] = {}
    for m, r in ray_runs.items():
        steps, window = plan[m]
        n_img = a.batch * window

        def rates(secs: list[float], n: int = n_img) -> list[float]:
            return [n / s for s in secs]

        def cpu_ms(cpu_s: list[float], n: int = n_img) -> float:
            return 1000 * _median(cpu_s) / n

        p_ips = rates([s for w in plain[m] for s in w["seconds"][1:]])
        base, ray_ips = _median(p_ips), _median(r["images_per_s"][1:])
        wait = _median(r["data_wait"][1:])
        plain_cpu = cpu_ms([c for w in plain[m] for c in w["cpu_s"][1:]])
        train_cpu = cpu_ms(r["cpu_s_train_worker"][1:]) if r["cpu_s_train_worker"] else math.nan
        all_cpu = cpu_ms(r["cpu_s_all_ray"][1:])
        part1[m] = {
            "dit": {**DIT_SIZES[m], "params_m": r["params_m"]},
            "steps": steps,
            "window_steps": window,
            "plain_images_per_s": base,
            "ray_images_per_s": ray_ips,
            "plain_step_ms": 1000 * a.batch / base,
            "ray_step_ms": 1000 * a.batch / ray_ips,
            "ray_overhead_pct": 100 * (1 - ray_ips / base),
            "data_wait_fraction": wait,
            # CPU per image does not depend on the share of the machine a run got
            "cpu_ms_per_image": {
                "plain": plain_cpu,
                "ray_train_worker": train_cpu,
                "all_ray_processes": all_cpu,
            },
            "ray_cpu_overhead_pct": 100 * (train_cpu / plain_cpu - 1),
            "ray_all_processes_cpu_overhead_pct": 100 * (all_cpu / plain_cpu - 1),
            "ray_step_extra_ms": 1000 * a.batch * (1 / ray_ips - 1 / base),
            "ray_step_data_wait_ms": 1000 * a.batch / ray_ips * wait,
            "ray_wall_s": r["wall_s"],
            "ray_fixed_s": r["wall_s"] - steps * a.batch / ray_ips,
            "ray_worker": r["worker"],
            "ray_train_worker_process": r["train_worker_process"],
            "plain_images_per_s_before_after": [_median(rates(w["seconds"][1:])) for w in plain[m]],
            "windows_images_per_s": {
                "plain": p_ips,
                "ray_train": r["images_per_s"],
            },
            "ray_train_windows_data_wait": r["data_wait"],
            "ray_train_windows_cpu_s": {
                "train_worker": r["cpu_s_train_worker"],
                "all_ray": r["cpu_s_all_ray"],
            },
        }
        if "in_worker" in r:
            worker_ips = _median(rates(r["in_worker"]["seconds"][1:]))
            part1[m]["breakdown"] = {
                "plain_in_ray_worker_images_per_s": worker_ips,
                "ray_worker_overhead_pct": 100 * (1 - worker_ips / base),
                "plain_in_ray_worker_cpu_ms_per_image": cpu_ms(r["in_worker"]["cpu_s"][1:]),
                "windows_images_per_s": {"plain_in_ray_worker": rates(r["in_worker"]["seconds"])},
            }
    report = {
        "config": {**vars(a), "plan": plan, "narrow_b": NARROW_B_DIMS},
        "machine": {
            **machine_start,
            "load_avg_1m_5m_15m_end": [round(x, 2) for x in os.getloadavg()],
            "ray_num_cpus": 4,
        },
        "ray_vs_plain": part1,
        "online_vs_precomputed": online,
        "phase_s": phase_s,
        "total_s": time.perf_counter() - t_start,
    }
    out = write_json(a.out, report)
    print(summary_line(report, a, out), flush=True)
    return 0


def summary_line(report: dict[str, Any], a: argparse.Namespace, out: Path) -> str:
    """One line: overhead and data wait per model, online/precomputed step time."""
    parts = []
    for m, r in report["ray_vs_plain"].items():
        parts.append(
            f"{m} ray {r['ray_images_per_s']:.0f} vs plain {r['plain_images_per_s']:.0f} img/s "
            f"(overhead {r['ray_overhead_pct']:.1f}% wall, {r['ray_cpu_overhead_pct']:.1f}% "
            f"CPU/img; data wait {r['data_wait_fraction']:.1%})"
        )
    for m, r in report["online_vs_precomputed"].items():
        parts.append(
            f"{m} online encode x{r['ratio_online_over_precomputed']:.2f} step time "
            f"({r['online_step_ms']:.0f} vs {r['precomputed_step_ms']:.0f} ms)"
        )
    return (
        f"bench train [bs {a.batch}, {a.threads} thread(s), {report['machine']['cpus']} cores, "
        f"load {report['machine']['load_avg_1m_5m_15m'][0]:.0f}]: "
        + "; ".join(parts)
        + f" -> {out}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
