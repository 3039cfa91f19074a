"""The in-process demo: both SVG stages on the scikit-learn digits, then a sample grid PNG.

Debug sizes and a randomly initialised tiny DINOv3 (no weights may be downloaded here), so the
pictures show the pipeline working end to end, not the paper's quality. Stages:
  1. train the residual encoder + decoder (L1 reconstruction; LPIPS and GAN come with Ray Train),
  2. encode every image once in eval mode (deterministic latents) and measure per-channel stats,
  3. train a debug DiT with the rectified-flow loss, label dropout and EMA,
  4. sample a class-by-class grid with Euler + CFG and decode it; write a sampler bundle.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from svg_ray.checkpoint import BundleInfo, save_bundle
from svg_ray.config import add_arguments, parse_arguments, to_dict
from svg_ray.data.digits import CLASS_NAMES, load_digits_tensor
from svg_ray.data.stats import ChannelMoments
from svg_ray.flow.loss import FlowLoss
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.generate import generate, image_grid, latents_to_tokens, to_uint8
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.models.dit import DiT, count_params, dit_config
from svg_ray.models.ema import EMA


@dataclass
class DemoConfig:
    """Settings of the in-process demo."""

    out_dir: str = "outputs/demo"
    """Where the grid, reconstructions, bundle and summary go."""
    ae_steps: int = 200
    """Autoencoder steps (residual encoder + decoder)."""
    ae_batch: int = 32
    """Autoencoder batch size."""
    ae_lr: float = 5e-4
    """Autoencoder Adam learning rate (higher than the paper's 1e-4 to converge in minutes)."""
    dit_steps: int = 1500
    """Diffusion steps."""
    dit_batch: int = 64
    """Diffusion batch size."""
    dit_lr: float = 1e-3
    """DiT AdamW learning rate."""
    dit_depth: int = 4
    """Debug DiT depth."""
    dit_width: int = 192
    """Debug DiT width."""
    ema_decay: float = 0.995
    """EMA decay (short run, so far below the paper's 0.9999)."""
    sample_steps: int = 25
    """Euler steps for the grid."""
    cfg_scale: float = 3.0
    """Guidance scale for the grid."""
    seed: int = 0
    """Global seed."""
    threads: int = 0
    """torch intra-op threads (0 = torch default)."""


def _log(msg: str, t0: float) -> None:
    print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns the summary written to out_dir/summary.json."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ae_cfg = ae_preset("debug")
    images, labels = load_digits_tensor(ae_cfg.resolution)
    n = len(images)
    _log(f"digits: {n} images, {ae_cfg.resolution}px, 10 classes", t0)

    # Stage 1: autoencoder.
    ae = SVGAutoencoder(ae_cfg)
    opt = torch.optim.Adam(ae.trainable_parameters(), lr=cfg.ae_lr, betas=(0.5, 0.9))
    ae.train()
    for step in range(1, cfg.ae_steps + 1):
        idx = torch.randint(0, n, (cfg.ae_batch,))
        x = images[idx]
        loss = (ae(x) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.ae_steps:
            _log(f"autoencoder step {step}/{cfg.ae_steps}  L1 {loss.item():.4f}", t0)
    ae.eval()

    # Stage 2: latents once, in eval mode, plus per-channel statistics.
    with torch.no_grad():
        z = torch.cat([ae.encode(images[i : i + 256]) for i in range(0, n, 256)])  # (N, C, h, w)
        recon = ae.decode(z[:16]).clamp(-1, 1)
        rec_l1 = (recon - images[:16]).abs().mean().item()
    stats = ChannelMoments.of(z).finalize()
    tokens = latents_to_tokens(stats.normalize(z))  # (N, T, C), ~unit variance per channel
    _log(f"latents {tuple(z.shape)}; eval reconstruction L1 {rec_l1:.4f}", t0)
    pair = torch.cat([to_uint8(images[:8]), to_uint8(recon[:8])])
    _save_png(image_grid(pair, nrow=8), out / "reconstructions.png")

    # Stage 3: diffusion transformer.
    dcfg = dit_config(
        "debug",
        depth=cfg.dit_depth,
        width=cfg.dit_width,
        heads=4,
        in_channels=ae.latent_channels,
        grid=ae.grid,
        num_classes=len(CLASS_NAMES),
    )
    dit = DiT(dcfg)
    ema = EMA(dit, cfg.ema_decay)
    flow = FlowLoss(time_shift=0.4)
    dopt = torch.optim.AdamW(dit.parameters(), lr=cfg.dit_lr, betas=(0.9, 0.999), weight_decay=0)
    _log(f"DiT debug: {count_params(dit) / 1e6:.2f}M params", t0)
    dit.train()
    for step in range(1, cfg.dit_steps + 1):
        idx = torch.randint(0, n, (cfg.dit_batch,))
        loss = flow(dit, tokens[idx], labels[idx])
        dopt.zero_grad(set_to_none=True)
        loss.backward()
        dopt.step()
        ema.update(dit)
        if step % 250 == 0 or step == cfg.dit_steps:
            _log(f"diffusion step {step}/{cfg.dit_steps}  flow loss {loss.item():.4f}", t0)

    # Stage 4: sample a grid, one row per class.
    ema_dit = ema.model
    assert isinstance(ema_dit, DiT)
    scfg = SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale)
    per_class = 8
    ys = torch.arange(10).repeat_interleave(per_class)
    imgs = generate(ema_dit, ae, stats, ys, list(range(len(ys))), scfg)
    grid_path = out / "samples.png"
    _save_png(image_grid(to_uint8(imgs), nrow=per_class), grid_path)
    bundle = out / "bundle"
    save_bundle(
        str(bundle),
        ema_dit,
        ae,
        BundleInfo(stats, CLASS_NAMES, cfg.dit_steps, {"demo": to_dict(cfg)}, to_dict(scfg)),
    )
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "images": n,
        "latent_shape": list(z.shape[1:]),
        "ae_final_l1": rec_l1,
        "dit_final_loss": loss.item(),
        "dit_params": count_params(dit),
        "samples_png": str(grid_path),
        "bundle": str(bundle),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(f"sample grid: {grid_path}  bundle: {bundle}", t0)
    return summary


def _save_png(grid: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(grid.numpy()).save(path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``svg-ray demo [--key value ...]`` with keys of DemoConfig."""
    p = argparse.ArgumentParser(prog="svg-ray demo", description=__doc__.splitlines()[0])
    add_arguments(p, DemoConfig)
    run(parse_arguments(DemoConfig, vars(p.parse_args(argv)), "demo"))
    return 0
