"""Import the SVG paper's released checkpoints (github.com/shiml20/SVG) into our modules.

What the release holds, read from the reference code (never run, never copied):
- ``svg_autoencoder_dinov3s16p_vit-s_epoch40.ckpt``: a PyTorch Lightning checkpoint of
  ``DinoDecoder`` (autoencoder/ldm/models/dino_decoder.py). Its ``state_dict`` holds the frozen
  DINOv3 ViT-S/16+ under ``encoder.*`` in Meta's layout (loaded with ``torch.hub``), the residual
  ViT ``extra_vit.*`` (torchvision's VisionTransformer), ``mask_token``, the LDM decoder
  ``decoder.*``, an unused ``norm_vit`` and the training loss ``loss.*``.
- ``V1-SVG-XL-7000K-256x256.pt``: ``{"ema": state_dict}`` of ``DiT`` in models/models_SVG.py
  (train_svg.py saves only the EMA weights).

Released key -> our module:
    encoder.*    -> encoder.model.*  Meta DINOv3 names -> timm Eva names (timm's own converter)
    extra_vit.*  -> extra_vit.*      unchanged (both are torchvision's VisionTransformer)
    mask_token   -> mask_token       unchanged
    decoder.*    -> decoder.*        unchanged (LDM Decoder layout)
    DiT (ema)    -> DiT              unchanged

Nothing is dropped quietly: a released tensor is mapped, or listed in ``AE_DROPPED`` /
``DINO_DROPPED`` with its reason, or the import fails naming it; a tensor of our module comes from
the file or is listed in ``AE_GENERATED``; shapes must match our named presets. Files are read
with ``torch.load(weights_only=True)``: nothing in them can run code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from svg_ray import storage
from svg_ray.checkpoint import (
    BUNDLE_AE,
    BUNDLE_DIT,
    BUNDLE_JSON,
    BundleInfo,
    CheckpointError,
    load_strict,
    save_autoencoder,
    save_bundle,
    save_dit,
)
from svg_ray.config import require, to_dict
from svg_ray.data.latents import LatentStats
from svg_ray.flow import SamplerConfig
from svg_ray.models.autoencoder import AutoencoderConfig, SVGAutoencoder, ae_preset
from svg_ray.models.dino import FrozenDino, classify_rope_periods, is_meta_layout, to_timm_layout
from svg_ray.models.dit import DIT_SIZES, DiT, DiTConfig, dit_config
from svg_ray.weights import load_state_dict, resolve_asset, sha256_file

log = logging.getLogger(__name__)

# Released tensors deliberately not imported. A key ending in "." covers everything under it.
AE_DROPPED: dict[str, str] = {
    "norm_vit.weight": "LayerNorm(392) built by DinoDecoder.__init__ but never called",
    "norm_vit.bias": "LayerNorm(392) built by DinoDecoder.__init__ but never called",
    "loss.logvar": "training loss only: learned log-variance of the reconstruction term",
    "loss.perceptual_loss.": "training loss only: LPIPS (VGG16 and its linear heads)",
    "loss.discriminator.": "training loss only: PatchGAN discriminator",
}
DINO_DROPPED: dict[str, str] = {
    "mask_token": "DINOv3 pretraining token for masked patches; inference adds 0 * mask_token",
    "rope_embed.periods": "RoPE periods: no timm tensor; checked to be this arch's (bf16-rounded "
    "in Meta's releases) and pinned in our DINO's RoPE",
    "blocks.*.attn.qkv.bias_mask": "folded into qkv.bias (Meta's LinearKMaskedBias: bias * mask)",
    "blocks.*.attn.qkv.bias": "only for an arch without qkv bias, when the q and v parts are all "
    "zero (checked); the k part never changes attention",
}
# Our tensors the release does not have, with where their values come from.
AE_GENERATED: dict[str, str] = {
    "align.running_stats": "running alignment statistics: unused in 'batch' mode (the reference)",
    "align.num_batches_tracked": "running alignment statistics: unused in 'batch' mode",
    "img_mean": "ImageNet normalisation constant",
    "img_std": "ImageNet normalisation constant",
}
# The reference's sampling settings (sample_svg.py): 25 Euler steps, shift 0.15, constant CFG 4.
REFERENCE_SAMPLER = SamplerConfig(steps=25, kind="euler", time_shift=0.15, cfg_scale=4.0)


@dataclass
class ImportReport:
    """What one import did: provenance for the written files and the command's summary."""

    source: str
    """The released file (path or URI as given)."""
    sha256: str
    """sha256 of the released file."""
    entry: str
    """Which part of the file was read ('state_dict', 'ema', ... or '' for a bare state dict)."""
    mapped: int = 0
    """Released tensors that landed in our module."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Released key -> why it was not imported."""
    generated: dict[str, str] = field(default_factory=dict)
    """Our key -> why the release does not have it."""

    def summary(self) -> dict[str, Any]:
        """JSON-able provenance: counts per drop reason rather than every key."""
        reasons: dict[str, int] = {}
        for why in self.dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {
            "source": self.source,
            "sha256": self.sha256,
            "entry": self.entry,
            "mapped": self.mapped,
            "dropped": reasons,
            "generated": sorted(self.generated),
        }


