"""Stage-1 autoencoder losses: L1 + LPIPS(VGG) + PatchGAN hinge loss with an adaptive weight.

The SVG autoencoder (arXiv 2510.15301) trains its decoder with the LDM recipe: pixel L1 + 1.0 x
LPIPS(VGG16) + a PatchGAN discriminator (3 layers, ndf 64) under a hinge loss, the GAN term scaled
by ||grad nll|| / ||grad g|| on the decoder's last layer x 0.5 (clamped at 1e4) and switched on
after 2,500 iterations. Images everywhere here are (B, 3, H, W) in [-1, 1].

Scale: the reference (LPIPSWithDiscriminatorDecoder) sums L1 + LPIPS over C x H x W per image and
divides by the batch, so its reconstruction loss is C*H*W (196,608 at 256px) times the per-element
mean. ``reduction='sum'`` (the default) computes exactly that scale, so the 1e4 clamp and Adam's
epsilon act as they do there; ``'mean'`` is the same loss divided by C*H*W, with the clamp
divided by C*H*W too (Adam's epsilon is then effectively C*H*W times larger).

Nothing is downloaded: the VGG16 trunk comes from a local path or s3:// URI; the five LPIPS linear
heads are the file the ``lpips`` package ships (its code is not used).
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from svg_ray.config import require
from svg_ray.weights import AssetError, load_state_dict, resolve_asset, sha256_file

LPIPS_VGG_OPTION = "ae.lpips_vgg_weights (--lpips-vgg-weights)"
# sha256 of lpips 0.1.4's weights/v0.1/vgg.pth (unchanged since the v0.1 release in 2018).
LPIPS_HEADS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features.
VGG_TAPS = (3, 8, 15, 22, 29)
VGG_TAP_CHANNELS = (64, 128, 256, 512, 512)
_HEAD_OF_TAP = {tap: k for k, tap in enumerate(VGG_TAPS)}


# --------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features...", CVPR)
# --------------------------------------------------------------------------------------------


def unit_normalize(feats: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each spatial feature vector to unit L2 norm over channels: (B, C, H, W) -> same."""
    # vector_norm's backward is defined as 0 where the norm is 0; sqrt(sum(x**2)) would give
    # 0/0 = NaN there, which a ReLU map that is all zero at one location can trigger.
    return feats / (torch.linalg.vector_norm(feats, dim=1, keepdim=True) + eps)


def _lpips_heads_file() -> Path:
    """Path of the v0.1 VGG linear heads shipped inside the ``lpips`` package (checksummed)."""
    try:
        root = importlib.resources.files("lpips")
    except ModuleNotFoundError as e:
        raise AssetError(
            "the LPIPS linear heads ship inside the 'lpips' package: install lpips==0.1.4"
        ) from e
    path = Path(str(root.joinpath("weights", "v0.1", "vgg.pth")))
    if not path.is_file():
        raise AssetError(f"lpips package has no v0.1 VGG heads at {path}: install lpips==0.1.4")
    got = sha256_file(path)
    if got != LPIPS_HEADS_SHA256:
        raise AssetError(
            f"LPIPS heads {path} have sha256 {got}, expected {LPIPS_HEADS_SHA256} "
            "(a different lpips release?); install lpips==0.1.4"
        )
    return path


