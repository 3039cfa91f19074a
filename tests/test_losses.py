"""Stage-1 AE losses: LPIPS against the lpips package, PatchGAN, hinge, adaptive weight, AELoss.

No real weights are needed: LPIPS runs on a randomly initialised VGG16 trunk saved in torchvision's
state-dict layout (the linear heads are the real ones shipped inside the lpips package).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import vgg16

from svg_ray.config import ConfigError, from_dict
from svg_ray.losses import (
    LPIPS,
    AELoss,
    AELossConfig,
    NLayerDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    unit_normalize,
)
from svg_ray.weights import AssetError

OPTION = "--lpips-vgg-weights"


def random_vgg_state() -> dict[str, torch.Tensor]:
    """A random VGG16 trunk in torchvision's key layout (``features.N.*`` plus a classifier key)."""
    with torch.device("meta"):  # skip allocating the 120M-parameter classifier
        features = vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1234)
    sd: dict[str, torch.Tensor] = {}
    for name, t in features.state_dict().items():
        if name.endswith("weight"):  # kaiming fan-out like torchvision, so activations stay O(1)
            fan_out = t.shape[0] * t.shape[2] * t.shape[3]
            sd[f"features.{name}"] = torch.randn(t.shape, generator=gen) * (2.0 / fan_out) ** 0.5
        else:
            sd[f"features.{name}"] = 0.05 * torch.randn(t.shape, generator=gen)
    sd["classifier.6.bias"] = torch.zeros(1000)  # the real file has a classifier; it is ignored
    return sd


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(random_vgg_state(), path)
    return path


@pytest.fixture(scope="module")
def lpips_model(vgg_file: Path) -> LPIPS:
    return LPIPS(str(vgg_file))


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1], (n, 3, size, size)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------- LPIPS


def test_lpips_identity_symmetry_and_positivity(lpips_model: LPIPS) -> None:
    x, y = images(2, seed=1), images(2, seed=2)
    assert lpips_model(x, x).abs().max().item() < 1e-6
    d_xy, d_yx = lpips_model(x, y), lpips_model(y, x)
    assert d_xy.shape == (2,)
    torch.testing.assert_close(d_xy, d_yx, rtol=0, atol=1e-6)
    assert bool((d_xy > 0).all())
    torch.testing.assert_close(lpips_model(x, y, reduction="mean"), d_xy.mean())


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's deprecated `pretrained=`
def test_lpips_matches_lpips_package(
    lpips_model: LPIPS, vgg_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lpips

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"lpips tried to download {args}")

    # pnet_rand=True builds torchvision's vgg16 without weights; prove nothing is fetched.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    # lpips splits features into slice1..5 but keeps torchvision's layer indices.
    bounds = (0, 4, 9, 16, 23, 30)
    sd = torch.load(vgg_file, weights_only=True)
    net_sd = {}
    for s in range(5):
        for i in range(bounds[s], bounds[s + 1]):
            for p in ("weight", "bias"):
                if f"features.{i}.{p}" in sd:
                    net_sd[f"slice{s + 1}.{i}.{p}"] = sd[f"features.{i}.{p}"]
    ref.net.load_state_dict(net_sd, strict=True)
    for k in range(5):
        assert torch.equal(
            lpips_model.get_parameter(f"heads.{k}.weight"), getattr(ref, f"lin{k}").model[1].weight
        )
    x, y = images(2, seed=3), images(2, seed=4)
    with torch.no_grad():
        expected = ref(x, y).flatten()  # (B,)
        got = lpips_model(x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lpips_is_frozen_but_passes_gradient_to_images(lpips_model: LPIPS) -> None:
    lpips_model.train()
    assert not lpips_model.training and not lpips_model.features.training
    assert all(not p.requires_grad for p in lpips_model.parameters())
    x = images(2, seed=5)
    y = images(2, seed=6).requires_grad_(True)
    lpips_model(x, y, reduction="mean").backward()
    assert y.grad is not None and bool(torch.isfinite(y.grad).all()) and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())


