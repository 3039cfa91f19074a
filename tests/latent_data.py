"""A small latent dataset in the precompute job's exact on-disk format, for training tests.

Latents are class-dependent Gaussians (mean depends on the label), so a model that learns the
data lowers its loss measurably within a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from svg_ray import storage
from svg_ray.data import schema
from svg_ray.data.manifest import DatasetManifest
from svg_ray.data.stats import ChannelMoments


def make_latent_dataset(
    root: str,
    ae_uri: str,
    rows: int = 256,
    shards: int = 4,
    shape: tuple[int, int, int] = (200, 4, 4),
    classes: int = 10,
    flip: bool = True,
    seed: int = 0,
) -> DatasetManifest:
    """Write ``shards`` Parquet files + manifest.json under ``root`` (local path or s3://)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, size=(classes, *shape)).astype(np.float32)
    labels = np.arange(rows) % classes
    lat = (centers[labels] + 0.3 * rng.normal(size=(rows, *shape))).astype(np.float16)
    flipped = lat[..., ::-1].copy()
    moments = ChannelMoments.of(lat.astype(np.float32))
    if flip:
        moments = moments.merge(ChannelMoments.of(flipped.astype(np.float32)))
    fs, base = storage.filesystem(root)
    rel = []
    for s, idx in enumerate(np.array_split(np.arange(rows), shards)):
        cols = {
            schema.COL_ID: pa.array([f"img{i:05d}" for i in idx], pa.string()),
            schema.COL_LABEL: pa.array(labels[idx], pa.int64()),
            schema.COL_LATENT: pa.FixedShapeTensorArray.from_numpy_ndarray(lat[idx]),
        }
        if flip:
            cols[schema.COL_LATENT_FLIP] = pa.FixedShapeTensorArray.from_numpy_ndarray(flipped[idx])
        name = f"{schema.SHARDS_DIR}/part-{s:06d}.parquet"
        fs.create_dir(f"{base}/{schema.SHARDS_DIR}", recursive=True)
        with fs.open_output_stream(f"{base}/{name}") as f:
            pq.write_table(pa.table(cols), f, compression="none")
        rel.append(name)
    manifest = DatasetManifest(
        encoder="vit_tiny_patch16_dinov3_qkvb",
        encoder_sha256="random",
        autoencoder_id="test",
        autoencoder_uri=ae_uri,
        resolution=64,
        dtype="float16",
        latent_shape=shape,
        num_rows=rows,
        has_flip=flip,
        class_names=[str(c) for c in range(classes)],
        latent_stats=moments.finalize(),
        source_uri="synthetic",
        shards=rel,
    )
    manifest.save(root)
    return manifest
