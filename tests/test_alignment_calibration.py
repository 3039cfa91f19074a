"""Calibrating the running alignment statistics in eval mode (no residual dropout, no mask
tokens) at the end of autoencoder training."""

from __future__ import annotations

import pytest
import torch

from svg_ray.config import ConfigError
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset, calibrate_alignment
from svg_ray.models.residual import channel_stats


def _batches(n: int, size: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 64, 64, generator=g) * 2 - 1 for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> SVGAutoencoder:
    """A debug autoencoder whose running statistics come from train-mode batches."""
    torch.manual_seed(0)
    ae = SVGAutoencoder(ae_preset("debug"))
    ae.cfg.residual.mask_prob = 0.5  # many mask tokens: train-mode statistics move visibly
    ae.train()
    with torch.no_grad():
        for x in _batches(6, seed=1):
            ae.encode(x)
    ae.cfg.residual.mask_prob = 0.1
    return ae


def test_running_statistics_become_the_pooled_eval_mode_statistics(
    trained: SVGAutoencoder,
) -> None:
    ae = trained
    before = ae.align.running_stats.tolist()
    batches = _batches(3, seed=2)
    result = calibrate_alignment(ae, batches, max_images=100)
    assert ae.training  # mode restored
    # Independently: eval-mode maps of all 12 images pooled, the reference's statistics.
    ae.eval()
    with torch.no_grad():
        x = torch.cat(batches)
        dino = ae.encoder(ae.normalize(x)).transpose(1, 2)
        res = ae.extra_vit(ae.normalize(x))
    md, sd = channel_stats(dino.double())
    mr, sr = channel_stats(res.double())
    expected = [md.item(), sd.item(), mr.item(), sr.item()]
    assert result["images"] == 12 and result["before"] == pytest.approx(before)
    assert result["after"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert ae.align.running_stats.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # Train mode (dropout, half the maps masked) left the residual statistics visibly off.
    assert max(result["relative_change"][2:]) > 0.05
    # Eval-mode latents now align with the calibrated statistics.
    with torch.no_grad():
        z = ae.encode(x).flatten(2)[:, dino.shape[1] :]
    aligned = (res - mr.float()) / (sr.float() + 1e-6) * sd.float() + md.float()
    torch.testing.assert_close(z, aligned, rtol=1e-5, atol=1e-5)
    ae.train()


def test_calibration_is_deterministic_and_stops_at_max_images(trained: SVGAutoencoder) -> None:
    batches = _batches(5, seed=3)
    torch.manual_seed(1)
    a = calibrate_alignment(trained, iter(batches), max_images=10)
    torch.manual_seed(2)  # dropout and masking would make these differ; eval mode has neither
    b = calibrate_alignment(trained, iter(batches), max_images=10)
    c = calibrate_alignment(trained, [torch.cat(batches)[:10]], max_images=10)
    assert a["images"] == b["images"] == c["images"] == 10
    assert a["after"] == b["after"]
    assert a["after"] == pytest.approx(c["after"], rel=1e-9)
    assert int(trained.align.num_batches_tracked) >= 1


def test_only_running_alignment_is_calibrated() -> None:
    cfg = ae_preset("debug")
    cfg.residual.align = "batch"
    with pytest.raises(ConfigError, match="running"):
        calibrate_alignment(SVGAutoencoder(cfg), _batches(1))
    with pytest.raises(ConfigError, match="at least 2 images"):
        calibrate_alignment(SVGAutoencoder(ae_preset("debug")), [torch.zeros(1, 3, 64, 64)])