# --------------------------------------------------------------------------------------------
# Reading released files without running pickles
# --------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True), memory-mapped when the file format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        try:
            needs = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # the listing is a courtesy; the refusal stands without it
            needs = []
        raise CheckpointError(
            f"{path} holds pickled Python objects {needs or ''} besides tensors; loading it "
            "would run code from the file, so it is refused. Re-save its weights as a plain "
            "dict of tensors (or safetensors) in an environment you trust."
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e


def read_released(
    uri: str, option: str, sha256: str | None, entries: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """The state dict under the first of ``entries`` in a released file (or the file itself when
    it is a bare state dict), with a report naming its source and sha256."""
    path = resolve_asset(uri, option, sha256)
    digest = sha256 or sha256_file(path)
    if path.suffix == ".safetensors":
        obj: Any = load_state_dict(path)
    else:
        obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri} does not hold a dict (got {type(obj).__name__})")
    entry = next((e for e in entries if isinstance(obj.get(e), dict)), "")
    if entry:
        obj = obj[entry]
    elif not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{uri} has none of the entries {list(entries)} and is not a bare state dict; "
            f"its top-level keys are {sorted(map(str, obj))[:10]}"
        )
    odd = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"{uri}: state dict entries that are not tensors: {odd[:6]}")
    return dict(obj), ImportReport(source=uri, sha256=digest, entry=entry)


# --------------------------------------------------------------------------------------------
# Shape checks against our presets
# --------------------------------------------------------------------------------------------


def _facts(
    sd: dict[str, torch.Tensor], dims: dict[str, tuple[str, int]], counts: dict[str, str]
) -> dict[str, int]:
    """Architecture numbers read off a state dict: tensor dims and numbers of repeated blocks."""
    out = {name: int(sd[k].shape[d]) for name, (k, d) in dims.items() if k in sd}
    for name, prefix in counts.items():
        n = len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})
        if n:
            out[name] = n
    return out


def _check_facts(got: dict[str, int], want: dict[str, int], what: str, hint: str) -> None:
    """Refuse a checkpoint whose architecture differs from the config's, naming the numbers."""
    bad = [f"{n} {got[n]} (expected {want[n]})" for n in want if n in got and got[n] != want[n]]
    if bad:
        raise CheckpointError(f"{what} does not have the expected shapes: {', '.join(bad)}; {hint}")


_AE_DIMS = {
    "DINO width": ("encoder.model.cls_token", -1),
    "residual width": ("extra_vit.class_token", -1),
    "residual tokens": ("extra_vit.encoder.pos_embedding", 1),
    "residual MLP": ("extra_vit.encoder.layers.encoder_layer_0.mlp.0.weight", 0),
    "residual channels": ("extra_vit.heads.2.weight", 0),
    "decoder latent channels": ("decoder.conv_in.weight", 1),
    "decoder base channels": ("decoder.conv_out.weight", 1),
}
_AE_COUNTS = {
    "DINO depth": "encoder.model.blocks.",
    "residual depth": "extra_vit.encoder.layers.encoder_layer_",
    "decoder levels": "decoder.up.",
    "decoder blocks per level": "decoder.up.0.block.",
}
_AE_FACTS = (_AE_DIMS, _AE_COUNTS)
_DIT_DIMS = {
    "width": ("ln1.weight", 0),
    "latent channels": ("ln1.weight", 1),
    "head dim": ("blocks.0.attn.q_norm.weight", 0),
    "MLP hidden": ("blocks.0.mlp.fc1.weight", 0),
    "output channels": ("final_layer.linear.weight", 0),
    "label rows": ("y_embedder.embedding_table.weight", 0),
    "tokens": ("pos_embed", 1),
}
_DIT_COUNTS = {"depth": "blocks."}
_DIT_FACTS = (_DIT_DIMS, _DIT_COUNTS)


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------


