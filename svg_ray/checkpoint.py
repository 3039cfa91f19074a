"""Model files: the autoencoder checkpoint and the sampler bundle, on a local path or S3.

Weights are safetensors (no pickles, so nothing from storage can execute code); configs and
provenance travel in the safetensors header and in ``bundle.json``. Loading is strict: every tensor
in the file must land in the model and every model tensor must come from the file (the reference
once silently left its residual encoder random).

Sampler bundle layout (a directory):
    bundle.json              format, configs, latent stats, class names, step, sampler defaults
    dit_ema.safetensors      EMA weights of the diffusion transformer
    autoencoder.safetensors  the full SVG autoencoder (decoder used for sampling)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from svg_ray import storage
from svg_ray.config import from_dict, to_dict
from svg_ray.data.latents import LatentStats
from svg_ray.errors import SvgRayError
from svg_ray.models.autoencoder import AutoencoderConfig, SVGAutoencoder
from svg_ray.models.dit import DiT, DiTConfig

AE_FORMAT = "svg-ray-autoencoder/1"
DIT_FORMAT = "svg-ray-dit/1"
BUNDLE_FORMAT = "svg-ray-bundle/1"

BUNDLE_JSON = "bundle.json"
"""The bundle's description, written last: a folder without it is not a bundle."""
BUNDLE_DIT = "dit_ema.safetensors"
"""The bundle's EMA diffusion transformer."""
BUNDLE_AE = "autoencoder.safetensors"
"""The bundle's autoencoder (the same file name a training run exports)."""


class CheckpointError(SvgRayError, RuntimeError):
    """A checkpoint is missing, of the wrong kind, or does not match its model."""


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte length, then a JSON header)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a module's state (safetensors refuses shared/strided storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def state_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str:
    """How ``sd`` differs from the state ``own`` (missing, unexpected and mis-shaped keys, six
    named of each), or '' when it matches key for key and shape for shape."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if not (missing or unexpected or bad):
        return ""
    return (
        f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected "
        f"{unexpected[:6]}, {len(bad)} wrong shape {bad[:6]}"
    )


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that reports missing, unexpected and mis-shaped tensors by name."""
    mismatch = state_mismatch(module.state_dict(), sd)
    if mismatch:
        raise CheckpointError(f"{what} does not match the model: {mismatch}")
    module.load_state_dict(sd, strict=True)


