"""Stage 2 on Ray Train: the DiT on precomputed latents with the rectified-flow loss.

``launch`` validates everything before a worker starts (the dataset, its autoencoder, the batch
split), plans the data and hands a ``JobPlan`` to the shared driver (``training/trainer.py``).
``DiffusionTask`` is this job's part of the shared loop: the DiT, its EMA and AdamW, the latent
batches, ``diffusion_step``, and the export of the EMA sampler bundle (storage, MLflow, registry).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from svg_ray import storage
from svg_ray.config import require, to_dict
from svg_ray.data.latents import latents_to_tokens
from svg_ray.data.manifest import DatasetManifest, load_manifest
from svg_ray.flow.loss import FlowLoss
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.generate import image_grid, to_uint8
from svg_ray.models.dit import DIT_SIZES, DiT, DiTConfig, count_params, dit_config
from svg_ray.models.ema import EMA
from svg_ray.training import data as tdata
from svg_ray.training.accel import (
    DevicePrefetcher,
    compile_blocks,
    load_optimizer_state,
    optimizer_impl,
    resolve_compile,
)
from svg_ray.training.common import RunSettings, TrainConfig
from svg_ray.training.trainer import (
    JobPlan,
    RunContext,
    RunResult,
    TrainTask,
    WorkerContext,
)
from svg_ray.training.trainer import launch as launch_plan

KIND = "diffusion"
BUNDLE_DIR = "bundle"
"""The sampler bundle's folder inside the run folder (and its MLflow artifact path)."""


