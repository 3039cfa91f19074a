"""LDM-style convolutional decoder: latent (B, C, h, w) -> image (B, 3, 16h, 16w).

Layout follows the Latent Diffusion decoder (Rombach et al. 2022, ldm/modules/diffusionmodules/
model.py), which SVG reuses with ch 128, ch_mult (1,1,2,2,4), 2+1 res blocks per level, attention
at 16x16 and in the middle, nearest-neighbour upsampling. Parameter names match that layout so
released SVG decoders load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from svg_ray.config import require


@dataclass
class DecoderConfig:
    """Shape of the convolutional decoder."""

    ch: int = 128
    """Base channel count."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per level; len-1 upsamplings by 2 (5 levels -> 16x)."""
    num_res_blocks: int = 2
    """Residual blocks per level (the decoder runs num_res_blocks + 1 per level)."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Feature-map sizes (at 256px output) that get a self-attention block."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    out_ch: int = 3
    """Output image channels."""

    def __post_init__(self) -> None:
        require(len(self.ch_mult) >= 1, "decoder.ch_mult needs at least one level")
        require(self.ch % 32 == 0, "decoder.ch must be a multiple of 32 (GroupNorm groups)")
        require(self.num_res_blocks >= 0, "decoder.num_res_blocks must be >= 0")

    @property
    def upsample_factor(self) -> int:
        """Spatial factor between latent grid and image."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, c: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return self.block_2(self.attn_1(self.block_1(h)))


class UpLevel(nn.Module):
    """One decoder level: res blocks, optional attention after each, optional 2x upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.upsample: Upsample | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W')."""
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return self.upsample(h) if self.upsample is not None else h


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), unbounded (clamp to show)."""

    def __init__(self, cfg: DecoderConfig, z_channels: int, resolution: int = 256) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = resolution // cfg.upsample_factor
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, cfg.dropout)
        # Built from the lowest resolution up but stored by level index (up[0] = full size).
        ups: list[UpLevel] = []
        for level in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[level]
            up = UpLevel()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent map to pixels."""
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):  # lowest resolution first
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