def _read(uri: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not storage.exists(uri):
        raise CheckpointError(f"checkpoint not found: {uri}")
    data = storage.read_bytes(uri)
    try:
        meta = _header_metadata(data)
        tensors = st_load(data)
    except Exception as e:
        raise CheckpointError(f"{uri} is not a readable safetensors file: {e}") from e
    if meta.get("format") != fmt:
        raise CheckpointError(f"{uri} has format {meta.get('format')!r}, expected {fmt!r}")
    return tensors, meta


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------


def save_autoencoder(ae: SVGAutoencoder, uri: str, extra: dict[str, Any] | None = None) -> None:
    """Write the whole autoencoder (DINO included, so the file is self-contained)."""
    meta = {
        "format": AE_FORMAT,
        "config": json.dumps(ae.cfg.to_dict()),
        "dino_weights_sha256": ae.encoder.weights_sha256 or "random",
        "latent_shape": json.dumps(list(ae.latent_shape)),
        "extra": json.dumps(extra or {}),
    }
    storage.write_bytes(uri, st_save(_state(ae), metadata=meta))


def load_autoencoder(uri: str, device: str | torch.device = "cpu") -> SVGAutoencoder:
    """Rebuild an autoencoder from its checkpoint, in eval mode."""
    tensors, meta = _read(uri, AE_FORMAT)
    cfg = AutoencoderConfig.from_dict(json.loads(meta["config"]))
    ae = SVGAutoencoder(cfg, load_dino_weights=False)
    load_strict(ae, tensors, f"autoencoder checkpoint {uri}")
    ae.encoder.weights_sha256 = meta.get("dino_weights_sha256")
    return ae.to(device).eval()


def read_metadata(uri: str) -> dict[str, str]:
    """The header metadata of a safetensors checkpoint, reading only the header bytes."""
    if not storage.exists(uri):
        raise CheckpointError(f"checkpoint not found: {uri}")
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{uri} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise CheckpointError(f"{uri} is not a safetensors file (header size {n})")
        try:
            return json.loads(f.read(n)).get("__metadata__", {}) or {}
        except ValueError as e:
            raise CheckpointError(f"{uri} is not a safetensors file: {e}") from e


def autoencoder_latent_shape(uri: str) -> tuple[int, int, int]:
    """(C, h, w) of the latents an autoencoder checkpoint produces, from its header alone."""
    meta = read_metadata(uri)
    if meta.get("format") != AE_FORMAT:
        raise CheckpointError(f"{uri} has format {meta.get('format')!r}, expected {AE_FORMAT!r}")
    if "latent_shape" in meta:
        c, h, w = json.loads(meta["latent_shape"])
        return int(c), int(h), int(w)
    return tuple(load_autoencoder(uri).latent_shape)  # type: ignore[return-value]


def autoencoder_id(uri: str) -> str:
    """A short content id of an autoencoder checkpoint (sha256 of its bytes, 16 hex)."""
    import hashlib

    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Diffusion transformer and the sampler bundle
# --------------------------------------------------------------------------------------------


def save_dit(model: DiT, uri: str) -> None:
    """Write DiT weights with their config."""
    meta = {"format": DIT_FORMAT, "config": json.dumps(to_dict(model.cfg))}
    storage.write_bytes(uri, st_save(_state(model), metadata=meta))


def load_dit(uri: str, device: str | torch.device = "cpu") -> DiT:
    """Rebuild a DiT from its weights file, in eval mode."""
    tensors, meta = _read(uri, DIT_FORMAT)
    cfg = from_dict(DiTConfig, json.loads(meta["config"]), "dit")
    model = DiT(cfg)
    load_strict(model, tensors, f"DiT checkpoint {uri}")
    return model.to(device).eval()


@dataclass
class BundleInfo:
    """What a sampler bundle holds besides weights."""

    latent_stats: LatentStats
    class_names: list[str]
    step: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    sampler_defaults: dict[str, Any] = field(default_factory=dict)


def save_bundle(uri: str, dit_ema: DiT, ae: SVGAutoencoder, info: BundleInfo) -> None:
    """Write a sampler bundle directory: EMA DiT, autoencoder and bundle.json (written last)."""
    if info.latent_stats.channels != dit_ema.cfg.in_channels:
        raise CheckpointError(
            f"latent stats have {info.latent_stats.channels} channels but the DiT takes "
            f"{dit_ema.cfg.in_channels}"
        )
    save_dit(dit_ema, storage.join(uri, BUNDLE_DIT))
    save_autoencoder(ae, storage.join(uri, BUNDLE_AE))
    storage.write_json(
        storage.join(uri, BUNDLE_JSON),
        {
            "format": BUNDLE_FORMAT,
            "dit_config": to_dict(dit_ema.cfg),
            "autoencoder_config": ae.cfg.to_dict(),
            "latent_stats": info.latent_stats.to_dict(),
            "class_names": info.class_names,
            "step": info.step,
            "source": info.source,
            "sampler_defaults": info.sampler_defaults,
        },
    )


def is_bundle(uri: str) -> bool:
    """Whether ``uri`` is a sampler bundle folder (its bundle.json exists)."""
    return storage.exists(storage.join(uri, BUNDLE_JSON))


def read_bundle_json(uri: str, option: str = "--bundle") -> dict[str, Any]:
    """A bundle's bundle.json, checked for format and for its two weight files (not read)."""
    path = storage.join(uri, BUNDLE_JSON)
    if not storage.exists(path):
        raise CheckpointError(f"{option}: no sampler bundle at {uri} ({BUNDLE_JSON} missing)")
    meta = storage.read_json(path)
    if meta.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{option}: {path} has format {meta.get('format')!r}")
    for name in (BUNDLE_DIT, BUNDLE_AE):
        if not storage.exists(storage.join(uri, name)):
            raise CheckpointError(f"{option}: {uri} lacks {name}")
    return dict(meta)


def load_bundle(
    uri: str, device: str | torch.device = "cpu"
) -> tuple[DiT, SVGAutoencoder, BundleInfo]:
    """Load (EMA DiT, autoencoder, info) from a bundle directory on a local path or S3."""
    meta = read_bundle_json(uri, "bundle")
    dit = load_dit(storage.join(uri, BUNDLE_DIT), device)
    ae = load_autoencoder(storage.join(uri, BUNDLE_AE), device)
    info = BundleInfo(
        latent_stats=LatentStats.from_dict(meta["latent_stats"]),
        class_names=list(meta["class_names"]),
        step=int(meta.get("step", 0)),
        source=dict(meta.get("source", {})),
        sampler_defaults=dict(meta.get("sampler_defaults", {})),
    )
    if ae.latent_channels != dit.cfg.in_channels:
        raise CheckpointError(
            f"bundle {uri}: autoencoder latent has {ae.latent_channels} channels, "
            f"DiT expects {dit.cfg.in_channels}"
        )
    return dit, ae, info
