"""Ray Data stages of the evaluation jobs: one row per chunk in, one row of features out.

Each stage is a stateful callable class that loads its networks once per actor and maps a chunk
row to a row of features (``dict[str, np.ndarray]`` with a leading axis of 1), so images are
made and measured on the worker and only features travel to the driver. Real images come from
the input layer's ``DecodeChunk`` stage (ADM centre crop, missing or undecodable files reported
by name; storage errors that persist fail the task).
``stream_in_order`` hands the rows to the driver in chunk order, whatever order the workers
finish in, so the float64 folds downstream give the same bits for any number of workers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from svg_ray.data import schema
from svg_ray.data.images import to_model_input
from svg_ray.data.inputs import DecodeChunk, one
from svg_ray.evaluation.stats import ImageCountError

__all__ = [
    "DecodeChunk",
    "EncodePooled",
    "GenerateFeatures",
    "ImageFeatures",
    "ReconstructFeatures",
    "generation_labels",
    "generation_spec",
    "noise_seed",
    "one",
    "stream_in_order",
]

POOL_DIM = 2048


def noise_seed(seed: int, index: int) -> int:
    """Noise seed of generated image ``index``: (seed << 32) + index, disjoint across seeds."""
    return (seed << 32) + index


def generation_labels(indices: np.ndarray, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Class of each generated image: index % classes ('cycle') or a uniform draw fixed by
    (seed, index) ('random'), the same whatever the chunking or the number of workers."""
    if mode == "cycle":
        return indices % num_classes
    # One stream per seed, read at the image indices (its own stream: the noise seeds are apart).
    draws = np.random.default_rng([seed, 0x1ABE1]).integers(0, num_classes, int(indices.max()) + 1)
    return draws[indices]


def generation_spec(chunk: int, start: int, count: int) -> str:
    """The row a generation chunk starts from: images start .. start + count - 1."""
    return json.dumps({"chunk": chunk, "start": start, "count": count})


def _setup_torch(device: str, threads: int) -> torch.device:
    """Thread count and device of a worker actor."""
    torch.set_num_threads(max(1, threads))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--gpus-per-worker > 0 but this Ray worker sees no CUDA device")
    return torch.device(device)


def _inception(uri: str, sha256: str | None, device: torch.device, batch_size: int) -> Any:
    from svg_ray.evaluation.inception import InceptionFeatures, inception_weights

    path, _ = inception_weights(uri, sha256)
    return InceptionFeatures(path, device, batch_size)


class GenerateFeatures:
    """Sample a chunk of images from a bundle and return their Inception features."""

    def __init__(
        self,
        bundle: str,
        sampler: dict[str, Any],
        inception_weights: str,
        inception_sha256: str | None,
        seed: int,
        preview: int,
        batch_size: int,
        device: str,
        threads: int,
        label_mode: str = "cycle",
    ) -> None:
        """Load the bundle (EMA DiT + autoencoder) and the Inception network once."""
        from svg_ray.checkpoint import load_bundle
        from svg_ray.config import from_dict
        from svg_ray.flow.samplers import SamplerConfig

        self.device = _setup_torch(device, threads)
        self.dit, self.ae, info = load_bundle(bundle, self.device)
        self.stats = info.latent_stats
        self.num_classes = self.dit.cfg.num_classes
        self.sampler = from_dict(SamplerConfig, sampler, "sampler")
        self.inception = _inception(inception_weights, inception_sha256, self.device, batch_size)
        self.seed = seed
        self.preview = preview
        self.batch_size = batch_size
        self.label_mode = label_mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Chunk spec -> indices (n,), pool (n, 2048), logits (n, 1008), a few preview images."""
        from svg_ray.generate import generate, to_uint8

        t0 = time.perf_counter()
        spec = json.loads(one(batch, schema.ROW_SPEC))
        indices = np.arange(spec["start"], spec["start"] + spec["count"], dtype=np.int64)
        pools, logits, shown = [], [], []
        for i in range(0, len(indices), self.batch_size):
            idx = indices[i : i + self.batch_size]
            labels = torch.as_tensor(
                generation_labels(idx, self.num_classes, self.label_mode, self.seed)
            )
            seeds = [noise_seed(self.seed, int(j)) for j in idx]
            images = generate(self.dit, self.ae, self.stats, labels, seeds, self.sampler)
            u8 = to_uint8(images)  # (B, H, W, 3): exactly what a saved PNG would hold
            pool, logit = self.inception(u8)
            pools.append(pool)
            logits.append(logit)
            shown.append(u8.numpy()[idx < self.preview])
        return {
            schema.ROW_CHUNK: np.array([spec["chunk"]], np.int64),
            "indices": indices[None],
            "pool": np.concatenate(pools)[None],
            "logits": np.concatenate(logits)[None],
            "preview": np.concatenate(shown)[None],
            "seconds": np.array([time.perf_counter() - t0]),
        }


class ImageFeatures:
    """Inception pool features of a decoded chunk of real images."""

    def __init__(
        self,
        inception_weights: str,
        inception_sha256: str | None,
        batch_size: int,
        device: str,
        threads: int,
    ) -> None:
        """Load the Inception network once."""
        self.device = _setup_torch(device, threads)
        self.inception = _inception(inception_weights, inception_sha256, self.device, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded chunk -> pool features (n, 2048); ids and skipped inputs passed through."""
        images = np.array(one(batch, schema.ROW_IMAGES))  # writable copy: Ray's views are read-only
        pool, _ = self.inception(images)
        return {
            schema.ROW_CHUNK: batch[schema.ROW_CHUNK],
            schema.ROW_EXPECTED: batch[schema.ROW_EXPECTED],
            schema.ROW_IDS: batch[schema.ROW_IDS],
            schema.ROW_SKIPPED: batch[schema.ROW_SKIPPED],
            "pool": pool[None],
        }


