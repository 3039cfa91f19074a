"""ODE samplers for the rectified flow: Euler or Heun from t = 0 (noise) to t = 1 (data).

The time grid is t_i = f_s(i / N) with s = 0.15 by default (SVG's sampling shift), which spends
more steps near the noise end. Classifier-free guidance v = v_u + w (v_c - v_u) is applied to ALL
latent channels (DiT/SiT guide only the first 3 by an inherited accident; we do not).

CFG modes (``SamplerConfig.cfg_mode``): the reference sampler's strings, verbatim and with its
formulas (shiml20/SVG rectified_flow.py), plus our 'interval'. Step i counts from 0 of N; t is the
time of the model evaluation (Heun's corrector uses t_{i+1} and the same i):

    constant          w at every step.
    late              w where (i + 1) / N > 0.5, else 1 (plain conditional).
    linear            w_i = 1 + (w - 1) (i + 1) / N: from ~1 up to w at the last step.
    early-<x>         w where t > x, else 1 (t = 0 is noise, so this guides the steps after x).
    cfg_star-<k>-<r>  v = -r v_u for the first k steps (r = 0: zero velocity, x stays put), then
                      v = (1 - w) v_u + w v_c. The reference's FID script uses cfg_star-1-0.
    interval          w where cfg_interval[0] <= t <= cfg_interval[1], else 1.

Weight-1 steps run the conditional pass alone and zero-velocity steps run no model at all; the
result equals the reference's (which always runs both passes) up to float rounding. The
reference decides 'early' on its float32 time grid; so do we, so a threshold never flips a step.
"""

from __future__ import annotations

import enum
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from svg_ray.config import ConfigError, require
from svg_ray.flow.path import shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SamplerKind(str, enum.Enum):
    """ODE integrator."""

    EULER = "euler"
    HEUN = "heun"


class CFGMode(str, enum.Enum):
    """The guidance schedules (parametrised ones take arguments: 'early-0.3', 'cfg_star-1-0')."""

    CONSTANT = "constant"
    """w at every step."""
    INTERVAL = "interval"
    """w only while cfg_interval[0] <= t <= cfg_interval[1], plain conditional elsewhere."""
    LATE = "late"
    """w in the second half of the steps ((i + 1) / N > 0.5), plain conditional before."""
    LINEAR = "linear"
    """w_i = 1 + (w - 1) (i + 1) / N."""
    EARLY = "early"
    """'early-<x>': w where t > x, plain conditional elsewhere."""
    CFG_STAR = "cfg_star"
    """'cfg_star-<k>-<r>': v = -r v_u for the first k steps, then (1 - w) v_u + w v_c."""


CFG_MODE_FORMS = "constant, interval, late, linear, early-<x>, cfg_star-<k>-<r>"
"""The accepted cfg_mode strings, for error messages."""
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"  # no sign or exponent: the reference splits on '-'


@dataclass(frozen=True)
class CFGSchedule:
    """A parsed ``cfg_mode`` string."""

    mode: CFGMode
    """Which schedule."""
    threshold: float = 0.0
    """early-<x>: x, the time after which guidance applies."""
    skip: int = 0
    """cfg_star-<k>-<r>: k, the steps that take -r v_u."""
    ratio: float = 0.0
    """cfg_star-<k>-<r>: r."""


def parse_cfg_mode(mode: str) -> CFGSchedule:
    """Parse a cfg_mode string (the reference's spelling); ConfigError naming the forms."""
    plain = (CFGMode.CONSTANT, CFGMode.INTERVAL, CFGMode.LATE, CFGMode.LINEAR)
    if mode in {m.value for m in plain}:
        return CFGSchedule(CFGMode(mode))
    if m := re.fullmatch(r"early-" + _NUMBER, mode):
        x = float(m.group(1))
        require(0.0 <= x <= 1.0, f"sampler.cfg_mode {mode!r}: x in early-<x> must be in [0, 1]")
        return CFGSchedule(CFGMode.EARLY, threshold=x)
    if m := re.fullmatch(r"cfg_star-(\d+)-" + _NUMBER, mode):
        skip, ratio = int(m.group(1)), float(m.group(2))
        require(math.isfinite(ratio), f"sampler.cfg_mode {mode!r}: r must be finite")
        return CFGSchedule(CFGMode.CFG_STAR, skip=skip, ratio=ratio)
    raise ConfigError(f"sampler.cfg_mode must be one of {CFG_MODE_FORMS}; got {mode!r}")


