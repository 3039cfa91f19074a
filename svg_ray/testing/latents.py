"""A small latent dataset in the precompute job's exact on-disk format, for training tests.

Latents are class-dependent Gaussians (mean depends on the label), so a model that learns the
data lowers its loss measurably within a few dozen steps. Labels cycle through the classes, so
every shard holds every class, as the precompute job's mixed shards do; ``class_sorted`` writes
them the way an older precompute did for a class-folder tree (label runs, no label summary).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from svg_ray import storage
from svg_ray.data import schema
from svg_ray.data.latents import ChannelMoments
from svg_ray.data.manifest import DatasetManifest, ShardLabelSummary
from svg_ray.training.latent_reader import ShardFile, ShardIndex, read_row_group


def make_latent_dataset(
    root: str,
    ae_uri: str,
    rows: int = 256,
    shards: int = 4,
    shape: tuple[int, int, int] = (200, 4, 4),
    classes: int = 10,
    flip: bool = True,
    seed: int = 0,
    class_sorted: bool = False,
    row_group_rows: int | None = None,
) -> DatasetManifest:
    """Write ``shards`` Parquet files + manifest.json under ``root`` (local path or s3://)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, size=(classes, *shape)).astype(np.float32)
    labels = np.arange(rows) % classes
    if class_sorted:
        labels = np.sort(labels)
    lat = (centers[labels] + 0.3 * rng.normal(size=(rows, *shape))).astype(np.float16)
    flipped = lat[..., ::-1].copy()
    moments = ChannelMoments.of(lat.astype(np.float32))
    if flip:
        moments = moments.merge(ChannelMoments.of(flipped.astype(np.float32)))
    fs, base = storage.filesystem(root)
    rel = []
    histograms = []
    for s, idx in enumerate(np.array_split(np.arange(rows), shards)):
        ys, counts = np.unique(labels[idx], return_counts=True)
        histograms.append({int(y): int(c) for y, c in zip(ys, counts, strict=True)})
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
            pq.write_table(pa.table(cols), f, compression="none", row_group_size=row_group_rows)
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
        shuffle_seed=None if class_sorted else 0,
        shard_labels=None if class_sorted else ShardLabelSummary.of(histograms),
    )
    manifest.save(root)
    return manifest


def write_precomputed(
    root: str,
    labels: list[int],
    shape: tuple[int, int, int] = (4, 2, 2),
    flip: bool = True,
    rows_per_shard: int = 1024,
    shuffle_seed: int = 0,
    row_group_rows: int = 0,
    seed: int = 0,
) -> DatasetManifest:
    """A latent dataset written by the precompute job's own chunking, writer and manifest code
    (no images, no encoder): inputs ``<class>/<n>.jpg`` with these labels, in sorted order, as
    an ImageNet-style folder tree lists them. ``shuffle_seed`` -1 cuts the sorted list into
    consecutive chunks and drops the label summary: a dataset of an older precompute."""
    import json

    from svg_ray.data.precompute import (
        InputPlan,
        PrecomputeConfig,
        WriteChunk,
        build_manifest,
        make_chunks,
        record_name,
    )

    names = [f"c{y:04d}" for y in range(max(labels) + 1)]
    ids = [f"{names[y]}/{k:07d}.jpg" for k, y in enumerate(labels)]
    plan = InputPlan("folder", ids, list(labels), ids, names)
    cfg = PrecomputeConfig(
        input="synthetic-input",
        out=root,
        autoencoder="synthetic-ae",
        flip=flip,
        rows_per_shard=rows_per_shard,
        shuffle_seed=shuffle_seed,
    )
    chunks = make_chunks(plan, rows_per_shard, cfg.chunk_seed)
    writer = WriteChunk(root, "float16", flip, row_group_rows)
    rng = np.random.default_rng(seed)
    for c in chunks:
        y = np.asarray(c.labels, np.int64)
        lat = rng.standard_normal((len(y), *shape), dtype=np.float32)
        lat = (lat + y[:, None, None, None] % 7).astype(np.float16)
        moments = ChannelMoments.of(lat.astype(np.float32))
        batch = {
            "chunk": np.array([c.index]),
            "expected": np.array([len(c.ids)]),
            "ids": np.array([json.dumps(c.ids)]),
            "labels": y[None],
            "skipped": np.array(["[]"]),
            schema.COL_LATENT: lat[None],
            "count": np.array([moments.count]),
            "total": moments.total[None],
            "total_sq": moments.total_sq[None],
            "decode_s": np.array([0.0]),
            "encode_s": np.array([0.0]),
        }
        if flip:
            batch[schema.COL_LATENT_FLIP] = lat[..., ::-1].copy()[None]
        writer(batch)
    records = {c.index: storage.read_json(storage.join(root, record_name(c.index))) for c in chunks}
    ae_info = {
        "encoder": "vit_tiny_patch16_dinov3_qkvb",
        "encoder_sha256": "random",
        "autoencoder_id": "synthetic",
        "resolution": 64,
        "latent_shape": list(shape),
    }
    manifest = build_manifest(cfg, plan, chunks, records, ae_info)
    if cfg.chunk_seed is None:
        manifest.shard_labels = None  # what an older precompute's manifest looks like
    manifest.save(root)
    return manifest


class CountingRead:
    """The latent reader's real storage read (its ``read`` hook), recording the (file, row group)
    of every read: which row groups a reader decoded, and how often."""

    def __init__(self) -> None:
        self.units: list[tuple[str, int]] = []

    def __call__(self, fs: pafs.FileSystem, shard: ShardFile, g: int, cols: list[str]) -> pa.Table:
        """Read through ``read_row_group`` and record it."""
        self.units.append((shard.uri, g))
        return read_row_group(fs, shard, g, cols)

    def rows(self, index: ShardIndex) -> set[int]:
        """Dataset row numbers of every row decoded."""
        first = {index.units[u]: int(index.unit_first_row[u]) for u in range(len(index.units))}
        by_uri = {f.uri: k for k, f in enumerate(index.files)}
        out: set[int] = set()
        for uri, g in self.units:
            f = by_uri[uri]
            start = first[(f, g)]
            out |= set(range(start, start + index.files[f].row_groups[g]))
        return out