class ReconstructFeatures:
    """Reconstruct a decoded chunk with the autoencoder; per-image metrics + Inception features."""

    def __init__(
        self,
        autoencoder: str,
        lpips_vgg_weights: str | None,
        lpips_sha256: str | None,
        inception_weights: str,
        inception_sha256: str | None,
        preview: int,
        batch_size: int,
        device: str,
        threads: int,
    ) -> None:
        """Load the autoencoder (eval mode: deterministic latents), LPIPS and Inception once."""
        from svg_ray.checkpoint import load_autoencoder
        from svg_ray.losses import LPIPS

        self.device = _setup_torch(device, threads)
        self.ae = load_autoencoder(autoencoder, self.device)
        self.lpips = LPIPS(lpips_vgg_weights, lpips_sha256).to(self.device)
        self.inception = _inception(inception_weights, inception_sha256, self.device, batch_size)
        self.preview = preview
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded chunk -> psnr, ssim, lpips (n,), pool_real and pool_recon (n, 2048)."""
        from svg_ray.evaluation.image_metrics import psnr, ssim
        from svg_ray.generate import to_uint8

        images = np.array(one(batch, schema.ROW_IMAGES))  # (n, R, R, 3) uint8, writable
        res = self.ae.cfg.resolution
        cols: dict[str, list[np.ndarray]] = {
            "psnr": [np.zeros(0)],
            "ssim": [np.zeros(0)],
            "lpips": [np.zeros(0)],
            "pool_real": [np.zeros((0, POOL_DIM), np.float32)],
            "pool_recon": [np.zeros((0, POOL_DIM), np.float32)],
            "preview_real": [np.zeros((0, res, res, 3), np.uint8)],
            "preview_recon": [np.zeros((0, res, res, 3), np.uint8)],
        }
        # The report shows the set's first images: they are in chunk 0.
        show = self.preview if int(one(batch, schema.ROW_CHUNK)) == 0 else 0
        for i in range(0, len(images), self.batch_size):
            real = images[i : i + self.batch_size]
            x = to_model_input(real).to(self.device)  # (B, 3, R, R) in [-1, 1]
            recon = to_uint8(self.ae(x)).numpy()  # (B, R, R, 3) uint8, as it would be saved
            y = to_model_input(recon).to(self.device)
            cols["psnr"].append(psnr(real, recon))
            cols["ssim"].append(ssim(real, recon))
            cols["lpips"].append(self.lpips(x, y).double().cpu().numpy())
            cols["pool_real"].append(self.inception(real)[0])
            cols["pool_recon"].append(self.inception(recon)[0])
            cols["preview_real"].append(real[: max(0, show - i)])
            cols["preview_recon"].append(recon[: max(0, show - i)])
        out = {k: np.concatenate(v)[None] for k, v in cols.items()}
        for k in (schema.ROW_CHUNK, schema.ROW_EXPECTED, schema.ROW_IDS, schema.ROW_SKIPPED):
            out[k] = batch[k]
        return out


class EncodePooled:
    """Encode a decoded chunk and mean-pool each latent over its grid: (n, C)."""

    def __init__(self, autoencoder: str, batch_size: int, device: str, threads: int) -> None:
        """Load the autoencoder in eval mode (running alignment statistics)."""
        from svg_ray.checkpoint import load_autoencoder

        self.device = _setup_torch(device, threads)
        self.ae = load_autoencoder(autoencoder, self.device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded chunk -> pooled latents (n, C) and labels (n,)."""
        images = np.array(one(batch, schema.ROW_IMAGES))  # writable copy: Ray's views are read-only
        pooled = [np.zeros((0, self.ae.latent_channels), np.float32)]
        for i in range(0, len(images), self.batch_size):
            x = to_model_input(images[i : i + self.batch_size]).to(self.device)
            z = self.ae.encode(x)  # (B, C, h, w)
            pooled.append(z.float().mean(dim=(2, 3)).cpu().numpy())
        return {
            schema.ROW_CHUNK: batch[schema.ROW_CHUNK],
            schema.ROW_EXPECTED: batch[schema.ROW_EXPECTED],
            schema.ROW_IDS: batch[schema.ROW_IDS],
            schema.ROW_LABELS: batch[schema.ROW_LABELS],
            schema.ROW_SKIPPED: batch[schema.ROW_SKIPPED],
            "pooled": np.concatenate(pooled)[None],
        }


def stream_in_order(
    rows: Iterable[dict[str, np.ndarray]], chunks: int
) -> Iterator[dict[str, np.ndarray]]:
    """Rows (one chunk each) in chunk order 0, 1, ...; early arrivals wait in a buffer.

    Raises ImageCountError if a chunk never arrives or arrives twice.
    """
    pending: dict[int, dict[str, np.ndarray]] = {}
    nxt = 0
    for row in rows:
        c = int(one(row, schema.ROW_CHUNK))
        if c < nxt or c in pending or not 0 <= c < chunks:
            raise ImageCountError(f"chunk {c} arrived twice or is unknown ({chunks} chunks)")
        pending[c] = row
        while nxt in pending:
            yield pending.pop(nxt)
            nxt += 1
    if nxt != chunks:
        raise ImageCountError(
            f"only chunks 0..{nxt - 1} of {chunks} came back complete (chunk {nxt} is missing); "
            "a worker failed without an error: rerun the evaluation"
        )