def test_unit_normalize_has_finite_gradient_at_zero_features() -> None:
    f = torch.zeros(1, 4, 2, 2)
    f[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # one location non-zero, the rest 0
    f.requires_grad_(True)
    out = unit_normalize(f)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    out.sum().backward()
    assert f.grad is not None and bool(torch.isfinite(f.grad).all())


def test_lpips_missing_or_corrupt_weights_name_the_option(vgg_file: Path, tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=OPTION):
        LPIPS(None)
    with pytest.raises(AssetError, match=OPTION):
        LPIPS(str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(AssetError, match=OPTION):
        LPIPS(str(garbage))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(AssetError, match=rf"{OPTION}.*missing \['features.0.bias'"):
        LPIPS(str(wrong))
    with pytest.raises(AssetError, match=rf"{OPTION}.*sha256 mismatch"):
        LPIPS(str(vgg_file), sha256="0" * 64)


# ---------------------------------------------------------------------------------- PatchGAN


@pytest.mark.parametrize(("size", "grid"), [(64, 6), (256, 30)])
def test_discriminator_patch_map_shape(size: int, grid: int) -> None:
    disc = NLayerDiscriminator()
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, grid, grid)


def test_discriminator_size_and_init() -> None:
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    # taming-transformers' NLayerDiscriminator(3, 64, 3) has exactly this many parameters.
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 5 and len(bns) == 3
    conv_w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(conv_w.mean().item()) < 1e-3 and abs(conv_w.std().item() - 0.02) < 1e-3
    bn_w = torch.cat([b.weight for b in bns])  # 896 values
    assert abs(bn_w.mean().item() - 1.0) < 5e-3 and abs(bn_w.std().item() - 0.02) < 5e-3
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)


def test_hinge_losses_on_known_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2]
    fake = torch.tensor([-3.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(2.0 / 3))
    # Confident, correct logits give zero discriminator loss.
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0


# ---------------------------------------------------------------------------- adaptive weight


def test_adaptive_weight_is_the_hand_computed_gradient_norm_ratio() -> None:
    lin = nn.Linear(3, 2, bias=False)
    X = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0], [0.5, -2.0, 1.0], [2.0, 1.0, -1.0]])
    v = torch.tensor([0.3, -1.2])
    out = lin(X)  # (4, 2)
    nll = (out**2).mean()  # d/dW = 2/8 * out^T X
    g = -(out @ v).mean()  # d/dW = -1/4 * v x sum_i X_i
    w = adaptive_gan_weight(nll, g, lin.weight, scale=0.5)
    grad_nll = (2.0 / 8) * out.detach().T @ X
    grad_g = -0.25 * torch.outer(v, X.sum(0))
    expected = 0.5 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    (nll + w * g).backward()  # graphs were retained for the caller's backward
    assert lin.weight.grad is not None


def test_adaptive_weight_is_clamped() -> None:
    lin = nn.Linear(3, 1, bias=False)
    out = lin(torch.ones(1, 3))
    nll, g = out.sum() * 10.0, out.sum() * 1e-12  # ratio ~ 1e5 / (tiny + 1e-4) >> 1e4
    assert adaptive_gan_weight(nll, g, lin.weight, scale=0.5).item() == pytest.approx(0.5e4)


# ------------------------------------------------------------------------------------ AELoss


