"""The frozen DINO wrapper: weights from a path, both key layouts, checksums, freezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svg_ray.models.dino import DinoConfig, FrozenDino
from svg_ray.weights import AssetError, sha256_file


def timm_to_meta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a timm DINOv3 state dict in Meta's release layout (what Meta's .pth files hold)."""
    out: dict[str, torch.Tensor] = {}
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            v_bias = sd[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * v.numel())
            continue
        if k.endswith("attn.v_bias"):
            continue
        nk = k.replace("reg_token", "storage_tokens")
        nk = nk.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if swiglu:
            nk = nk.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
            nk = nk.replace("mlp.fc2.", "mlp.w3.")
        out[nk] = v
    out["rope_embed.periods"] = torch.ones(8)  # recomputed by timm
    out["mask_token"] = torch.zeros(1, next(iter(sd.values())).shape[-1])
    return out


def _reference(arch: str, img: int) -> FrozenDino:
    return FrozenDino(DinoConfig(arch=arch, allow_random=True), img_size=img)


@pytest.mark.parametrize("arch", ["dinov3_vittiny16_debug", "dinov3_vits16plus"])
def test_loads_timm_and_meta_layouts(tmp_path: Path, arch: str) -> None:
    ref = _reference(arch, 32)
    sd = ref.model.state_dict()
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(timm_file))
    meta_file = tmp_path / "meta.pth"
    meta_sd = timm_to_meta(sd)
    assert "storage_tokens" in meta_sd and "reg_token" not in meta_sd
    torch.save(meta_sd, meta_file)
    x = torch.randn(2, 3, 32, 32)
    expected = ref(x)
    for f in (timm_file, meta_file):
        torch.manual_seed(123)  # a different random init, overwritten by the weights
        enc = FrozenDino(DinoConfig(arch=arch, weights=str(f)), img_size=32)
        assert enc.weights_sha256 == sha256_file(f)
        assert torch.allclose(enc(x), expected, atol=1e-5), f.name


def test_output_is_patch_tokens_without_prefix() -> None:
    enc = _reference("dinov3_vittiny16_debug", 64)
    out = enc(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 16, 192)  # 4x4 patches, CLS and 4 registers dropped
    full = enc.model.forward_features(torch.zeros(1, 3, 64, 64))
    assert full.shape[1] == 16 + 5


def test_checksum_and_missing_file_errors(tmp_path: Path) -> None:
    ref = _reference("dinov3_vittiny16_debug", 32)
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(f))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        FrozenDino(DinoConfig(arch="dinov3_vittiny16_debug", weights=str(f), sha256="0" * 64), 32)
    good = sha256_file(f)
    FrozenDino(DinoConfig(arch="dinov3_vittiny16_debug", weights=str(f), sha256=good), 32)
    with pytest.raises(AssetError, match=r"dino\.weights.*not found"):
        FrozenDino(DinoConfig(arch="dinov3_vittiny16_debug", weights=str(tmp_path / "nope.pth")))
    with pytest.raises(AssetError, match=r"dino\.weights"):
        FrozenDino(DinoConfig(arch="dinov3_vittiny16_debug"))  # no weights, random not allowed


def test_wrong_architecture_is_rejected(tmp_path: Path) -> None:
    ref = _reference("dinov3_vittiny16_debug", 32)
    f = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(f))
    with pytest.raises(ValueError, match="do not match"):
        FrozenDino(DinoConfig(arch="dinov3_vits16", weights=str(f)), 32)


def test_stays_frozen_and_in_eval_mode() -> None:
    enc = _reference("dinov3_vittiny16_debug", 32)
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