@dataclass
class SamplerConfig:
    """Every sampler setting, explicit and logged (an implicit CFG mode cost one user 2x FID)."""

    steps: int = 25
    """Integration steps N."""
    kind: str = "euler"
    """'euler' or 'heun' (Heun costs two model calls per step)."""
    time_shift: float = 0.15
    """s in t_i = f_s(i/N); 1.0 gives a uniform grid."""
    cfg_scale: float = 1.0
    """Guidance weight w; 1.0 disables guidance (no unconditional pass), except in cfg_star's
    first k steps (-r v_u, or zero velocity when r = 0)."""
    cfg_mode: str = "constant"
    """How w is applied over the steps: constant, late, linear, early-<x>, cfg_star-<k>-<r> (the
    reference's strings and formulas) or interval (see the module docstring)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """[t_lo, t_hi] where guidance applies in 'interval' mode (other modes ignore it)."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"sampler.steps must be >= 1, got {self.steps}")
        require(
            self.kind in {k.value for k in SamplerKind},
            f"sampler.kind must be one of {[k.value for k in SamplerKind]}, got {self.kind!r}",
        )
        parse_cfg_mode(self.cfg_mode)
        require(self.time_shift > 0, "sampler.time_shift must be positive")
        require(self.cfg_scale >= 0, "sampler.cfg_scale must be >= 0")
        lo, hi = self.cfg_interval
        require(0.0 <= lo <= hi <= 1.0, "sampler.cfg_interval must satisfy 0 <= lo <= hi <= 1")

    @property
    def nfe(self) -> int:
        """Model evaluations per sample, before the CFG doubling."""
        return self.steps * (2 if self.kind == SamplerKind.HEUN else 1)

    @property
    def schedule(self) -> CFGSchedule:
        """The parsed cfg_mode."""
        return parse_cfg_mode(self.cfg_mode)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """N + 1 times from 0 to 1: t_i = f_s(i / N), float64 for exact endpoints."""
    base = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)
    return shift_time(base, shift)  # type: ignore[return-value]


def reference_times(steps: int, shift: float = 1.0) -> list[float]:
    """The reference's float32 grid (linspace in float32, shifted in Python floats, stored as
    float32): what its 'early' threshold compares against."""
    base = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32).tolist()
    return torch.tensor([shift_time(b, shift) for b in base], dtype=torch.float32).tolist()


Guide = tuple[Literal["cond", "cfg", "star", "uncond", "zero"], float]
"""How one model evaluation combines the passes: v_c alone, v_u + w (v_c - v_u),
(1 - w) v_u + w v_c, w * v_u, or zero velocity (no model call)."""


def step_guidance(cfg: SamplerConfig, step: int, t: float, t_ref: float | None = None) -> Guide:
    """The guidance of the evaluation at ``step`` (0-based) and time ``t``; ``t_ref`` is the
    reference's float32 time of it (default: float32(t)), used by 'early-<x>'."""
    sch = cfg.schedule
    w = cfg.cfg_scale
    n = cfg.steps
    if sch.mode == CFGMode.CFG_STAR:
        if step < sch.skip:
            return ("zero", 0.0) if sch.ratio == 0 else ("uncond", -sch.ratio)
        return ("cond", 1.0) if w == 1.0 else ("star", w)
    if sch.mode == CFGMode.LATE:
        w = w if (step + 1) / n > 0.5 else 1.0
    elif sch.mode == CFGMode.LINEAR:
        w = 1.0 + (w - 1.0) * (step + 1) / n
    elif sch.mode == CFGMode.EARLY:
        t32 = float(torch.tensor(t, dtype=torch.float32)) if t_ref is None else t_ref
        w = w if t32 > sch.threshold else 1.0
    elif sch.mode == CFGMode.INTERVAL:
        lo, hi = cfg.cfg_interval
        w = w if lo <= t <= hi else 1.0
    return ("cond", 1.0) if w == 1.0 else ("cfg", w)


def guided_velocity(
    model: VelocityFn,
    x: torch.Tensor,
    t: float,
    y: torch.Tensor,
    null_class: int,
    cfg: SamplerConfig,
    step: int = 0,
    t_ref: float | None = None,
) -> torch.Tensor:
    """v(x, t, y) with CFG over all channels; conditional and null passes share one batch."""
    form, w = step_guidance(cfg, step, t, t_ref)
    if form == "zero":
        return torch.zeros_like(x)
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    if form == "cond":
        return model(x, tt, y)
    null = torch.full_like(y, null_class)
    if form == "uncond":
        return model(x, tt, null) * w  # w = -r: the reference's -v_u * r
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
    v_c, v_u = v.chunk(2)
    if form == "star":
        return (1 - w) * v_u + w * v_c
    return v_u + w * (v_c - v_u)


@torch.no_grad()
def sample(
    model: VelocityFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    cfg: SamplerConfig,
    null_class: int,
) -> torch.Tensor:
    """Integrate dx/dt = v from x(0) = noise to t = 1; returns x(1), same shape as noise."""
    ts = time_grid(cfg.steps, cfg.time_shift).tolist()
    ts32 = reference_times(cfg.steps, cfg.time_shift)
    x = noise
    for i, (t0, t1) in enumerate(itertools.pairwise(ts)):
        dt = t1 - t0
        d0 = guided_velocity(model, x, t0, y, null_class, cfg, i, ts32[i])
        if cfg.kind == SamplerKind.HEUN:
            x_pred = x + dt * d0
            # The reference's corrector keeps the step index i but takes t_{i+1}.
            d1 = guided_velocity(model, x_pred, t1, y, null_class, cfg, i, ts32[i + 1])
            x = x + dt * 0.5 * (d0 + d1)
        else:
            x = x + dt * d0
    return x
