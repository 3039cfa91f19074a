"""Residual branch of the SVG latent: a small ViT plus distribution alignment.

The residual encoder adds the fine detail DINO drops (SVG Sec. 3.2). It is torchvision's
VisionTransformer (patch 16, 6 layers, 8 heads, width 384, MLP 1536, dropout 0.1) with a per-token
head Linear(384,384)-GELU-Linear(384,C_r); using torchvision's module keeps parameter names equal
to the released SVG autoencoder (``extra_vit.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from svg_ray.config import require


@dataclass
class ResidualConfig:
    """Residual ViT and the alignment of its output to DINO's statistics."""

    out_dim: int = 8
    """Residual channels per token (C_r); the latent has C_dino + C_r channels."""
    depth: int = 6
    """Transformer layers."""
    heads: int = 8
    """Attention heads."""
    width: int = 384
    """Hidden size."""
    mlp_dim: int = 1536
    """MLP hidden size."""
    dropout: float = 0.1
    """Dropout and attention dropout (training only)."""
    mask_prob: float = 0.1
    """Training only: probability per sample that the whole residual map becomes the mask token."""
    align: Literal["running", "batch", "off"] = "running"
    """'running': batch stats in training, running estimates in eval (deterministic latents);
    'batch': the reference behaviour (batch statistics always); 'off': no alignment."""
    align_momentum: float = 0.01
    """Update rate of the running alignment statistics (like BatchNorm's momentum)."""

    def __post_init__(self) -> None:
        require(self.out_dim > 0, "residual.out_dim must be positive")
        require(self.width % self.heads == 0, "residual.width must be divisible by residual.heads")
        require(0.0 <= self.mask_prob < 1.0, "residual.mask_prob must be in [0, 1)")
        require(0.0 < self.align_momentum <= 1.0, "residual.align_momentum must be in (0, 1]")


class ResidualEncoder(VisionTransformer):
    """ImageNet-normalised images (B, 3, H, W) -> residual tokens (B, C_r, N)."""

    def __init__(self, cfg: ResidualConfig, img_size: int = 256, patch_size: int = 16) -> None:
        super().__init__(
            image_size=img_size,
            patch_size=patch_size,
            num_layers=cfg.depth,
            num_heads=cfg.heads,
            hidden_dim=cfg.width,
            mlp_dim=cfg.mlp_dim,
            num_classes=cfg.out_dim,
            dropout=cfg.dropout,
            attention_dropout=cfg.dropout,
        )
        self.heads = nn.Sequential(
            nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens through the ViT and the per-token head; CLS is used then dropped."""
        x = self._process_input(x)  # (B, N, D)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = self.encoder(torch.cat([cls, x], dim=1))[:, 1:]  # (B, N, D)
        return self.heads(x).transpose(1, 2)  # (B, C_r, N)


def channel_stats(x: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two alignment scalars of a (B, C, N) map: mean over channels of per-channel mean / std.

    Per-channel statistics pool the batch and token axes (unbiased std, as the reference).
    """
    mean = x.mean(dim=(0, 2)).mean()
    std = x.std(dim=(0, 2)).mean()
    return mean, std + eps


class DistributionAlignment(nn.Module):
    """Rescale the residual to DINO's statistics: r <- (r - mu_r)/(sigma_r + 1e-6) * sigma_d + mu_d.

    Four stop-gradient scalars. The reference computes them per batch even at inference, which
    makes an image's latent depend on its batch-mates; in 'running' mode they are tracked as
    running estimates during training and frozen in eval mode, like BatchNorm.
    """

    running_stats: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, mode: str = "running", momentum: float = 0.01, eps: float = 1e-6) -> None:
        super().__init__()
        self.mode = mode
        self.momentum = momentum
        self.eps = eps
        # Order: mu_dino, sigma_dino, mu_res, sigma_res.
        self.register_buffer("running_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def batch_stats(self, dino: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """(mu_d, sigma_d, mu_r, sigma_r) of this batch; dino (B, C_d, N), res (B, C_r, N)."""
        md, sd = channel_stats(dino.float())
        mr, sr = channel_stats(res.float())
        return torch.stack([md, sd, mr, sr])

    def forward(self, dino: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Aligned residual (B, C_r, N)."""
        if self.mode == "off":
            return res
        if self.mode == "batch" or self.training:
            stats = self.batch_stats(dino, res)
            if self.mode == "running" and self.training:
                with torch.no_grad():
                    # First batch initialises, then an exponential moving average.
                    m = 1.0 if int(self.num_batches_tracked) == 0 else self.momentum
                    self.running_stats.lerp_(stats.to(self.running_stats), m)
                    self.num_batches_tracked += 1
        else:
            stats = self.running_stats
        mu_d, sd_d, mu_r, sd_r = stats.to(res.dtype).unbind(0)
        return (res - mu_r) / (sd_r + self.eps) * sd_d + mu_d
