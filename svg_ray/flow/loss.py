"""Rectified-flow training loss: sample shifted t, interpolate, regress the velocity (plain MSE)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from svg_ray.flow.path import interpolate, shift_time, velocity_target

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FlowLoss:
    """MSE between model velocity and x - eps at t = f_s(u), u ~ U(0, 1) (SVG uses s = 0.4)."""

    def __init__(self, time_shift: float = 0.4) -> None:
        if time_shift <= 0:
            raise ValueError(f"time_shift must be positive, got {time_shift}")
        self.time_shift = time_shift

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None):
        """n training times in [0, 1], shifted toward noise."""
        u = torch.rand(n, device=device, generator=generator)
        return shift_time(u, self.time_shift)

    def __call__(
        self,
        model: VelocityFn,
        x: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the batch of per-sample MSE; ``noise``/``t`` may be fixed for tests."""
        noise = torch.randn_like(x) if noise is None else noise
        t = self.sample_t(x.shape[0], x.device) if t is None else t
        x_t = interpolate(x, noise, t)
        v = model(x_t, t.to(x.dtype), y)
        return ((v.float() - velocity_target(x, noise).float()) ** 2).mean()
