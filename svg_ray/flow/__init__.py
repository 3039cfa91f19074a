"""Rectified flow: the interpolation path, the training loss and the ODE samplers.

Time convention (stated once, tested in tests/test_flow.py): t = 0 is pure noise, t = 1 is data.
x_t = (1 - t) * eps + t * x, and the velocity target is v = x - eps (integrate t from 0 to 1).
"""

from svg_ray.flow.loss import FlowLoss
from svg_ray.flow.path import interpolate, shift_time, velocity_target
from svg_ray.flow.samplers import (
    CFGMode,
    SamplerConfig,
    SamplerKind,
    parse_cfg_mode,
    sample,
    time_grid,
)

__all__ = [
    "CFGMode",
    "FlowLoss",
    "SamplerConfig",
    "SamplerKind",
    "interpolate",
    "parse_cfg_mode",
    "sample",
    "shift_time",
    "time_grid",
    "velocity_target",
]
