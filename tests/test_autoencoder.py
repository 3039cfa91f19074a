"""The SVG autoencoder: shapes, normalisation, alignment, masking, determinism, freezing."""

from __future__ import annotations

import pytest
import torch

from svg_ray.models.autoencoder import IMAGENET_MEAN, IMAGENET_STD, SVGAutoencoder, ae_preset
from svg_ray.models.residual import DistributionAlignment, channel_stats


@pytest.fixture(scope="module")
def ae() -> SVGAutoencoder:
    torch.manual_seed(0)
    return SVGAutoencoder(ae_preset("debug"))


def test_shapes_and_dtypes(ae: SVGAutoencoder) -> None:
    ae.eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 192 + 8, 4, 4) and z.dtype == torch.float32
    assert ae.latent_shape == (200, 4, 4)
    out = ae.decode(z)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32


def test_paper_sizes() -> None:
    from svg_ray.models.autoencoder import AutoencoderConfig
    from svg_ray.models.dino import DinoConfig

    full = SVGAutoencoder(AutoencoderConfig(dino=DinoConfig(allow_random=True)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert full.latent_shape == (392, 16, 16)
    assert count(full.encoder) == pytest.approx(28.7e6, rel=0.01)  # DINOv3 ViT-S/16+
    assert count(full.extra_vit) == pytest.approx(11.2e6, rel=0.02)  # residual ViT ~11M
    assert count(full.decoder) == pytest.approx(43.1e6, rel=0.02)  # LDM decoder ~43M


def test_normalisation_happens_once_and_matches_imagenet(ae: SVGAutoencoder) -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    expected = ((x + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    assert torch.allclose(ae.normalize(x), expected, atol=1e-6)
    # DINO and the residual encoder both receive the normalised image
    seen = []
    h1 = ae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    h2 = ae.extra_vit.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    ae.eval()
    ae.encode(img)
    h1.remove()
    h2.remove()
    assert torch.allclose(seen[0], ae.normalize(img)) and torch.allclose(seen[1], seen[0])


def test_alignment_matches_dino_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    dino = torch.randn(4, 32, 16, generator=g) * 3.0 + 2.0
    res = torch.randn(4, 8, 16, generator=g) * 0.1 - 5.0
    al = DistributionAlignment("batch")
    out = al(dino, res)
    md, sd = channel_stats(dino)
    mo, so = channel_stats(out)
    assert mo.item() == pytest.approx(md.item(), abs=1e-4)
    assert so.item() == pytest.approx(sd.item(), rel=1e-4)
    # exact formula with the four scalars
    mr, sr = channel_stats(res)
    assert torch.allclose(out, (res - mr) / (sr + 1e-6) * sd + md, atol=1e-5)
    # stop-gradient on the statistics: the gradient is the plain scale factor
    r = res.clone().requires_grad_(True)
    al(dino, r).sum().backward()
    assert r.grad is not None
    assert torch.allclose(r.grad, torch.full_like(r, (sd / (sr + 1e-6)).item()), rtol=1e-5)


def test_running_statistics_track_and_freeze() -> None:
    al = DistributionAlignment("running", momentum=0.5)
    g = torch.Generator().manual_seed(0)
    dino = torch.randn(8, 16, 4, generator=g) * 2 + 1
    res = torch.randn(8, 4, 4, generator=g) * 0.5 + 3
    al.train()
    al(dino, res)
    first = al.batch_stats(dino, res)
    assert torch.allclose(al.running_stats, first)  # first batch initialises
    al(dino * 0 + 5, res)  # second batch: EMA with momentum 0.5
    second = al.batch_stats(dino * 0 + 5, res)
    assert torch.allclose(al.running_stats, 0.5 * first + 0.5 * second)
    assert int(al.num_batches_tracked) == 2
    al.eval()
    before = al.running_stats.clone()
    one = al(dino[:1], res[:1])
    assert torch.equal(al.running_stats, before)  # eval never updates
    mu_d, sd_d, mu_r, sd_r = before
    assert torch.allclose(one, (res[:1] - mu_r) / (sd_r + 1e-6) * sd_d + mu_d)


def test_eval_latent_does_not_depend_on_batch_mates(ae: SVGAutoencoder) -> None:
    ae.train()
    ae.encode(torch.rand(8, 3, 64, 64) * 2 - 1)  # populate running stats
    ae.eval()
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    alone = ae.encode(img)
    others = torch.rand(5, 3, 64, 64) * 2 - 1
    in_batch = ae.encode(torch.cat([others[:2], img, others[2:]]))[2:3]
    in_other_batch = ae.encode(torch.cat([img, -others]))[:1]
    assert torch.allclose(alone, in_batch, atol=1e-5)
    assert torch.allclose(alone, in_other_batch, atol=1e-5)
    # the reference's batch-statistic mode does depend on the batch (why we changed it)
    ae.align.mode = "batch"
    try:
        a = ae.encode(torch.cat([img, others]))[:1]
        b = ae.encode(torch.cat([img, -others * 0.1]))[:1]
        assert not torch.allclose(a[:, -8:], b[:, -8:], atol=1e-3)
    finally:
        ae.align.mode = "running"


def test_masking_replaces_whole_residual_map_in_training_only() -> None:
    torch.manual_seed(0)
    cfg = ae_preset("debug")
    cfg.residual.mask_prob = 0.5
    cfg.residual.align = "off"
    model = SVGAutoencoder(cfg)
    model.train()
    z = model.encode(torch.rand(64, 3, 64, 64) * 2 - 1)
    res = z[:, -8:].flatten(2)  # (B, 8, N)
    token = model.mask_token.detach()  # (1, 8, 1)
    masked = torch.isclose(res, token.expand_as(res)).all(dim=(1, 2))
    assert 16 <= int(masked.sum()) <= 48  # ~Binomial(64, 0.5)
    assert not torch.isclose(res[~masked], token.expand(int((~masked).sum()), 8, 16)).all()
    model.eval()
    z_eval = model.encode(torch.rand(64, 3, 64, 64) * 2 - 1)[:, -8:].flatten(2)
    assert not torch.isclose(z_eval, token.expand_as(z_eval)).all(dim=(1, 2)).any()


def test_dino_stays_frozen_through_a_training_step(ae: SVGAutoencoder) -> None:
    before = {k: v.clone() for k, v in ae.encoder.state_dict().items()}
    res_before = ae.extra_vit.heads[2].weight.clone()
    opt = torch.optim.Adam(ae.trainable_parameters(), lr=1e-2)
    ae.train()
    assert not ae.encoder.training
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    loss = (ae(x) - x).abs().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in ae.encoder.parameters())
    for k, v in ae.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(ae.extra_vit.heads[2].weight, res_before)  # the residual did train
    trainable = {id(p) for p in ae.trainable_parameters()}
    assert not any(id(p) in trainable for p in ae.encoder.parameters())
