"""Stage 2 on Ray Train: the DiT on precomputed latents with the rectified-flow loss.

Driver side (``launch``): validate everything before a worker starts, create or re-attach the
MLflow run, plan the data, and fit. Worker side (``train_loop``): restore, then step, log,
checkpoint and sample until the configured step; rank 0 exports the sampler bundle and registers
it in MLflow.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from svg_ray import storage
from svg_ray.config import from_dict, require, to_dict
from svg_ray.data import schema
from svg_ray.data.manifest import DatasetManifest, load_manifest
from svg_ray.flow.loss import FlowLoss
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.generate import image_grid, latents_to_tokens, to_uint8
from svg_ray.models.dit import DIT_SIZES, DiT, DiTConfig, count_params, dit_config
from svg_ray.models.ema import EMA
from svg_ray.training import data as tdata
from svg_ray.training.common import (
    RunSettings,
    Throughput,
    device_and_precision,
    ensure_ray,
    fit,
    load_checkpoint,
    save_checkpoint,
    step_seed,
)

KIND = "diffusion"


@dataclass
class DiffusionTrainConfig:
    """Stage-2 training settings (defaults: the SVG paper's)."""

    data: str = ""
    """Precomputed latent dataset (folder or s3:// prefix holding manifest.json)."""
    model: str = "SVG-XL"
    """DiT size: SVG-B, SVG-L, SVG-XL or debug."""
    steps: int = 400_000
    """Total optimiser steps; a resumed run stops exactly here."""
    global_batch: int = 256
    """Images per step over all workers (must divide evenly)."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 0.0
    """Max gradient norm; 0 disables clipping (the reference does not clip)."""
    ema_decay: float = 0.9999
    """EMA decay per step."""
    class_dropout: float = 0.1
    """Label dropout probability (trains the null class for CFG)."""
    time_shift: float = 0.4
    """Training time shift s in t = f_s(u)."""
    use_flip: bool = True
    """Use precomputed horizontally flipped latents for half the samples, when present."""
    shuffle_buffer: int = 2048
    """Rows in each worker's seeded local shuffle buffer (when streaming)."""
    cache_mb: int = 1024
    """Workers whose shards fit in this many MiB read them once and draw each epoch as a seeded
    permutation in memory; larger datasets stream from storage every epoch (0: always stream)."""
    precision: str = "auto"
    """'auto' (bf16 autocast + TF32 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    seed: int = 0
    """Seed of every random choice (per step and rank)."""
    log_every: int = 50
    """Log metrics every N steps."""
    checkpoint_every: int = 2000
    """Checkpoint every N steps (and at the end)."""
    sample_every: int = 0
    """Log a sample grid to MLflow every N steps (0: only at the end)."""
    sample_steps: int = 25
    """Sampler steps for logged grids."""
    sample_cfg: float = 4.0
    """CFG scale for logged grids."""

    def __post_init__(self) -> None:
        require(bool(self.data), "train.data must name a precomputed dataset (--data)")
        require(self.model in DIT_SIZES, f"train.model must be one of {sorted(DIT_SIZES)}")
        require(self.steps >= 1, "train.steps must be >= 1")
        require(self.global_batch >= 1, "train.global_batch must be >= 1")
        require(self.lr > 0, "train.lr must be positive")
        require(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        require(self.precision in {"auto", "bf16", "fp32"}, "train.precision: auto|bf16|fp32")
        for name in ("log_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        require(self.sample_every >= 0, "train.sample_every must be >= 0")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def validate(cfg: DiffusionTrainConfig, run: RunSettings) -> tuple[DatasetManifest, DiTConfig]:
    """Everything that can be checked before a worker starts; returns (manifest, DiT config)."""
    require(
        cfg.global_batch % run.num_workers == 0,
        f"train.global_batch {cfg.global_batch} is not divisible by run.num_workers "
        f"{run.num_workers}",
    )
    from svg_ray.checkpoint import autoencoder_latent_shape

    manifest = load_manifest(cfg.data)
    c, h, w = manifest.latent_shape
    require(h == w, f"latents must be square, the dataset has {h}x{w}")
    ae_shape = autoencoder_latent_shape(manifest.autoencoder_uri)
    require(
        ae_shape == manifest.latent_shape,
        f"the dataset's latents have shape {manifest.latent_shape} but its autoencoder "
        f"{manifest.autoencoder_uri} produces {ae_shape}: the manifest points at the wrong "
        "autoencoder; re-run precompute with the autoencoder you will decode with",
    )
    dcfg = dit_config(
        cfg.model,
        in_channels=c,
        grid=h,
        num_classes=len(manifest.class_names),
        class_dropout=cfg.class_dropout,
    )
    return manifest, dcfg


def launch(cfg: DiffusionTrainConfig, run: RunSettings) -> dict[str, Any]:
    """Validate, attach MLflow, plan the data and train; returns a summary."""
    from svg_ray import tracking

    manifest, dcfg = validate(cfg, run)
    per_worker = cfg.global_batch // run.num_workers
    data_plan = tdata.plan(manifest, cfg.data, run.num_workers, per_worker)
    tracking_uri = run.tracking_uri or tracking.default_tracking_uri()
    tracking.check_registration(run.register_as, run.alias)
    run_id, resumed = tracking.find_or_create_run(
        tracking_uri, run.experiment, run.name, run.run_uri, KIND
    )
    tracking.record_provenance(tracking_uri, run_id)
    tracking.log_dataset_input(tracking_uri, run_id, manifest, cfg.data)
    tracking.log_params_once(
        tracking_uri,
        run_id,
        {
            "train": to_dict(cfg),
            "run": to_dict(run),
            "dit": to_dict(dcfg),
            "dataset": {"rows": manifest.num_rows, "autoencoder_id": manifest.autoencoder_id},
        },
    )
    ensure_ray()
    columns = [schema.COL_LABEL, schema.COL_LATENT]
    if cfg.use_flip and manifest.has_flip:
        columns.append(schema.COL_LATENT_FLIP)
    loop_config = {
        "train": to_dict(cfg),
        "dit": to_dict(dcfg),
        "manifest": manifest.to_dict(),
        "steps_per_epoch": data_plan.steps_per_epoch,
        "cached": tdata.fits_in_memory(data_plan, manifest.bytes_per_row, cfg.cache_mb),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "run_uri": run.run_uri,
        "register_as": run.register_as,
        "alias": run.alias,
    }
    print(
        f"[train] {'resuming' if resumed else 'starting'} run {run.name!r} "
        f"(MLflow run {run_id}); {data_plan.steps_per_epoch} steps/epoch on "
        f"{run.num_workers} worker(s), rows per worker {data_plan.rows}"
        f"{' (held in memory)' if loop_config['cached'] else ' (streamed)'}",
        flush=True,
    )
    result = fit(train_loop, loop_config, run, tdata.rank_datasets(data_plan, columns))
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return {
        "run_id": run_id,
        "resumed": resumed,
        "metrics": dict(result.metrics or {}),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "bundle": storage.join(run.run_uri, "bundle"),
        "tracking_uri": tracking_uri,
    }


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop: restore, train to the configured step, checkpoint, export (rank 0)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from svg_ray.tracking import RunLogger

    cfg = from_dict(DiffusionTrainConfig, config["train"], "train")
    manifest = DatasetManifest.from_dict(config["manifest"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, amp = device_and_precision(cfg.precision)
    steps_per_epoch = int(config["steps_per_epoch"])
    per_worker = cfg.global_batch // world

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
    model = DiT(from_dict(DiTConfig, config["dit"], "dit")).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    step = epoch = step_in_epoch = 0
    state = load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    flow = FlowLoss(cfg.time_shift)
    stats = manifest.latent_stats
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    logger = (
        RunLogger(config["tracking_uri"], config["run_id"], "train", cfg.steps)
        if rank == 0
        else None
    )
    if logger and step == 0:
        logger.metrics({"dit_params_m": count_params(model) / 1e6}, 0)
    meter = Throughput()

    def state_dict() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "ema": ema.model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "seed": cfg.seed,
            "mlflow_run_id": config["run_id"],
            "config": config["train"],
            "manifest": config["manifest"],
        }

    cache: dict[str, Any] | None = None
    while step < cfg.steps:
        epoch_seed = cfg.seed * 100_003 + epoch * 1_009 + rank
        if config["cached"]:
            cache = cache if cache is not None else tdata.read_all(shard)
            batches = tdata.permuted_batches(cache, per_worker, epoch_seed)
        else:
            batches = shard.iter_batches(
                batch_size=per_worker,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer,
                local_shuffle_seed=epoch_seed,
            )
        it = iter(batches)
        for i in range(steps_per_epoch):
            t_wait = time.perf_counter()
            batch = next(it)
            if i < step_in_epoch:
                continue  # resume: these batches were consumed before the checkpoint
            meter.wait += time.perf_counter() - t_wait
            torch.manual_seed(step_seed(cfg.seed, step, rank))
            g = torch.Generator().manual_seed(step_seed(cfg.seed, step, rank) + 1)
            z, y = tdata.batch_to_tensors(batch, manifest.dtype, cfg.use_flip, g)
            x = latents_to_tokens(stats.normalize(z)).to(device)  # (B, T, C)
            y = y.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = flow(ddp, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            ema.update(model)
            step += 1
            step_in_epoch = i + 1
            meter.samples += per_worker * world

            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_avg = loss.detach().float().clone()
                if world > 1:
                    dist.all_reduce(loss_avg)
                    loss_avg /= world
                if logger:
                    _, ips, wait = meter.window()
                    logger.metrics(
                        {
                            "loss": loss_avg.item(),
                            "grad_norm": float(grad_norm),
                            "lr": opt.param_groups[0]["lr"],
                            "images_per_s": ips,
                            "data_wait_fraction": wait,
                            "epoch": epoch,
                        },
                        step,
                    )
                meter.reset()
            if logger and cfg.sample_every and step % cfg.sample_every == 0:
                _log_samples(logger, ema.model, manifest, cfg, step, device)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(state_dict(), {"step": step, "loss": loss.item()})
            if step >= cfg.steps:
                break
        else:
            epoch += 1
            step_in_epoch = 0

    if rank == 0 and logger is not None:
        _export(logger, ema.model, manifest, cfg, config, step, device)


_AE_CACHE: dict[str, Any] = {}


def _autoencoder(manifest: DatasetManifest, device: torch.device) -> Any:
    """The dataset's autoencoder (for decoding sample grids and for the bundle), loaded once."""
    from svg_ray.checkpoint import load_autoencoder

    key = manifest.autoencoder_uri
    if key not in _AE_CACHE:
        _AE_CACHE[key] = load_autoencoder(key, device)
    return _AE_CACHE[key]


@torch.no_grad()
def _log_samples(
    logger: Any,
    ema_model: Any,
    manifest: DatasetManifest,
    cfg: DiffusionTrainConfig,
    step: int,
    device: torch.device,
) -> None:
    from svg_ray.generate import generate

    ae = _autoencoder(manifest, device)
    n_cls = len(manifest.class_names)
    labels = torch.arange(16) % n_cls
    scfg = SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg)
    imgs = generate(ema_model, ae, manifest.latent_stats, labels, list(range(16)), scfg)
    logger.image(image_grid(to_uint8(imgs), nrow=8).numpy(), "samples", step)


