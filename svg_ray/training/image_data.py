"""Images into the autoencoder job: the epoch order of ``svg_ray.data.order``, Ray Data decoding.

The order is the latent reader's, over images instead of latents: a pure function of (seed,
epoch, rank, world). A folder tree's images are single-row units, so every epoch is a seeded
global permutation of all images dealt to the ranks in equal spans; Parquet inputs use their row
groups as units, shuffled within windows of about one file's rows (a row group is Parquet's read
unit: drawing rows one by one from all files would read every row group once per row). Every rank
runs exactly ``steps_per_epoch`` steps.

Each epoch, a worker builds a Ray Dataset over its own rows in that order: CPU tasks read
(``svg_ray.data.inputs``: transient storage errors retried, a vanished file a skip reason) and
decode/crop them, and the worker cuts the stream into batches. Batch ``k`` holds exactly the
rank's rows ``[k*B, (k+1)*B)``: an input that cannot be decoded is counted and replaced by a good
image of the *same* batch, so no bad file shifts later batches. A resume at step ``k`` therefore
starts the stream at row ``k*B`` (a folder) or at the window holding it (Parquet, re-reading fewer
rows than one window) and decodes nothing it already trained on.

This module stays light (no model code): every Ray Data decode task imports it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from svg_ray.config import ConfigError
from svg_ray.data import inputs, schema
from svg_ray.data.images import DEFAULT_MAX_PIXELS, Crop
from svg_ray.data.inputs import COL_OK, COL_REASON
from svg_ray.data.order import EpochOrder, rng

__all__ = [
    "COL_OK",
    "COL_REASON",
    "ImageInput",
    "ImagePlan",
    "ImageStream",
    "SkipCounter",
    "decode_sources",
    "plan_images",
    "probe_decodable",
]

OPTION = "--input"
"""The autoencoder job's option naming its images (quoted in input errors)."""
_CROP = 5
"""Stream of ``order.rng`` seeding an epoch's random crops (apart from the order's own)."""


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
    """'center' (ADM) or 'random' (a window seeded by the run's seed, the epoch and the image)."""


@dataclass
class ImagePlan:
    """The inputs as units of the epoch order (listings and footers only, no image bytes)."""

    source_format: str
    """'folder' (units are image files) or 'parquet' (units are row groups of Parquet files)."""
    sources: list[str]
    """Folder: the image URIs. Parquet: the files."""
    unit_rows: list[int]
    """Rows per unit (all 1 for a folder)."""
    unit_first_row: list[int] = field(default_factory=list)
    """Parquet: each unit's first row within its file."""
    unit_file: list[int] = field(default_factory=list)
    """Parquet: each unit's file (index into ``sources``)."""
    window_rows: int = 1
    """Rows shuffled together (Parquet: the largest file's rows)."""

    @property
    def inputs(self) -> int:
        """Images (or Parquet rows) in the plan, bad ones included."""
        return sum(self.unit_rows)

    def order(self, world: int, batch_size: int, seed: int) -> EpochOrder:
        """The epoch order of these inputs; refuses a plan that cannot fill one batch per rank."""
        what = "images" if self.source_format == "folder" else "rows"
        return EpochOrder(self.unit_rows, world, batch_size, seed, self.window_rows, what)


def plan_images(src: ImageInput) -> ImagePlan:
    """List the inputs: a folder tree's images, or the row groups of Parquet files (footers)."""
    fmt = inputs.resolve_format(src.uri, src.input_format, OPTION)
    if fmt == "folder":
        files = [str(u) for u in inputs.plan_folder(src.uri, OPTION).sources]
        return ImagePlan(fmt, files, [1] * len(files))
    files = inputs.parquet_files(src.uri, OPTION)
    with ThreadPoolExecutor(16) as pool:  # footers: one small ranged GET each on S3
        footers = list(pool.map(inputs.parquet_footer, files))
    inputs.require_columns(files[0], footers[0], {src.image_column: "--image-column"}, OPTION)
    rows, first, owner = [], [], []
    for f, md in enumerate(footers):
        start = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            rows.append(n)
            first.append(start)
            owner.append(f)
            start += n
    return ImagePlan(fmt, files, rows, first, owner, max(md.num_rows for md in footers))


def probe_decodable(src: ImageInput, plan: ImagePlan, n: int = 8) -> None:
    """Fail before any worker starts if none of the first few inputs decodes (wrong input)."""
    if plan.source_format == "folder":
        sources: list[Any] = plan.sources[:n]
    else:
        sources = [[plan.sources[0], r] for r in range(min(n, plan.unit_rows[0]))]
    out = decode_sources(sources, plan.source_format, src)
    if not out[COL_OK].any():
        raise ConfigError(
            f"none of the first {len(out[COL_OK])} inputs of {src.uri} could be decoded "
            f"as images (e.g. {out[COL_REASON][0]}); check --input, --input-format and "
            "--image-column"
        )


def decode_sources(
    sources: list[Any], source_format: str, src: ImageInput, crop_seed: int = 0
) -> dict[str, Any]:
    """Read and decode ``sources`` (folder: URIs; Parquet: [file, row]) in order: crops uint8
    (n, R, R, 3) (zeros where not ok), ok flags, the source names and skip reasons.
    ``crop_seed``: with ``src.crop == 'random'``, the windows' seed (with each image's bytes)."""
    with ThreadPoolExecutor(8) as pool:  # S3 GETs are latency-bound: overlap them
        raw = inputs.fetch(source_format, sources, src.image_column, pool)
    n, r = len(sources), src.resolution
    images = np.zeros((n, r, r, 3), np.uint8)
    ok = np.zeros(n, bool)
    reasons = [""] * n
    for i, data in enumerate(raw):
        res = inputs.decode(data, r, src.max_pixels, src.crop, crop_seed)
        if isinstance(res, str):
            reasons[i] = res
        else:
            images[i], ok[i] = res, True
    names = [s if isinstance(s, str) else f"{s[0]}:{s[1]}" for s in sources]
    return {
        schema.COL_IMAGE: images,
        COL_OK: ok,
        schema.COL_PATH: np.array(names, dtype=object),
        COL_REASON: np.array(reasons, dtype=object),
    }