class TinyDecoder(nn.Module):
    """A one-conv 'decoder' whose weight plays the decoder's last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(z)


def no_lpips_cfg(**kw: object) -> AELossConfig:
    return from_dict(AELossConfig, {"perceptual_weight": 0.0, "gan_start_step": 10, **kw})


def test_perceptual_weight_zero_needs_no_vgg_and_l1_is_summed_per_image() -> None:
    loss_fn = AELoss(no_lpips_cfg())  # no lpips_vgg_weights set: must not be needed
    assert loss_fn.perceptual is None
    assert loss_fn.enabled_losses() == ["l1", "patchgan_hinge"]
    dec = TinyDecoder()
    x = images(2)
    recons = dec(torch.randn(2, 4, 32, 32))
    loss, logs = loss_fn.generator_loss(x, recons, step=0, last_layer=dec.conv_out.weight)
    l1 = (x - recons).abs().mean()
    # The reference's scale: summed over C x H x W per image, averaged over the batch.
    torch.testing.assert_close(loss, (x - recons).abs().sum() / 2)
    assert logs["l1"] == pytest.approx(l1.item())  # logged as the per-element mean
    assert logs["perceptual_on"] == 0.0 and "perceptual" not in logs


def test_gan_term_is_exactly_off_before_the_start_step_and_on_after() -> None:
    loss_fn = AELoss(no_lpips_cfg(l1_weight=2.0))
    disc = loss_fn.discriminator
    assert disc is not None
    dec = TinyDecoder()
    x, z = images(2), torch.randn(2, 4, 32, 32)

    recons = dec(z)
    loss, logs = loss_fn.generator_loss(x, recons, step=9, last_layer=dec.conv_out.weight)
    torch.testing.assert_close(loss, 2.0 * (x - recons).abs().sum() / 2)
    assert logs["gan_on"] == 0.0 and "gan_g" not in logs
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the discriminator never ran
    d_loss, d_logs = loss_fn.discriminator_loss(x, recons, step=9)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs["d_on"] == 0.0

    recons = dec(z)
    loss, logs = loss_fn.generator_loss(x, recons, step=10, last_layer=dec.conv_out.weight)
    assert logs["gan_on"] == 1.0
    nll = 2.0 * (x - recons).abs().sum() / 2
    g = hinge_g_loss(disc(recons))  # train-mode BN: same batch, same logits
    w = adaptive_gan_weight(nll, g, dec.conv_out.weight, scale=0.5)
    torch.testing.assert_close(loss, nll + w * g)
    assert logs["gan_adaptive_weight"] == pytest.approx(w.item(), rel=1e-5)
    assert logs["gan_g"] == pytest.approx(g.item(), rel=1e-5)
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5)


def test_discriminator_loss_is_hinge_on_detached_recons() -> None:
    loss_fn = AELoss(no_lpips_cfg())
    disc = loss_fn.discriminator
    assert disc is not None
    dec = TinyDecoder()
    x = images(2)
    recons = dec(torch.randn(2, 4, 32, 32))
    d_loss, logs = loss_fn.discriminator_loss(x, recons, step=10)
    expected = hinge_d_loss(disc(x), disc(recons.detach()))
    torch.testing.assert_close(d_loss, expected)
    assert logs["d_on"] == 1.0 and logs["d_loss"] == pytest.approx(expected.item(), rel=1e-6)
    d_loss.backward()
    assert dec.conv_out.weight.grad is None  # no gradient reaches the decoder
    assert all(p.grad is not None for p in disc.parameters())


def test_gan_weight_zero_turns_the_gan_off() -> None:
    loss_fn = AELoss(no_lpips_cfg(gan_weight=0.0))
    assert loss_fn.discriminator is None and not loss_fn.gan_active(10**9)
    assert loss_fn.enabled_losses() == ["l1"]
    dec = TinyDecoder()
    x = images(2)
    recons = dec(torch.randn(2, 4, 32, 32))
    loss, logs = loss_fn.generator_loss(x, recons, step=10**6, last_layer=dec.conv_out.weight)
    torch.testing.assert_close(loss, (x - recons).abs().sum() / 2)
    assert logs["gan_on"] == 0.0
    assert loss_fn.discriminator_loss(x, recons, step=10**6)[0].item() == 0.0


def test_full_loss_with_lpips(vgg_file: Path, lpips_model: LPIPS) -> None:
    cfg = AELossConfig(lpips_vgg_weights=str(vgg_file), gan_start_step=0)
    loss_fn = AELoss(cfg)
    assert loss_fn.enabled_losses() == ["l1", "lpips_vgg", "patchgan_hinge"]
    dec = TinyDecoder()
    x = images(2)
    recons = dec(torch.randn(2, 4, 32, 32))
    loss, logs = loss_fn.generator_loss(x, recons, step=0, last_layer=dec.conv_out.weight)
    p = lpips_model(x, recons, reduction="mean")
    assert logs["perceptual"] == pytest.approx(p.item(), rel=1e-5)
    assert logs["nll"] == pytest.approx(3 * 32 * 32 * (logs["l1"] + p.item()), rel=1e-5)
    assert logs["perceptual_on"] == 1.0 and logs["gan_on"] == 1.0
    loss.backward()
    assert dec.conv_out.weight.grad is not None
    assert all(q.grad is None for q in loss_fn.perceptual.parameters())  # type: ignore[union-attr]
    # Validation under no_grad: the GAN term is reported but not added (nothing to balance).
    with torch.no_grad():
        val, vlogs = loss_fn.generator_loss(
            x, dec(torch.randn(2, 4, 32, 32)), 0, dec.conv_out.weight
        )
    assert vlogs["gan_adaptive_weight"] == 0.0 and val.item() == pytest.approx(vlogs["nll"])


class PixelDiscriminator(nn.Module):
    """A 1x1-conv 'discriminator' (logit = a . pixel): its gradient has a closed form."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.conv.weight.data.copy_(a.view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def reference_weight_by_hand(
    x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, a: torch.Tensor
) -> tuple[float, float, float]:
    """(nll, g, adaptive weight) of LPIPSWithDiscriminatorDecoder for recons = W z (1x1 conv),
    logits = a . recons, written out: nll = sum|x - Wz| / B, g = -mean(a . Wz),
    d nll / dW = -(1/B) sum sign(x - Wz) z^T, d g / dW = -(1/(B h w)) a (sum z)^T,
    weight = 0.5 clamp(|d nll| / (|d g| + 1e-4), 0, 1e4)."""
    b, _, h, wd = x.shape
    r = torch.einsum("oc,bchw->bohw", w, z)
    sign = torch.sign(x - r)
    nll = float((x - r).abs().sum() / b)
    g = float(-torch.einsum("o,bohw->", a, r) / (b * h * wd))
    grad_nll = -torch.einsum("bohw,bchw->oc", sign, z) / b
    grad_g = -torch.outer(a, z.sum(dim=(0, 2, 3))) / (b * h * wd)
    ratio = float(grad_nll.norm() / (grad_g.norm() + 1e-4))
    return nll, g, 0.5 * min(max(ratio, 0.0), 1e4)


