"""Streaming images into the autoencoder job: per-rank file lists, Ray Data decoding, batches.

Each rank reads its own fixed list of inputs as a Ray Dataset named ``train_<rank>`` (the same
scheme as the latent reader in ``training/data.py``): a folder tree is dealt out file by file
after a seeded permutation, Parquet files are balanced by row count. Ray Data CPU tasks read,
decode and crop (``svg_ray.data.images``); an input that cannot be read or decoded
becomes a row flagged not-ok, which the training loop skips and counts, so one bad file never
kills a job. ``epoch_batches`` cuts a rank's stream into exactly ``steps_per_epoch`` batches in an
order that is a function of (seed, epoch, rank), so a resumed run replays the same batches.

This module stays light (no model code): every Ray Data decode worker imports it.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from svg_ray import storage
from svg_ray.config import ConfigError, require
from svg_ray.data import schema
from svg_ray.data.images import DEFAULT_MAX_PIXELS, Crop, prepare_image

COL_OK = "ok"
"""Decoded-row flag between the decode stage and the training loop (False: skipped input)."""
COL_REASON = "reason"
"""Why an input was skipped ('' when ok)."""


@dataclass
class ImageInput:
    """Where the training images come from and how they are cropped."""

    uri: str
    """Image folder tree (<root>/<class>/<image>) or Parquet file/folder; local path or s3://."""
    input_format: str = "auto"
    """'auto', 'folder' or 'parquet'."""
    image_column: str = schema.COL_IMAGE
    """Parquet: column of encoded image bytes (binary, or a struct with a 'bytes' field)."""
    resolution: int = 256
    """Crop size in pixels."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Inputs with more decoded pixels are skipped (decompression-bomb guard)."""
    crop: Crop = "center"
    """'center' (ADM) or 'random' (a window seeded by crop_seed and the image bytes)."""
    crop_seed: int = 0
    """Seed of the random crop windows."""


@dataclass
class ImagePlan:
    """Which inputs each rank reads and how many steps make an epoch."""

    source_format: str
    """'folder' (files lists are image files) or 'parquet' (file lists are Parquet files)."""
    files: list[list[str]]
    """Per rank, its files in reading order."""
    rows: list[int]
    """Per rank, its number of inputs (images or Parquet rows, bad ones included)."""
    steps_per_epoch: int
    """Steps every rank runs per epoch: the smallest rank's inputs // per-worker batch."""


def plan_images(src: ImageInput, seed: int, world: int, per_worker: int) -> ImagePlan:
    """Per-rank input lists: folder trees split by file, Parquet files balanced by row count."""
    from svg_ray.data.precompute import PrecomputeError, detect_format, plan_folder

    rng = np.random.default_rng(seed)
    try:
        fmt = detect_format(src.uri) if src.input_format == "auto" else src.input_format
        if fmt == "folder":
            # A seeded permutation dealt round-robin: every rank sees every class, and ranks
            # differ in size by at most one image.
            files = [str(u) for u in plan_folder(src.uri).sources]
            files = [files[i] for i in rng.permutation(len(files))]
            groups = [files[r::world] for r in range(world)]
            rows = [len(g) for g in groups]
        else:
            groups, rows = _plan_parquet(src, world, rng)
    except PrecomputeError as e:  # the precompute job's planner speaks of --input too
        raise ConfigError(str(e)) from None
    steps = min(rows) // per_worker
    require(
        steps >= 1,
        f"not enough data: {sum(rows)} {'images' if fmt == 'folder' else 'rows'} under "
        f"{src.uri} give ranks {rows}, fewer than one batch of {per_worker} per worker; lower "
        "--global-batch or --num-workers (Parquet: or use more, smaller files)",
    )
    return ImagePlan(fmt, groups, rows, steps)


def _plan_parquet(
    src: ImageInput, world: int, rng: np.random.Generator
) -> tuple[list[list[str]], list[int]]:
    """Parquet files balanced over ranks by row count (footers only), each rank's order seeded."""
    import pyarrow.parquet as pq

    from svg_ray.training.data import assign_files, shard_rows

    files = storage.list_files(src.uri, ".parquet") if storage.exists(src.uri) else []
    if not files and src.uri.endswith(".parquet") and storage.exists(src.uri):
        files = [src.uri]
    require(bool(files), f"no .parquet files under {src.uri} (--input)")
    fs, path = storage.filesystem(files[0])
    with fs.open_input_file(path) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    require(
        src.image_column in names,
        f"parquet input {files[0]} has no column {src.image_column!r} (has {names}); "
        "set --image-column",
    )
    rows = shard_rows(files)
    index_groups = [[int(i) for i in rng.permutation(g)] for g in assign_files(rows, world)]
    per_rank = [sum(rows[i] for i in g) for g in index_groups]
    return [[files[i] for i in g] for g in index_groups], per_rank


_FILESYSTEMS: dict[str, Any] = {}


def _read(uri: str) -> bytes | str:
    """A file's bytes, or why it could not be read."""
    try:
        if storage.is_s3(uri):
            # One S3 client per process: creating one per file costs more than the GET.
            if "s3" not in _FILESYSTEMS:
                _FILESYSTEMS["s3"] = storage.s3_filesystem()
            fs, path = _FILESYSTEMS["s3"], uri[len("s3://") :]
        else:
            fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except Exception as e:  # a vanished or unreadable file is one skipped input, not a crash
        return f"unreadable: {type(e).__name__}: {e}"


