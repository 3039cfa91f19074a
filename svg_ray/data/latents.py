"""The latent's contract, in one place: how a latent is stored, laid out and normalised.

Every job that writes or reads SVG latents goes through this module:

- **Storage**: a latent (C, h, w) is stored in Parquet as an Arrow fixed-shape tensor of
  ``float16`` or ``bfloat16`` (numpy and Arrow have no bfloat16: its bits are stored as uint16)
  (``latents_to_numpy``, ``latents_to_torch``, ``STORAGE_NUMPY_DTYPE``).
- **Layout**: the DiT sees tokens (B, h*w, C) in row-major grid order (``latents_to_tokens``,
  ``tokens_to_latents``).
- **Statistics**: SVG's DiT trains on latents normalised per channel, (z - mean) / std over the
  dataset. The reference ships a statistics file tied to its own residual encoder; here the
  precompute job measures them for whatever autoencoder produced the latents (``ChannelMoments``,
  merged across chunks and workers, finalised to ``LatentStats``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from svg_ray.errors import SvgRayError

LATENT_DTYPES = ("float16", "bfloat16")
"""Storage dtypes of latents (as manifests record them)."""
STORAGE_NUMPY_DTYPE = {"float16": np.float16, "bfloat16": np.uint16}
"""numpy dtype of the stored latents (bf16 as its uint16 bit pattern; numpy has no bf16)."""


class LatentError(SvgRayError):
    """A latent array of an unknown storage dtype."""


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def latents_to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored latent array -> torch tensor of the manifest's dtype.

    Arrow and numpy have no bfloat16, so bf16 latents are stored as their uint16 bit patterns;
    this reinterprets them (no rounding). float16 arrays pass through.
    """
    # torch refuses to share read-only memory (Arrow buffers are read-only): copy those.
    a = np.ascontiguousarray(array)
    if not a.flags.writeable:
        a = a.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if dtype == "float16":
        return torch.from_numpy(a.astype(np.float16, copy=False))
    raise LatentError(f"unknown latent dtype {dtype!r}; expected one of {LATENT_DTYPES}")


def latents_to_numpy(latents: torch.Tensor, dtype: str) -> np.ndarray:
    """torch latents -> the array stored in Parquet (fp16, or bf16 bits as uint16)."""
    if dtype == "bfloat16":
        bits = latents.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        return bits.numpy().view(np.uint16)
    if dtype == "float16":
        return latents.detach().to("cpu", torch.float16).contiguous().numpy()
    raise LatentError(f"unknown latent dtype {dtype!r}; expected one of {LATENT_DTYPES}")


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def latents_to_tokens(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), the DiT's token-major layout."""
    return z.flatten(2).transpose(1, 2)


def tokens_to_latents(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


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