@pytest.mark.parametrize("a_scale", [1.0, 1e-7])  # 1e-7: the 1e4 clamp binds
def test_adaptive_weight_in_the_reference_scale_by_hand(a_scale: float) -> None:
    g_ = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 8, 8, generator=g_) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g_)
    w = torch.randn(3, 4, generator=g_) * 0.3
    a = torch.tensor([0.7, -0.2, 0.4]) * a_scale
    nll, g, weight = reference_weight_by_hand(x, z, w, a)
    assert (weight == 0.5e4) == (a_scale < 1)
    losses = {}
    for reduction in ("sum", "mean"):
        loss_fn = AELoss(no_lpips_cfg(gan_start_step=0, reduction=reduction))
        loss_fn.discriminator = PixelDiscriminator(a)
        dec = nn.Conv2d(4, 3, 1, bias=False)
        dec.weight.data.copy_(w.view(3, 4, 1, 1))
        loss, logs = loss_fn.generator_loss(x, dec(z), step=0, last_layer=dec.weight)
        losses[reduction] = loss
        chw = 3 * 8 * 8
        div = 1.0 if reduction == "sum" else chw  # 'mean': the same loss / (C*H*W)
        assert logs["nll"] == pytest.approx(nll / div, rel=1e-5)
        assert logs["gan_g"] == pytest.approx(g, rel=1e-5)
        assert logs["gan_adaptive_weight"] == pytest.approx(weight / div, rel=1e-5)
        assert loss.item() == pytest.approx((nll + weight * g) / div, rel=1e-5)
    torch.testing.assert_close(losses["mean"] * 3 * 8 * 8, losses["sum"])


def test_lpips_on_without_weights_names_the_option() -> None:
    with pytest.raises(AssetError, match=OPTION):
        AELoss(AELossConfig())


@pytest.mark.parametrize(
    "bad",
    [
        {"l1_weight": -1.0},
        {"gan_weight": -0.5},
        {"l1_weight": 0.0, "perceptual_weight": 0.0},
        {"lpips_sha256": "abc"},
        {"gan_start_step": -1},
        {"reduction": "avg"},
        {"max_gan_weight": 0.0},
        {"disc_layers": 0},
        {"unknown_key": 1},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        from_dict(AELossConfig, bad)
