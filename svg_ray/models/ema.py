"""Exponential moving average of model weights (DiT keeps 0.9999, updated every step)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


class EMA(nn.Module):
    """Holds a frozen copy of ``model`` whose parameters track an exponential moving average."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied.

        One ``_foreach_lerp_`` over all parameters: a few kernel launches instead of one per
        tensor (SVG-XL has ~450), the same arithmetic as a per-tensor ``lerp_``.
        """
        ema_p, src_p = _pairs(self.model.named_parameters(), model.named_parameters())
        if ema_p:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        ema_b, src_b = _pairs(self.model.named_buffers(), model.named_buffers())
        if ema_b:
            torch._foreach_copy_(ema_b, src_b)

    def train(self, mode: bool = True) -> EMA:
        """The EMA copy always stays in eval mode."""
        return super().train(False)


def _pairs(
    ema: Iterable[tuple[str, torch.Tensor]], src: Iterable[tuple[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA tensors, source tensors) matched by name, the source in the EMA's dtype."""
    by_name = {name: t.detach() for name, t in src}
    out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for name, t in ema:
        s = by_name[name]
        out[0].append(t)
        out[1].append(s if s.dtype == t.dtype else s.to(t.dtype))
    return out
