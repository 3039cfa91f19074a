"""Stage 1 on Ray Train: the SVG autoencoder (residual encoder + mask token + decoder; DINO frozen).

Driver side (``launch``): validate everything before a worker starts (input, DINO and VGG weights,
the architecture), create or re-attach the MLflow run, plan which image files each rank reads,
and fit. Worker side (``train_loop``): restore, then alternate a generator step (L1 + LPIPS +
adaptive-weight PatchGAN) and a discriminator step until the configured step; rank 0 logs
reconstruction grids and exports ``<storage>/<name>/autoencoder.safetensors`` (eval mode, running
alignment statistics) to storage and MLflow, and optionally registers it.

Data (``training/image_data.py``): Ray Data tasks decode and ADM-centre-crop each rank's own
fixed input list; undecodable inputs are skipped and counted, and every rank runs exactly
``steps_per_epoch`` steps (a rank short of good images wraps around instead of running short,
which would hang DDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from svg_ray import storage
from svg_ray.config import from_dict, require, to_dict
from svg_ray.data import schema
from svg_ray.data.images import DEFAULT_MAX_PIXELS, to_model_input
from svg_ray.losses import AELoss, AELossConfig
from svg_ray.models.autoencoder import AutoencoderConfig, SVGAutoencoder, ae_preset
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
from svg_ray.training.image_data import (
    ImageInput,
    ImagePlan,
    SkipCounter,
    epoch_batches,
    plan_images,
    probe_decodable,
    rank_datasets,
)

KIND = "autoencoder"
AE_FILE = "autoencoder.safetensors"
"""Name of the exported autoencoder, in the run folder and in the MLflow artifact folder."""
PRESETS = ("svg", "debug")


@dataclass
class AETrainConfig:
    """Stage-1 training settings (defaults: the SVG paper's; the loss lives in AELossConfig)."""

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
    steps: int = 100_000
    """Total steps (one generator + one discriminator update each); a resumed run stops here."""
    global_batch: int = 512
    """Images per step over all workers (must divide evenly)."""
    lr: float = 1e-4
    """Adam learning rate of decoder + residual encoder + mask token (constant)."""
    disc_lr: float = 1e-4
    """Adam learning rate of the discriminator (constant)."""
    beta1: float = 0.5
    """Adam beta1 of both optimisers."""
    beta2: float = 0.9
    """Adam beta2 of both optimisers."""
    grad_clip: float = 0.0
    """Max gradient norm of the autoencoder step; 0: no clipping (the reference does not clip)."""
    shuffle_buffer: int = 1024
    """Decoded images in each worker's seeded local shuffle buffer (0: file order only)."""
    decode_batch: int = 64
    """Images per Ray Data decode task batch."""
    decode_cpus: float = 1.0
    """CPUs per Ray Data decode task."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more decoded pixels (W*H) are skipped (decompression-bomb guard)."""
    precision: str = "fp32"
    """'fp32' (the reference's), 'bf16' (autocast on GPU) or 'auto' (bf16 on GPU, fp32 on CPU)."""
    seed: int = 0
    """Seed of the initial weights, the file order and every random choice (per step and rank)."""
    log_every: int = 50
    """Log metrics every N steps."""
    checkpoint_every: int = 2000
    """Checkpoint every N steps (and at the end)."""
    recon_every: int = 1000
    """Log a reconstruction grid (inputs over reconstructions) every N steps; 0: only at the end."""
    recon_images: int = 8
    """Images in a reconstruction grid (from rank 0's current batch)."""

    def __post_init__(self) -> None:
        require(bool(self.input), "train.input must name an image folder or Parquet (--input)")
        require(self.preset in PRESETS, f"train.preset must be one of {list(PRESETS)}")
        require(
            self.resolution >= 0 and self.resolution % 16 == 0,
            f"train.resolution must be 0 or a positive multiple of 16, got {self.resolution}",
        )
        require(self.steps >= 1, "train.steps must be >= 1")
        require(self.global_batch >= 1, "train.global_batch must be >= 1")
        require(self.lr > 0 and self.disc_lr > 0, "train.lr and train.disc_lr must be positive")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2 must be in [0,1)")
        require(self.grad_clip >= 0, "train.grad_clip must be >= 0")
        require(self.shuffle_buffer >= 0, "train.shuffle_buffer must be >= 0")
        require(self.decode_batch >= 1, "train.decode_batch must be >= 1")
        require(self.decode_cpus > 0, "train.decode_cpus must be positive")
        require(self.max_pixels >= 1, "train.max_pixels must be >= 1")
        require(self.precision in {"auto", "bf16", "fp32"}, "train.precision: auto|bf16|fp32")
        for name in ("log_every", "checkpoint_every", "recon_images"):
            require(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        require(self.recon_every >= 0, "train.recon_every must be >= 0")

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
            self.input, self.input_format, self.image_column, resolution, self.max_pixels
        )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class Validated:
    """What ``validate`` learned: the data plan, the architecture and the losses switched on."""

    images: ImageInput
    plan: ImagePlan
    autoencoder: AutoencoderConfig
    losses: list[str]
    trainable_params: int


def validate(cfg: AETrainConfig, loss_cfg: AELossConfig, run: RunSettings) -> Validated:
    """Everything that can be checked before a worker starts (cheap checks first)."""
    require(
        cfg.global_batch % run.num_workers == 0,
        f"train.global_batch {cfg.global_batch} is not divisible by run.num_workers "
        f"{run.num_workers}",
    )
    require(storage.exists(cfg.input), f"input not found: {cfg.input} (--input)")
    ae_cfg = cfg.autoencoder_config()
    images = cfg.image_input(ae_cfg.resolution)
    plan = plan_images(images, cfg.seed, run.num_workers, cfg.global_batch // run.num_workers)
    probe_decodable(images, plan)
    # Building both loads the DINO and VGG weights once here: a missing, mismatched or
    # corrupt file fails now with the option to set, not later in every worker.
    ae = SVGAutoencoder(ae_cfg)
    losses = AELoss(loss_cfg).enabled_losses()
    return Validated(
        images, plan, ae_cfg, losses, sum(p.numel() for p in ae.trainable_parameters())
    )


def launch(cfg: AETrainConfig, loss_cfg: AELossConfig, run: RunSettings) -> dict[str, Any]:
    """Validate, attach MLflow, plan the data and train; returns a summary."""
    from svg_ray import tracking

    v = validate(cfg, loss_cfg, run)
    tracking_uri = run.tracking_uri or tracking.default_tracking_uri()
    tracking.check_registration(run.register_as, run.alias)
    run_id, resumed = tracking.find_or_create_run(
        tracking_uri, run.experiment, run.name, run.run_uri, KIND
    )
    tracking.record_provenance(tracking_uri, run_id)
    tracking.log_images_input(
        tracking_uri, run_id, cfg.input, [f for fs in v.plan.files for f in fs],
        sum(v.plan.rows), v.plan.source_format,
    )  # fmt: skip
    tracking.log_params_once(
        tracking_uri,
        run_id,
        {
            "train": to_dict(cfg),
            "loss": to_dict(loss_cfg),
            "run": to_dict(run),
            "autoencoder": v.autoencoder.to_dict(),
            "losses": {"enabled": ",".join(v.losses)},
            "data": {
                "format": v.plan.source_format,
                "inputs": sum(v.plan.rows),
                "steps_per_epoch": v.plan.steps_per_epoch,
                "trainable_params": v.trainable_params,
            },
        },
    )
    tracking.RunLogger(tracking_uri, run_id).set_tag("svg_ray.losses", ",".join(v.losses))
    ensure_ray()
    loop_config = {
        "train": to_dict(cfg),
        "loss": to_dict(loss_cfg),
        "autoencoder": v.autoencoder.to_dict(),
        "losses": v.losses,
        "steps_per_epoch": v.plan.steps_per_epoch,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "run_uri": run.run_uri,
        "register_as": run.register_as,
        "alias": run.alias,
    }
    print(
        f"[train-ae] {'resuming' if resumed else 'starting'} run {run.name!r} "
        f"(MLflow run {run_id}); losses {v.losses}; {v.plan.steps_per_epoch} steps/epoch "
        f"on {run.num_workers} worker(s), inputs per worker {v.plan.rows}",
        flush=True,
    )
    datasets = rank_datasets(v.images, v.plan, cfg.decode_batch, cfg.decode_cpus)
    result = fit(train_loop, loop_config, run, datasets)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return {
        "run_id": run_id,
        "resumed": resumed,
        "metrics": dict(result.metrics or {}),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "autoencoder": storage.join(run.run_uri, AE_FILE),
        "tracking_uri": tracking_uri,
        "losses": v.losses,
    }


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
class _Parts:
    """The modules and optimisers one training step touches."""

    ae: SVGAutoencoder
    ae_ddp: torch.nn.Module
    loss: AELoss
    disc_ddp: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    grad_clip: float
    amp: torch.dtype | None


def train_step(p: _Parts, x: torch.Tensor, step: int) -> dict[str, float]:
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


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop: restore, train to the configured step, checkpoint, export (rank 0)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from svg_ray.tracking import RunLogger

    cfg = from_dict(AETrainConfig, config["train"], "train")
    loss_cfg = from_dict(AELossConfig, config["loss"], "ae")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, amp = device_and_precision(cfg.precision)
    steps_per_epoch = int(config["steps_per_epoch"])
    per_worker = cfg.global_batch // world

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
    ae = SVGAutoencoder(AutoencoderConfig.from_dict(config["autoencoder"])).to(device)
    loss_fn = AELoss(loss_cfg).to(device)
    disc = loss_fn.discriminator
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(ae.trainable_parameters(), lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=betas) if disc else None
    step = epoch = step_in_epoch = 0
    state = load_checkpoint()
    if state is not None:
        if state.get("kind") != KIND:
            raise RuntimeError(f"the checkpoint in {config['run_uri']} is not an autoencoder run")
        if state["dino_sha256"] != (ae.encoder.weights_sha256 or "random"):
            raise RuntimeError(
                f"run {config['run_uri']} was trained with DINO weights {state['dino_sha256']}, "
                f"this job loads {ae.encoder.weights_sha256 or 'random'} (--dino-weights)"
            )
        _restore_trainable(ae, state["ae"])
        opt_g.load_state_dict(state["opt_g"])
        if disc is not None and opt_d is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if step_in_epoch >= steps_per_epoch:  # saved at an epoch's last step: start the next
            epoch, step_in_epoch = epoch + 1, 0
    ae.train()  # FrozenDino and LPIPS stay in eval mode whatever their parent says
    ae_ddp: torch.nn.Module = ae
    if world > 1:
        # Buffers are not broadcast from rank 0: the running alignment statistics are averaged
        # over ranks after each step instead (an average of EMAs is the EMA of the averages).
        # DINO has no trainable parameter, so DDP simply leaves it out of the gradient buckets.
        # The mask token gets a gradient every step, zero when no sample was masked (it enters
        # through torch.where), so unused-parameter search is needed only without masking.
        ddp_kwargs = {
            "broadcast_buffers": False,
            "find_unused_parameters": ae.cfg.residual.mask_prob == 0,
        }
        ae_ddp = ray.train.torch.prepare_model(ae, parallel_strategy_kwargs=ddp_kwargs)
        if disc is not None:
            # D's BatchNorm running stats are never used (it only runs in train mode).
            loss_fn.discriminator = ray.train.torch.prepare_model(
                disc, parallel_strategy_kwargs={"broadcast_buffers": False}
            )
    parts = _Parts(ae, ae_ddp, loss_fn, loss_fn.discriminator, opt_g, opt_d, cfg.grad_clip, amp)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    logger = (
        RunLogger(config["tracking_uri"], config["run_id"], "train-ae", cfg.steps)
        if rank == 0
        else None
    )
    meter = Throughput()
    last_x: torch.Tensor | None = None
    logs: dict[str, float] = {}

    def state_dict() -> dict[str, Any]:
        return {
            "kind": KIND,
            "ae": trainable_state(ae),
            "disc": disc.state_dict() if disc is not None else None,
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict() if opt_d is not None else None,
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "seed": cfg.seed,
            "mlflow_run_id": config["run_id"],
            "dino_sha256": ae.encoder.weights_sha256 or "random",
            "config": {k: config[k] for k in ("train", "loss", "autoencoder")},
        }

    while step < cfg.steps:
        skipped = SkipCounter(rank)
        it = epoch_batches(
            shard, per_worker, steps_per_epoch, cfg.seed, rank, epoch, cfg.shuffle_buffer, skipped
        )
        for i in range(steps_per_epoch):
            t_wait = time.perf_counter()
            batch = next(it)
            if i < step_in_epoch:
                continue  # resume: these batches were consumed before the checkpoint
            meter.wait += time.perf_counter() - t_wait
            torch.manual_seed(step_seed(cfg.seed, step, rank))  # residual masks, dropout
            x = to_model_input(batch).to(device, non_blocking=True)  # (B, 3, R, R) in [-1, 1]
            logs = train_step(parts, x, step)
            if world > 1 and ae.align.mode == "running":
                dist.all_reduce(ae.align.running_stats)
                ae.align.running_stats /= world
            step += 1
            step_in_epoch = i + 1
            last_x = x
            meter.samples += per_worker * world

            if step % cfg.log_every == 0 or step == cfg.steps:
                _log_metrics(logger, logs, ae, opt_g, meter, skipped.count, epoch, step, world)
                meter.reset()
            if logger and cfg.recon_every and step % cfg.recon_every == 0:
                _log_recon(logger, ae, x, cfg.recon_images, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(state_dict(), {"step": step, "l1": logs["l1"]})
            if step >= cfg.steps:
                break
        else:
            if skipped.count:
                print(f"[train-ae] rank {rank}: epoch {epoch} skipped {skipped.count} inputs")
            epoch += 1
            step_in_epoch = 0

    if rank == 0 and logger is not None:
        if last_x is not None and not (cfg.recon_every and step % cfg.recon_every == 0):
            _log_recon(logger, ae, last_x, cfg.recon_images, step)
        _export(logger, ae, config, step)


def _log_metrics(
    logger: Any,
    logs: dict[str, float],
    ae: SVGAutoencoder,
    opt: torch.optim.Optimizer,
    meter: Throughput,
    skipped: int,
    epoch: int,
    step: int,
    world: int,
) -> None:
    """Average the step's logs over ranks (every rank must call this), rank 0 logs them."""
    import torch.distributed as dist

    keys = sorted(logs)  # identical on every rank: the same step switches the same terms on
    values = torch.tensor([logs[k] for k in keys] + [float(skipped)], dtype=torch.float64)
    values = values.to(ae.align.running_stats.device)  # NCCL reduces GPU tensors only
    if world > 1:
        dist.all_reduce(values)
        values[:-1] /= world  # the skip count is a sum over ranks
    if logger is None:
        return
    out = dict(zip(keys, values[:-1].tolist(), strict=True))
    _, ips, wait = meter.window()
    mu_d, sd_d, mu_r, sd_r = ae.align.running_stats.tolist()
    out.update(
        {
            "skipped_images": float(values[-1]),  # this epoch so far, all ranks
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": ips,
            "data_wait_fraction": wait,
            "epoch": epoch,
            "align_mu_dino": mu_d,
            "align_sigma_dino": sd_d,
            "align_mu_res": mu_r,
            "align_sigma_res": sd_r,
        }
    )
    logger.metrics(out, step)


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


def _export(logger: Any, ae: SVGAutoencoder, config: dict[str, Any], step: int) -> None:
    """The eval-mode autoencoder to <run>/autoencoder.safetensors and MLflow; registry version."""
    from svg_ray import tracking
    from svg_ray.checkpoint import save_autoencoder

    extra = {
        "mlflow_run_id": config["run_id"],
        "run_uri": config["run_uri"],
        "step": step,
        "losses": config["losses"],
    }
    ae = ae.to("cpu").eval()
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / AE_FILE
        save_autoencoder(ae, str(local), extra)
        storage.write_bytes(storage.join(config["run_uri"], AE_FILE), local.read_bytes())
        tracking.export_model(
            config["tracking_uri"], config["run_id"], "autoencoder", str(local), step,
            config.get("register_as"), config.get("alias"),
        )  # fmt: skip
    logger.finish()
