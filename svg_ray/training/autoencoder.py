"""Stage 1 on Ray Train: the SVG autoencoder (residual encoder + mask token + decoder; DINO frozen).

``launch`` validates everything before a worker starts (input, DINO and VGG weights, the
architecture), plans which inputs each rank reads and hands a ``JobPlan`` to the shared driver
(``training/trainer.py``). ``AutoencoderTask`` is this job's part of the shared loop: the
autoencoder, its discriminator and optimisers, image batches, ``autoencoder_step`` (a generator
step with L1 + LPIPS + adaptive-weight PatchGAN, then a discriminator step), reconstruction grids
and the export of ``<storage>/<name>/autoencoder.safetensors`` (eval mode, running alignment
statistics) to storage and MLflow.

Data (``training/image_data.py``): every epoch a seeded permutation of the inputs dealt to the
ranks, decoded and cropped by Ray Data tasks; an undecodable input is counted and replaced by a
good image of its own batch, so every rank runs exactly ``steps_per_epoch`` steps and a resume
starts at its batch without decoding earlier ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from svg_ray import storage
from svg_ray.checkpoint import BUNDLE_AE
from svg_ray.config import ConfigError, require, to_dict
from svg_ray.data import schema
from svg_ray.data.images import DEFAULT_MAX_PIXELS, to_model_input
from svg_ray.losses import AELoss, AELossConfig
from svg_ray.models.autoencoder import (
    AutoencoderConfig,
    SVGAutoencoder,
    ae_preset,
    calibrate_alignment,
)
from svg_ray.training.accel import (
    compile_blocks,
    load_optimizer_state,
    optimizer_impl,
    resolve_compile,
)
from svg_ray.training.common import RunSettings, TrainConfig
from svg_ray.training.image_data import (
    ImageInput,
    ImagePlan,
    ImageStream,
    plan_images,
    probe_decodable,
)
from svg_ray.training.trainer import (
    JobPlan,
    RunContext,
    RunResult,
    TrainTask,
    WorkerContext,
)
from svg_ray.training.trainer import launch as launch_plan

KIND = "autoencoder"
AE_FILE = BUNDLE_AE
"""Name of the exported autoencoder, in the run folder and in the MLflow artifact folder."""
PRESETS = ("svg", "debug")


@dataclass
class AETrainConfig(TrainConfig):
    """Stage-1 training settings (defaults: the SVG paper's; the loss lives in AELossConfig)."""

    steps: int = 100_000
    """Total steps (one generator + one discriminator update each); a resumed run stops here."""
    global_batch: int = 512
    """Images per step over all workers (must divide evenly)."""
    beta1: float = 0.5
    """Adam beta1 of both optimisers."""
    beta2: float = 0.9
    """Adam beta2 of both optimisers."""
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    """'fp32' (the reference's), 'bf16' (autocast on GPU) or 'auto' (bf16 on GPU, fp32 on CPU)."""
    input: str = ""
    """Image folder tree (<root>/<class>/<image>) or Parquet with encoded images; path or s3://."""
    input_format: Literal["auto", "folder", "parquet"] = "auto"
    """'auto': Parquet when the input is a .parquet file or a folder of them, else a folder tree."""
    image_column: str = schema.COL_IMAGE
    """Parquet input: column of encoded image bytes (binary, or a struct with a 'bytes' field)."""
    preset: str = "svg"
    """Autoencoder architecture: 'svg' (the paper's, 256px) or 'debug' (tiny, 64px, CPU)."""
    resolution: int = 0
    """Image size in pixels (a multiple of 16); 0 = the preset's."""
    dino_weights: str | None = None
    """DINO weights (path or s3://, timm or Meta layout); required unless dino_allow_random."""
    dino_sha256: str | None = None
    """Expected sha256 of dino_weights; verified when set."""
    dino_allow_random: bool = False
    """Run with a RANDOM frozen DINO (tests and demos only; the latents carry no semantics)."""
    disc_lr: float = 1e-4
    """Adam learning rate of the discriminator (constant); ``lr`` is the autoencoder's."""
    decode_batch: int = 64
    """Images per Ray Data decode task batch."""
    decode_cpus: float = 1.0
    """CPUs per Ray Data decode task."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more decoded pixels (W*H) are skipped (decompression-bomb guard)."""
    crop: Literal["random", "center"] = "random"
    """'random': a window of the short-side-resized image, as the reference AE trains (a new
    window every epoch, fixed by --seed, the epoch and the image, so a resumed run sees the same
    crops); 'center': the ADM crop that precompute and evaluation use."""
    recon_every: int = 1000
    """Log a reconstruction grid (inputs over reconstructions) every N steps; 0: only at the end."""
    recon_images: int = 8
    """Images in a reconstruction grid (from rank 0's current batch)."""
    calibrate_images: int = 4096
    """'running' alignment: before export, rank 0 re-estimates the statistics in eval mode (no
    dropout, no mask tokens) on up to this many centre-cropped images, as precompute will see
    them; 0 keeps the training EMA."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.input), "train.input must name an image folder or Parquet (--input)")
        require(self.preset in PRESETS, f"train.preset must be one of {list(PRESETS)}")
        require(
            self.resolution >= 0 and self.resolution % 16 == 0,
            f"train.resolution must be 0 or a positive multiple of 16, got {self.resolution}",
        )
        require(self.disc_lr > 0, "train.disc_lr must be positive")
        require(self.decode_batch >= 1, "train.decode_batch must be >= 1")
        require(self.decode_cpus > 0, "train.decode_cpus must be positive")
        require(self.max_pixels >= 1, "train.max_pixels must be >= 1")
        require(self.recon_images >= 1, "train.recon_images must be >= 1")
        require(self.recon_every >= 0, "train.recon_every must be >= 0")
        require(self.calibrate_images >= 0, "train.calibrate_images must be >= 0")

    def autoencoder_config(self) -> AutoencoderConfig:
        """The preset with this run's resolution and DINO weights (validated on construction)."""
        base = ae_preset(self.preset)
        dino = dataclasses.replace(
            base.dino,
            weights=self.dino_weights,
            sha256=self.dino_sha256,
            # Explicit for every preset (the debug preset allows random DINO by default): a
            # training run must never silently train on random semantic features.
            allow_random=self.dino_allow_random,
        )
        return dataclasses.replace(base, resolution=self.resolution or base.resolution, dino=dino)

    def image_input(self, resolution: int) -> ImageInput:
        """The input settings the data plan and the decode stage need."""
        return ImageInput(
            self.input, self.input_format, self.image_column, resolution, self.max_pixels, self.crop
        )


@dataclass
class AutoencoderSpec:
    """What every autoencoder worker is sent."""

    train: AETrainConfig
    loss: AELossConfig
    autoencoder: dict[str, Any]
    """The architecture (``AutoencoderConfig.to_dict``)."""
    losses: list[str]
    """The loss terms switched on (for the exported file's provenance)."""
    steps_per_epoch: int
    run: RunContext | None = None


@dataclass
class AutoencoderResult(RunResult):
    """A finished autoencoder run."""

    losses: list[str] = dataclasses.field(default_factory=list)
    """The loss terms that were switched on."""

    @property
    def autoencoder(self) -> str:
        """The exported autoencoder file."""
        return self.output


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class Validated:
    """What ``validate`` learned: the data plan, the architecture and the losses switched on."""

    images: ImageInput
    plan: ImagePlan
    steps_per_epoch: int
    autoencoder: AutoencoderConfig
    losses: list[str]
    trainable_params: int


def validate(cfg: AETrainConfig, loss_cfg: AELossConfig, run: RunSettings) -> Validated:
    """Everything that can be checked before a worker starts (cheap checks first)."""
    per_worker = cfg.per_worker_batch(run.num_workers)
    require(storage.exists(cfg.input), f"input not found: {cfg.input} (--input)")
    ae_cfg = cfg.autoencoder_config()
    images = cfg.image_input(ae_cfg.resolution)
    plan = plan_images(images)
    steps = plan.order(run.num_workers, per_worker, cfg.seed).steps_per_epoch
    probe_decodable(images, plan)
    # Building both loads the DINO and VGG weights once here: a missing, mismatched or
    # corrupt file fails now with the option to set, not later in every worker.
    ae = SVGAutoencoder(ae_cfg)
    losses = AELoss(loss_cfg).enabled_losses()
    return Validated(
        images, plan, steps, ae_cfg, losses, sum(p.numel() for p in ae.trainable_parameters())
    )


def plan(cfg: AETrainConfig, loss_cfg: AELossConfig, run: RunSettings) -> JobPlan:
    """Validate and plan the data: the job as the shared driver runs it."""
    v = validate(cfg, loss_cfg, run)
    enabled = ",".join(v.losses)
    return JobPlan(
        task=AutoencoderTask,
        spec=AutoencoderSpec(cfg, loss_cfg, v.autoencoder.to_dict(), v.losses, v.steps_per_epoch),
        params={
            "train": to_dict(cfg),
            "loss": to_dict(loss_cfg),
            "run": to_dict(run),
            "autoencoder": v.autoencoder.to_dict(),
            "losses": {"enabled": enabled},
            "data": {
                "format": v.plan.source_format,
                "inputs": v.plan.inputs,
                "steps_per_epoch": v.steps_per_epoch,
                "trainable_params": v.trainable_params,
            },
        },
        output=storage.join(run.run_uri, AE_FILE),
        describe=(
            f"losses {v.losses}; {v.steps_per_epoch} steps/epoch on {run.num_workers} "
            f"worker(s) over {v.plan.inputs} inputs"
        ),
        shared={"images": v.images, "plan": v.plan},
        tags={"svg_ray.losses": enabled},
        record_inputs=functools.partial(_record_images, cfg=cfg, plan=v.plan),
    )


def _record_images(tracking_uri: str, run_id: str, cfg: AETrainConfig, plan: ImagePlan) -> None:
    from svg_ray import tracking

    tracking.log_images_input(
        tracking_uri, run_id, cfg.input, plan.sources, plan.inputs, plan.source_format
    )


def launch(cfg: AETrainConfig, loss_cfg: AELossConfig, run: RunSettings) -> AutoencoderResult:
    """Validate, attach MLflow, plan the data and train; returns where the autoencoder went."""
    p = plan(cfg, loss_cfg, run)
    result = launch_plan(p, run)
    return AutoencoderResult(**dataclasses.asdict(result), losses=p.spec.losses)


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------


def trainable_state(ae: SVGAutoencoder) -> dict[str, torch.Tensor]:
    """The AE state a checkpoint needs: everything but the frozen DINO (reloaded from its file),
    including the running alignment statistics."""
    return {k: v for k, v in ae.state_dict().items() if not k.startswith("encoder.")}


def _restore_trainable(ae: SVGAutoencoder, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = ae.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith("encoder.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"checkpoint does not match the autoencoder: {bad[:6]}")


@dataclass
class AutoencoderParts:
    """The modules and optimisers one autoencoder step touches."""

    ae: SVGAutoencoder
    ae_ddp: torch.nn.Module
    """The module the generator loss calls: ``ae`` itself or its DDP wrapper."""
    loss: AELoss
    disc_ddp: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    grad_clip: float
    amp: torch.dtype | None


def autoencoder_step(p: AutoencoderParts, x: torch.Tensor, step: int) -> dict[str, float]:
    """One generator step then (once the GAN is on) one discriminator step; returns float logs."""
    from torch.nn.parallel import DistributedDataParallel

    dev = x.device.type
    # The generator loss runs D on the reconstructions and its backward reaches D's parameters:
    # no_sync skips that pointless all-reduce (those grads are zeroed before D's own step).
    quiet = (
        p.disc_ddp.no_sync()
        if isinstance(p.disc_ddp, DistributedDataParallel)
        else contextlib.nullcontext()
    )
    with quiet:
        with torch.autocast(dev, dtype=p.amp, enabled=p.amp is not None):
            recons = p.ae_ddp(x)  # (B, 3, R, R)
            g_loss, logs = p.loss.generator_loss(x, recons, step, p.ae.decoder.conv_out.weight)
        p.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
    max_norm = p.grad_clip if p.grad_clip > 0 else math.inf
    logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(p.ae.trainable_parameters(), max_norm))
    p.opt_g.step()
    if p.loss.gan_active(step):  # before gan_start_step D is never run nor stepped
        assert p.opt_d is not None and p.loss.discriminator is not None
        with torch.autocast(dev, dtype=p.amp, enabled=p.amp is not None):
            d_loss, d_logs = p.loss.discriminator_loss(x, recons, step)
        p.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        p.opt_d.step()
    else:
        d_logs = p.loss.discriminator_loss(x, recons, step)[1]
    return {**logs, **d_logs}


class AutoencoderTask(
    TrainTask[AutoencoderSpec, AETrainConfig], kind=KIND, label="train-ae", spec=AutoencoderSpec
):
    """The autoencoder on decoded image batches; rank 0 exports the eval-mode checkpoint."""

    def __init__(self, spec: AutoencoderSpec, ctx: WorkerContext) -> None:
        super().__init__(spec, ctx)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank and every run
        ae = SVGAutoencoder(AutoencoderConfig.from_dict(spec.autoencoder)).to(ctx.device)
        loss = AELoss(spec.loss).to(ctx.device)
        disc, betas = loss.discriminator, (self.cfg.beta1, self.cfg.beta2)
        impl = optimizer_impl(ctx.device)
        opt_g = torch.optim.Adam(ae.trainable_parameters(), lr=self.cfg.lr, betas=betas, **impl)
        opt_d = (
            torch.optim.Adam(disc.parameters(), lr=self.cfg.disc_lr, betas=betas, **impl)
            if disc
            else None
        )
        if resolve_compile(self.cfg.compile, ctx.device):
            compile_blocks([ae.decoder])  # the trained part that runs at full resolution
        self.parts = AutoencoderParts(ae, ae, loss, disc, opt_g, opt_d, self.cfg.grad_clip, ctx.amp)
        self.disc = disc  # unwrapped: checkpoints must not depend on the DDP wrapper
        self.stream = ImageStream(
            ctx.shared["images"],
            ctx.shared["plan"],
            rank=ctx.rank,
            world=ctx.world,
            batch_size=self.per_worker,
            seed=self.cfg.seed,
            decode_batch=self.cfg.decode_batch,
            decode_cpus=self.cfg.decode_cpus,
        )
        self.last_x: torch.Tensor | None = None

    @property
    def dino_id(self) -> str:
        """The frozen DINO's weights (a resumed run must use the same)."""
        return self.parts.ae.encoder.weights_sha256 or "random"

    def state_dict(self) -> dict[str, Any]:
        """Trainable weights (with alignment statistics), discriminator, both optimisers."""
        p = self.parts
        return {
            "ae": trainable_state(p.ae),
            "disc": self.disc.state_dict() if self.disc is not None else None,
            "opt_g": p.opt_g.state_dict(),
            "opt_d": p.opt_d.state_dict() if p.opt_d is not None else None,
            "dino_sha256": self.dino_id,
            "config": {
                "train": to_dict(self.cfg),
                "loss": to_dict(self.spec.loss),
                "autoencoder": self.spec.autoencoder,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after checking the run used the same frozen DINO."""
        if state["dino_sha256"] != self.dino_id:
            raise ConfigError(
                f"run {self.run.run_uri} was trained with DINO weights {state['dino_sha256']}, "
                f"this job loads {self.dino_id} (--dino-weights)"
            )
        p = self.parts
        _restore_trainable(p.ae, state["ae"])
        load_optimizer_state(p.opt_g, state["opt_g"])
        if self.disc is not None and p.opt_d is not None:
            self.disc.load_state_dict(state["disc"])
            load_optimizer_state(p.opt_d, state["opt_d"])

    def prepare(self) -> None:
        """Train mode and DDP wrappers."""
        import ray.train.torch

        p = self.parts
        p.ae.train()  # FrozenDino and LPIPS stay in eval mode whatever their parent says
        if self.ctx.world > 1:
            # Buffers are not broadcast from rank 0: the running alignment statistics are
            # averaged over ranks after each step instead (an average of EMAs is the EMA of the
            # averages). DINO has no trainable parameter, so DDP leaves it out of the gradient
            # buckets. The mask token gets a gradient every step, zero when no sample was masked
            # (it enters through torch.where): unused-parameter search only without masking.
            ddp_kwargs = {
                "broadcast_buffers": False,
                "find_unused_parameters": p.ae.cfg.residual.mask_prob == 0,
            }
            p.ae_ddp = ray.train.torch.prepare_model(p.ae, parallel_strategy_kwargs=ddp_kwargs)
            if p.loss.discriminator is not None:
                # D's BatchNorm running stats are never used (it only runs in train mode).
                p.loss.discriminator = ray.train.torch.prepare_model(
                    p.loss.discriminator, parallel_strategy_kwargs={"broadcast_buffers": False}
                )
                p.disc_ddp = p.loss.discriminator

    def batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        """Model inputs (B, 3, R, R) in [-1, 1] from batch ``start`` of ``epoch``."""
        for batch in self.stream.epoch(epoch, start):
            yield to_model_input(batch).to(self.ctx.device, non_blocking=True)

    def position(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """The rank's next input: batch ``step_in_epoch`` starts at this row of its order."""
        return {"epoch": epoch, "step": step_in_epoch, "row": step_in_epoch * self.per_worker}

    def step(self, batch: torch.Tensor, step: int) -> dict[str, Any]:
        """One ``autoencoder_step``, then the running alignment statistics averaged over ranks."""
        import torch.distributed as dist

        logs = autoencoder_step(self.parts, batch, step)
        align = self.parts.ae.align
        if self.ctx.world > 1 and align.mode == "running":
            dist.all_reduce(align.running_stats)
            align.running_stats /= self.ctx.world
        self.last_x = batch
        return logs

    def counters(self) -> dict[str, float]:
        """Inputs skipped this epoch (summed over ranks)."""
        return {"skipped_images": float(self.stream.skipped.count)}

    def metrics(self) -> dict[str, float]:
        """Learning rate and the running alignment statistics."""
        mu_d, sd_d, mu_r, sd_r = self.parts.ae.align.running_stats.tolist()
        return {
            "lr": self.parts.opt_g.param_groups[0]["lr"],
            "align_mu_dino": mu_d,
            "align_sigma_dino": sd_d,
            "align_mu_res": mu_r,
            "align_sigma_res": sd_r,
        }

    @property
    def images_every(self) -> int:
        """``recon_every``."""
        return self.cfg.recon_every

    def log_images(self, logger: Any, step: int) -> None:
        """Inputs (top row) over eval-mode reconstructions (bottom row) of the last batch."""
        if self.last_x is not None:
            _log_recon(logger, self.parts.ae, self.last_x, self.cfg.recon_images, step)

    def export(self, logger: Any, step: int) -> None:
        """Calibrate the alignment statistics, then write the eval-mode autoencoder to storage
        and MLflow; a registry version if asked."""
        calibration = self._calibrate()
        _export(logger, self.parts.ae, self.run, self.spec.losses, step, calibration)

    def _calibrate(self) -> dict[str, Any] | None:
        """The running alignment statistics re-estimated in eval mode (rank 0 alone: no
        collective that could hang after the loop) on centre crops, as precompute sees them."""
        ae, n = self.parts.ae, self.cfg.calibrate_images
        if not n or ae.align.mode != "running":
            return None
        images = dataclasses.replace(self.stream.src, crop="center")
        stream = ImageStream(
            images, self.stream.plan, rank=0, world=1, batch_size=self.per_worker,
            seed=self.cfg.seed, decode_batch=self.cfg.decode_batch,
            decode_cpus=self.cfg.decode_cpus,
        )  # fmt: skip
        batches = (to_model_input(b).to(self.ctx.device) for b in stream.epoch(0))
        calibration = calibrate_alignment(ae, batches, n)
        print(f"[train-ae] alignment statistics calibrated in eval mode: {calibration}")
        return calibration


@torch.no_grad()
def _log_recon(logger: Any, ae: SVGAutoencoder, x: torch.Tensor, n: int, step: int) -> None:
    """Inputs (top row) over eval-mode reconstructions (bottom row) as one PNG artifact."""
    from svg_ray.generate import image_grid, to_uint8

    x = x[:n].float()
    ae.eval()  # running alignment statistics, no masking, no dropout: what precompute will see
    try:
        recons = ae(x).float()
    finally:
        ae.train()
    grid = image_grid(torch.cat([to_uint8(x), to_uint8(recons)]), nrow=len(x))
    logger.image(grid.numpy(), "reconstructions", step)


def _export(
    logger: Any,
    ae: SVGAutoencoder,
    run: RunContext,
    losses: list[str],
    step: int,
    calibration: dict[str, Any] | None,
) -> None:
    """The eval-mode autoencoder to <run>/autoencoder.safetensors and MLflow; registry version.
    ``calibration``: what ``calibrate_alignment`` did, recorded in the file's metadata."""
    from svg_ray import tracking
    from svg_ray.checkpoint import save_autoencoder

    extra = {
        "mlflow_run_id": run.run_id,
        "run_uri": run.run_uri,
        "step": step,
        "losses": losses,
        "align_calibration": calibration,
    }
    ae = ae.to("cpu").eval()
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / AE_FILE
        save_autoencoder(ae, str(local), extra)
        storage.write_bytes(storage.join(run.run_uri, AE_FILE), local.read_bytes())
        tracking.export_model(
            run.tracking_uri, run.run_id, "autoencoder", str(local), step, run.register_as,
            run.alias,
        )  # fmt: skip
