"""The FID Inception network: torch-fidelity's InceptionV3, weights from a path, never a hub.

torch-fidelity's ``FeatureExtractorInceptionV3`` is the TF-Inception port that published FIDs use
(TF1-compatible bilinear resize to 299, pool3 2048 features, 1008 logits). Given
``feature_extractor_weights_path`` it loads that file and downloads nothing; without it, it would
download, so this module always passes a path. The expected file is torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (95,628,359 bytes, sha256 below); any file with the
same keys and shapes loads, and results say whether the standard one was used.

torch-fidelity unpickles with ``weights_only=False``; the file is therefore first opened here
with ``weights_only=True``, which refuses any pickle that could run code, and must be a flat
dict of tensors: such a file unpickles to the same plain tensors either way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from svg_ray.weights import AssetError, cache_dir, load_state_dict, resolve_asset, sha256_file

INCEPTION_OPTION = "--inception-weights"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
"""sha256 of torch-fidelity's release file (its name carries the first 8 hex digits)."""
EXTRACTOR_NAME = "inception-v3-compat"
POOL = "2048"
"""Feature used for FID (torch-fidelity's default for 'fid')."""
LOGITS = "logits_unbiased"
"""Feature used for the Inception Score (torch-fidelity's default for 'isc')."""
POOL_DIM = 2048
LOGIT_DIM = 1008


def _extractor_class() -> Any:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        raise AssetError(
            "the FID Inception network comes from the 'torch-fidelity' package: "
            "pip install torch-fidelity==0.4.0"
        ) from e
    return FeatureExtractorInceptionV3


def inception_skeleton() -> torch.nn.Module:
    """The architecture with PyTorch's default init and no weights loaded (nothing fetched)."""
    base = _extractor_class()

    class _Skeleton(base):  # type: ignore[misc, valid-type]
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return None  # the constructor's load of the placeholder file is skipped

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        return _Skeleton(EXTRACTOR_NAME, [POOL, LOGITS], feature_extractor_weights_path=str(empty))


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in torch-fidelity's layout, for tests (He-normal convs keep the
    activations O(1) through the 90-odd layers; PyTorch's default init shrinks them to ~1e-8)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in inception_skeleton().state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = t[0].numel()
            out[name] = torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name == "fc.weight":
            out[name] = torch.randn(t.shape, generator=gen) * (1.0 / t.shape[1]) ** 0.5
        else:  # BatchNorm affine/running stats (identity) and fc bias (zero) as initialised
            out[name] = t.clone()
    return out


def _check_layout(sd: dict[str, torch.Tensor], uri: str | None) -> None:
    """Every tensor of torch-fidelity's InceptionV3, with its shape, and nothing else."""
    from svg_ray.checkpoint import state_mismatch

    mismatch = state_mismatch(inception_skeleton().state_dict(), sd)
    if mismatch:
        raise AssetError(
            f"{INCEPTION_OPTION}: {uri} is not torch-fidelity's InceptionV3 ({INCEPTION_FILE}): "
            f"{mismatch}"
        )


def inception_weights(uri: str | None, sha256: str | None = None) -> tuple[Path, str]:
    """(local .pth for torch-fidelity, sha256 of the given file) for Inception weights given by
    a path or s3:// URI: a plain state dict (.pth, read with weights_only=True) or .safetensors,
    checked against torch-fidelity's layout. A .safetensors file is converted once into the
    local asset cache (torch-fidelity reads torch files only)."""
    path = resolve_asset(uri, f"{INCEPTION_OPTION} (torch-fidelity's {INCEPTION_FILE})", sha256)
    digest = sha256_file(path)
    if path.suffix == ".safetensors":
        local = cache_dir() / "inception" / f"{digest}.pth"
        if not local.is_file():
            sd = load_state_dict(path)
            _check_layout(sd, uri)
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_suffix(f".part{os.getpid()}")
            torch.save(sd, tmp)
            os.replace(tmp, local)  # atomic: actors on one node may race to write it
        return local, digest
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # anything but plain tensors (code in the pickle included)
        raise AssetError(
            f"{INCEPTION_OPTION}: {uri} is not a plain tensor file (torch.load with "
            f"weights_only=True refused it: {e})"
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AssetError(
            f"{INCEPTION_OPTION}: {uri} must hold a flat state dict of tensors, as "
            f"{INCEPTION_FILE} does (got {type(obj).__name__})"
        )
    _check_layout(obj, uri)
    return path, digest


class InceptionFeatures:
    """uint8 images (n, H, W, 3) -> pool features (n, 2048) and logits (n, 1008), float32."""

    def __init__(self, weights: Path, device: torch.device, batch_size: int = 64) -> None:
        """Build torch-fidelity's extractor from a checked local file (see inception_weights)."""
        cls = _extractor_class()
        self.model = cls(
            EXTRACTOR_NAME, [POOL, LOGITS], feature_extractor_weights_path=str(weights)
        ).to(device)
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Features of uint8 (n, H, W, 3) images, any size (resized to 299 inside)."""
        x = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 (n, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
        pools, logits = [], []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size].to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W)
            pool, logit = self.model(batch.contiguous())
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        if not pools:
            return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, LOGIT_DIM), np.float32)
        return torch.cat(pools).numpy(), torch.cat(logits).numpy()