def released_autoencoder_config() -> AutoencoderConfig:
    """The release's shapes are our 'svg' preset (autoencoder/configs/
    example_svg_autoencoder_vitsp.yaml: dinov3_vits16plus, residual ViT-S out 8, decoder ch 128,
    ch_mult 1,1,2,2,4, 2 res blocks, attention at 16), with the reference's batch alignment."""
    return _for_release(ae_preset("svg"))


def _for_release(cfg: AutoencoderConfig) -> AutoencoderConfig:
    """``cfg`` with batch-statistic alignment (use_outnorm in the reference; the release has no
    running statistics) and no DINO weights file (they come with the checkpoint)."""
    if cfg.residual.align != "batch":
        log.info("residual.align %r -> 'batch' to match the released model", cfg.residual.align)
    return dataclasses.replace(
        cfg,
        residual=dataclasses.replace(cfg.residual, align="batch"),
        dino=dataclasses.replace(cfg.dino, weights=None, sha256=None, allow_random=False),
    )


def _dropped_reason(key: str, table: dict[str, str]) -> str | None:
    """Why ``key`` is deliberately not imported, or None (prefix entries end in '.')."""
    for k, why in table.items():
        if key == k or (k.endswith(".") and key.startswith(k)):
            return why
    return None


def dino_to_timm(
    meta: dict[str, torch.Tensor], model: nn.Module, fp32_periods: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta-layout DINOv3 tensors -> timm names of ``model``, plus {dropped key: reason}.

    Renaming is timm's (``checkpoint_filter_fn``), applied one key at a time so that a key it
    would silently skip is an error here instead. ``rope_embed.periods`` must be this model's
    RoPE periods, exact or bf16-rounded (Meta's buffer), against ``fp32_periods`` (default: the
    model's own, which a fresh timm model holds in fp32); the caller pins them.
    """
    meta = dict(meta)
    dropped: dict[str, str] = {}
    own = model.state_dict()
    has_qv_bias = any(k.endswith("attn.q_bias") for k in own)
    if "mask_token" in meta:
        del meta["mask_token"]
        dropped["mask_token"] = DINO_DROPPED["mask_token"]
    periods = meta.pop("rope_embed.periods", None)
    if periods is not None:
        ref = fp32_periods
        if ref is None:
            ref = getattr(getattr(model, "rope", None), "periods", None)
        if not isinstance(ref, torch.Tensor):
            raise CheckpointError(
                "DINO weights have rope_embed.periods but the configured dino.arch has no RoPE "
                "(a DINOv2 arch for DINOv3 weights?)"
            )
        try:
            classify_rope_periods(periods, ref, "DINO rope_embed.periods")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        dropped["rope_embed.periods"] = DINO_DROPPED["rope_embed.periods"]
    for k in [k for k in meta if k.endswith("attn.qkv.bias")]:
        bias = meta[k]
        mask = meta.pop(k + "_mask", None)
        if mask is not None:
            if not torch.isfinite(mask).all():
                raise CheckpointError(f"DINO {k}_mask is not initialised (NaN)")
            bias = bias * mask
            dropped[k + "_mask"] = DINO_DROPPED["blocks.*.attn.qkv.bias_mask"]
        q, kb, v = bias.chunk(3)
        # The k bias adds q.b_k to every logit of one query, which softmax ignores.
        if has_qv_bias:
            meta[k] = torch.cat([q, torch.zeros_like(kb), v])
        elif q.any() or v.any():
            raise CheckpointError(
                f"DINO {k} has non-zero q/v biases but the configured dino.arch has no qkv bias; "
                "use the '_qkvb' variant (e.g. vit_small_plus_patch16_dinov3_qkvb)"
            )
        else:
            del meta[k]
            dropped[k] = DINO_DROPPED["blocks.*.attn.qkv.bias"]
    # timm's converter only recognises Meta's layout by 'storage_tokens'; give it one each call.
    anchor = meta.get("storage_tokens", torch.zeros(1, 1, 1))
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for k, v in meta.items():
        alone = k == "storage_tokens"
        part = to_timm_layout({k: v} if alone else {"storage_tokens": anchor, k: v}, model)
        if not alone:
            part.pop("reg_token", None)
        if not part:
            unused.append(k)
        for nk, nv in part.items():
            if nk in out or (not k.endswith("qkv.bias") and nv.shape != v.shape):
                raise CheckpointError(f"DINO key {k} does not convert one-to-one (to {nk})")
            out[nk] = nv
    if unused:
        raise CheckpointError(f"DINO weights have {len(unused)} keys with no place: {unused[:6]}")
    return out, dropped


def _dino_state(
    sd: dict[str, torch.Tensor], encoder: FrozenDino
) -> tuple[dict[str, torch.Tensor], dict[str, str], torch.Tensor | None]:
    """DINO tensors in the encoder's timm names, from either layout, and the RoPE periods the
    weights carry (None when they carry none)."""
    periods = sd.get("rope_embed.periods", sd.get("rope.periods"))
    if is_meta_layout(sd):
        out, dropped = dino_to_timm(sd, encoder.model, encoder.fp32_periods)
        return out, dropped, periods
    return {k: v for k, v in sd.items() if k != "rope.periods"}, {}, periods


def autoencoder_from_state(
    released: dict[str, torch.Tensor],
    cfg: AutoencoderConfig | None = None,
    dino: dict[str, torch.Tensor] | None = None,
    what: str = "released autoencoder",
) -> tuple[SVGAutoencoder, dict[str, str]]:
    """Build our autoencoder from a released ``DinoDecoder`` state dict; returns (model in eval
    mode, {dropped released key: reason}). ``dino``: DINO weights (either layout) for a
    checkpoint without ``encoder.*``; when both exist they must be equal."""
    cfg = _for_release(cfg or released_autoencoder_config())
    ae = SVGAutoencoder(cfg, load_dino_weights=False)
    own = ae.state_dict()
    clash = sorted(set(released) & set(AE_GENERATED))
    if clash:
        raise CheckpointError(f"{what}: unexpected keys {clash} (not in the released layout)")
    mapped: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    dino_in: dict[str, torch.Tensor] = {}
    for k, v in released.items():
        why = _dropped_reason(k, AE_DROPPED)
        if why:
            dropped[k] = why
        elif k.startswith("encoder."):
            dino_in[k[len("encoder.") :]] = v
        else:
            mapped[k] = v  # extra_vit.*, mask_token, decoder.*: our names are the released ones
    if not dino_in and dino is None:
        raise CheckpointError(f"{what} has no DINO weights (encoder.*): set --dino-weights")
    # Architecture first (DINO's cls_token and blocks.i are named alike in both layouts), so a
    # checkpoint of another size fails on its numbers rather than on some tensor deep inside.
    _check_facts(
        _facts({**mapped, **{f"encoder.model.{k}": v for k, v in dino_in.items()}}, *_AE_FACTS),
        _facts(own, *_AE_FACTS),
        what,
        "it is not the architecture of the chosen autoencoder preset",
    )
    dino_sd, dino_dropped, periods = _dino_state(dino_in, ae.encoder) if dino_in else ({}, {}, None)
    dropped.update({f"encoder.{k}": why for k, why in dino_dropped.items()})
    if dino is not None:
        given, _, given_periods = _dino_state(dino, ae.encoder)
        if periods is not None and given_periods is not None:
            if not torch.equal(periods.float(), given_periods.float()):
                raise CheckpointError(
                    f"{what} holds DINO RoPE periods that differ from --dino-weights: the "
                    "autoencoder was trained with other DINO features"
                )
        periods = given_periods if given_periods is not None else periods
        if dino_sd:
            diff = sorted(
                k
                for k in set(given) | set(dino_sd)
                if k not in given or k not in dino_sd or not torch.equal(given[k], dino_sd[k])
            )
            if diff:
                raise CheckpointError(
                    f"{what} holds DINO weights that differ from --dino-weights ({diff[:4]}): "
                    "the autoencoder was trained with other DINO features"
                )
        dino_sd = given
    mapped.update({f"encoder.model.{k}": v for k, v in dino_sd.items()})
    mapped.update({k: own[k] for k in AE_GENERATED})
    load_strict(ae, mapped, what)
    if periods is not None:
        try:
            ae.encoder.use_file_periods(periods, what)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return ae.eval(), dropped


def import_autoencoder(
    uri: str,
    cfg: AutoencoderConfig | None = None,
    *,
    sha256: str | None = None,
    dino_weights: str | None = None,
    dino_sha256: str | None = None,
) -> tuple[SVGAutoencoder, ImportReport]:
    """Load the released SVG autoencoder (.ckpt, local or s3://) into our SVGAutoencoder."""
    released, report = read_released(uri, "--autoencoder", sha256, ("state_dict",))
    dino = dino_digest = None
    if dino_weights:
        dino_path = resolve_asset(dino_weights, "--dino-weights", dino_sha256)
        dino, dino_digest = load_state_dict(dino_path), dino_sha256 or sha256_file(dino_path)
    ae, report.dropped = autoencoder_from_state(released, cfg, dino, f"autoencoder {uri}")
    report.mapped = len(released) - len(report.dropped)
    report.generated = dict(AE_GENERATED)
    # Provenance of the DINO features: the file they were read from.
    ae.encoder.weights_sha256 = dino_digest or report.sha256
    return ae, report


# --------------------------------------------------------------------------------------------
# Diffusion transformer
# --------------------------------------------------------------------------------------------


def released_dit_config() -> DiTConfig:
    """SVG-XL as released (config/example_svg_xl.yaml: depth 28, width 1152, 16 heads, 392
    channels, patch 1, qk_norm, 1000 classes + null, learn_sigma)."""
    return dit_config("SVG-XL")


def dit_from_state(
    released: dict[str, torch.Tensor], cfg: DiTConfig | None = None, what: str = "released DiT"
) -> DiT:
    """Build our DiT from a released state dict (names are equal); eval mode. Under
    ``torch.device('meta')`` only names and shapes are checked."""
    cfg = cfg or released_dit_config()
    with torch.device("meta"):  # shapes only: a wrong size fails before 675M weights are made
        shapes = DiT(cfg).state_dict()
    _check_facts(
        _facts(released, *_DIT_FACTS),
        _facts(shapes, *_DIT_FACTS),
        what,
        f"pick the matching size (one of {sorted(DIT_SIZES)})",
    )
    model = DiT(cfg)
    load_strict(model, released, what)
    return model.eval()


def import_dit(
    uri: str,
    cfg: DiTConfig | None = None,
    *,
    sha256: str | None = None,
    weights: Literal["ema", "model"] = "ema",
) -> tuple[DiT, ImportReport]:
    """Load a released SVG DiT (.pt, local or s3://): its EMA weights unless ``weights='model'``."""
    released, report = read_released(uri, "--dit", sha256, (weights,))
    if not report.entry:
        log.warning("%s is a bare state dict: importing it as the %s weights", uri, weights)
    report.mapped = len(released)
    return dit_from_state(released, cfg, f"DiT {uri}"), report


# --------------------------------------------------------------------------------------------
# Bundle inputs and the import job
# --------------------------------------------------------------------------------------------


def read_latent_stats(uri: str, channels: int) -> LatentStats:
    """Per-channel latent mean/std: the reference's dinov3_sp_stats.pt (tensors
    ``dinov3_sp_mean``/``dinov3_sp_std``, shape (1, 1, C)) or our JSON ``{"mean", "std"}``."""
    path = resolve_asset(uri, "--latent-stats")
    if path.suffix == ".json":
        stats = LatentStats.from_dict(json.loads(path.read_text()))
    else:
        d = _torch_load(path)
        pairs = (("dinov3_sp_mean", "dinov3_sp_std"), ("mean", "std"))
        names = next((p for p in pairs if isinstance(d, dict) and set(p) <= set(d)), None)
        if names is None:
            raise CheckpointError(f"{uri}: expected tensors dinov3_sp_mean/dinov3_sp_std")
        stats = LatentStats(*(np.asarray(d[n].float().reshape(-1)) for n in names))
    if stats.channels != channels:
        raise CheckpointError(f"{uri} has stats for {stats.channels} channels, not {channels}")
    if not (np.isfinite(stats.std).all() and (stats.std > 0).all()):
        raise CheckpointError(f"{uri}: latent std must be finite and positive")
    return stats


def read_class_names(uri: str | None, num_classes: int) -> list[str]:
    """Class names from a JSON list or a text file (one per line); default '0'..'N-1'."""
    if not uri:
        return [str(i) for i in range(num_classes)]
    text = resolve_asset(uri, "--class-names").read_text()
    names = json.loads(text) if text.lstrip().startswith("[") else text.splitlines()
    names = [str(n).strip() for n in names if str(n).strip()]
    if len(names) != num_classes:
        raise CheckpointError(f"{uri} names {len(names)} classes; the DiT has {num_classes}")
    return names


@dataclass
class ImportConfig:
    """One import: released files in, our model files out."""

    out: str = ""
    """Output directory (local or s3://): a sampler bundle when both models are given."""
    autoencoder: str | None = None
    """Released SVG autoencoder checkpoint (.ckpt), local path or s3:// URI."""
    autoencoder_sha256: str | None = None
    """Expected sha256 of the autoencoder file; verified when set."""
    ae_preset: str = "svg"
    """Our autoencoder preset the release must match ('svg'; 'debug' for tests)."""
    dino_weights: str | None = None
    """DINOv3 weights (Meta or timm layout) for a checkpoint without encoder.*; if it has them,
    they must be equal."""
    dino_sha256: str | None = None
    """Expected sha256 of the DINO weights file."""
    dit: str | None = None
    """Released SVG diffusion transformer (.pt), local path or s3:// URI."""
    dit_sha256: str | None = None
    """Expected sha256 of the DiT file; verified when set."""
    dit_size: str = "SVG-XL"
    """Our DiT size the release must match."""
    dit_weights: Literal["ema", "model"] = "ema"
    """Which weights of the DiT file to import."""
    latent_stats: str | None = None
    """Per-channel latent mean/std for the bundle: the reference's dinov3_sp_stats.pt or JSON."""
    class_names: str | None = None
    """Class names, one per line or a JSON list (default: '0'..'N-1')."""

    def __post_init__(self) -> None:
        require(bool(self.out), "import.out: set --out to the output directory")
        require(
            bool(self.autoencoder or self.dit), "import: give --autoencoder and/or --dit to import"
        )
        require(self.ae_preset in {"svg", "debug"}, "import.ae_preset must be 'svg' or 'debug'")
        require(self.dit_size in DIT_SIZES, f"import.dit_size must be one of {sorted(DIT_SIZES)}")
        require(
            not (self.autoencoder and self.dit) or bool(self.latent_stats),
            "import: a sampler bundle needs --latent-stats (the reference's dinov3_sp_stats.pt)",
        )


def run_import(cfg: ImportConfig) -> dict[str, Any]:
    """Import what ``cfg`` names and write it under ``cfg.out``; returns a summary."""
    ae = dit = None
    source: dict[str, Any] = {"imported_from": "github.com/shiml20/SVG release"}
    if cfg.autoencoder:
        ae, rep = import_autoencoder(
            cfg.autoencoder,
            ae_preset(cfg.ae_preset),
            sha256=cfg.autoencoder_sha256,
            dino_weights=cfg.dino_weights,
            dino_sha256=cfg.dino_sha256,
        )
        source["autoencoder"] = rep.summary()
    if cfg.dit:
        # With an autoencoder the DiT must take its latents; the file's shapes are checked so.
        channels = {} if ae is None else {"in_channels": ae.latent_channels}
        dit, rep = import_dit(
            cfg.dit,
            dit_config(cfg.dit_size, **channels),
            sha256=cfg.dit_sha256,
            weights=cfg.dit_weights,
        )
        source["dit"] = rep.summary()
    written: list[str] = []
    if ae is not None and dit is not None:
        assert cfg.latent_stats is not None  # ImportConfig requires it for a bundle
        info = BundleInfo(
            latent_stats=read_latent_stats(cfg.latent_stats, dit.cfg.in_channels),
            class_names=read_class_names(cfg.class_names, dit.cfg.num_classes),
            source={**source, "latent_stats": cfg.latent_stats},
            sampler_defaults=to_dict(REFERENCE_SAMPLER),
        )
        save_bundle(cfg.out, dit, ae, info)
        written.append(storage.join(cfg.out, BUNDLE_JSON))
    elif ae is not None:
        written.append(storage.join(cfg.out, BUNDLE_AE))
        save_autoencoder(ae, written[-1], extra=source)
    elif dit is not None:
        written.append(storage.join(cfg.out, BUNDLE_DIT))
        save_dit(dit, written[-1])
    bundle = ae is not None and dit is not None
    return {"out": cfg.out, "bundle": bundle, "written": written, **source}
