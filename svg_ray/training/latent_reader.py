"""The DiT job's latent reader: mixed batches, exact resume without replay, one latent per sample.

Runs inside each Ray Train worker and reads the latent Parquet shards directly with pyarrow (a
small thread pool overlaps row-group reads with training). The order is ``svg_ray.data.order``'s:
a pure function of (seed, epoch, rank, world) over the shards' *row groups*:

- every epoch the row groups of all shards are permuted, the ranks take equal consecutive spans
  of that order, and each rank shuffles its rows within windows of about one shard's rows (row
  groups from different files, read concurrently), so a batch draws from several places in the
  dataset and every rank runs exactly ``steps_per_epoch`` steps;
- ``epoch(e, start_step=k)`` yields exactly batches ``k, k+1, ...`` of ``epoch(e)``, reading only
  from the window that holds batch ``k`` on: a resume re-reads fewer rows than one window and
  decodes nothing before it;
- with flips, each row group is read either as ``latent`` or as ``latent_flip`` for a whole epoch
  (a seeded coin per row group and epoch), so one latent column is read per trained sample.

A dataset that fits in ``cache_mb`` is read once and every epoch is a seeded global permutation of
its rows dealt to the ranks, with a per-sample flip coin (small datasets: the demo, fine-tuning).

Everything read from storage goes through two small functions, ``read_footer`` (once per shard,
by ``index_shards``) and ``read_row_group`` (every batch); both can be replaced by wrappers
(retries, counting) through the ``read`` arguments.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from svg_ray import storage
from svg_ray.config import ConfigError, require
from svg_ray.data import schema
from svg_ray.data.latents import latents_to_torch
from svg_ray.data.manifest import DatasetManifest, ManifestError
from svg_ray.data.order import EpochOrder, Segment, Window

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The shard index: footers only
# --------------------------------------------------------------------------------------------


@dataclass
class ShardFile:
    """One Parquet shard: where it is and how its rows split into row groups."""

    uri: str
    size: int
    """File size in bytes."""
    row_groups: tuple[int, ...]
    """Rows per row group."""
    metadata: pq.FileMetaData = field(repr=False, compare=False)
    """The parsed footer: reads skip fetching it again."""

    @property
    def rows(self) -> int:
        """Rows in the file."""
        return sum(self.row_groups)


@dataclass
class ShardIndex:
    """Every shard's footer facts, in manifest order; row groups are the reader's units."""

    root: str
    files: list[ShardFile]
    units: list[tuple[int, int]] = field(init=False, repr=False)
    """(file index, row group) of each unit, file by file."""
    unit_rows: list[int] = field(init=False, repr=False)
    """Rows per unit."""
    unit_first_row: np.ndarray = field(init=False, repr=False)
    """Dataset row number of each unit's first row (rows counted file by file)."""

    def __post_init__(self) -> None:
        self.units = [(f, g) for f, sf in enumerate(self.files) for g in range(len(sf.row_groups))]
        self.unit_rows = [self.files[f].row_groups[g] for f, g in self.units]
        self.unit_first_row = np.concatenate([[0], np.cumsum(self.unit_rows)[:-1]]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        """Rows over all shards."""
        return sum(self.unit_rows)

    @property
    def max_file_rows(self) -> int:
        """Rows of the largest shard (the default shuffle window)."""
        return max(f.rows for f in self.files)


def _path(uri: str) -> str:
    """The path of ``uri`` inside its pyarrow filesystem."""
    return uri[len("s3://") :] if storage.is_s3(uri) else storage.filesystem(uri)[1]


def read_footer(fs: pafs.FileSystem, uri: str) -> ShardFile:
    """One shard's size and parsed footer (a HEAD and one small ranged GET on S3); transient
    storage errors are retried (``storage.retrying``), never turned into a missing shard."""
    return storage.retrying(_read_footer, fs, uri, what=uri)


def _read_footer(fs: pafs.FileSystem, uri: str) -> ShardFile:
    info = fs.get_file_info(_path(uri))
    if info.type != pafs.FileType.File:
        raise ManifestError(
            f"shard {uri} listed in the dataset's {schema.MANIFEST} is missing; the dataset "
            "was changed after precompute: rerun `svg-ray precompute` into a new --out"
        )
    with fs.open_input_file(info.path) as f:
        md = pq.ParquetFile(f).metadata
    groups = tuple(md.row_group(g).num_rows for g in range(md.num_row_groups))
    return ShardFile(uri, int(info.size), groups, md)


FooterFn = Callable[[pafs.FileSystem, str], ShardFile]
"""(filesystem, shard URI) -> ShardFile: what ``index_shards`` calls for every shard."""


def index_shards(
    manifest: DatasetManifest, root: str, threads: int = 16, read: FooterFn = read_footer
) -> ShardIndex:
    """Read every shard's footer (concurrently: latency-bound on S3) and check them against the
    manifest. The index is picklable, so a driver can build it once and ship it to workers."""
    uris = manifest.shard_uris(root)
    if not uris:
        raise ConfigError(f"the dataset at {root} lists no shards in its manifest")
    fs, _ = storage.filesystem(root)
    with ThreadPoolExecutor(max(1, min(threads, len(uris)))) as pool:
        files = list(pool.map(lambda u: read(fs, u), uris))
    want = [schema.COL_LABEL, schema.COL_LATENT]
    if manifest.has_flip:
        want.append(schema.COL_LATENT_FLIP)
    for f in files:
        names = f.metadata.schema.to_arrow_schema().names
        missing = [c for c in want if c not in names]
        if missing:
            raise ManifestError(f"shard {f.uri} lacks column(s) {missing} (has {names})")
    index = ShardIndex(root, files)
    if index.num_rows != manifest.num_rows:
        raise ManifestError(
            f"the shards of {root} hold {index.num_rows} rows but its manifest says "
            f"{manifest.num_rows}; the dataset was changed after precompute"
        )
    return index


# --------------------------------------------------------------------------------------------
# Reading one row group: the only storage access
# --------------------------------------------------------------------------------------------

ReadFn = Callable[[pafs.FileSystem, ShardFile, int, list[str]], pa.Table]
"""(filesystem, shard, row group, columns) -> table: what the reader calls for every read."""


def read_row_group(
    fs: pafs.FileSystem, shard: ShardFile, row_group: int, columns: list[str]
) -> pa.Table:
    """``columns`` of one row group of one shard, using the footer already in the index (one
    ranged GET per column chunk on S3, coalesced where they touch; a page-cache map locally).
    Transient storage errors are retried (``storage.retrying``)."""
    return storage.retrying(_read_row_group, fs, shard, row_group, columns, what=shard.uri)


def _read_row_group(
    fs: pafs.FileSystem, shard: ShardFile, row_group: int, columns: list[str]
) -> pa.Table:
    path = _path(shard.uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    with pa.memory_map(path) if local else fs.open_input_file(path) as source:
        # pre_buffer fetches the column chunks in (few, concurrent) requests: for remote files
        pf = pq.ParquetFile(source, metadata=shard.metadata, pre_buffer=not local)
        return pf.read_row_group(row_group, columns=columns, use_threads=False)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class LatentBatch:
    """One rank's batch for one step."""

    latents: torch.Tensor
    """(B, C, h, w) in the storage dtype (float16 or bfloat16): convert on the device."""
    labels: torch.Tensor
    """(B,) int64 class indices."""
    rows: np.ndarray
    """(B,) dataset row numbers (shards in manifest order, rows in file order): which samples."""
    flipped: np.ndarray
    """(B,) whether each latent is the flipped image's."""

    def to(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents in ``dtype``, labels) on ``device``; the cast runs there (half the copy)."""
        z = self.latents.to(device, non_blocking=True).to(dtype)
        return z, self.labels.to(device, non_blocking=True)


@dataclass
class ReadStats:
    """What a reader has read from storage so far (thread-safe counters)."""

    reads: int = 0
    """Row-group reads."""
    rows: int = 0
    """Rows decoded (whole row groups: Parquet's read unit)."""
    latent_bytes: int = 0
    """Stored bytes of the latent column chunks read."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, rows: int, latent_bytes: int) -> None:
        """Count one row-group read."""
        with self.lock:
            self.reads += 1
            self.rows += rows
            self.latent_bytes += latent_bytes


@dataclass
class _Part:
    """Decoded rows of one segment."""

    labels: np.ndarray
    latents: np.ndarray
    flipped: bool


_WARNED: set[str] = set()


def order_warning(manifest: DatasetManifest, root: str) -> str | None:
    """Why streamed batches of this dataset will be less mixed than a shuffled sampler's, or
    None when its shards are random samples."""
    if manifest.shards_mixed:
        return None
    return (
        f"the latent dataset {root} was written with its shards in sorted input order (a "
        "class-folder tree gives one or two classes per shard), so streamed batches mix fewer "
        "classes than a shuffled sampler's; rewrite it with this version's `svg-ray precompute "
        f"--input {manifest.source_uri or '...'} --out <new folder>`, which mixes every shard "
        "(--shuffle-seed)"
    )


class LatentReader:
    """One rank's batches of a latent dataset, epoch by epoch (see the module doc)."""

    def __init__(
        self,
        index: ShardIndex,
        manifest: DatasetManifest,
        *,
        rank: int,
        world: int,
        batch_size: int,
        seed: int,
        use_flip: bool = True,
        cache_mb: int = 0,
        prefetch: int = 1,
        window_rows: int = 0,
        threads: int = 0,
        read: ReadFn = read_row_group,
    ) -> None:
        """Plan the epochs (no data read yet).

        ``cache_mb``: hold the whole dataset in memory when it fits (0: always stream);
        ``prefetch``: windows read ahead of the one being consumed; ``window_rows``: rows
        shuffled together when streaming (0: the largest shard's rows; a resume re-reads fewer);
        ``threads``: concurrent row-group reads (0: 4 on local files, 8 on S3, where reads wait
        on the network); ``read``: the storage read (wrap it to add retries or count reads).
        """
        require(prefetch >= 0, "prefetch must be >= 0")
        require(threads >= 0, "threads must be >= 0")
        require(0 <= rank < world, f"rank {rank} is outside world size {world}")
        self.index = index
        self.manifest = manifest
        self.rank = rank
        self.world = world
        self.batch_size = batch_size
        self.seed = seed
        self.flips = use_flip and manifest.has_flip
        self.prefetch = prefetch
        self.read = read
        self.stats = ReadStats()
        self.fs, _ = storage.filesystem(index.root)
        threads = threads or (8 if storage.is_s3(index.root) else 4)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="latent-reader")
        self._latent_bytes = int(np.prod(manifest.latent_shape)) * 2
        needed = index.num_rows * (self._latent_bytes * (2 if self.flips else 1) + 8)
        self.in_memory = cache_mb > 0 and needed <= cache_mb * 2**20
        self.window_rows = window_rows or index.max_file_rows
        if self.in_memory:
            self.order = EpochOrder([1] * index.num_rows, world, batch_size, seed)
        else:
            self.order = EpochOrder(index.unit_rows, world, batch_size, seed, self.window_rows)
            if rank == 0:
                self._warn_once()
        self._memory: dict[str, np.ndarray] | None = None
        self._windows: tuple[int, list[Window]] | None = None

    # ---- public ----------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        """Steps every rank runs per epoch (the same on all ranks)."""
        return self.order.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[LatentBatch]:
        """Batches ``start_step, ..., steps_per_epoch - 1`` of ``epoch`` for this rank."""
        require(epoch >= 0, "epoch must be >= 0")
        require(
            0 <= start_step <= self.steps_per_epoch,
            f"start_step {start_step} is outside the epoch's {self.steps_per_epoch} steps",
        )
        if self.in_memory:
            return self._memory_epoch(epoch, start_step)
        return self._stream_epoch(epoch, start_step)

    def position(self, epoch: int, step: int) -> dict[str, Any]:
        """Where batch ``step`` of ``epoch`` starts on this rank (for the checkpoint record):
        the shard and row it begins in, and the plan that defines the order."""
        plan = {
            "seed": self.seed,
            "rank": self.rank,
            "world": self.world,
            "batch_size": self.batch_size,
            "rows": self.index.num_rows,
            "in_memory": self.in_memory,
            "window_rows": self.window_rows,
        }
        pos: dict[str, Any] = {"epoch": epoch, "step": step, "plan": plan}
        if self.in_memory or step >= self.steps_per_epoch:
            return pos
        windows = self._epoch_windows(epoch)
        w, offset = self.order.locate(windows, step)
        seg = windows[w].segments[0]
        f, g = self.index.units[seg.unit]
        pos.update(
            window=w,
            row_in_window=offset,
            file=self.index.files[f].uri,
            row_group=g,
            row=int(sum(self.index.files[f].row_groups[:g]) + seg.start),
        )
        return pos

    def close(self) -> None:
        """Stop the read threads (pending reads finish first)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LatentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- streaming ---------------------------------------------------------------------------

    def _warn_once(self) -> None:
        msg = order_warning(self.manifest, self.index.root)
        if msg and self.index.root not in _WARNED:
            _WARNED.add(self.index.root)
            log.warning(msg)

    def _epoch_windows(self, epoch: int) -> list[Window]:
        if self._windows is None or self._windows[0] != epoch:
            self._windows = (epoch, self.order.windows(epoch, self.rank))
        return self._windows[1]

    def _read_unit(self, unit: int, columns: list[str]) -> pa.Table:
        """Read one unit through ``self.read`` and count it."""
        f, g = self.index.units[unit]
        shard = self.index.files[f]
        table = self.read(self.fs, shard, g, columns)
        md = shard.metadata.row_group(g)
        latent = [
            md.column(i).total_compressed_size
            for i in range(md.num_columns)
            if md.column(i).path_in_schema.split(".")[0] in columns
            and md.column(i).path_in_schema != schema.COL_LABEL
        ]
        self.stats.add(table.num_rows, sum(latent))
        return table

    def _read_segment(self, seg: Segment, flipped: bool) -> _Part:
        col = schema.COL_LATENT_FLIP if flipped else schema.COL_LATENT
        table = self._read_unit(seg.unit, [schema.COL_LABEL, col])
        labels = table.column(schema.COL_LABEL).to_numpy()[seg.start : seg.stop]
        latents = _tensor_column(table.column(col))[seg.start : seg.stop]
        return _Part(np.asarray(labels, np.int64), latents, flipped)

    def _stream_epoch(self, epoch: int, start_step: int) -> Iterator[LatentBatch]:
        windows = self._epoch_windows(epoch)
        w_next, skip = self.order.locate(windows, start_step)
        unit_flips = self.order.unit_flips(epoch) if self.flips else None
        queue: deque[tuple[Window, list[Future[_Part]]]] = deque()

        def fill() -> None:
            nonlocal w_next
            while w_next < len(windows) and len(queue) <= self.prefetch:
                w = windows[w_next]
                flips = [
                    bool(unit_flips[s.unit]) if unit_flips is not None else False
                    for s in w.segments
                ]
                futures = [
                    self._pool.submit(self._read_segment, s, f)
                    for s, f in zip(w.segments, flips, strict=True)
                ]
                queue.append((w, futures))
                w_next += 1

        builder = _BatchBuilder(self.batch_size, self.manifest)
        fill()
        while queue:
            window, futures = queue.popleft()
            parts = [f.result() for f in futures]
            fill()  # the next window's reads run while this one is cut into batches
            seg_of = np.repeat(np.arange(len(parts)), [len(p.labels) for p in parts])
            row_of = np.concatenate([np.arange(len(p.labels)) for p in parts])
            pos, skip = skip, 0
            while pos < window.rows:
                take = min(builder.free, window.rows - pos)
                src = window.order[pos : pos + take]
                for s, r in zip(seg_of[src], row_of[src], strict=True):
                    seg = window.segments[s]
                    row = int(self.index.unit_first_row[seg.unit]) + seg.start + int(r)
                    builder.add(parts[s], int(r), row)
                pos += take
                if builder.free == 0:
                    yield builder.take()

    # ---- in memory ---------------------------------------------------------------------------

    def _load(self) -> dict[str, np.ndarray]:
        """Every row of the dataset (labels, latents, flips when used), read once."""
        if self._memory is None:
            cols = [schema.COL_LABEL, schema.COL_LATENT]
            if self.flips:
                cols.append(schema.COL_LATENT_FLIP)
            tables = list(
                self._pool.map(lambda u: self._read_unit(u, cols), range(len(self.index.units)))
            )
            self._memory = {
                schema.COL_LABEL: np.concatenate(
                    [t.column(schema.COL_LABEL).to_numpy() for t in tables]
                ).astype(np.int64),
                **{
                    c: np.concatenate([_tensor_column(t.column(c)) for t in tables])
                    for c in cols[1:]
                },
            }
        return self._memory

    def _memory_epoch(self, epoch: int, start_step: int) -> Iterator[LatentBatch]:
        data = self._load()
        rows = self.order.rank_units(epoch, self.rank)
        flips = self.order.row_flips(epoch) if self.flips else None
        b = self.batch_size
        for k in range(start_step, self.steps_per_epoch):
            idx = rows[k * b : (k + 1) * b]
            flipped = flips[idx] if flips is not None else np.zeros(b, bool)
            z = data[schema.COL_LATENT][idx]
            if flips is not None and flipped.any():
                z[flipped] = data[schema.COL_LATENT_FLIP][idx[flipped]]
            yield LatentBatch(
                latents_to_torch(z, self.manifest.dtype),
                torch.from_numpy(data[schema.COL_LABEL][idx]),
                idx.astype(np.int64),
                flipped,
            )


class _BatchBuilder:
    """Fills one batch row by row from decoded parts (one copy per latent)."""

    def __init__(self, batch_size: int, manifest: DatasetManifest) -> None:
        self.batch_size = batch_size
        self.manifest = manifest
        self._new()

    def _new(self) -> None:
        self.latents: np.ndarray | None = None
        self.labels = np.empty(self.batch_size, np.int64)
        self.rows = np.empty(self.batch_size, np.int64)
        self.flipped = np.empty(self.batch_size, bool)
        self.n = 0

    @property
    def free(self) -> int:
        """Rows still missing from the batch."""
        return self.batch_size - self.n

    def add(self, part: _Part, r: int, row: int) -> None:
        """Append row ``r`` of ``part`` (dataset row number ``row``)."""
        if self.latents is None:
            self.latents = np.empty((self.batch_size, *part.latents.shape[1:]), part.latents.dtype)
        self.latents[self.n] = part.latents[r]
        self.labels[self.n] = part.labels[r]
        self.rows[self.n] = row
        self.flipped[self.n] = part.flipped
        self.n += 1

    def take(self) -> LatentBatch:
        """The full batch; starts the next one."""
        assert self.latents is not None and self.n == self.batch_size
        out = LatentBatch(
            latents_to_torch(self.latents, self.manifest.dtype),
            torch.from_numpy(self.labels),
            self.rows,
            self.flipped,
        )
        self._new()
        return out


def _tensor_column(col: pa.ChunkedArray) -> np.ndarray:
    """A fixed-shape tensor column as one (n, C, h, w) array (zero-copy for a single chunk)."""
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return arr.to_numpy_ndarray()