def _lpips_heads(path: Path) -> nn.ModuleList:
    """The five 1x1 linear heads (``lin{k}.model.1.weight``), checked to be non-negative."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    heads = []
    for k, c in enumerate(VGG_TAP_CHANNELS):
        w = sd[f"lin{k}.model.1.weight"]  # (1, C_k, 1, 1)
        if w.shape != (1, c, 1, 1) or bool((w < 0).any()):
            raise AssetError(f"LPIPS head {k} in {path} is not a non-negative (1, {c}, 1, 1) conv")
        head = nn.Conv2d(c, 1, 1, bias=False)
        head.weight.data.copy_(w)
        heads.append(head)
    return nn.ModuleList(heads)


class LPIPS(nn.Module):
    """LPIPS perceptual distance with a VGG16 trunk, frozen and always in eval mode.

    Features after relu1_2 ... relu5_3 are unit-normalised over channels, their squared
    difference is weighted by a learned non-negative 1x1 conv per layer, averaged over space and
    summed over layers. Gradients flow to the input images, never to the weights.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, vgg_weights: str | None, sha256: str | None = None) -> None:
        """Load torchvision's ImageNet VGG16 state dict from ``vgg_weights`` (path or s3://)."""
        super().__init__()
        from torchvision.models import vgg16

        path = resolve_asset(vgg_weights, LPIPS_VGG_OPTION, sha256)
        # Built on the meta device: the unused 120M-parameter classifier is never allocated or
        # initialised, and every kept tensor is overwritten by the strict load below.
        with torch.device("meta"):
            features = vgg16(weights=None).features[: VGG_TAPS[-1] + 1]
        self.features = features.to_empty(device="cpu")
        self._load_vgg(path, str(vgg_weights))
        self.heads = _lpips_heads(_lpips_heads_file())
        # LPIPS v0.1's input scaling layer: [-1, 1] images to roughly ImageNet-normalised ones.
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _load_vgg(self, path: Path, uri: str) -> None:
        """Copy ``features.N.*`` from a torchvision VGG16 state dict; every trunk tensor needed."""
        try:
            sd = load_state_dict(path)
        except AssetError as e:
            raise AssetError(f"{LPIPS_VGG_OPTION}: {e}") from e
        own = self.features.state_dict()
        trunk = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
        missing = sorted(set(own) - set(trunk))
        bad_shape = sorted(k for k in own if k in trunk and trunk[k].shape != own[k].shape)
        if missing or bad_shape:
            raise AssetError(
                f"{LPIPS_VGG_OPTION}: {uri} is not torchvision's VGG16 state dict "
                f"(vgg16-397923af.pth layout): missing {['features.' + k for k in missing[:4]]}, "
                f"wrong shape {['features.' + k for k in bad_shape[:4]]}"
            )
        # The classifier.* tensors in the file are not needed; conv5_3 is the last layer used.
        self.features.load_state_dict({k: trunk[k] for k in own})

    def train(self, mode: bool = True) -> LPIPS:
        """Ignore train mode: the metric is frozen and always runs in eval mode."""
        return super().train(False)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, reduction: Literal["none", "mean"] = "none"
    ) -> torch.Tensor:
        """LPIPS distance between images (B, 3, H, W) in [-1, 1] -> (B,), or its mean."""
        B = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W): one VGG pass for both
        dist = x.new_zeros(B, dtype=torch.float32)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _HEAD_OF_TAP:
                f = unit_normalize(h)  # (2B, C, h, w)
                head: nn.Module = self.heads[_HEAD_OF_TAP[i]]
                d = head((f[:B] - f[B:]) ** 2)  # (B, 1, h, w)
                dist = dist + d.mean(dim=(1, 2, 3)).float()
        return dist.mean() if reduction == "mean" else dist


# --------------------------------------------------------------------------------------------
# PatchGAN discriminator (Isola et al. 2017, pix2pix; taming-transformers' discriminator/model.py)
# --------------------------------------------------------------------------------------------