@dataclass
class DiffusionTrainConfig(TrainConfig):
    """Stage-2 training settings (defaults: the SVG paper's)."""

    data: str = ""
    """Precomputed latent dataset (folder or s3:// prefix holding manifest.json)."""
    model: str = "SVG-XL"
    """DiT size: SVG-B, SVG-L, SVG-XL, demo or debug."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    ema_decay: float = 0.9999
    """EMA decay per step."""
    class_dropout: float = 0.1
    """Label dropout probability (trains the null class for CFG)."""
    time_shift: float = 0.4
    """Training time shift s in t = f_s(u)."""
    use_flip: bool = True
    """Use precomputed horizontally flipped latents for half the samples, when present."""
    shuffle_rows: int = 0
    """Streaming: rows shuffled together on a worker, read from row groups of several shards
    (0: one shard's rows); a resume re-reads at most this many rows."""
    cache_mb: int = 1024
    """A dataset that fits in this many MiB is read once by each worker and every epoch is a
    seeded permutation of all its rows; larger datasets stream every epoch (0: always stream)."""
    sample_every: int = 0
    """Log a sample grid to MLflow every N steps (0: only at the end)."""
    sample_steps: int = 25
    """Sampler steps for logged grids."""
    sample_cfg: float = 4.0
    """CFG scale for logged grids."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.data), "train.data must name a precomputed dataset (--data)")
        require(self.model in DIT_SIZES, f"train.model must be one of {sorted(DIT_SIZES)}")
        require(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        require(self.sample_every >= 0, "train.sample_every must be >= 0")
        require(self.shuffle_rows >= 0, "train.shuffle_rows must be >= 0")
        require(self.cache_mb >= 0, "train.cache_mb must be >= 0")


@dataclass
class DiffusionSpec:
    """What every diffusion worker is sent."""

    train: DiffusionTrainConfig
    dit: DiTConfig
    manifest: dict[str, Any]
    """The dataset's manifest (``DatasetManifest.to_dict``)."""
    steps_per_epoch: int
    run: RunContext | None = None


@dataclass
class DiffusionResult(RunResult):
    """A finished diffusion run."""

    @property
    def bundle(self) -> str:
        """The exported sampler bundle folder."""
        return self.output


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def validate(cfg: DiffusionTrainConfig, run: RunSettings) -> tuple[DatasetManifest, DiTConfig]:
    """Everything that can be checked before a worker starts; returns (manifest, DiT config)."""
    cfg.per_worker_batch(run.num_workers)
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


def reader(
    cfg: DiffusionTrainConfig,
    manifest: DatasetManifest,
    index: tdata.ShardIndex,
    rank: int,
    world: int,
) -> tdata.LatentReader:
    """This job's latent reader for one rank (the driver makes rank 0's to plan the epochs)."""
    return tdata.LatentReader(
        index,
        manifest,
        rank=rank,
        world=world,
        batch_size=cfg.per_worker_batch(world),
        seed=cfg.seed,
        use_flip=cfg.use_flip,
        cache_mb=cfg.cache_mb,
        window_rows=cfg.shuffle_rows,
    )


def plan(cfg: DiffusionTrainConfig, run: RunSettings) -> JobPlan:
    """Validate and plan the data: the job as the shared driver runs it."""
    manifest, dcfg = validate(cfg, run)
    # The shard footers, read once here and shipped to every worker.
    index = tdata.index_shards(manifest, cfg.data)
    with reader(cfg, manifest, index, 0, run.num_workers) as probe:
        steps, in_memory = probe.steps_per_epoch, probe.in_memory
    return JobPlan(
        task=DiffusionTask,
        spec=DiffusionSpec(cfg, dcfg, manifest.to_dict(), steps),
        params={
            "train": to_dict(cfg),
            "run": to_dict(run),
            "dit": to_dict(dcfg),
            "dataset": {"rows": manifest.num_rows, "autoencoder_id": manifest.autoencoder_id},
        },
        output=storage.join(run.run_uri, BUNDLE_DIR),
        describe=(
            f"{steps} steps/epoch on {run.num_workers} worker(s), {manifest.num_rows} rows in "
            f"{len(index.files)} shards{' (held in memory)' if in_memory else ' (streamed)'}"
        ),
        shared={"index": index},
        record_inputs=functools.partial(_record_dataset, manifest=manifest, uri=cfg.data),
    )


def _record_dataset(tracking_uri: str, run_id: str, manifest: DatasetManifest, uri: str) -> None:
    from svg_ray import tracking

    tracking.log_dataset_input(tracking_uri, run_id, manifest, uri)


def launch(cfg: DiffusionTrainConfig, run: RunSettings) -> DiffusionResult:
    """Validate, attach MLflow, plan the data and train; returns where the bundle went."""
    result = launch_plan(plan(cfg, run), run)
    return DiffusionResult(**dataclasses.asdict(result))


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------


@dataclass
class DiffusionParts:
    """What one diffusion step touches."""

    model: DiT
    """The trained DiT (its parameters are what the optimiser and the EMA see)."""
    forward: nn.Module
    """The module the loss calls: ``model`` itself or its DDP wrapper."""
    ema: EMA
    opt: torch.optim.Optimizer
    flow: FlowLoss
    grad_clip: float
    amp: torch.dtype | None
    """Autocast dtype of the forward pass (None: fp32)."""


def diffusion_step(p: DiffusionParts, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flow loss on tokens ``x`` (B, T, C) with labels ``y`` (B,), backward, AdamW, EMA.

    Returns the loss and the gradient norm as tensors: reading them is the only host sync, and
    the loop does it at its logging cadence only.
    """
    with torch.autocast(x.device.type, dtype=p.amp, enabled=p.amp is not None):
        loss = p.flow(p.forward, x, y)
    p.opt.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = p.grad_clip if p.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), max_norm)
    p.opt.step()
    p.ema.update(p.model)
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}


def make_parts(cfg: DiffusionTrainConfig, dcfg: DiTConfig, device: torch.device) -> DiffusionParts:
    """A freshly initialised DiT (seeded by ``cfg.seed``), its EMA, AdamW and the flow loss.

    The DiT's blocks are compiled when ``cfg.compile`` resolves on for ``device`` (the EMA copy,
    used only to sample, stays eager); AdamW is fused on CUDA.
    """
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
    model = DiT(dcfg).to(device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        **optimizer_impl(device),
    )
    ema = EMA(model, cfg.ema_decay)
    if resolve_compile(cfg.compile, device):
        compile_blocks(model.blocks)
    return DiffusionParts(model, model, ema, opt, FlowLoss(cfg.time_shift), cfg.grad_clip, None)


class DiffusionTask(
    TrainTask[DiffusionSpec, DiffusionTrainConfig], kind=KIND, label="train", spec=DiffusionSpec
):
    """The DiT on latent batches; rank 0 exports the EMA sampler bundle."""

    def __init__(self, spec: DiffusionSpec, ctx: WorkerContext) -> None:
        super().__init__(spec, ctx)
        self.manifest = DatasetManifest.from_dict(spec.manifest)
        self.parts = make_parts(self.cfg, spec.dit, ctx.device)
        self.parts.amp = ctx.amp
        self.reader = reader(self.cfg, self.manifest, ctx.shared["index"], ctx.rank, ctx.world)

    def state_dict(self) -> dict[str, Any]:
        """Weights, EMA, optimiser and the settings that produced them."""
        return {
            "model": self.parts.model.state_dict(),
            "ema": self.parts.ema.model.state_dict(),
            "opt": self.parts.opt.state_dict(),
            "config": to_dict(self.cfg),
            "manifest": self.spec.manifest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights, EMA and optimiser."""
        self.parts.model.load_state_dict(state["model"])
        self.parts.ema.model.load_state_dict(state["ema"])
        load_optimizer_state(self.parts.opt, state["opt"])

    def prepare(self) -> None:
        """The DDP wrapper."""
        import ray.train.torch

        if self.ctx.world > 1:
            self.parts.forward = ray.train.torch.prepare_model(self.parts.model)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Normalised token batches (B, T, C) and labels, from batch ``start`` of ``epoch``.

        The next batch is copied to the device while the current step runs; the fp16 -> fp32
        cast and the normalisation run there (half the bytes copied).
        """
        stats = self.manifest.latent_stats

        def tokens(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return latents_to_tokens(stats.normalize(z.float())), y  # (B, T, C), (B,)

        cpu = ((b.latents, b.labels) for b in self.reader.epoch(epoch, start))
        yield from DevicePrefetcher(cpu, self.ctx.device, tokens)

    def position(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """Where the reader stands (shard, row group, row) at this point of the epoch."""
        return self.reader.position(epoch, step_in_epoch)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, Any]:
        """One ``diffusion_step``."""
        return diffusion_step(self.parts, *batch)

    def metrics(self) -> dict[str, float]:
        """The learning rate."""
        return {"lr": self.parts.opt.param_groups[0]["lr"]}

    def first_metrics(self) -> dict[str, float]:
        """The DiT's size."""
        return {"dit_params_m": count_params(self.parts.model) / 1e6}

    @property
    def ema_model(self) -> DiT:
        """The EMA weights, as the DiT they are a copy of."""
        return cast(DiT, self.parts.ema.model)

    @property
    def images_every(self) -> int:
        """``sample_every``."""
        return self.cfg.sample_every

    def log_images(self, logger: Any, step: int) -> None:
        """A 16-image sample grid from the EMA weights."""
        _log_samples(logger, self.ema_model, self.manifest, self.cfg, step, self.ctx.device)

    def export(self, logger: Any, step: int) -> None:
        """The sampler bundle to storage and MLflow; a registry version if asked."""
        _export(logger, self.ema_model, self.manifest, self.cfg, self.run, step, self.ctx.device)


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
    ema_model: DiT,
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
    ema_model: DiT,
    manifest: DatasetManifest,
    cfg: DiffusionTrainConfig,
    run: RunContext,
    step: int,
    device: torch.device,
) -> None:
    """The sampler bundle (storage + MLflow artifacts), then a registry version."""
    from svg_ray import tracking
    from svg_ray.checkpoint import BundleInfo, save_bundle

    ae = _autoencoder(manifest, device)
    info = BundleInfo(
        latent_stats=manifest.latent_stats,
        class_names=manifest.class_names,
        step=step,
        source={
            "mlflow_run_id": run.run_id,
            "run_uri": run.run_uri,
            "dataset": cfg.data,
            "autoencoder_id": manifest.autoencoder_id,
        },
        sampler_defaults=to_dict(SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg)),
    )
    ema_cpu = ema_model.to("cpu")
    with tempfile.TemporaryDirectory() as d:
        save_bundle(d, ema_cpu, ae.to("cpu"), info)
        tracking.export_model(
            run.tracking_uri, run.run_id, "sampler", d, step, run.register_as, run.alias
        )
    save_bundle(storage.join(run.run_uri, BUNDLE_DIR), ema_cpu, ae, info)