def _export(
    logger: Any,
    ema_model: Any,
    manifest: DatasetManifest,
    cfg: DiffusionTrainConfig,
    config: dict[str, Any],
    step: int,
    device: torch.device,
) -> None:
    """Final sample grid, the sampler bundle (storage + MLflow artifacts), registry version."""
    from svg_ray import tracking
    from svg_ray.checkpoint import BundleInfo, save_bundle

    _log_samples(logger, ema_model, manifest, cfg, step, device)
    ae = _autoencoder(manifest, device)
    info = BundleInfo(
        latent_stats=manifest.latent_stats,
        class_names=manifest.class_names,
        step=step,
        source={
            "mlflow_run_id": config["run_id"],
            "run_uri": config["run_uri"],
            "dataset": cfg.data,
            "autoencoder_id": manifest.autoencoder_id,
        },
        sampler_defaults=to_dict(SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg)),
    )
    ema_cpu = ema_model.to("cpu")
    with tempfile.TemporaryDirectory() as d:
        save_bundle(d, ema_cpu, ae.to("cpu"), info)
        tracking.export_model(
            config["tracking_uri"], config["run_id"], "sampler", d, step,
            config.get("register_as"), config.get("alias"),
        )  # fmt: skip
    save_bundle(storage.join(config["run_uri"], "bundle"), ema_cpu, ae, info)
    logger.finish()
