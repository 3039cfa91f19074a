"""Model files: strict round trips of the autoencoder, the DiT and the sampler bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from svg_ray.checkpoint import (
    BundleInfo,
    CheckpointError,
    load_autoencoder,
    load_bundle,
    load_dit,
    save_autoencoder,
    save_bundle,
    save_dit,
)
from svg_ray.data.latents import ChannelMoments, LatentStats
from svg_ray.flow import SamplerConfig
from svg_ray.generate import generate, image_grid, initial_noise, to_uint8
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.models.dit import DiT, dit_config


def _ae() -> SVGAutoencoder:
    ae = SVGAutoencoder(ae_preset("debug"))
    ae.train()
    ae.encode(torch.rand(4, 3, 64, 64) * 2 - 1)  # non-default running stats
    return ae.eval()


def test_autoencoder_round_trip_uses_every_weight(tmp_path: Path) -> None:
    ae = _ae()
    path = str(tmp_path / "ae.safetensors")
    save_autoencoder(ae, path)
    torch.manual_seed(99)  # loading must not depend on the init it overwrites
    loaded = load_autoencoder(path)
    assert not loaded.training
    own = ae.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, own[k]), k
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(loaded.encode(x), ae.encode(x))
    assert loaded.cfg == ae.cfg


def test_strict_loading_reports_names(tmp_path: Path) -> None:
    ae = _ae()
    sd = {k: v.contiguous() for k, v in ae.state_dict().items()}
    sd.pop("mask_token")
    sd["norm_vit.weight"] = torch.ones(3)
    meta = {"format": "svg-ray-autoencoder/1", "config": __import__("json").dumps(ae.cfg.to_dict())}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st_save(sd, metadata=meta))
    with pytest.raises(CheckpointError, match=r"1 missing \['mask_token'\].*1 unexpected"):
        load_autoencoder(str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(str(tmp_path / "none.safetensors"))
    dit_file = tmp_path / "dit.safetensors"
    save_dit(DiT(dit_config("debug", in_channels=8, grid=2, num_classes=3)), str(dit_file))
    with pytest.raises(CheckpointError, match="format"):
        load_autoencoder(str(dit_file))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_autoencoder(str(tmp_path / "junk.safetensors"))


def test_bundle_round_trip_and_generation(tmp_path: Path) -> None:
    ae = _ae()
    dit = DiT(dit_config("debug", in_channels=200, grid=4, num_classes=10))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # leave adaLN-Zero so sampling is non-trivial
    z = ae.encode(torch.rand(16, 3, 64, 64) * 2 - 1)
    stats = ChannelMoments.of(z).finalize()
    uri = str(tmp_path / "bundle")
    save_bundle(uri, dit, ae, BundleInfo(stats, [str(i) for i in range(10)], step=7))
    dit2, ae2, info = load_bundle(uri)
    assert info.step == 7 and info.class_names[3] == "3"
    np.testing.assert_array_equal(info.latent_stats.mean, stats.mean)
    cfg = SamplerConfig(steps=3, cfg_scale=2.0)
    labels = torch.tensor([1, 2, 3])
    a = generate(dit, ae, stats, labels, [5, 6, 7], cfg)
    b = generate(dit2, ae2, info.latent_stats, labels, [5, 6, 7], cfg)
    assert a.shape == (3, 3, 64, 64) and torch.allclose(a, b, atol=1e-5)
    assert a.min() >= -1 and a.max() <= 1
    # an image depends on its own seed only, not on what else is in the batch
    c = generate(dit2, ae2, info.latent_stats, labels[1:2], [6], cfg)
    assert torch.allclose(c, b[1:2], atol=1e-4)
    grid = image_grid(to_uint8(a), nrow=2)
    assert grid.shape == (2 * 64 + 2, 2 * 64 + 2, 3) and grid.dtype == torch.uint8


def test_bundle_rejects_mismatched_stats(tmp_path: Path) -> None:
    dit = DiT(dit_config("debug", in_channels=200, grid=4, num_classes=10))
    bad = LatentStats(np.zeros(7), np.ones(7))
    with pytest.raises(CheckpointError, match="7 channels"):
        save_bundle(str(tmp_path / "b"), dit, _ae(), BundleInfo(bad, ["a"]))
    with pytest.raises(CheckpointError, match=r"bundle\.json missing"):
        load_bundle(str(tmp_path / "empty"))


def test_dit_round_trip(tmp_path: Path) -> None:
    dit = DiT(dit_config("debug", in_channels=8, grid=2, num_classes=3))
    save_dit(dit, str(tmp_path / "d.safetensors"))
    again = load_dit(str(tmp_path / "d.safetensors"))
    assert again.cfg == dit.cfg
    for k, v in again.state_dict().items():
        assert torch.equal(v, dit.state_dict()[k])


def test_latent_stats_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 2, 2, generator=g) * 4 + 1
    b = torch.randn(7, 3, 2, 2, generator=g) - 2
    merged = ChannelMoments.of(a).merge(ChannelMoments.of(b)).finalize()
    allz = torch.cat([a, b]).permute(1, 0, 2, 3).reshape(3, -1).double()
    np.testing.assert_allclose(merged.mean, allz.mean(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(merged.std, allz.std(1, unbiased=False).numpy(), rtol=1e-5)
    x = torch.cat([a, b])
    back = merged.denormalize(merged.normalize(x))
    assert torch.allclose(back, x, atol=1e-4)
    assert (
        merged.normalize(x)
        .permute(1, 0, 2, 3)
        .reshape(3, -1)
        .std(1, unbiased=False)
        .sub(1)
        .abs()
        .max()
        < 1e-3
    )
    with pytest.raises(ValueError, match="no latents"):
        ChannelMoments.zeros(3).finalize()


def test_initial_noise_is_per_seed() -> None:
    n = initial_noise([1, 2, 1], tokens=4, channels=3)
    assert torch.equal(n[0], n[2]) and not torch.equal(n[0], n[1])
