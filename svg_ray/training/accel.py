"""Speed on the accelerator, outside the model files: compile, fused AdamW, device prefetch.

Model code stays single-device and eager (``models/``); the training jobs apply these:

- ``compile_blocks``: ``torch.compile`` each repeated block in place (torchtitan's per-block
  compile). One graph serves every block of a depth, the compile takes seconds rather than
  minutes, DDP still sees plain parameters, and ``state_dict`` keys do not change, so eager and
  compiled runs share checkpoints. Random draws (noise, t, label dropout) stay outside the
  compiled graphs: a compiled run consumes the RNG exactly as an eager one does.
- ``optimizer_impl``: the fused CUDA Adam kernel (one launch for every parameter) on a GPU;
  ``load_optimizer_state`` restores a checkpoint written with either implementation.
- ``DevicePrefetcher``: batches copied from pinned memory on a side stream while the current
  step runs, so the copy is off the critical path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

CompileMode = Literal["auto", "on", "off"]


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether to compile: 'auto' compiles on CUDA only (on a CPU the compile costs more than
    the steps of a short run gain), 'on' and 'off' as said."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be 'auto', 'on' or 'off', got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_blocks(blocks: Iterable[nn.Module]) -> int:
    """``torch.compile`` every module of ``blocks`` in place; returns how many.

    ``nn.Module.compile`` keeps the module (and so its parameters and ``state_dict`` keys); the
    graph is built on the first call.
    """
    n = 0
    for block in blocks:
        block.compile()
        n += 1
    return n


def optimizer_impl(device: torch.device) -> dict[str, Any]:
    """Keyword arguments choosing the Adam/AdamW implementation for ``device``: the fused kernel
    on CUDA (one launch for every parameter), torch's default elsewhere; the same update either
    way, to rounding."""
    return {"fused": True} if device.type == "cuda" else {}


_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load ``state`` into ``opt`` keeping ``opt``'s own implementation (fused or foreach).

    ``Optimizer.load_state_dict`` would adopt the implementation recorded in the checkpoint (a
    run resumed on another kind of device would then ask for a kernel it lacks); the state
    tensors are placed for the implementation in use.
    """
    groups = [
        {**saved, **{k: cur[k] for k in _IMPL_KEYS if k in cur}}
        for saved, cur in zip(state["param_groups"], opt.param_groups, strict=True)
    ]
    opt.load_state_dict({**state, "param_groups": groups})


Batch = tuple[torch.Tensor, ...]


class DevicePrefetcher:
    """Iterate ``batches`` (tuples of CPU tensors) as tuples on ``device``, transformed.

    On CUDA the next batch is pinned and copied on a side stream (``non_blocking``) while the
    caller's step runs on the default stream; ``transform`` (e.g. normalisation) runs there too,
    on the device. Elsewhere the copy and transform are done in line.
    """

    def __init__(
        self,
        batches: Iterable[Batch],
        device: torch.device,
        transform: Callable[..., Batch] | None = None,
    ) -> None:
        self.batches = batches
        self.device = device
        self.transform = transform

    def _load(self, batch: Batch) -> Batch:
        moved = tuple(t.to(self.device, non_blocking=True) for t in batch)
        return self.transform(*moved) if self.transform is not None else moved

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            for batch in self.batches:
                yield self._load(batch)
            return
        stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)

        def issue(batch: Batch) -> Batch:
            pinned = tuple(t.pin_memory() for t in batch)
            with torch.cuda.stream(stream):
                return self._load(pinned)

        it = iter(self.batches)
        ahead = next(it, None)
        nxt = issue(ahead) if ahead is not None else None
        while nxt is not None:
            main.wait_stream(stream)
            cur = nxt
            for t in cur:
                t.record_stream(main)  # the side stream's allocations now belong to the step
            ahead = next(it, None)
            nxt = issue(ahead) if ahead is not None else None
            yield cur
