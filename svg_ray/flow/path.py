"""The rectified-flow path. t = 0 is noise, t = 1 is data (the convention of svg_ray.flow)."""

from __future__ import annotations

import torch


def shift_time(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """f_s(t) = s t / (1 + (s - 1) t); s < 1 moves mass toward t = 0 (noise); fixes 0 and 1."""
    if s <= 0:
        raise ValueError(f"time shift must be positive, got {s}")
    return s * t / (1 + (s - 1) * t)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * noise + t * x for per-sample t (B,)."""
    tb = _bcast(t, x)
    return (1 - tb) * noise + tb * x


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = x - noise (points from noise toward data)."""
    return x - noise