def _decode_items(
    batch: dict[str, np.ndarray], source_format: str, src: ImageInput, crop_seed: int
) -> dict[str, Any]:
    """Ray Data stage: one item (a JSON list of sources) -> its decoded rows, in order."""
    sources = [s for spec in batch["sources"] for s in json.loads(spec)]
    return decode_sources(sources, source_format, src, crop_seed)


class SkipCounter:
    """Inputs skipped this epoch on this rank; the first few are printed with their reason."""

    def __init__(self, rank: int, show: int = 10, keep: int = 1000) -> None:
        self.rank = rank
        self.show = show
        self.keep = keep
        self.count = 0
        self.skipped: list[tuple[str, str]] = []
        """(input, reason) of the first ``keep`` skipped inputs."""

    def add(self, paths: np.ndarray, reasons: np.ndarray) -> None:
        """Count skipped rows (and print them while under the ``show`` limit)."""
        for p, why in zip(paths, reasons, strict=True):
            if self.count < self.show:
                print(f"[train-ae] rank {self.rank}: skipped {p}: {why}", flush=True)
            if self.count < self.keep:
                self.skipped.append((str(p), str(why)))
            self.count += 1


def fill_bad_rows(batch: dict[str, np.ndarray], where: str) -> np.ndarray:
    """A batch's images with every undecodable row replaced by the next good row of the same
    batch (cyclically): batch ``k`` depends on its own inputs only, so resume stays exact."""
    ok = np.asarray(batch[COL_OK], bool)
    images = batch[schema.COL_IMAGE]
    if ok.all():
        return images
    good = np.flatnonzero(ok)
    if not len(good):
        pairs = zip(batch[schema.COL_PATH], batch[COL_REASON], strict=True)
        shown = "; ".join(f"{p}: {r}" for p, r in pairs)
        raise ConfigError(f"{where}: none of its {len(ok)} images could be decoded ({shown})")
    out = np.array(images)  # writable: Ray hands out read-only views
    for i in np.flatnonzero(~ok):
        out[i] = out[good[np.searchsorted(good, i) % len(good)]]
    return out


class ImageStream:
    """One rank's image batches, epoch by epoch (see the module doc)."""

    def __init__(
        self,
        src: ImageInput,
        plan: ImagePlan,
        *,
        rank: int,
        world: int,
        batch_size: int,
        seed: int,
        decode_batch: int = 64,
        decode_cpus: float = 1.0,
    ) -> None:
        """Plan the epochs (no data read yet)."""
        self.src, self.plan = src, plan
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.decode_batch, self.decode_cpus = decode_batch, decode_cpus
        self.order = plan.order(world, batch_size, seed)
        self.skipped = SkipCounter(rank)

    @property
    def steps_per_epoch(self) -> int:
        """Steps every rank runs per epoch."""
        return self.order.steps_per_epoch

    def _items(self, epoch: int, start: int) -> list[list[Any]]:
        """The rank's sources from batch ``start`` on, grouped into decode items, in order."""
        b = self.batch_size
        if self.plan.source_format == "folder":
            units = self.order.rank_units(epoch, self.rank)[start * b :]
            per = max(1, self.decode_batch)
            return [
                [self.plan.sources[int(u)] for u in units[i : i + per]]
                for i in range(0, len(units), per)
            ]
        windows = self.order.windows(epoch, self.rank)
        w0, skip = self.order.locate(windows, start)
        items = []
        for w in windows[w0:]:
            rows = [
                (self.plan.unit_file[s.unit], self.plan.unit_first_row[s.unit] + r)
                for s in w.segments
                for r in range(s.start, s.stop)
            ]
            ordered = [rows[int(i)] for i in w.order]
            items.append([[self.plan.sources[f], r] for f, r in ordered[skip:]])
            skip = 0
        return items

    def epoch(self, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
        """uint8 batches (B, R, R, 3) ``start .. steps_per_epoch - 1`` of ``epoch``."""
        import ray.data

        self.skipped = SkipCounter(self.rank)
        items = self._items(epoch, start)
        if not items:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batch k must be rows [k*B, (k+1)*B)
        decode = functools.partial(
            _decode_items,
            source_format=self.plan.source_format,
            src=self.src,
            # A new random window every epoch, the same in a resumed run.
            crop_seed=int(rng(self.seed, _CROP, epoch).integers(2**31)),
        )
        ds = ray.data.from_items(
            [{"sources": json.dumps(i)} for i in items],
            override_num_blocks=min(len(items), max(1, math.ceil(len(items) / 4))),
        ).map_batches(decode, batch_size=1, num_cpus=self.decode_cpus)
        step = start
        for batch in ds.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=True
        ):
            ok = np.asarray(batch[COL_OK], bool)
            if not ok.all():
                self.skipped.add(batch[schema.COL_PATH][~ok], batch[COL_REASON][~ok])
            yield fill_bad_rows(batch, f"rank {self.rank}, epoch {epoch}, batch {step}")
            step += 1