def _init_discriminator(m: nn.Module) -> None:
    """pix2pix/DCGAN init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: a conv stack whose output logit map judges overlapping image patches.

    With 3 layers each logit sees a 70x70 patch; 256px input gives a 30x30 map, 64px a 6x6 map.
    Module names (``main.N``) match taming-transformers so its discriminator weights load as is.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        """``n_layers`` stride-2/1 conv-BN-LeakyReLU blocks after a plain stride-2 conv."""
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps resolution (pix2pix)
            layers += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),  # BN has the bias
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, H', W')."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(logits_fake), a scalar."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    scale: float = 0.5,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """scale * clamp(||d nll / d last|| / (||d g / d last|| + 1e-4), 0, max_weight), detached.

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer
    (Esser et al. 2021, taming-transformers' calculate_adaptive_weight). Both graphs are kept so
    the caller can still backpropagate the total loss.
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * scale


# --------------------------------------------------------------------------------------------
# The combined stage-1 loss
# --------------------------------------------------------------------------------------------


@dataclass
class AELossConfig:
    """Weights and switches of the stage-1 autoencoder loss (SVG / LDM recipe)."""

    l1_weight: float = 1.0
    """Weight of the pixel L1 term (mean absolute difference of [-1, 1] images)."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS(VGG16); 0 turns it off and then no VGG weights are needed."""
    lpips_vgg_weights: str | None = None
    """Local path or s3:// URI of torchvision's ImageNet VGG16 state dict (vgg16-397923af.pth)."""
    lpips_sha256: str | None = None
    """Expected sha256 of lpips_vgg_weights; verified when set."""
    gan_weight: float = 0.5
    """Scale on the adaptive GAN weight (taming's disc_weight); 0 turns the GAN off."""
    gan_start_step: int = 2501
    """First step (iteration) with the GAN terms on; earlier steps are L1 + LPIPS. The
    reference's disc_start 5001 counts Lightning optimizer steps, two per iteration (generator
    and discriminator), so its generator first sees the GAN at iteration 2501 (its discriminator
    first trains at 2500, here at 2501 too)."""
    reduction: Literal["sum", "mean"] = "sum"
    """'sum': the reference's scale, L1 + LPIPS summed over C x H x W per image and averaged over
    the batch (the 1e4 clamp and Adam's epsilon act as in the reference); 'mean': per-element
    means, the same loss / (C*H*W) with max_gan_weight / (C*H*W) as the clamp (Adam's epsilon
    then acts C*H*W times larger). Logged 'l1' and 'perceptual' are per-element means either way."""
    max_gan_weight: float = 1e4
    """Clamp of the adaptive GAN weight (before gan_weight), in the 'sum' scale (taming's 1e4)."""
    disc_layers: int = 3
    """Conv-BN-LeakyReLU blocks in the PatchGAN discriminator."""
    disc_ndf: int = 64
    """Channels of the discriminator's first conv (doubling per block, at most 8x)."""

    def __post_init__(self) -> None:
        for name in ("l1_weight", "perceptual_weight", "gan_weight"):
            require(getattr(self, name) >= 0, f"ae.{name} must be >= 0, got {getattr(self, name)}")
        require(
            self.l1_weight > 0 or self.perceptual_weight > 0,
            "ae.l1_weight and ae.perceptual_weight are both 0: no reconstruction loss to train on",
        )
        require(
            self.lpips_sha256 is None or bool(re.fullmatch(r"[0-9a-fA-F]{64}", self.lpips_sha256)),
            f"ae.lpips_sha256 must be 64 hex digits, got {self.lpips_sha256!r}",
        )
        require(self.gan_start_step >= 0, "ae.gan_start_step must be >= 0")
        require(self.reduction in ("sum", "mean"), "ae.reduction must be 'sum' or 'mean'")
        require(self.max_gan_weight > 0, "ae.max_gan_weight must be positive")
        require(self.disc_layers >= 1, "ae.disc_layers must be >= 1")
        require(self.disc_ndf >= 1, "ae.disc_ndf must be >= 1")


class AELoss(nn.Module):
    """Generator and discriminator losses for the autoencoder, alternated by the trainer.

    ``perceptual`` (LPIPS) exists only when perceptual_weight > 0 and ``discriminator`` only when
    gan_weight > 0. While ``gan_active(step)`` is False the discriminator is never run and
    ``discriminator_loss`` is a constant 0 with no graph: skip the discriminator update then. For
    data parallel training wrap the discriminator in place (``loss.discriminator = DDP(...)``);
    zero its gradients before its own backward, since the generator step also reaches it.
    """

    discriminator: nn.Module | None

    def __init__(self, cfg: AELossConfig) -> None:
        """Build LPIPS (loading its VGG16 weights) and the discriminator as ``cfg`` asks."""
        super().__init__()
        self.cfg = cfg
        self.perceptual = (
            LPIPS(cfg.lpips_vgg_weights, cfg.lpips_sha256) if cfg.perceptual_weight > 0 else None
        )
        self.discriminator = (
            NLayerDiscriminator(ndf=cfg.disc_ndf, n_layers=cfg.disc_layers)
            if cfg.gan_weight > 0
            else None
        )

    def enabled_losses(self) -> list[str]:
        """Names of the terms this loss can switch on, for the run record."""
        names = ["l1"] if self.cfg.l1_weight > 0 else []
        if self.perceptual is not None:
            names.append("lpips_vgg")
        if self.discriminator is not None:
            names.append("patchgan_hinge")
        return names

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step`` (from gan_start_step, if the GAN exists)."""
        return self.discriminator is not None and step >= self.cfg.gan_start_step

    def generator_loss(
        self, inputs: torch.Tensor, recons: torch.Tensor, step: int, last_layer: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Decoder-side loss: l1_w * L1 + p_w * LPIPS (+ adaptive weight * -mean D(recons)).

        ``last_layer`` is the decoder's final conv weight, where the GAN gradient is balanced.
        Images are (B, 3, H, W) in [-1, 1]; returns the scalar loss and float logs. With
        reduction 'sum' the reconstruction terms are C*H*W times their means (the reference's
        per-image sum, LPIPS broadcast over every pixel and channel as it does).
        """
        cfg = self.cfg
        elements = inputs[0].numel()  # C * H * W
        scale, max_weight = (
            (float(elements), cfg.max_gan_weight)
            if cfg.reduction == "sum"
            else (1.0, cfg.max_gan_weight / elements)
        )
        l1 = (inputs - recons).abs().mean()
        nll = cfg.l1_weight * l1
        terms: dict[str, torch.Tensor] = {"l1": l1}
        if self.perceptual is not None:
            p = self.perceptual(inputs, recons, reduction="mean")
            nll = nll + cfg.perceptual_weight * p
            terms["perceptual"] = p
        nll = nll * scale
        loss = nll
        gan_on = self.gan_active(step)
        if gan_on:
            assert self.discriminator is not None
            g = hinge_g_loss(self.discriminator(recons))
            if torch.is_grad_enabled():
                weight = adaptive_gan_weight(
                    nll, g, last_layer, scale=cfg.gan_weight, max_weight=max_weight
                )
            else:
                # Evaluation under no_grad: no gradients to balance, so report g but add nothing.
                weight = torch.zeros((), device=g.device)
            loss = nll + weight * g
            terms["gan_g"] = g
            terms["gan_adaptive_weight"] = weight
        terms["nll"] = nll
        terms["g_loss"] = loss
        logs = _to_floats(terms)
        logs["perceptual_on"] = float(self.perceptual is not None)
        logs["gan_on"] = float(gan_on)
        return loss, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, recons: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the discriminator on real ``inputs`` vs detached ``recons``; 0 when off."""
        if not self.gan_active(step):
            return inputs.new_zeros((), dtype=torch.float32), {"d_loss": 0.0, "d_on": 0.0}
        assert self.discriminator is not None
        # Two passes, as taming does: BatchNorm sees real and fake batches separately.
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(recons.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = _to_floats(
            {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        )
        logs["d_on"] = 1.0
        return loss, logs


def _to_floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors -> floats with one device sync instead of one per term."""
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).tolist()
    return dict(zip(terms, values, strict=True))
