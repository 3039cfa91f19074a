"""Samplers against a known answer: the exact velocity field of a Gaussian mixture."""

from __future__ import annotations

import pytest
import torch

from svg_ray.config import ConfigError
from svg_ray.flow import SamplerConfig, sample
from svg_ray.flow.samplers import guided_velocity

# A 2-D mixture: weights, means, isotropic stds.
W = torch.tensor([0.3, 0.7], dtype=torch.float64)
MU = torch.tensor([[-2.0, 1.0], [1.5, -0.5]], dtype=torch.float64)
S = torch.tensor([0.5, 0.3], dtype=torch.float64)


def mixture_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t] for x_t = (1-t) x0 + t x1, x0 ~ N(0, I), x1 ~ mixture (closed form)."""
    tt = t.to(torch.float64)[:, None, None]  # (B, 1, 1)
    var = (1 - tt) ** 2 + tt**2 * S[None, :, None] ** 2  # (B, K, 1)
    diff = x.to(torch.float64)[:, None, :] - tt * MU[None]  # (B, K, D)
    d = x.shape[-1]
    logp = (
        torch.log(W)[None]
        - 0.5 * (diff**2).sum(-1) / var[..., 0]
        - 0.5 * d * torch.log(var[..., 0])
    )
    post = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1)
    v_k = MU[None] + (tt * S[None, :, None] ** 2 - (1 - tt)) / var * diff  # (B, K, D)
    return (post * v_k).sum(1).to(x.dtype)


def mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    mean = (W[:, None] * MU).sum(0)
    second = (W[:, None] * (MU**2 + S[:, None] ** 2)).sum(0)
    return mean, second - mean**2


def run(kind: str, steps: int, noise: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    y = torch.zeros(noise.shape[0], dtype=torch.long)
    cfg = SamplerConfig(steps=steps, kind=kind, time_shift=shift)
    return sample(mixture_velocity, noise, y, cfg, null_class=1)


def test_samples_match_mixture_moments() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40_000, 2, generator=g, dtype=torch.float64)
    mean, var = mixture_moments()
    for kind in ("euler", "heun"):
        x = run(kind, 100, noise)
        assert torch.allclose(x.mean(0), mean, atol=0.03), kind
        assert torch.allclose(x.var(0), var, rtol=0.04), kind
        # the right share of samples lands near each component
        near_first = ((x - MU[0]).norm(dim=1) < (x - MU[1]).norm(dim=1)).double().mean()
        assert near_first.item() == pytest.approx(0.3, abs=0.01)


def test_heun_beats_euler_at_equal_steps() -> None:
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    reference = run("heun", 400, noise)  # converged ODE solution from the same noise
    for steps in (4, 8, 16):
        err_e = (run("euler", steps, noise) - reference).norm(dim=1).mean()
        err_h = (run("heun", steps, noise) - reference).norm(dim=1).mean()
        assert err_h < 0.5 * err_e, (steps, err_h.item(), err_e.item())
    # and both converge as steps grow
    e8 = (run("euler", 8, noise) - reference).norm(dim=1).mean()
    e32 = (run("euler", 32, noise) - reference).norm(dim=1).mean()
    assert e32 < e8 / 2


def test_shifted_grid_reaches_the_same_ode_solution() -> None:
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = run("heun", 400, noise)
    shifted = run("heun", 100, noise, shift=0.15)
    err = (shifted - reference).norm(dim=1)
    assert err.mean() < 2e-3 and err.max() < 0.05, (err.mean().item(), err.max().item())


def _toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """v = 1 everywhere for real labels, 0 for the null class (label 9)."""
    return (y != 9).to(x.dtype)[:, None, None].expand_as(x).clone()


def test_cfg_applies_to_every_channel() -> None:
    x = torch.zeros(3, 16, 392)
    y = torch.tensor([0, 1, 2])
    cfg = SamplerConfig(cfg_scale=3.0)
    v = guided_velocity(_toy_model, x, 0.5, y, null_class=9, cfg=cfg)
    # v_u + w (v_c - v_u) = 0 + 3 * (1 - 0) on all 392 channels, not just the first 3
    assert torch.equal(v, torch.full_like(x, 3.0))


def test_cfg_interval_and_disabled() -> None:
    x = torch.zeros(2, 4, 8)
    y = torch.tensor([0, 1])
    cfg = SamplerConfig(cfg_scale=4.0, cfg_mode="interval", cfg_interval=(0.2, 0.6))
    assert torch.equal(guided_velocity(_toy_model, x, 0.5, y, 9, cfg), torch.full_like(x, 4.0))
    assert torch.equal(guided_velocity(_toy_model, x, 0.9, y, 9, cfg), torch.ones_like(x))
    calls = []

    def counting(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return _toy_model(x, t, y)

    guided_velocity(counting, x, 0.5, y, 9, SamplerConfig(cfg_scale=1.0))
    assert calls == [2]  # w = 1 skips the unconditional pass


def test_sampler_config_validation() -> None:
    with pytest.raises(ConfigError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ConfigError, match="kind"):
        SamplerConfig(kind="rk4")
    with pytest.raises(ConfigError, match="cfg_mode"):
        SamplerConfig(cfg_mode="late")
    with pytest.raises(ConfigError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))
    assert SamplerConfig(kind="heun", steps=10).nfe == 20
