"""Frozen DINO encoder: a timm ViT that returns final-norm patch tokens, never trained.

SVG (arXiv 2510.15301, Sec. 3) uses DINOv3 ViT-S/16+ as a frozen semantic encoder. Input is the
ImageNet-normalised image at full resolution (256px, not resized to 224); output is the final-norm
patch tokens with CLS and register tokens dropped, (B, N, C).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svg_ray.config import require
from svg_ray.weights import load_state_dict, resolve_asset

log = logging.getLogger(__name__)

# Short names accepted in configs -> timm architecture names.
DINO_ARCHS: dict[str, str] = {
    "dinov3_vits16": "vit_small_patch16_dinov3",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3",
    "dinov3_vitl16": "vit_large_patch16_dinov3",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    "dinov3_vittiny16_debug": "vit_tiny_patch16_dinov3_qkvb",
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
}


@dataclass
class DinoConfig:
    """Which frozen encoder to run and where its weights come from."""

    arch: str = "dinov3_vits16plus"
    """Short name (see DINO_ARCHS) or a timm architecture name."""
    weights: str | None = None
    """Local path or s3:// URI of the pretrained weights (timm or Meta key layout)."""
    sha256: str | None = None
    """Expected sha256 of the weights file; verified when set."""
    allow_random: bool = False
    """Run with random weights (tests and the demo only); logged loudly."""

    def __post_init__(self) -> None:
        require(bool(self.arch), "dino.arch must name an encoder, e.g. 'dinov3_vits16plus'")

    @property
    def timm_name(self) -> str:
        """The timm architecture name."""
        return DINO_ARCHS.get(self.arch, self.arch)


def is_meta_layout(sd: dict[str, torch.Tensor]) -> bool:
    """Meta's releases name LayerScale 'ls1.gamma' (and DINOv3 registers 'storage_tokens')."""
    return "storage_tokens" in sd or any(".ls1.gamma" in k for k in sd)


def to_timm_layout(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a Meta-layout DINO state dict to timm's names with timm's own filter functions."""
    from timm.models import eva, vision_transformer

    # timm builds DINOv3 on its Eva class and DINOv2 on VisionTransformer.
    module = eva if isinstance(model, eva.Eva) else vision_transformer
    return module.checkpoint_filter_fn(sd, model)


class FrozenDino(nn.Module):
    """A frozen timm DINO ViT returning final-norm patch tokens (B, N, C).

    ``requires_grad`` is off for every parameter and the module stays in eval mode even when its
    parent is put in train mode, so dropout/drop-path never switch on.
    """

    model: Any  # a timm VisionTransformer / Eva

    def __init__(self, cfg: DinoConfig, img_size: int = 256, load_weights: bool = True) -> None:
        """Build ``cfg.arch``; ``load_weights=False`` when the caller restores a full checkpoint."""
        super().__init__()
        import timm

        self.cfg = cfg
        # img_size explicitly: DINOv2 defaults to 518 and asserts on any other size.
        self.model = timm.create_model(
            cfg.timm_name, pretrained=False, num_classes=0, img_size=img_size
        )
        self.weights_sha256: str | None = None
        if not load_weights:
            pass  # weights arrive with the enclosing checkpoint (strictly checked there)
        elif cfg.weights:
            self.load_weights(cfg.weights, cfg.sha256)
        elif cfg.allow_random:
            log.warning(
                "FrozenDino(%s) runs with RANDOM weights (allow_random=True): features carry no "
                "semantics; use only for tests and the demo",
                cfg.timm_name,
            )
        else:
            resolve_asset(None, "dino.weights (--dino-weights)")  # raises with the option name
        self.model.requires_grad_(False)
        self.model.eval()
        self.num_prefix_tokens: int = int(getattr(self.model, "num_prefix_tokens", 1))
        self.embed_dim: int = int(self.model.embed_dim)
        patch = self.model.patch_embed.patch_size
        self.patch_size: int = int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    def load_weights(self, uri: str, sha256: str | None = None) -> None:
        """Load timm- or Meta-layout weights; every model tensor must be covered."""
        from svg_ray.weights import sha256_file

        path = resolve_asset(uri, "dino.weights (--dino-weights)", sha256)
        sd = load_state_dict(path)
        if is_meta_layout(sd):
            sd = to_timm_layout(sd, self.model)
        own = self.model.state_dict()
        # Buffers timm recomputes itself (RoPE periods) need not be in the file.
        needed = {k for k in own if not k.endswith("periods")}
        missing = sorted(needed - set(sd))
        unexpected = sorted(set(sd) - set(own))
        bad_shape = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
        if missing or unexpected or bad_shape:
            raise ValueError(
                f"DINO weights {uri} do not match {self.cfg.timm_name}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                f"wrong shape {bad_shape[:5]}; check dino.arch"
            )
        self.model.load_state_dict(sd, strict=False)
        self.weights_sha256 = sha256 or sha256_file(path)

    def train(self, mode: bool = True) -> FrozenDino:
        """Ignore train mode: the encoder is frozen and always runs in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) -> patch tokens (B, H/p * W/p, C)."""
        tokens = self.model.forward_features(x)  # (B, prefix + N, C), final norm applied
        return tokens[:, self.num_prefix_tokens :]
