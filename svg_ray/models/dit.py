"""Diffusion transformer on SVG latents: plain DiT/SiT with adaLN-Zero and per-head QK LayerNorm.

Follows DiT (Peebles & Xie 2023, facebookresearch/DiT models.py) with the SVG changes (Sec. 3.3):
patch size 1 (a token-wise Linear from 392 channels), raw t in [0, 1] into a 256-frequency
sinusoidal embedding, per-head LayerNorm on q and k. Parameter names match the released SVG-XL
(``ln1``, ``blocks.i.attn.q_norm``, ``final_layer``...) so it imports without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from svg_ray.config import require

# --------------------------------------------------------------------------------------------
# Config and size registry
# --------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """Shape of the diffusion transformer."""

    depth: int = 28
    """Transformer blocks."""
    width: int = 1152
    """Hidden size."""
    heads: int = 16
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden size / width."""
    in_channels: int = 392
    """Latent channels (DINO + residual)."""
    grid: int = 16
    """Latent tokens per side (resolution / 16)."""
    num_classes: int = 1000
    """Class count; index num_classes is the null class used for CFG."""
    class_dropout: float = 0.1
    """Probability of replacing a label with the null class in training (CFG)."""
    learn_sigma: bool = True
    """Output 2x channels as the reference does (only the first half is used); needed to
    import released weights."""

    def __post_init__(self) -> None:
        require(self.width % self.heads == 0, "dit.width must be divisible by dit.heads")
        require(self.depth > 0 and self.grid > 0, "dit.depth and dit.grid must be positive")
        require(0.0 <= self.class_dropout < 1.0, "dit.class_dropout must be in [0, 1)")
        require(self.num_classes > 0, "dit.num_classes must be positive")

    @property
    def out_channels(self) -> int:
        """Channels the final layer emits."""
        return self.in_channels * (2 if self.learn_sigma else 1)


DIT_SIZES: dict[str, dict[str, int]] = {
    "SVG-B": {"depth": 12, "width": 768, "heads": 12},
    "SVG-L": {"depth": 24, "width": 1024, "heads": 16},
    "SVG-XL": {"depth": 28, "width": 1152, "heads": 16},
    "debug": {"depth": 2, "width": 64, "heads": 4},
    "demo": {"depth": 4, "width": 192, "heads": 4},  # `svg-ray demo` on CPU: minutes, legible
}


def dit_config(size: str, **overrides: object) -> DiTConfig:
    """DiTConfig for a named size ('SVG-B', 'SVG-L', 'SVG-XL', 'debug') with overrides."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    return DiTConfig(**{**DIT_SIZES[size], **overrides})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), MAE convention (w first)."""
    assert dim % 4 == 0, "width must be divisible by 4 for 2-D sin-cos embeddings"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def emb1d(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D/2)

    return np.concatenate([emb1d(gw), emb1d(gh)], axis=1)  # (M, D)


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] -> 256-frequency sinusoid -> MLP (no 1000x scaling, as SVG)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim): [cos(t f), sin(t f)] with log-spaced frequencies."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, width)."""
        dtype = next(self.mlp.parameters()).dtype
        return self.mlp(self.sinusoid(t, self.freq_dim).to(dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; an extra row (index num_classes) is the null class for CFG."""

    def __init__(self, num_classes: int, width: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) long -> (B, width); label dropout in training mode."""
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with per-head LayerNorm on q and k."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, hd)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2 (names match timm's Mlp)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def zero_init(self) -> None:
        """adaLN-Zero: the block starts as the identity."""
        lin = self.adaLN_modulation[-1]
        assert isinstance(lin, nn.Linear)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) -> (B, T, D)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a token-wise Linear to the output channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def zero_init(self) -> None:
        """Zero modulation and output: the model starts by predicting v = 0."""
        lin = self.adaLN_modulation[-1]
        assert isinstance(lin, nn.Linear)
        for t in (lin.weight, lin.bias, self.linear.weight, self.linear.bias):
            nn.init.zeros_(t)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) -> (B, T, out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Velocity model v(x_t, t, y) on latent tokens: (B, T, C) -> (B, T, C).

    Takes and returns token-major latents (B, grid*grid, C); ``forward`` drops the unused sigma
    half when ``learn_sigma`` is set.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.ln1 = nn.Linear(cfg.in_channels, D)  # patch size 1: token-wise projection
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, D), requires_grad=False)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(D, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linear, N(0, 0.02) embeddings, zero adaLN and output (adaLN-Zero)."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        pe = sincos_pos_embed_2d(self.cfg.width, self.cfg.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in self.t_embedder.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            assert isinstance(block, DiTBlock)
            block.zero_init()
        self.final_layer.zero_init()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) at time t (B,) in [0,1] with labels y (B,) -> velocity (B, T, C)."""
        h = self.ln1(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c)  # (B, T, out_channels)
        return out[..., : self.cfg.in_channels]


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not, excluding buffers and fixed pos-emb)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
