"""The DiT job's training data: the latent reader and, until the loop moves to it, the previous
Ray Data path.

``LatentReader`` (``svg_ray.training.latent_reader``, re-exported here) is the reader to use: a
per-worker pyarrow reader whose order is a function of (seed, epoch, rank, world) over the
shards' row groups (``svg_ray.data.order``), mixing the whole dataset every epoch, resuming at
any step by seeking to the window that holds it, and reading one latent column per sample::

    index = index_shards(manifest, root)            # footers only (driver or worker)
    reader = LatentReader(index, manifest, rank=rank, world=world, batch_size=per_worker,
                          seed=cfg.seed, use_flip=cfg.use_flip, cache_mb=cfg.cache_mb)
    for batch in reader.epoch(epoch, start_step=step_in_epoch):   # LatentBatch
        z, y = batch.to(device)                     # fp16 -> fp32 on the device
    checkpoint["data_position"] = reader.position(epoch, step_in_epoch)

The functions below are the previous path (each rank's fixed set of files as a Ray Dataset
``train_<rank>``, a local shuffle buffer, replay on resume); ``assign_files`` and
``shard_rows`` also serve the autoencoder job's image planner.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from svg_ray import storage
from svg_ray.config import ConfigError
from svg_ray.data import schema
from svg_ray.data.manifest import DatasetManifest, latents_to_torch
from svg_ray.training.latent_reader import (
    LatentBatch,
    LatentReader,
    ShardIndex,
    index_shards,
    order_warning,
    read_footer,
    read_row_group,
)

__all__ = [
    "DataPlan",
    "LatentBatch",
    "LatentReader",
    "ShardIndex",
    "assign_files",
    "batch_to_tensors",
    "fits_in_memory",
    "index_shards",
    "order_warning",
    "permuted_batches",
    "plan",
    "rank_datasets",
    "read_all",
    "read_footer",
    "read_row_group",
    "shard_rows",
]


def shard_rows(uris: list[str]) -> list[int]:
    """Row count of each Parquet file, from its footer (no data read)."""
    out = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            out.append(pq.ParquetFile(f).metadata.num_rows)
    return out


def assign_files(rows: list[int], world: int) -> list[list[int]]:
    """Split file indices into ``world`` groups of near-equal row totals (deterministic)."""
    groups: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        groups[r].append(i)
        load[r] += rows[i]
    return [sorted(g) for g in groups]


@dataclass
class DataPlan:
    """Which files each rank reads and how many steps make an epoch."""

    files: list[list[str]]
    rows: list[int]
    steps_per_epoch: int


def plan(manifest: DatasetManifest, root: str, world: int, per_worker_batch: int) -> DataPlan:
    """Balance shards over ranks; fail early if any rank cannot fill one batch."""
    uris = manifest.shard_uris(root)
    if not uris:
        raise ConfigError(f"the dataset at {root} lists no shards in its manifest")
    rows = shard_rows(uris)
    groups = assign_files(rows, world)
    per_rank = [sum(rows[i] for i in g) for g in groups]
    steps = min(per_rank) // per_worker_batch
    if steps < 1:
        raise ConfigError(
            f"not enough data: {sum(rows)} rows in {len(uris)} shards give ranks {per_rank} rows, "
            f"fewer than one batch of {per_worker_batch} per worker; lower --global-batch or "
            "--num-workers, or precompute more images (or smaller shards)"
        )
    return DataPlan([[uris[i] for i in g] for g in groups], per_rank, steps)


def rank_datasets(data_plan: DataPlan, columns: list[str]) -> dict[str, Any]:
    """One Ray Dataset per rank (``train_<rank>``), columns pruned at the read."""
    import ray.data

    fs, _ = storage.filesystem(data_plan.files[0][0])
    out = {}
    for r, files in enumerate(data_plan.files):
        paths = [storage.filesystem(u)[1] for u in files]
        # select_columns is pushed down into the Parquet read (only these columns are fetched).
        out[f"train_{r}"] = ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)
    return out


def batch_to_tensors(
    batch: dict[str, np.ndarray], dtype: str, use_flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numpy batch -> (latents float32 (B, C, h, w), labels (B,)); picks the flipped latent for
    a random half of the samples when flips were precomputed (h-flip augmentation)."""
    z = latents_to_torch(batch[schema.COL_LATENT], dtype).float()
    if use_flip and schema.COL_LATENT_FLIP in batch:
        zf = latents_to_torch(batch[schema.COL_LATENT_FLIP], dtype).float()
        pick = torch.rand(z.shape[0], generator=generator) < 0.5
        z = torch.where(pick[:, None, None, None], zf, z)
    y = torch.from_numpy(np.asarray(batch[schema.COL_LABEL]).astype(np.int64))
    return z, y


def fits_in_memory(data_plan: DataPlan, bytes_per_row: float, cache_mb: int) -> bool:
    """Whether every rank's rows fit in ``cache_mb`` MiB (0 disables the cache)."""
    return cache_mb > 0 and max(data_plan.rows) * bytes_per_row <= cache_mb * 2**20


def read_all(shard: Any) -> dict[str, np.ndarray]:
    """Every row of a worker's dataset shard, in file order, as one numpy array per column."""
    parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        raise ValueError("the worker's dataset shard is empty")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def permuted_batches(
    rows: dict[str, np.ndarray], batch_size: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Full batches of a seeded permutation of ``rows`` (a function of the seed only)."""
    n = len(next(iter(rows.values())))
    perm = np.random.default_rng(seed).permutation(n)
    for i in range(n // batch_size):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        yield {k: v[idx] for k, v in rows.items()}
