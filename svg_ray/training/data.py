"""The DiT job's training data: the latent reader (``svg_ray.training.latent_reader``).

A per-worker pyarrow reader whose order is a function of (seed, epoch, rank, world) over the
shards' row groups (``svg_ray.data.order``), mixing the whole dataset every epoch, resuming at any
step by seeking to the window that holds it, and reading one latent column per sample::

    index = index_shards(manifest, root)            # footers only, once on the driver
    reader = LatentReader(index, manifest, rank=rank, world=world, batch_size=per_worker,
                          seed=cfg.seed, use_flip=cfg.use_flip, cache_mb=cfg.cache_mb)
    for batch in reader.epoch(epoch, start_step=step_in_epoch):   # LatentBatch
        z, y = batch.to(device)                     # fp16 -> fp32 on the device
    checkpoint["data_position"] = reader.position(epoch, step_in_epoch)

``shard_rows`` and ``assign_files`` balance Parquet files over ranks for the autoencoder job's
image planner.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from svg_ray import storage
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
    "LatentBatch",
    "LatentReader",
    "ShardIndex",
    "assign_files",
    "index_shards",
    "order_warning",
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
