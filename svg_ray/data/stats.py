"""Per-channel latent statistics: streaming moments that merge across shards and workers.

SVG's DiT trains on latents normalised per channel, (z - mean) / std over the dataset. The
reference ships a stats file tied to its own residual encoder; here the precompute job measures
them for whatever autoencoder produced the latents (see docs: svg-method.md, Sec. 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ChannelMoments:
    """Count, sum and sum of squares per channel in float64; mergeable and exact enough for fp16
    latents (sums of squares in float64 lose nothing measurable at ImageNet scale)."""

    count: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def zeros(cls, channels: int) -> ChannelMoments:
        """Empty accumulator."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, latents: np.ndarray | torch.Tensor) -> ChannelMoments:
        """Moments of a (B, C, h, w) or (B, C) batch, pooling batch and spatial axes."""
        x = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else latents
        x = np.asarray(x, dtype=np.float64)
        x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])  # (B*h*w, C)
        return cls(x.shape[0], x.sum(0), (x * x).sum(0))

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Sum of two accumulators."""
        return ChannelMoments(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq
        )

    def finalize(self) -> LatentStats:
        """Mean and (population) std per channel."""
        if self.count == 0:
            raise ValueError("no latents were accumulated: cannot compute statistics")
        mean = self.total / self.count
        var = np.maximum(self.total_sq / self.count - mean * mean, 0.0)
        return LatentStats(mean.astype(np.float32), np.sqrt(var).astype(np.float32))


@dataclass
class LatentStats:
    """Per-channel mean and std of the latents, shape (C,) each."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.std = np.asarray(self.std, dtype=np.float32)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(
                f"latent stats must be two (C,) vectors, got {self.mean.shape} and {self.std.shape}"
            )

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.mean.shape[0])

    def _view(self, x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * x.ndim
        shape[channel_dim] = self.channels
        m = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype).view(shape)
        s = torch.as_tensor(self.std, device=x.device, dtype=x.dtype).view(shape)
        return m, s

    def normalize(self, z: torch.Tensor, channel_dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
        """(z - mean) / std along ``channel_dim``."""
        m, s = self._view(z, channel_dim)
        return (z - m) / (s + eps)

    def denormalize(self, x: torch.Tensor, channel_dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
        """Inverse of normalize."""
        m, s = self._view(x, channel_dim)
        return x * (s + eps) + m

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-able form."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> LatentStats:
        """Inverse of to_dict."""
        return cls(np.asarray(d["mean"]), np.asarray(d["std"]))
