"""The SVG autoencoder: frozen DINO + residual ViT -> 392-channel latent -> conv decoder.

Images enter and leave in [-1, 1]. ImageNet normalisation happens in exactly one place
(``SVGAutoencoder.normalize``): feeding [-1,1] images to DINO is the colour-shift bug seen in the
reference's issues.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from svg_ray.config import ConfigError, from_dict, require, to_dict
from svg_ray.models.decoder import Decoder, DecoderConfig
from svg_ray.models.dino import DinoConfig, FrozenDino
from svg_ray.models.residual import DistributionAlignment, ResidualConfig, ResidualEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AutoencoderConfig:
    """Everything that shapes an SVG autoencoder."""

    resolution: int = 256
    """Square image size in pixels; the latent grid is resolution / 16."""
    dino: DinoConfig = field(default_factory=DinoConfig)
    """The frozen semantic encoder."""
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    """The trained residual branch."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """The convolutional decoder."""

    def __post_init__(self) -> None:
        require(self.resolution % 16 == 0, "autoencoder.resolution must be a multiple of 16")
        require(
            self.resolution % self.decoder.upsample_factor == 0,
            "autoencoder.resolution must be divisible by the decoder's upsampling factor",
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        """Strictly parse a nested dict."""
        return from_dict(cls, d, "autoencoder")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return to_dict(self)


def ae_preset(name: str) -> AutoencoderConfig:
    """Named autoencoder sizes: 'svg' (the paper's) and 'debug' (CPU, seconds)."""
    if name == "svg":
        return AutoencoderConfig()
    if name == "debug":
        return AutoencoderConfig(
            resolution=64,
            dino=DinoConfig(arch="dinov3_vittiny16_debug", allow_random=True),
            residual=ResidualConfig(depth=2, heads=4, width=128, mlp_dim=256),
            decoder=DecoderConfig(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=0),
        )
    raise ValueError(f"unknown autoencoder preset {name!r}; choose 'svg' or 'debug'")


class SVGAutoencoder(nn.Module):
    """encode: images [-1,1] (B,3,H,W) -> latent (B, C_d + C_r, H/16, W/16); decode: inverse."""

    img_mean: torch.Tensor
    img_std: torch.Tensor

    def __init__(self, cfg: AutoencoderConfig, load_dino_weights: bool = True) -> None:
        """Build from config; ``load_dino_weights=False`` when restoring a full checkpoint."""
        super().__init__()
        self.cfg = cfg
        self.encoder = FrozenDino(cfg.dino, img_size=cfg.resolution, load_weights=load_dino_weights)
        require(
            self.encoder.patch_size == 16,
            f"dino.arch {cfg.dino.arch} has patch size {self.encoder.patch_size}; the SVG "
            "latent grid needs patch 16 (a DINOv3 model)",
        )
        self.extra_vit = ResidualEncoder(cfg.residual, img_size=cfg.resolution)
        r = cfg.residual.out_dim
        # One learned token replaces the whole residual map of a masked sample (SVG Sec. 3.2).
        self.mask_token = nn.Parameter(torch.randn(1, r, 1) * 0.02)
        self.align = DistributionAlignment(cfg.residual.align, cfg.residual.align_momentum)
        self.latent_channels = self.encoder.embed_dim + r
        self.decoder = Decoder(cfg.decoder, self.latent_channels, cfg.resolution)
        self.register_buffer("img_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 2 - 1)
        self.register_buffer("img_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 2)

    @property
    def grid(self) -> int:
        """Latent grid side (tokens per row)."""
        return self.cfg.resolution // 16

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return (self.latent_channels, self.grid, self.grid)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1,1] images -> ImageNet-normalised; the only place normalisation happens."""
        # (x+1)/2 - mean) / std == (x - (2*mean-1)) / (2*std)
        return (images - self.img_mean) / self.img_std

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters stage 1 trains: residual encoder, mask token and decoder."""
        return [*self.extra_vit.parameters(), self.mask_token, *self.decoder.parameters()]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1,1] (B, 3, H, W) -> latent (B, C_d + C_r, H/16, W/16)."""
        B, _, H, W = images.shape
        x = self.normalize(images)
        dino = self.encoder(x).transpose(1, 2)  # (B, C_d, N)
        res = self.extra_vit(x)  # (B, C_r, N)
        if self.training and self.cfg.residual.mask_prob > 0:
            masked = torch.rand(B, 1, 1, device=images.device) < self.cfg.residual.mask_prob
            res = torch.where(masked, self.mask_token.expand_as(res), res)
        res = self.align(dino, res)
        z = torch.cat([dino, res], dim=1)  # (B, C, N)
        return z.reshape(B, -1, H // 16, W // 16)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> images (B, 3, 16h, 16w), roughly in [-1,1] (clamp to display)."""
        return self.decoder(latent)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct images."""
        return self.decode(self.encode(images))


class _ChannelMoments:
    """Per-channel sums over (batch, tokens) in float64, for pooled mean and unbiased std."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Fold in a (B, C, N) map."""
        x = x.detach().double()
        s1, s2 = x.sum(dim=(0, 2)), (x * x).sum(dim=(0, 2))
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[0] * x.shape[2]

    def stats(self) -> tuple[float, float]:
        """(mean over channels of the per-channel mean, same of the per-channel std)."""
        assert self.s1 is not None and self.s2 is not None and self.n > 1
        mean = self.s1 / self.n
        var = (self.s2 - self.n * mean * mean).clamp_min(0) / (self.n - 1)
        return float(mean.mean()), float(var.sqrt().mean())


@torch.no_grad()
def calibrate_alignment(
    ae: SVGAutoencoder, batches: Iterable[torch.Tensor], max_images: int = 4096
) -> dict[str, Any]:
    """Set the running alignment statistics to their eval-mode values over ``batches``.

    Training tracks them as an EMA of batch statistics in train mode, i.e. with residual dropout
    and ~mask_prob of the residual maps replaced by the mask token; latents are made in eval mode
    with neither. This pass runs the encoders in eval mode over at most ``max_images`` images
    ([-1, 1] tensors (B, 3, H, W)) and sets (mu_dino, sigma_dino, mu_res, sigma_res) to the
    statistics of all of them pooled (what 'batch' alignment computes on one batch of them all).
    Returns {"images", "before", "after", "relative_change"}; the model's train/eval mode is
    restored.
    """
    if ae.align.mode != "running":
        raise ConfigError(
            f"only 'running' alignment has statistics to calibrate, not {ae.align.mode!r}"
        )
    was_training = ae.training
    ae.eval()
    device = ae.img_mean.device
    dino, res = _ChannelMoments(), _ChannelMoments()
    seen = 0
    try:
        for batch in batches:
            x = batch[: max_images - seen].to(device, torch.float32)
            xn = ae.normalize(x)
            dino.add(ae.encoder(xn).transpose(1, 2))  # (B, C_d, N)
            res.add(ae.extra_vit(xn))  # (B, C_r, N)
            seen += x.shape[0]
            if seen >= max_images:
                break
    finally:
        ae.train(was_training)
    if seen < 2:
        raise ConfigError(f"alignment calibration needs at least 2 images, got {seen}")
    before = ae.align.running_stats.tolist()
    after = [*dino.stats(), *res.stats()]
    ae.align.running_stats.copy_(torch.tensor(after, dtype=ae.align.running_stats.dtype))
    # Tracked from now on: a later training step continues the average instead of restarting.
    ae.align.num_batches_tracked.clamp_(min=1)
    change = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(after, before, strict=True)]
    return {"images": seen, "before": before, "after": after, "relative_change": change}
