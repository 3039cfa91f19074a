"""The one input layer of every job that reads images: planning, reading and decoding.

Precompute, autoencoder training and evaluation all take the same two kinds of input, local or
``s3://``:

- a folder tree ``<root>/<class>/.../<image>`` (classes = sorted folder names; hidden files and
  files directly under the root are ignored), or
- Parquet files of encoded images (a binary column, or Hugging Face's ``{"bytes", "path"}``
  struct), with or without a label column.

Planning (``plan_inputs``) lists them in a deterministic order from listings and Parquet footers
only, never image bytes. Reading goes through ``storage.retrying``: throttling, 5xx and dropped
connections are retried and, if they persist, raise ``StorageUnavailableError`` and fail the
task; only an input that is *missing* (deleted after planning) or *undecodable* becomes a skip
reason, which every job counts and lists. Decoding is ``data/images.prepare_image`` (the ADM
centre crop, or a seeded random crop), one row per chunk in ``DecodeChunk`` (precompute and
evaluation) and one row per image in the autoencoder job's stage (``training/image_data``).

Errors name the caller's own option (``option="--data"``), so no job rewrites another's messages.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from svg_ray import storage
from svg_ray.config import ConfigError
from svg_ray.data import schema
from svg_ray.data.images import Crop, prepare_image

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "folder", "parquet")
"""Values of every job's --input-format."""
COL_OK = "ok"
"""Per-image decode flag of a decoded batch (False: skipped input)."""
COL_REASON = "reason"
"""Why an input was skipped ('' when ok)."""
NULL_REASON = "no image bytes (null)"
"""Skip reason of a Parquet row whose image is null."""


class InputError(ConfigError):
    """The input cannot be planned: missing, empty, or lacking a column; names the option."""


@dataclass
class InputPlan:
    """The sorted input list and everything derived from it."""

    source_format: str
    """'folder' or 'parquet'."""
    ids: list[str]
    """Unique image ids, in processing order."""
    labels: list[int]
    """Label index per id."""
    sources: list[Any]
    """Per id: a file URI (folder) or [parquet file URI, row] (parquet)."""
    class_names: list[str]
    """Label index -> class name."""

    def fingerprint(self) -> str:
        """sha256 of the (id, label) list: a changed input set changes the chunking."""
        h = hashlib.sha256()
        for i, y in zip(self.ids, self.labels, strict=True):
            h.update(f"{i}\t{y}\n".encode())
        return h.hexdigest()

    def head(self, n: int) -> InputPlan:
        """The first ``n`` inputs (all if ``n`` is 0)."""
        if not n:
            return self
        return InputPlan(
            self.source_format, self.ids[:n], self.labels[:n], self.sources[:n], self.class_names
        )


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _full_uri(root_uri: str, fs_path: str) -> str:
    """A pyarrow filesystem path back to a URI of the same kind as ``root_uri``."""
    return f"s3://{fs_path}" if storage.is_s3(root_uri) else fs_path


def list_input_files(uri: str, option: str = "--input") -> tuple[str, list[str]]:
    """(root path, sorted file paths below it) skipping hidden names; InputError if missing."""
    fs, root = storage.filesystem(uri)
    info = storage.retrying(fs.get_file_info, root, what=uri)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{option}: input not found: {uri}")
    if info.type == pafs.FileType.File:
        return root, [root]
    listing = storage.retrying(fs.get_file_info, pafs.FileSelector(root, recursive=True), what=uri)
    files = []
    for fi in listing:
        rel = fi.path[len(root) :].lstrip("/")
        if fi.type == pafs.FileType.File and not any(p.startswith(".") for p in rel.split("/")):
            files.append(fi.path)
    return root, sorted(files)


def detect_format(uri: str, option: str = "--input") -> str:
    """'parquet' for a .parquet file or a folder holding only .parquet files, else 'folder'."""
    _, files = list_input_files(uri, option)
    if files and all(f.endswith(".parquet") for f in files):
        return "parquet"
    return "folder"


