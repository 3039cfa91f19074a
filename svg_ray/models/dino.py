"""Frozen DINO encoder: a timm ViT that returns final-norm patch tokens, never trained.

SVG (arXiv 2510.15301, Sec. 3) uses DINOv3 ViT-S/16+ as a frozen semantic encoder. Input is the
ImageNet-normalised image at full resolution (256px, not resized to 224); output is the final-norm
patch tokens with CLS and register tokens dropped, (B, N, C).

RoPE periods (DINOv3): Meta trains the distilled DINOv3 models with bfloat16 RoPE periods and
keeps them as a persistent bfloat16 buffer, so the torch.hub model (and with it the SVG
reference and its released autoencoder) computes with bf16-rounded periods (1.3359 where the
formula gives 1.3335). timm drops that buffer and recomputes fp32 periods, which moves the
features by up to ~1.7e-3. ``FrozenDino`` pins the periods the released weights hold, whether or
not a weights file carries the buffer, and keeps them through ``.to()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from svg_ray.config import ConfigError, require
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
# DINOv3 models whose released weights keep fp32 RoPE periods (Meta trained the 7B with
# pos_embed_rope_dtype fp32); every other DINOv3 release stores them as bfloat16.
FP32_ROPE_ARCHS = frozenset({"vit_7b_patch16_dinov3"})
RopePeriods = Literal["auto", "bf16", "fp32"]


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
    rope_periods: RopePeriods = "auto"
    """DINOv3 RoPE periods: 'bf16' rounds them to bfloat16 as Meta's released weights hold them
    (what the reference computes with), 'fp32' keeps timm's exact values, 'auto' is 'fp32' for
    the 7B and 'bf16' otherwise. Under 'auto' a weights file that carries the buffer decides."""

    def __post_init__(self) -> None:
        require(bool(self.arch), "dino.arch must name an encoder, e.g. 'dinov3_vits16plus'")
        require(
            self.rope_periods in ("auto", "bf16", "fp32"),
            f"dino.rope_periods must be 'auto', 'bf16' or 'fp32', got {self.rope_periods!r}",
        )

    @property
    def timm_name(self) -> str:
        """The timm architecture name."""
        return DINO_ARCHS.get(self.arch, self.arch)

    def resolved_rope_periods(self) -> Literal["bf16", "fp32"]:
        """'bf16' or 'fp32': what 'auto' means for this architecture."""
        if self.rope_periods != "auto":
            return self.rope_periods
        return "fp32" if self.timm_name in FP32_ROPE_ARCHS else "bf16"


def bf16_rounded(periods: torch.Tensor) -> torch.Tensor:
    """fp32 periods rounded to bfloat16 and back: the values Meta's bf16 buffer holds.

    For base-100 periods every exact value lies thousands of fp32 ulps from a bf16 rounding
    boundary, so computing the power in bf16 (as Meta's init does) gives these same values.
    """
    return periods.float().to(torch.bfloat16).float()


def classify_rope_periods(
    given: torch.Tensor, fp32: torch.Tensor, source: str
) -> Literal["bf16", "fp32"]:
    """Which periods a weights file holds: exactly the bf16-rounded ones, or fp32 (rtol 1e-6).

    Anything else (another base, another head size) is a different RoPE: ConfigError naming
    ``source`` and the largest relative deviation.
    """
    got = given.detach().float().cpu().reshape(-1)
    ref = fp32.detach().float().cpu().reshape(-1)
    if got.shape == ref.shape:
        if torch.equal(got, bf16_rounded(ref)):
            return "bf16"
        if torch.allclose(got, ref, rtol=1e-6, atol=0.0):
            return "fp32"
        dev = f"max relative deviation {float(((got - ref).abs() / ref).max()):.3g}"
    else:
        dev = f"{got.numel()} values, expected {ref.numel()}"
    raise ConfigError(
        f"{source}: RoPE periods differ from the configured DINO's, in fp32 or rounded to "
        f"bfloat16 ({dev}): a different DINO architecture? check dino.arch"
    )


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
        self.model.eval()  # before the RoPE embedding is rebuilt: no train-time coordinate jitter
        rope = getattr(self.model, "rope", None)
        periods = getattr(rope, "periods", None)
        # timm's exact fp32 periods, kept to classify a file's and to rebuild the pinned ones.
        self.fp32_periods: torch.Tensor | None = (
            periods.detach().float().cpu().clone() if isinstance(periods, torch.Tensor) else None
        )
        self.rope_periods: torch.Tensor | None = None
        if self.fp32_periods is not None:
            mode = cfg.resolved_rope_periods()
            self.set_rope_periods(
                bf16_rounded(self.fp32_periods) if mode == "bf16" else self.fp32_periods
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
        # Meta's name for the buffer, or timm's if a file was saved with it; timm's converter
        # would drop it, and its values are what the reference computes with.
        file_periods = sd.pop("rope_embed.periods", None)
        if file_periods is None:
            file_periods = sd.pop("rope.periods", None)
        if is_meta_layout(sd):
            sd = to_timm_layout(sd, self.model)
        own = self.model.state_dict()
        # timm keeps the RoPE periods out of its state dict (pinned in set_rope_periods).
        needed = {k for k in own if not k.endswith("periods")}
        missing = sorted(needed - set(sd))
        unexpected = sorted(set(sd) - set(own))
        bad_shape = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
        if missing or unexpected or bad_shape:
            raise ConfigError(
                f"DINO weights {uri} do not match {self.cfg.timm_name}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                f"wrong shape {bad_shape[:5]}; check dino.arch"
            )
        self.model.load_state_dict(sd, strict=False)
        if file_periods is not None:
            self.use_file_periods(file_periods, f"DINO weights {uri}")
        self.weights_sha256 = sha256 or sha256_file(path)

    def use_file_periods(self, periods: torch.Tensor, source: str) -> None:
        """Pin the RoPE periods a weights file carries (checked to be this DINO's RoPE).

        Under ``rope_periods='auto'`` the file decides and the config records what it held, so
        a checkpoint written from this model rebuilds the same periods; an explicit setting
        that disagrees with the file is a ConfigError naming the setting.
        """
        if self.fp32_periods is None:
            raise ConfigError(f"{source} has RoPE periods but {self.cfg.timm_name} has no RoPE")
        mode = classify_rope_periods(periods, self.fp32_periods, source)
        if self.cfg.rope_periods == "auto":
            if mode != self.cfg.resolved_rope_periods():
                self.cfg.rope_periods = mode
        elif mode != self.cfg.rope_periods:
            raise ConfigError(
                f"{source} holds {mode} RoPE periods but dino.rope_periods is "
                f"{self.cfg.rope_periods!r}; set it to 'auto' or {mode!r}"
            )
        self.set_rope_periods(periods.detach().float().cpu().reshape(-1))

    def set_rope_periods(self, periods: torch.Tensor) -> None:
        """Use ``periods`` (D_head / 4 values) in timm's RoPE, cached embedding included."""
        rope = self.model.rope
        self.rope_periods = periods.detach().float().cpu().clone()
        with torch.no_grad():
            rope.periods.copy_(self.rope_periods)
            cached = getattr(rope, "pos_embed_cached", None)
            if isinstance(cached, torch.Tensor) and rope.feat_shape is not None:
                cached.copy_(rope.get_embed(shape=list(rope.feat_shape)))

    def _apply(self, fn: Any, recurse: bool = True) -> FrozenDino:
        """Module moves and casts, then re-pin the periods (timm recomputes fp32 ones on a
        cast to a low-precision dtype)."""
        super()._apply(fn, recurse)
        if getattr(self, "rope_periods", None) is not None:
            assert self.rope_periods is not None
            self.set_rope_periods(self.rope_periods)
        return self

    def train(self, mode: bool = True) -> FrozenDino:
        """Ignore train mode: the encoder is frozen and always runs in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) -> patch tokens (B, H/p * W/p, C)."""
        tokens = self.model.forward_features(x)  # (B, prefix + N, C), final norm applied
        return tokens[:, self.num_prefix_tokens :]
