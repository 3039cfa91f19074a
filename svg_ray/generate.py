"""From class labels to pixels: sample latents with the flow ODE, de-normalise, decode."""

from __future__ import annotations

import torch

from svg_ray.data.latents import LatentStats, tokens_to_latents
from svg_ray.flow.samplers import SamplerConfig, sample
from svg_ray.models.autoencoder import SVGAutoencoder
from svg_ray.models.dit import DiT


def initial_noise(seeds: list[int], tokens: int, channels: int) -> torch.Tensor:
    """One CPU generator per image, so an image depends on its seed alone, not on its batch."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(tokens, channels, generator=g))
    return torch.stack(out)  # (B, T, C)


@torch.no_grad()
def generate_latents(
    dit: DiT, labels: torch.Tensor, seeds: list[int], cfg: SamplerConfig
) -> torch.Tensor:
    """Normalised latent tokens (B, T, C) for ``labels`` (B,), one seed per image."""
    device = next(dit.parameters()).device
    noise = initial_noise(seeds, dit.cfg.grid**2, dit.cfg.in_channels).to(device)
    return sample(dit, noise, labels.to(device), cfg, null_class=dit.cfg.num_classes)


@torch.no_grad()
def decode_tokens(
    ae: SVGAutoencoder, stats: LatentStats, tokens: torch.Tensor, grid: int
) -> torch.Tensor:
    """Normalised tokens (B, T, C) -> images in [-1, 1] (B, 3, H, W)."""
    z = stats.denormalize(tokens, channel_dim=2)
    return ae.decode(tokens_to_latents(z, grid)).clamp(-1, 1)


@torch.no_grad()
def generate(
    dit: DiT,
    ae: SVGAutoencoder,
    stats: LatentStats,
    labels: torch.Tensor,
    seeds: list[int],
    cfg: SamplerConfig,
) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) for class ``labels``."""
    tokens = generate_latents(dit, labels, seeds, cfg)
    return decode_tokens(ae, stats, tokens, dit.cfg.grid)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> one uint8 grid image (rows*H, nrow*W, 3), 2px black gaps."""
    B, H, W, C = images.shape
    rows = (B + nrow - 1) // nrow
    gap = 2
    grid = torch.zeros(rows * (H + gap) - gap, nrow * (W + gap) - gap, C, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[r * (H + gap) : r * (H + gap) + H, c * (W + gap) : c * (W + gap) + W] = images[i]
    return grid