def resolve_format(uri: str, input_format: str, option: str = "--input") -> str:
    """``input_format`` itself, or the detected one for 'auto'."""
    if input_format not in INPUT_FORMATS:
        raise InputError(f"{option}: input format {input_format!r} is not one of {INPUT_FORMATS}")
    return detect_format(uri, option) if input_format == "auto" else input_format


def plan_folder(uri: str, option: str = "--input") -> InputPlan:
    """ImageNet-style tree <root>/<class>/.../<file>: ids are relative paths, classes sorted."""
    root, files = list_input_files(uri, option)
    rel = [f[len(root) :].lstrip("/") for f in files]
    keep = [(r, f) for r, f in zip(rel, files, strict=True) if "/" in r]
    if len(keep) < len(rel):
        n_loose = len(rel) - len(keep)
        log.warning("ignoring %d file(s) directly under %s (not in a class folder)", n_loose, uri)
    if not keep:
        raise InputError(
            f"{option}: no images found under {uri}: expected <root>/<class_name>/<image files>"
        )
    class_names = sorted({r.split("/", 1)[0] for r, _ in keep})
    index = {c: i for i, c in enumerate(class_names)}
    return InputPlan(
        source_format="folder",
        ids=[r for r, _ in keep],
        labels=[index[r.split("/", 1)[0]] for r, _ in keep],
        sources=[_full_uri(uri, f) for _, f in keep],
        class_names=class_names,
    )


def _parquet_listing(uri: str, option: str) -> tuple[str, list[str]]:
    root, files = list_input_files(uri, option)
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise InputError(f"{option}: no .parquet files under {uri}")
    return root, files


def parquet_files(uri: str, option: str = "--input") -> list[str]:
    """The .parquet files of a Parquet input (a file or a folder), as URIs; InputError if none."""
    return [_full_uri(uri, f) for f in _parquet_listing(uri, option)[1]]


def _footer(uri: str) -> pq.FileMetaData:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def parquet_footer(uri: str) -> pq.FileMetaData:
    """A Parquet file's footer (schema, row groups), transient errors retried."""
    return storage.retrying(_footer, uri, what=uri)


def require_columns(uri: str, md: pq.FileMetaData, flags: dict[str, str], option: str) -> None:
    """InputError unless the file has every column in ``flags`` (column -> flag that sets it)."""
    names = md.schema.to_arrow_schema().names
    for column, flag in flags.items():
        if column not in names:
            raise InputError(
                f"{option}: parquet input {uri} has no column {column!r} (has {names}); set {flag}"
            )


def _read_columns(uri: str, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns)


def plan_parquet(
    uri: str,
    image_column: str,
    label_column: str | None,
    id_column: str = "",
    option: str = "--input",
) -> InputPlan:
    """Parquet rows of encoded images: labels (and ids) only, never the image bytes.

    ``label_column`` None: unlabelled (every label 0, one class 'all'; footers only).
    """
    root, paths = _parquet_listing(uri, option)
    ids: list[str] = []
    raw_labels: list[Any] = []
    sources: list[Any] = []
    for path in paths:
        f = _full_uri(uri, path)
        md = parquet_footer(f)
        flags = {image_column: "--image-column"}
        if label_column is not None:
            flags[label_column] = "--label-column"
        if id_column:
            flags[id_column] = "--id-column"
        require_columns(f, md, flags, option)
        rel = path[len(root) :].lstrip("/") or os.path.basename(path)
        n = md.num_rows
        if label_column is None:
            labels: list[Any] = [0] * n
            file_ids = [f"{rel}:{r}" for r in range(n)]
        else:
            table = storage.retrying(
                _read_columns, f, [label_column] + ([id_column] if id_column else []), what=f
            )
            labels = table.column(label_column).to_pylist()
            if any(y is None for y in labels):
                raise InputError(f"{option}: {f}: column {label_column!r} has nulls")
            file_ids = (
                [str(v) for v in table.column(id_column).to_pylist()]
                if id_column
                else [f"{rel}:{r}" for r in range(n)]
            )
        ids += file_ids
        raw_labels += labels
        sources += [[f, r] for r in range(n)]
    if len(set(ids)) != len(ids):
        raise InputError(f"{option}: ids in {uri} are not unique (--id-column {id_column!r})")
    if label_column is None:
        return InputPlan("parquet", ids, raw_labels, sources, ["all"])
    if all(isinstance(y, str) for y in raw_labels):
        class_names = sorted(set(raw_labels))
        index = {c: i for i, c in enumerate(class_names)}
        labels_int = [index[y] for y in raw_labels]
    elif all(isinstance(y, int) and not isinstance(y, bool) for y in raw_labels):
        if raw_labels and min(raw_labels) < 0:
            raise InputError(f"{option}: {uri}: negative labels in column {label_column!r}")
        labels_int = [int(y) for y in raw_labels]
        class_names = [str(i) for i in range(max(labels_int, default=-1) + 1)]
    else:
        raise InputError(f"{option}: {uri}: column {label_column!r} must hold integers or strings")
    return InputPlan("parquet", ids, labels_int, sources, class_names)


