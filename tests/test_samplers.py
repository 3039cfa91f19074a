"""Samplers against a known answer: the exact velocity field of a Gaussian mixture."""

from __future__ import annotations

import pytest
import torch

from svg_ray.config import ConfigError
from svg_ray.flow import SamplerConfig, sample
from svg_ray.flow.samplers import guided_velocity, parse_cfg_mode

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
        SamplerConfig(cfg_mode="sometimes")
    with pytest.raises(ConfigError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))
    assert SamplerConfig(kind="heun", steps=10).nfe == 20


# --------------------------------------------------------------------------------------------
# The reference's CFG modes (shiml20/SVG rectified_flow.py), checked by hand and step by step
# --------------------------------------------------------------------------------------------


def _constant_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """v_c = 1 for real labels, v_u = 0.5 for the null class (9): guided v = 0.5 + 0.5 w."""
    return torch.where(y == 9, 0.5, 1.0).to(x.dtype)[:, None, None].expand_as(x).clone()


@pytest.mark.parametrize(
    ("mode", "kind", "steps", "velocities"),
    [
        # Euler, N = 4, uniform grid t = 0, .25, .5, .75, dt = .25, w = 3 (guided v = 2).
        ("constant", "euler", 4, [2, 2, 2, 2]),
        ("late", "euler", 4, [1, 1, 2, 2]),  # (i + 1) / 4 > 0.5 from i = 2
        ("linear", "euler", 4, [1.25, 1.5, 1.75, 2]),  # w_i = 1.5, 2, 2.5, 3
        ("early-0.5", "euler", 4, [1, 1, 1, 2]),  # t > 0.5 only at t = .75
        ("early-0.4", "euler", 4, [1, 1, 2, 2]),
        ("cfg_star-1-0", "euler", 4, [0, 2, 2, 2]),  # zero velocity, then (1 - w) v_u + w v_c
        ("cfg_star-2-0.5", "euler", 4, [-0.25, -0.25, 2, 2]),  # -r v_u = -0.25
        ("interval", "euler", 4, [1, 1, 2, 1]),  # cfg_interval (0.3, 0.6): t = .5 only
        # Heun, N = 2 (dt = .5): each step averages predictor (t_i) and corrector (t_i+1, same i).
        ("early-0.5", "heun", 2, [(1 + 1) / 2, (1 + 2) / 2]),  # corrector of step 1 at t = 1
        ("late", "heun", 2, [1, 2]),  # step 0: (0 + 1) / 2 = 0.5 is not > 0.5
        ("cfg_star-1-0", "heun", 2, [0, 2]),  # both evaluations of step 0 are zero
    ],
)
def test_cfg_modes_match_hand_computed_samples(
    mode: str, kind: str, steps: int, velocities: list[float]
) -> None:
    x0 = torch.tensor([[[0.25, -1.0]]])
    cfg = SamplerConfig(
        steps=steps,
        kind=kind,
        time_shift=1.0,
        cfg_scale=3.0,
        cfg_mode=mode,
        cfg_interval=(0.3, 0.6),
    )
    out = sample(_constant_model, x0, torch.tensor([4]), cfg, null_class=9)
    expected = x0 + sum(v / steps for v in velocities)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def reference_sampler(
    model, z, y, null, steps: int, w: float, shift: float, mode: str, kind: str
) -> torch.Tensor:
    """The reference sampler restated from its formulas: float32 time grid, both passes at
    every evaluation, the schedule's weight per step index (Heun's corrector: same index,
    t_{i+1})."""
    base = torch.linspace(0, 1, steps + 1)
    t_seq = torch.tensor([shift * b.item() / (1 + (shift - 1) * b.item()) for b in base])
    dt_seq = t_seq[1:] - t_seq[:-1]

    def fn_v(z: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        vc, vu = model(z, t, y), model(z, t, null)
        if mode == "constant":
            cur = w
        elif mode == "late":
            cur = w if (i + 1) / steps > 0.5 else 1.0
        elif mode == "linear":
            cur = 1.0 + (w - 1.0) * (i + 1) / steps
        elif mode.startswith("early-"):
            cur = w if float(t[0]) > float(mode.split("-")[1]) else 1.0
        else:  # cfg_star-k-r
            k, r = int(mode.split("-")[1]), float(mode.split("-")[2])
            return -vu * r if i < k else (1 - w) * vu + w * vc
        return vu + cur * (vc - vu)

    b = z.shape[0]
    for i in range(steps):
        t = torch.full((b,), t_seq[i].item())
        v = fn_v(z, t, i)
        if kind == "euler":
            z = z + dt_seq[i] * v
        else:
            z_tilde = z + dt_seq[i] * v
            v_next = fn_v(z_tilde, torch.full((b,), t_seq[i + 1].item()), i)
            z = z + 0.5 * dt_seq[i] * (v + v_next)
    return z


def _nonlinear_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A small deterministic velocity field depending on x, t and the label."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, x.shape[-1], x.shape[-1], generator=g) * 0.5
    tt = t.to(x.dtype)[:, None, None]
    return torch.tanh(torch.einsum("bnc,bcd->bnd", x, table[y])) + tt * x - 0.3


@pytest.mark.parametrize(
    "mode",
    ["constant", "late", "linear", "early-0.3", "early-0.05", "cfg_star-1-0", "cfg_star-2-1.5"],
)
@pytest.mark.parametrize("kind", ["euler", "heun"])
def test_cfg_modes_give_the_reference_samples(mode: str, kind: str) -> None:
    noise = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 3, 7])
    for w in (1.0, 3.0):
        cfg = SamplerConfig(steps=7, kind=kind, time_shift=0.15, cfg_scale=w, cfg_mode=mode)
        ours = sample(_nonlinear_model, noise, y, cfg, null_class=9)
        ref = reference_sampler(
            _nonlinear_model, noise, y, torch.full_like(y, 9), 7, w, 0.15, mode, kind
        )
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_zero_velocity_steps_skip_the_model_and_weight_one_steps_skip_the_null_pass() -> None:
    calls: list[int] = []

    def counting(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return _constant_model(x, t, y)

    x = torch.zeros(2, 4, 8)
    y = torch.tensor([0, 1])
    star = SamplerConfig(steps=4, cfg_scale=3.0, cfg_mode="cfg_star-1-0")
    assert torch.equal(guided_velocity(counting, x, 0.0, y, 9, star, step=0), torch.zeros_like(x))
    assert calls == []
    late = SamplerConfig(steps=4, cfg_scale=3.0, cfg_mode="late")
    guided_velocity(counting, x, 0.0, y, 9, late, step=0)
    guided_velocity(counting, x, 0.9, y, 9, late, step=3)
    assert calls == [2, 4]  # conditional pass alone, then both passes in one batch


def test_cfg_mode_strings() -> None:
    """The reference's strings verbatim; anything it would not parse the same way is refused."""
    for ok in ("constant", "late", "linear", "interval", "early-0.3", "early-.5", "early-1"):
        SamplerConfig(cfg_mode=ok)
    star = parse_cfg_mode("cfg_star-1-0")
    assert (star.mode.value, star.skip, star.ratio) == ("cfg_star", 1, 0.0)
    assert parse_cfg_mode("cfg_star-3-2.5").ratio == 2.5
    assert parse_cfg_mode("early-0.25").threshold == 0.25
    for bad in (
        "early",
        "early-1.5",  # t never exceeds 1
        "early--0.1",
        "cfg_star-1",
        "cfg_star-1-1e-3",  # the reference splits on '-'
        "cfg_star-x-0",
        "Constant",
        "late ",
        "",
    ):
        with pytest.raises(ConfigError, match="cfg_mode"):
            SamplerConfig(cfg_mode=bad)