def decode_batch(
    batch: dict[str, np.ndarray],
    source_format: str,
    resolution: int,
    max_pixels: int,
    image_column: str,
    crop: Crop = "center",
    crop_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Ray Data stage: file paths (folder) or image bytes (Parquet) -> crops + ok flags.

    Returns image uint8 (n, R, R, 3) (zeros where not ok), ok bool (n,), path and reason strings.
    """
    paths = [str(p) for p in batch[schema.COL_PATH]]
    raw: list[Any]
    if source_format == "folder":
        with ThreadPoolExecutor(8) as pool:  # S3 GETs are latency-bound: overlap them
            raw = list(pool.map(_read, paths))
    else:
        # Hugging Face datasets store images as {"bytes": ..., "path": ...} structs.
        raw = [v.get("bytes") if isinstance(v, dict) else v for v in batch[image_column]]
    n = len(paths)
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    ok = np.zeros(n, bool)
    reasons = [""] * n
    for i, data in enumerate(raw):
        if data is None:
            res: np.ndarray | str = "no image bytes (null)"
        elif isinstance(data, str):
            res = data
        else:
            res = prepare_image(bytes(data), resolution, max_pixels, crop, crop_seed)
        if isinstance(res, str):
            reasons[i] = res
        else:
            images[i] = res
            ok[i] = True
    return {
        schema.COL_IMAGE: images,
        COL_OK: ok,
        schema.COL_PATH: np.array(paths, dtype=object),
        COL_REASON: np.array(reasons, dtype=object),
    }


def rank_datasets(
    src: ImageInput, plan: ImagePlan, decode_batch_size: int, decode_cpus: float
) -> dict[str, Any]:
    """One Ray Dataset per rank (``train_<rank>``): its inputs, decoded by CPU tasks."""
    import ray.data

    decode = functools.partial(
        decode_batch,
        source_format=plan.source_format,
        resolution=src.resolution,
        max_pixels=src.max_pixels,
        image_column=src.image_column,
        crop=src.crop,
        crop_seed=src.crop_seed,
    )
    out = {}
    for r, files in enumerate(plan.files):
        if plan.source_format == "folder":
            blocks = max(1, math.ceil(len(files) / decode_batch_size))
            ds: ray.data.Dataset = ray.data.from_items(
                [{schema.COL_PATH: u} for u in files], override_num_blocks=blocks
            )
        else:
            fs, _ = storage.filesystem(files[0])
            paths = [storage.filesystem(u)[1] for u in files]
            ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
            # Projection is pushed down to the read: labels and other columns are never loaded.
            ds = ds.select_columns([src.image_column, schema.COL_PATH])
        out[f"train_{r}"] = ds.map_batches(
            decode, batch_size=decode_batch_size, num_cpus=decode_cpus
        )
    return out


def probe_decodable(src: ImageInput, plan: ImagePlan, n: int = 8) -> None:
    """Fail before any worker starts if none of the first few inputs decodes (wrong input)."""
    import pyarrow.parquet as pq

    first = plan.files[0]
    if plan.source_format == "folder":
        batch = {schema.COL_PATH: np.array(first[:n], dtype=object)}
    else:
        fs, path = storage.filesystem(first[0])
        with fs.open_input_file(path) as f:
            head = next(pq.ParquetFile(f).iter_batches(batch_size=n, columns=[src.image_column]))
        raw = head.column(0).to_pylist()
        batch = {
            schema.COL_PATH: np.array([first[0]] * len(raw), dtype=object),
            src.image_column: np.array([*raw, None], dtype=object)[:-1],  # keep it 1-D
        }
    out = decode_batch(batch, plan.source_format, src.resolution, src.max_pixels, src.image_column)
    if not out[COL_OK].any():
        raise ConfigError(
            f"none of the first {len(out[COL_OK])} inputs of {src.uri} could be decoded "
            f"as images (e.g. {out[COL_REASON][0]}); check --input, --input-format and "
            "--image-column"
        )


class SkipCounter:
    """Inputs skipped this epoch on this rank; the first few are printed with their reason."""

    def __init__(self, rank: int, show: int = 10) -> None:
        self.rank = rank
        self.show = show
        self.count = 0

    def add(self, paths: np.ndarray, reasons: np.ndarray) -> None:
        """Count skipped rows (and print them while under the ``show`` limit)."""
        for p, why in zip(paths, reasons, strict=True):
            if self.count < self.show:
                print(f"[train-ae] rank {self.rank}: skipped {p}: {why}", flush=True)
            self.count += 1


def epoch_batches(
    shard: Any,
    per_worker: int,
    steps: int,
    seed: int,
    rank: int,
    epoch: int,
    buffer: int,
    skipped: SkipCounter,
) -> Iterator[np.ndarray]:
    """Exactly ``steps`` batches of uint8 images (per_worker, R, R, 3) for one epoch.

    The order is a function of (seed, epoch, rank). Skipped inputs are counted on the first pass;
    if bad files left the rank short, it wraps around to its first images.
    """
    made = n_pending = 0
    pending: list[np.ndarray] = []
    for lap in itertools.count():
        n_ok = 0
        shuffle_seed = seed * 100_003 + epoch * 1_009 + rank * 31 + lap  # distinct per rank/epoch
        batches = shard.iter_batches(
            batch_size=per_worker,
            batch_format="numpy",
            drop_last=False,
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=shuffle_seed if buffer else None,
        )
        for b in batches:
            ok = np.asarray(b[COL_OK], bool)
            if lap == 0 and not ok.all():
                skipped.add(b[schema.COL_PATH][~ok], b[COL_REASON][~ok])
            good = b[schema.COL_IMAGE][ok]
            n_ok += len(good)
            pending.append(good)
            n_pending += len(good)
            while n_pending >= per_worker:
                joined = np.concatenate(pending)
                yield joined[:per_worker]
                made += 1
                if made == steps:
                    return
                pending, n_pending = [joined[per_worker:]], n_pending - per_worker
        if n_ok == 0:
            raise RuntimeError(f"rank {rank}: none of its inputs could be decoded as images")