def plan_inputs(
    uri: str,
    input_format: str = "auto",
    image_column: str = schema.COL_IMAGE,
    label_column: str | None = schema.COL_LABEL,
    id_column: str = "",
    limit: int = 0,
    option: str = "--input",
) -> InputPlan:
    """List and label the images under ``uri`` in deterministic order (first ``limit`` if set).

    Labels come from the class folders, or from ``label_column`` for Parquet (None: unlabelled).
    """
    fmt = resolve_format(uri, input_format, option)
    if fmt == "parquet":
        plan = plan_parquet(uri, image_column, label_column, id_column, option)
    else:
        plan = plan_folder(uri, option)
    return plan.head(limit)


# --------------------------------------------------------------------------------------------
# Reading: missing -> a skip reason, transient -> retried, the rest -> StorageError
# --------------------------------------------------------------------------------------------


def read_file(uri: str) -> bytes | str:
    """A file's bytes, or why it is skipped (it vanished since planning)."""
    try:
        return storage.read_bytes(uri)
    except storage.StorageNotFoundError as e:
        return f"unreadable: {e}"


def _read_rows(uri: str, rows: list[int], column: str) -> list[bytes | None]:
    """Image bytes of ``rows`` of one Parquet file, reading only the row groups that hold them."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        starts = [0]
        for g in range(md.num_row_groups):
            starts.append(starts[-1] + md.row_group(g).num_rows)
        groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows})
        col = pf.read_row_groups(groups, columns=[column]).column(column).combine_chunks()
    if pa.types.is_struct(col.type):  # Hugging Face datasets store {"bytes", "path"}
        col = col.field("bytes")
    values = col.to_pylist()
    base: dict[int, int] = {}  # row group -> its first position in ``values``
    for g in groups:
        base[g] = sum(starts[x + 1] - starts[x] for x in base)
    out = []
    for r in rows:
        g = bisect.bisect_right(starts, r) - 1
        out.append(values[base[g] + r - starts[g]])
    return out


def read_parquet_rows(uri: str, rows: list[int], column: str) -> list[bytes | str | None]:
    """Image bytes of ``rows`` of one Parquet file (None: null); a vanished file: reasons."""
    try:
        return list(storage.retrying(_read_rows, uri, rows, column, what=uri))
    except storage.StorageNotFoundError as e:
        return [f"unreadable: {e}"] * len(rows)


def fetch(
    source_format: str, sources: list[Any], image_column: str, pool: ThreadPoolExecutor
) -> list[bytes | str | None]:
    """Raw bytes per source (a reason string when skipped, None for a null Parquet value)."""
    if source_format == "folder":
        return list(pool.map(read_file, [str(s) for s in sources]))
    out: list[bytes | str | None] = [None] * len(sources)
    by_file: dict[str, list[int]] = {}
    for k, (uri, _) in enumerate(sources):
        by_file.setdefault(uri, []).append(k)
    for uri, ks in by_file.items():
        values = read_parquet_rows(uri, [int(sources[k][1]) for k in ks], image_column)
        for k, v in zip(ks, values, strict=True):
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Decoding: one function, two Ray Data stage shapes
# --------------------------------------------------------------------------------------------


def decode(
    data: Any, resolution: int, max_pixels: int, crop: Crop = "center", seed: int = 0
) -> np.ndarray | str:
    """Raw input (bytes, HF struct, reason string or None) -> crop, or why it is skipped
    (``crop``/``seed``: see ``images.prepare_image``)."""
    if isinstance(data, dict):  # Hugging Face datasets store {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if data is None:
        return NULL_REASON
    if isinstance(data, str):
        return data
    return prepare_image(bytes(data), resolution, max_pixels, crop, seed)


def one(batch: dict[str, np.ndarray], key: str) -> Any:
    """The value of ``key`` in a batch holding exactly one chunk row (stages use batch_size=1)."""
    col = batch[key]
    if len(col) != 1:
        raise ValueError(f"expected one chunk per batch, got {len(col)} (use batch_size=1)")
    return col[0]


class DecodeChunk:
    """Ray Data stage (CPU actors): one chunk spec -> its ADM crops; skipped inputs by reason.

    A chunk spec is the JSON of ``precompute.Chunk.spec``: ids, labels and sources of one chunk.
    """

    def __init__(self, resolution: int, max_pixels: int, io_threads: int = 8) -> None:
        """One I/O thread pool per actor, reused for every chunk (S3 GETs are latency-bound)."""
        self.resolution = resolution
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(io_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One chunk spec -> one row: ok ids/labels, uint8 crops (n, R, R, 3), skipped list."""
        spec = json.loads(one(batch, schema.ROW_SPEC))
        t0 = time.perf_counter()
        ids, labels, images, skipped = [], [], [], []
        raw = fetch(spec["format"], spec["sources"], spec["image_column"], self.pool)
        for item_id, label, data in zip(spec["ids"], spec["labels"], raw, strict=True):
            res = decode(data, self.resolution, self.max_pixels)
            if isinstance(res, str):
                skipped.append([item_id, res])
                continue
            ids.append(item_id)
            labels.append(label)
            images.append(res)
        r = self.resolution
        stacked = np.stack(images) if images else np.zeros((0, r, r, 3), np.uint8)
        return {
            schema.ROW_CHUNK: np.array([spec["chunk"]], np.int64),
            schema.ROW_EXPECTED: np.array([len(spec["ids"])], np.int64),
            schema.ROW_IDS: np.array([json.dumps(ids)]),
            schema.ROW_LABELS: np.array(labels, np.int64)[None],
            schema.ROW_IMAGES: stacked[None],
            schema.ROW_SKIPPED: np.array([json.dumps(skipped)]),
            schema.ROW_DECODE_S: np.array([time.perf_counter() - t0]),
        }


def _head_rows(uri: str, column: str, n: int) -> list[Any]:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        head = next(pq.ParquetFile(f).iter_batches(batch_size=n, columns=[column]))
    return list(head.column(0).to_pylist())


def read_parquet_head(uri: str, column: str, n: int) -> list[Any]:
    """The first ``n`` values of ``column`` in one Parquet file (transient errors retried)."""
    return list(storage.retrying(_head_rows, uri, column, n, what=uri))


def decoded_chunks(
    specs: list[str], resolution: int, max_pixels: int, cpus: float, max_actors: int
) -> Any:
    """A Ray Dataset of chunk specs (one block, and one row, per chunk) decoded and cropped by a
    pool of ``DecodeChunk`` actors (1 to ``max_actors``, ``cpus`` each)."""
    import ray

    ds = ray.data.from_items([{schema.ROW_SPEC: s} for s in specs], override_num_blocks=len(specs))
    return ds.map_batches(
        DecodeChunk,
        fn_constructor_kwargs={"resolution": resolution, "max_pixels": max_pixels},
        batch_size=1,
        num_cpus=cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
    )
