"""Exact values of the rectified-flow path, the time shift and the loss (t=0 noise, t=1 data)."""

from __future__ import annotations

import pytest
import torch

from svg_ray.flow import FlowLoss, interpolate, shift_time, time_grid, velocity_target


def test_shift_known_points() -> None:
    # f_s(t) = s t / (1 + (s - 1) t)
    assert shift_time(0.0, 0.4) == 0.0
    assert shift_time(1.0, 0.4) == pytest.approx(1.0)
    assert shift_time(0.5, 0.4) == pytest.approx(0.2 / 0.7)
    assert shift_time(0.5, 0.15) == pytest.approx(0.075 / 0.575)
    assert shift_time(0.25, 1.0) == pytest.approx(0.25)
    # s < 1 moves every interior time toward noise (t = 0)
    t = torch.linspace(0.01, 0.99, 50)
    assert bool((shift_time(t, 0.4) < t).all())
    with pytest.raises(ValueError):
        shift_time(0.5, 0.0)


def test_interpolation_endpoints_and_velocity_sign() -> None:
    x = torch.randn(4, 16, 8)
    eps = torch.randn(4, 16, 8)
    assert torch.equal(interpolate(x, eps, torch.zeros(4)), eps)  # t = 0 is noise
    assert torch.equal(interpolate(x, eps, torch.ones(4)), x)  # t = 1 is data
    v = velocity_target(x, eps)
    assert torch.equal(v, x - eps)  # points from noise to data
    # Moving along v from t=0.3 for dt=0.2 lands exactly on x_0.5 (straight path).
    t = torch.full((4,), 0.3)
    assert torch.allclose(interpolate(x, eps, t) + 0.2 * v, interpolate(x, eps, t + 0.2), atol=1e-6)


def test_per_sample_time_broadcast() -> None:
    x, eps = torch.ones(2, 3, 5), torch.zeros(2, 3, 5)
    out = interpolate(x, eps, torch.tensor([0.25, 0.75]))
    assert torch.allclose(out[0], torch.full((3, 5), 0.25))
    assert torch.allclose(out[1], torch.full((3, 5), 0.75))


def test_time_grid_shifted() -> None:
    g = time_grid(4, 0.15)
    assert g[0].item() == 0.0 and g[-1].item() == pytest.approx(1.0)
    assert torch.allclose(g, torch.tensor([shift_time(i / 4, 0.15) for i in range(5)]).double())
    assert bool((g[1:] > g[:-1]).all())


def test_flow_loss_is_zero_for_exact_velocity_and_positive_otherwise() -> None:
    x, eps = torch.randn(8, 4, 3), torch.randn(8, 4, 3)
    y = torch.zeros(8, dtype=torch.long)
    loss = FlowLoss(0.4)
    exact = loss(lambda xt, t, y: x - eps, x, y, noise=eps)
    assert exact.item() == pytest.approx(0.0, abs=1e-12)
    zero = loss(lambda xt, t, y: torch.zeros_like(xt), x, y, noise=eps)
    assert zero.item() == pytest.approx(((x - eps) ** 2).mean().item(), rel=1e-6)


def test_training_times_follow_the_shift() -> None:
    ts = FlowLoss(0.4).sample_t(200_000, torch.device("cpu"))
    # P(f_s(u) < 0.5) = P(u < f_s^{-1}(0.5)) = P(u < 0.5 / (s + 0.5 (1 - s))) with s = 0.4
    expected = 0.5 / (0.4 + 0.5 * 0.6)
    assert (ts < 0.5).float().mean().item() == pytest.approx(expected, abs=0.01)
    assert ts.min() >= 0 and ts.max() <= 1
