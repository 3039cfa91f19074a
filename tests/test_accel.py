"""Training speed-ups keep the arithmetic: compiled vs eager, foreach EMA, optimiser state,
device prefetch."""

from __future__ import annotations

import copy

import pytest
import torch

from svg_ray.data.latents import latents_to_tokens
from svg_ray.flow.loss import FlowLoss
from svg_ray.models.dit import DiT, dit_config
from svg_ray.models.ema import EMA
from svg_ray.training.accel import (
    DevicePrefetcher,
    compile_blocks,
    load_optimizer_state,
    optimizer_impl,
    resolve_compile,
)
from svg_ray.training.diffusion import DiffusionParts, diffusion_step

CPU = torch.device("cpu")


def test_compile_resolves_on_for_gpus_only() -> None:
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("auto", CPU) is False
    assert resolve_compile("on", CPU) is True
    assert resolve_compile("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        resolve_compile("yes", CPU)
    assert optimizer_impl(torch.device("cuda")) == {"fused": True}
    assert optimizer_impl(CPU) == {}


def _parts(compiled: bool) -> DiffusionParts:
    torch.manual_seed(0)
    model = DiT(dit_config("debug", in_channels=8, grid=4, num_classes=10))
    with torch.no_grad():  # off DiT's zero init, so every layer carries a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(model, 0.9)
    if compiled:
        assert compile_blocks(model.blocks) == len(model.blocks)
    return DiffusionParts(model, model, ema, opt, FlowLoss(0.4), 0.0, None)


@pytest.mark.integration  # the compile runs gcc in subprocesses
def test_compiled_and_eager_steps_give_the_same_loss_and_weights() -> None:
    eager, compiled = _parts(False), _parts(True)
    start = {k: v.clone() for k, v in eager.model.state_dict().items()}
    assert list(compiled.model.state_dict()) == list(start)  # checkpoints are interchangeable
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(6, 16, 8, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        logs = []
        for parts in (eager, compiled):
            torch.manual_seed(100 + step)  # the loop's per-step seed: same t, noise, dropout
            logs.append(diffusion_step(parts, x, y))
        assert float(logs[1]["loss"]) == pytest.approx(float(logs[0]["loss"]), rel=1e-4)
        assert float(logs[1]["grad_norm"]) == pytest.approx(float(logs[0]["grad_norm"]), rel=1e-3)
    # Adam divides by sqrt(v): near-zero gradients turn rounding into lr-sized differences.
    for k, a in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], a, rtol=1e-3, atol=1e-4)
    for (k, a), b in zip(
        eager.ema.model.state_dict().items(),
        compiled.ema.model.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=k)
    # The weights moved: the comparison is not between two untouched models.
    moved = [k for k, v in eager.model.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) > len(start) // 2


def test_foreach_ema_equals_the_per_tensor_update() -> None:
    torch.manual_seed(0)
    model = DiT(dit_config("debug"))
    ema = EMA(model, 0.99)
    ref = copy.deepcopy(ema.model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        src = dict(model.named_parameters())
        for name, p in ref.named_parameters():  # the update as a loop over tensors
            p.data.lerp_(src[name].detach(), 0.01)
    n = 0
    for (name, a), b in zip(ref.named_parameters(), ema.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
        n += 1
    assert n == len(list(model.parameters())) > 20
    buffers = dict(model.named_buffers())
    for name, b in ema.model.named_buffers():
        assert torch.equal(b, buffers[name])


def test_optimizer_state_keeps_the_loading_optimizers_implementation() -> None:
    model = torch.nn.Linear(4, 3)
    saved_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    saved["param_groups"][0]["fused"] = True  # as written by a run on a GPU
    target = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=False)
    load_optimizer_state(target, saved)
    group = target.param_groups[0]
    assert group["fused"] is None and group["foreach"] is False  # its own implementation
    assert group["lr"] == 1e-3  # the checkpoint's hyperparameters
    state = target.state[model.weight]
    torch.testing.assert_close(state["exp_avg"], saved_opt.state[model.weight]["exp_avg"])
    target.step()  # and the loaded state is usable


def test_device_prefetcher_transforms_every_batch_in_order() -> None:
    batches = [
        (torch.full((2, 8, 2, 2), float(i), dtype=torch.float16), torch.tensor([i, i]))
        for i in range(5)
    ]

    def tokens(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return latents_to_tokens(z.float() * 2), y

    out = list(DevicePrefetcher(iter(batches), CPU, tokens))
    assert len(out) == 5
    for i, (x, y) in enumerate(out):
        assert x.shape == (2, 4, 8) and x.dtype == torch.float32
        assert torch.all(x == 2.0 * i) and y.tolist() == [i, i]
    assert list(DevicePrefetcher(iter([]), CPU)) == []
