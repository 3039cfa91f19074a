"""The diffusion transformer: sizes, conditioning, init, released-weight key layout; EMA."""

from __future__ import annotations

import pytest
import torch

from svg_ray.models.dit import DIT_SIZES, DiT, count_params, dit_config, sincos_pos_embed_2d
from svg_ray.models.ema import EMA


@pytest.mark.parametrize(("size", "millions"), [("SVG-B", 130), ("SVG-L", 458), ("SVG-XL", 675)])
def test_paper_parameter_counts(size: str, millions: float) -> None:
    with torch.device("meta"):
        model = DiT(dit_config(size))
    assert count_params(model) / 1e6 == pytest.approx(millions, rel=0.01)


def test_registry_has_debug_and_rejects_unknown() -> None:
    assert {"SVG-B", "SVG-L", "SVG-XL", "debug"} <= set(DIT_SIZES)
    with pytest.raises(ValueError, match="unknown DiT size"):
        dit_config("SVG-XXL")


def _small() -> DiT:
    return DiT(dit_config("debug", in_channels=24, grid=4, num_classes=10))


def test_shapes_and_zero_init() -> None:
    model = _small()
    x = torch.randn(3, 16, 24)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10 = null class
    assert out.shape == (3, 16, 24)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer starts at zero
    assert model.final_layer.linear.out_features == 48  # learn_sigma: 2x channels emitted


def test_conditioning_changes_output_after_training_steps() -> None:
    model = _small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 16, 24)
    model.train()
    for _ in range(3):  # adaLN-Zero: conditioning gets gradient once the output layer is nonzero
        opt.zero_grad()
        (model(x, torch.rand(8), torch.arange(8)) - x).pow(2).mean().backward()
        opt.step()
    model.eval()
    t = torch.full((2,), 0.5)
    a = model(x[:2], t, torch.tensor([1, 1]))
    b = model(x[:2], t, torch.tensor([2, 2]))
    c = model(x[:2], torch.full((2,), 0.9), torch.tensor([1, 1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_label_dropout_only_in_training() -> None:
    model = DiT(dit_config("debug", in_channels=8, grid=2, num_classes=10, class_dropout=0.5))
    emb = model.y_embedder
    y = torch.zeros(2000, dtype=torch.long)
    emb.train()
    dropped = (emb(y) == emb.embedding_table.weight[10]).all(dim=1).float().mean()
    assert dropped.item() == pytest.approx(0.5, abs=0.05)
    emb.eval()
    assert not (emb(y) == emb.embedding_table.weight[10]).all(dim=1).any()


def test_released_key_layout() -> None:
    keys = set(_small().state_dict())
    expected = {
        "ln1.weight",
        "pos_embed",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    assert expected <= keys


def test_pos_embed_is_fixed_2d_sincos() -> None:
    pe = sincos_pos_embed_2d(16, 4)
    assert pe.shape == (16, 16)
    # first half encodes the column (w), second half the row (h)
    assert pe[0, :8].tolist() == pytest.approx(pe[4, :8].tolist())  # same column, next row
    assert pe[0, 8:].tolist() == pytest.approx(pe[1, 8:].tolist())  # same row, next column
    model = _small()
    assert not model.pos_embed.requires_grad


def test_ema_update_rule() -> None:
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.9 * start + 0.1 * model.weight)
    assert not ema.model.weight.requires_grad
    ema.train()
    assert not ema.model.training
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)
