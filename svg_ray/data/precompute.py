"""Precompute SVG latents once with Ray Data: images -> DINO + residual latents -> Parquet.

The input list is sorted, then dealt into deterministic *chunks* of ``rows_per_shard`` images in
a seeded pseudo-random order (``shuffle_seed``), so every shard and every encoder batch is a
random sample of the dataset rather than a run of one class; a chunk is the unit of work, of
output and of resume:

    chunk specs --DecodeChunk (CPU actors)--> uint8 crops --EncodeChunk (GPU/CPU actors)-->
    latents + moments --WriteChunk (I/O actors)--> shards/part-NNNNNN.parquet + chunks/*.json

A chunk is committed when its record ``chunks/chunk-NNNNNN.json`` exists; the record is written
after the shard, and both names derive from the chunk index, so a killed job rerun with the same
settings skips committed chunks and overwrites half-written ones: exactly one row per input, none
missing, none duplicated. Ray's own ``write_parquet`` names files randomly per run, which would
duplicate rows on a rerun, hence the explicit writer. ``manifest.json`` is written last, from the
chunk records (row counts, skipped inputs, per-channel moments, label histograms), never from
Ray's in-memory state.

Why one row per chunk between stages: the three stages must agree on chunk boundaries, which
Ray's block splitting and coalescing do not preserve for per-image rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from svg_ray import storage
from svg_ray.checkpoint import BUNDLE_AE
from svg_ray.config import ConfigError, require
from svg_ray.data import inputs, schema
from svg_ray.data.images import DEFAULT_MAX_PIXELS, to_model_input
from svg_ray.data.inputs import InputPlan
from svg_ray.data.latents import (
    STORAGE_NUMPY_DTYPE,
    ChannelMoments,
    latents_to_numpy,
    latents_to_torch,
)
from svg_ray.data.manifest import DatasetManifest, ShardLabelSummary, SkippedInput
from svg_ray.errors import SvgRayError

log = logging.getLogger(__name__)

JOB_FORMAT = "svg-ray-precompute-job/1"
TMP_DIR = "_tmp"
"""Local staging folder for shards being written (renamed into shards/ when complete)."""
ROW_GROUP_BYTES = 32 << 20
"""Target Parquet row-group size: big enough for S3 throughput, small enough to stream."""


class PrecomputeError(SvgRayError, RuntimeError):
    """The job cannot run as configured (missing input, foreign output folder, ...)."""


@dataclass
class PrecomputeConfig:
    """Settings of the precompute job (the CLI flags are these field names)."""

    input: str
    """Image folder tree (<root>/<class>/<image>) or Parquet file/folder; local path or s3://."""
    out: str
    """Dataset root to write (local path or s3://); shards/, chunks/ and manifest.json go here."""
    autoencoder: str
    """SVG autoencoder checkpoint (local path or s3://) or a registered model
    (models:/<name>/<version>, /latest or @<alias>; a sampler bundle's autoencoder too)."""
    input_format: Literal["auto", "folder", "parquet"] = "auto"
    """'auto': Parquet when the input is a .parquet file or a folder of them, else a folder tree."""
    image_column: str = schema.COL_IMAGE
    """Parquet input: column of encoded image bytes (binary, or a struct with a 'bytes' field)."""
    label_column: str = schema.COL_LABEL
    """Parquet input: label column (integers used as-is, strings mapped by sorted name)."""
    id_column: str = ""
    """Parquet input: unique id column ('' = '<file>:<row>')."""
    resolution: int = 0
    """Crop size in pixels (0 = the autoencoder's; any other value must equal it)."""
    dtype: Literal["fp16", "bf16", "float16", "bfloat16"] = "fp16"
    """Storage dtype of the latents: 'fp16' or 'bf16' (recorded as float16/bfloat16)."""
    flip: bool = False
    """Also store the latent of the horizontally flipped image (column latent_flip)."""
    rows_per_shard: int = 1024
    """Images per chunk = rows per Parquet file (fewer when inputs are skipped); the resume unit."""
    shuffle_seed: int = 0
    """Seed of the random assignment of inputs to chunks (mixed shards and encoder batches); -1
    keeps the sorted order (only for inputs whose rows are already in random order)."""
    batch_size: int = 64
    """Encoder batch size inside a chunk."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more decoded pixels (W*H) are skipped (decompression-bomb guard)."""
    limit: int = 0
    """Use only the first N inputs in sorted order (0 = all)."""
    decoders: int = 2
    """Most decode actors (the pool scales between 1 and this)."""
    decode_cpus: float = 1.0
    """CPUs per decode actor."""
    encoders: int = 1
    """Encode actors (one per GPU on a cluster)."""
    encode_cpus: float = 1.0
    """CPUs per encode actor."""
    encode_gpus: float = 0.0
    """GPUs per encode actor (0 = encode on CPU)."""
    writers: int = 1
    """Most writer actors (I/O bound)."""
    write_cpus: float = 0.25
    """CPUs per writer actor (it mostly waits on storage)."""
    torch_threads: int = 0
    """torch intra-op threads per encode actor (0 = max(1, encode_cpus))."""
    tracking_uri: str | None = None
    """MLflow server of a models:/ --autoencoder (default: MLFLOW_TRACKING_URI)."""

    def __post_init__(self) -> None:
        require(bool(self.input), "precompute.input must name an image folder or Parquet input")
        require(bool(self.out), "precompute.out must name the output dataset root")
        require(bool(self.autoencoder), "precompute.autoencoder must name an AE checkpoint")
        # The manifest records these; training may run from another working directory.
        self.input = storage.absolute(self.input)
        self.out = storage.absolute(self.out)
        if not self.autoencoder.startswith("models:/"):  # a registry URI is resolved at run time
            self.autoencoder = storage.absolute(self.autoencoder)
        require(self.input_format in ("auto", "folder", "parquet"), "bad precompute.input_format")
        require(
            self.dtype in ("fp16", "bf16", "float16", "bfloat16"), "precompute.dtype: fp16 or bf16"
        )
        # The manifest and the job fingerprint keep the storage names datasets already carry.
        self.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(self.dtype, self.dtype)  # type: ignore[assignment]
        require(self.resolution >= 0, "precompute.resolution must be >= 0")
        require(self.rows_per_shard >= 1, "precompute.rows_per_shard must be >= 1")
        require(self.shuffle_seed >= -1, "precompute.shuffle_seed must be >= 0 (or -1: sorted)")
        require(self.batch_size >= 1, "precompute.batch_size must be >= 1")
        require(self.max_pixels >= 1, "precompute.max_pixels must be >= 1")
        require(self.limit >= 0, "precompute.limit must be >= 0")
        require(
            min(self.decoders, self.encoders, self.writers) >= 1,
            "precompute.decoders/encoders/writers must be >= 1",
        )
        require(self.decode_cpus > 0 and self.encode_cpus > 0, "decode/encode cpus must be > 0")
        require(self.write_cpus >= 0 and self.encode_gpus >= 0, "cpus/gpus must be >= 0")
        require(self.torch_threads >= 0, "precompute.torch_threads must be >= 0")
        require(
            storage.join(self.out, "") != storage.join(self.input, ""),
            "precompute.out must differ from precompute.input",
        )

    @property
    def chunk_seed(self) -> int | None:
        """The seed that deals inputs to chunks (None: consecutive slices of the sorted list)."""
        return self.shuffle_seed if self.shuffle_seed >= 0 else None


# --------------------------------------------------------------------------------------------
# Planning: list inputs, map classes, cut chunks
# --------------------------------------------------------------------------------------------


def plan_inputs(cfg: PrecomputeConfig) -> InputPlan:
    """List and label the inputs in deterministic order (honouring ``limit``)."""
    return inputs.plan_inputs(
        cfg.input,
        cfg.input_format,
        cfg.image_column,
        cfg.label_column,
        cfg.id_column,
        cfg.limit,
        option="--input",
    )


@dataclass
class Chunk:
    """A set of plan inputs, in processing order: the unit of work, output file and resume."""

    index: int
    ids: list[str]
    labels: list[int]
    sources: list[Any]

    def spec(self, source_format: str, image_column: str) -> str:
        """JSON handed to the decode stage (one Ray row per chunk)."""
        return json.dumps(
            {
                "chunk": self.index,
                "format": source_format,
                "image_column": image_column,
                "ids": self.ids,
                "labels": self.labels,
                "sources": self.sources,
            }
        )


CHUNK_ORDER = "blake2b-64/1"
"""Name of the seeded input order below; part of the job fingerprint, so a change of algorithm
can never mix two orders in one output folder."""


def shuffled_positions(ids: list[str], seed: int) -> list[int]:
    """Plan positions sorted by a keyed 64-bit hash of (seed, id): a seeded pseudo-random order
    that depends on nothing else (no library's random stream), so every rerun and resume of a
    job cuts exactly the same chunks."""
    keyed = hashlib.blake2b(digest_size=8, key=str(seed).encode())

    def digest(item: str) -> bytes:
        h = keyed.copy()  # cheaper than a new keyed hash per id (1.28M ids: ~2 s)
        h.update(item.encode())
        return h.digest()

    keys = np.frombuffer(b"".join(map(digest, ids)), dtype=">u8")
    return [int(p) for p in np.argsort(keys, kind="stable")]


def make_chunks(plan: InputPlan, rows_per_shard: int, seed: int | None = None) -> list[Chunk]:
    """Cut the plan into chunks of ``rows_per_shard`` (the last may be shorter).

    With a ``seed`` the inputs are first put in a seeded random order (``shuffled_positions``):
    every chunk, and every batch inside it, is then a random sample of the plan. Without one,
    chunks are consecutive slices of the plan's sorted order (what evaluation jobs want).
    """
    order = list(range(len(plan.ids))) if seed is None else shuffled_positions(plan.ids, seed)
    chunks = []
    for i in range(0, len(order), rows_per_shard):
        pos = order[i : i + rows_per_shard]
        chunks.append(
            Chunk(
                i // rows_per_shard,
                [plan.ids[p] for p in pos],
                [plan.labels[p] for p in pos],
                [plan.sources[p] for p in pos],
            )
        )
    return chunks


def shard_name(chunk: int) -> str:
    """Shard path relative to the dataset root."""
    return f"{schema.SHARDS_DIR}/part-{chunk:06d}.parquet"


def record_name(chunk: int) -> str:
    """Chunk commit record path relative to the dataset root."""
    return f"{schema.CHUNKS_DIR}/chunk-{chunk:06d}.json"


# --------------------------------------------------------------------------------------------
# Ray Data stages (stateful callables: dict[str, np.ndarray] -> dict[str, np.ndarray])
# --------------------------------------------------------------------------------------------


_one = inputs.one
"""The single row's value of ``key`` (stages run with batch_size=1: one chunk per call)."""


PASSED_ON = (
    schema.ROW_CHUNK,
    schema.ROW_EXPECTED,
    schema.ROW_IDS,
    schema.ROW_LABELS,
    schema.ROW_SKIPPED,
    schema.ROW_DECODE_S,
)
"""The decode stage's columns the encode stage hands on to the writer unchanged."""


class EncodeChunk:
    """Stage 2 (GPU or CPU actor pool): the autoencoder, loaded once per actor, encodes a chunk."""

    def __init__(
        self, autoencoder: str, batch_size: int, dtype: str, flip: bool, device: str, threads: int
    ) -> None:
        """Load the checkpoint in eval mode (running alignment stats: deterministic latents)."""
        from svg_ray.checkpoint import load_autoencoder

        if threads:
            torch.set_num_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("encode_gpus > 0 but this Ray worker sees no CUDA device")
        self.device = torch.device(device)
        self.ae = load_autoencoder(autoencoder, self.device)
        self.batch_size = batch_size
        self.dtype = dtype
        self.flip = flip

    @torch.inference_mode()
    def _encode(self, images: np.ndarray, flip: bool) -> np.ndarray:
        """uint8 (n, R, R, 3) -> stored latents (n, C, h, w) in the storage dtype."""
        out = []
        for i in range(0, len(images), self.batch_size):
            # uint8 to the device, then convert there: 4x less host-to-GPU traffic than float.
            u8 = torch.from_numpy(images[i : i + self.batch_size]).to(self.device)
            x = to_model_input(u8)  # (B, 3, R, R) in [-1, 1]
            if flip:
                x = x.flip(-1)
            out.append(latents_to_numpy(self.ae.encode(x), self.dtype))  # (B, C, h, w)
        if not out:
            return np.zeros((0, *self.ae.latent_shape), STORAGE_NUMPY_DTYPE[self.dtype])
        return np.concatenate(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded chunk -> latents (+ flips) and the per-channel moments of what is stored."""
        t0 = time.perf_counter()
        # A writable copy: Ray's views are read-only.
        images = np.array(_one(batch, schema.ROW_IMAGES))
        latents = self._encode(images, flip=False)
        # Statistics of the stored (rounded) values, pooled over flips too: that is exactly
        # the distribution training samples from.
        moments = ChannelMoments.zeros(self.ae.latent_channels)
        columns = {schema.COL_LATENT: latents}
        if self.flip:
            columns[schema.COL_LATENT_FLIP] = self._encode(images, flip=True)
        for arr in columns.values():
            if len(arr):
                moments = moments.merge(
                    ChannelMoments.of(latents_to_torch(arr, self.dtype).float())
                )
        out = {k: batch[k] for k in PASSED_ON}
        out.update({k: v[None] for k, v in columns.items()})
        out[schema.ROW_COUNT] = np.array([moments.count], np.int64)
        out[schema.ROW_TOTAL] = moments.total[None]
        out[schema.ROW_TOTAL_SQ] = moments.total_sq[None]
        out[schema.ROW_ENCODE_S] = np.array([time.perf_counter() - t0])
        return out


class WriteChunk:
    """Stage 3 (I/O actors): write the chunk's shard, then its commit record."""

    def __init__(self, out: str, dtype: str, flip: bool, row_group_rows: int = 0) -> None:
        """Keep one filesystem client per actor; ``row_group_rows``: rows per Parquet row group
        (0: as many as fit in ROW_GROUP_BYTES)."""
        self.out = out
        self.fs, self.root = storage.filesystem(out)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.dtype = dtype
        self.flip = flip
        self.row_group_rows = row_group_rows

    def _table(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = json.loads(_one(batch, schema.ROW_IDS))
        cols: dict[str, Any] = {
            schema.COL_ID: pa.array(ids, pa.string()),
            schema.COL_LABEL: pa.array(np.asarray(_one(batch, schema.ROW_LABELS)), pa.int64()),
        }
        names = [schema.COL_LATENT, schema.COL_LATENT_FLIP] if self.flip else [schema.COL_LATENT]
        for col in names:
            arr = np.ascontiguousarray(_one(batch, col))  # (n, C, h, w)
            # Arrow's canonical fixed-shape tensor: Ray Data reads it back as (B, C, h, w).
            cols[col] = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
        table = pa.table(cols)
        meta = {b"svg_ray.latent_dtype": self.dtype.encode()}
        return table.replace_schema_metadata(meta)

    def _write_shard(self, table: pa.Table, rel: str) -> int:
        """Write atomically: local via a staging file + rename; S3 objects appear only when the
        (multipart) upload completes. Returns the file size."""
        final = f"{self.root}/{rel}"
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        opts: dict[str, Any] = {
            # fp16 latents are noise to a compressor: store them raw (bytes/row ~ tensor size).
            "compression": {
                c: ("zstd" if c == schema.COL_ID else "none") for c in table.column_names
            },
            "use_dictionary": False,
            "write_statistics": [schema.COL_ID, schema.COL_LABEL],
            "row_group_size": self.row_group_rows or max(1, ROW_GROUP_BYTES // row_bytes),
        }
        if self.local:
            tmp = f"{self.root}/{TMP_DIR}/{os.path.basename(rel)}.{uuid.uuid4().hex}"
            self.fs.create_dir(os.path.dirname(tmp), recursive=True)
            self.fs.create_dir(os.path.dirname(final), recursive=True)
            pq.write_table(table, tmp, filesystem=self.fs, **opts)
            self.fs.move(tmp, final)
        else:
            with self.fs.open_output_stream(final) as f:
                pq.write_table(table, f, **opts)
        return int(self.fs.get_file_info(final).size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encoded chunk -> files; returns a one-row summary."""
        t0 = time.perf_counter()
        chunk = int(_one(batch, schema.ROW_CHUNK))
        rows = len(json.loads(_one(batch, schema.ROW_IDS)))
        rel: str | None = None
        size = 0
        if rows:  # an all-bad chunk writes no (empty) shard, only its record
            rel = shard_name(chunk)
            size = self._write_shard(self._table(batch), rel)
        skipped = json.loads(_one(batch, schema.ROW_SKIPPED))
        labels, counts = np.unique(
            np.asarray(_one(batch, schema.ROW_LABELS), np.int64), return_counts=True
        )
        write_s = time.perf_counter() - t0
        record = {
            "chunk": chunk,
            "expected": int(_one(batch, schema.ROW_EXPECTED)),
            "rows": rows,
            "shard": rel,
            "bytes": size,
            "skipped": skipped,
            # label -> rows written: the manifest summarises how mixed the shards are
            "labels": {str(int(y)): int(c) for y, c in zip(labels, counts, strict=True)},
            "moments": {
                "count": int(_one(batch, schema.ROW_COUNT)),
                "total": np.asarray(_one(batch, schema.ROW_TOTAL), np.float64).tolist(),
                "total_sq": np.asarray(_one(batch, schema.ROW_TOTAL_SQ), np.float64).tolist(),
            },
            "seconds": {
                "decode": float(_one(batch, schema.ROW_DECODE_S)),
                "encode": float(_one(batch, schema.ROW_ENCODE_S)),
                "write": write_s,
            },
        }
        delay = float(os.environ.get("SVG_RAY_TEST_WRITE_DELAY_S", "0") or 0)
        if delay:  # tests only: widen the window in which a kill lands mid-job
            time.sleep(delay)
        # The record is the commit: written after the shard, so its presence means "done".
        storage.write_json(storage.join(self.out, record_name(chunk)), record)
        return {
            schema.ROW_CHUNK: np.array([chunk], np.int64),
            schema.ROW_ROWS: np.array([rows], np.int64),
            schema.ROW_SKIPPED: np.array([len(skipped)], np.int64),
            schema.ROW_BYTES: np.array([size], np.int64),
            schema.ROW_DECODE_S: batch[schema.ROW_DECODE_S],
            schema.ROW_ENCODE_S: batch[schema.ROW_ENCODE_S],
            schema.ROW_WRITE_S: np.array([write_s]),
        }


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@dataclass
class PrecomputeResult:
    """What a run did."""

    manifest: DatasetManifest
    inputs: int
    """Inputs in the plan (rows + skipped)."""
    chunks_total: int
    chunks_run: int
    """Chunks processed in this run (the rest were already committed)."""
    images_run: int
    """Inputs processed in this run."""
    seconds: float
    """Wall time of this run, planning to manifest."""
    out: str = ""
    """The dataset root written."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Summed busy time per stage in this run (decode / encode / write, across actors)."""

    @property
    def images_per_s(self) -> float:
        """Throughput of this run."""
        return self.images_run / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        """The final one-line summary."""
        m = self.manifest
        return (
            f"precompute: {self.inputs} images, {m.num_rows} encoded, {m.num_skipped} skipped; "
            f"this run {self.images_run} images in {self.seconds:.1f} s = "
            f"{self.images_per_s:.1f} images/s ({self.chunks_total - self.chunks_run} of "
            f"{self.chunks_total} chunks already done); {m.bytes_per_row / 1024:.1f} KiB/row "
            f"-> {self.out}"
        )


def _job_fingerprint(
    cfg: PrecomputeConfig, plan: InputPlan, ae_id: str, resolution: int
) -> dict[str, Any]:
    """Settings that determine the output bytes: a rerun must match them exactly."""
    return {
        "format": JOB_FORMAT,
        "autoencoder_id": ae_id,
        "resolution": resolution,
        "dtype": cfg.dtype,
        "flip": cfg.flip,
        "rows_per_shard": cfg.rows_per_shard,
        "shuffle_seed": cfg.shuffle_seed,
        "chunk_order": CHUNK_ORDER if cfg.shuffle_seed >= 0 else "sorted",
        "max_pixels": cfg.max_pixels,
        "source_uri": cfg.input,
        "source_format": plan.source_format,
        "image_column": cfg.image_column if plan.source_format == "parquet" else "",
        "num_inputs": len(plan.ids),
        "inputs_sha256": plan.fingerprint(),
    }


def _check_or_write_job(out: str, job: dict[str, Any]) -> None:
    path = storage.join(out, schema.JOB_FILE)
    if storage.exists(path):
        old = storage.read_json(path)
        diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        if diff:
            raise PrecomputeError(
                f"{out} holds output of a different precompute job (differs in {diff}); "
                "use another --out, or delete it to start over"
            )
    else:
        storage.write_json(path, job)


def _committed(out: str) -> dict[int, dict[str, Any]]:
    """Commit records already present whose shard still exists, by chunk index.

    A record whose shard has vanished (deleted by hand, lifecycle rule) does not count: that
    chunk simply runs again.
    """
    uris = storage.list_files(storage.join(out, schema.CHUNKS_DIR), suffix=".json")
    with ThreadPoolExecutor(16) as pool:  # one GET each on S3: overlap them
        records = list(pool.map(storage.read_json, uris))
    _, root = storage.filesystem(out)
    base = f"s3://{root}/" if storage.is_s3(out) else f"{root}/"
    shards = storage.list_files(storage.join(out, schema.SHARDS_DIR), suffix=".parquet")
    present = {f.removeprefix(base) for f in shards}
    done: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["shard"] is None or r["shard"] in present:
            done[int(r["chunk"])] = r
        else:
            log.warning("chunk %d: shard %s is missing; recomputing it", r["chunk"], r["shard"])
    return done


def _cluster_check(cfg: PrecomputeConfig, can_grow: bool) -> None:
    """Refuse (or, on a cluster that may autoscale, warn about) a pipeline that cannot be
    scheduled on the resources present: Ray would wait for them forever."""
    from svg_ray.ray_cluster import check_resources

    check_resources(
        cfg.decode_cpus + cfg.encoders * cfg.encode_cpus + cfg.write_cpus,
        cfg.encoders * cfg.encode_gpus,
        f"the pipeline (1 decoder x {cfg.decode_cpus:g} CPUs + {cfg.encoders} encoder(s) x "
        f"{cfg.encode_cpus:g} CPUs and {cfg.encode_gpus:g} GPUs + 1 writer x "
        f"{cfg.write_cpus:g} CPUs)",
        "lower --decode-cpus/--encode-cpus/--encode-gpus/--encoders or give a local cluster "
        "more logical CPUs (--num-cpus)",
        can_grow,
    )


def _run_chunks(cfg: PrecomputeConfig, specs: list[str], resolution: int) -> list[dict]:
    """Run the three Ray Data stages over chunk specs; returns one summary dict per chunk."""
    import ray

    ds = inputs.decoded_chunks(
        specs, resolution, cfg.max_pixels, cfg.decode_cpus, cfg.decoders
    ).map_batches(
        EncodeChunk,
        fn_constructor_kwargs={
            "autoencoder": cfg.autoencoder,
            "batch_size": cfg.batch_size,
            "dtype": cfg.dtype,
            "flip": cfg.flip,
            "device": "cuda" if cfg.encode_gpus > 0 else "cpu",
            "threads": cfg.torch_threads or max(1, int(cfg.encode_cpus)),
        },
        batch_size=1,
        num_cpus=cfg.encode_cpus,
        num_gpus=cfg.encode_gpus,
        compute=ray.data.ActorPoolStrategy(size=cfg.encoders),
    )
    ds = ds.map_batches(
        WriteChunk,
        fn_constructor_kwargs={"out": cfg.out, "dtype": cfg.dtype, "flip": cfg.flip},
        batch_size=1,
        num_cpus=cfg.write_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.writers),
    )
    with storage.unwrap_storage_errors():  # storage that kept failing: one line, not a trace
        return ds.take_all()


def build_manifest(
    cfg: PrecomputeConfig,
    plan: InputPlan,
    chunks: list[Chunk],
    records: dict[int, dict[str, Any]],
    ae_info: dict[str, Any],
) -> DatasetManifest:
    """Merge the commit records into a manifest, checking every input is accounted for."""
    missing = [c.index for c in chunks if c.index not in records]
    if missing:
        raise PrecomputeError(f"chunks {missing[:10]} were not committed; rerun to finish them")
    moments = ChannelMoments.zeros(ae_info["latent_shape"][0])
    rows = 0
    total_bytes = 0
    skipped: list[SkippedInput] = []
    shards: list[str] = []
    histograms: list[dict[int, int]] = []
    for c in chunks:
        r = records[c.index]
        if r["rows"] + len(r["skipped"]) != len(c.ids) or r["expected"] != len(c.ids):
            raise PrecomputeError(
                f"chunk {c.index}: record accounts for {r['rows']} rows + {len(r['skipped'])} "
                f"skipped but the chunk has {len(c.ids)} inputs (output folder corrupted?)"
            )
        rows += r["rows"]
        total_bytes += r["bytes"]
        skipped += [SkippedInput(i, reason) for i, reason in r["skipped"]]
        if r["shard"]:
            shards.append(r["shard"])
            histograms.append({int(y): int(n) for y, n in r["labels"].items()})
        m = r["moments"]
        moments = moments.merge(
            ChannelMoments(int(m["count"]), np.asarray(m["total"]), np.asarray(m["total_sq"]))
        )
    if rows == 0:
        raise PrecomputeError(f"no input under {cfg.input} could be decoded ({len(skipped)} bad)")
    return DatasetManifest(
        encoder=ae_info["encoder"],
        encoder_sha256=ae_info["encoder_sha256"],
        autoencoder_id=ae_info["autoencoder_id"],
        autoencoder_uri=cfg.autoencoder,
        resolution=ae_info["resolution"],
        dtype=cfg.dtype,
        latent_shape=ae_info["latent_shape"],
        num_rows=rows,
        has_flip=cfg.flip,
        class_names=plan.class_names,
        latent_stats=moments.finalize(),
        skipped=skipped,
        source_uri=cfg.input,
        source_format=plan.source_format,
        shards=shards,
        bytes_per_row=total_bytes / rows,
        shuffle_seed=cfg.chunk_seed,
        shard_labels=ShardLabelSummary.of(histograms),
    )


def autoencoder_info(uri: str) -> dict[str, Any]:
    """Checkpoint facts the job and manifest need, loading it once on the driver."""
    from svg_ray.checkpoint import CheckpointError, autoencoder_id, load_autoencoder

    if not storage.exists(uri):
        raise PrecomputeError(f"autoencoder checkpoint not found: {uri} (--autoencoder)")
    try:
        ae = load_autoencoder(uri)
    except CheckpointError as e:
        raise PrecomputeError(f"--autoencoder: {e}") from e
    return {
        "encoder": ae.cfg.dino.timm_name,
        "encoder_sha256": ae.encoder.weights_sha256 or "random",
        "autoencoder_id": autoencoder_id(uri),
        "resolution": ae.cfg.resolution,
        "latent_shape": list(ae.latent_shape),
    }


def _autoencoder_file(cfg: PrecomputeConfig) -> str:
    """The autoencoder file every actor reads: ``--autoencoder`` itself, or a registered model's
    file (read in place on S3 or a local disk, else copied beside the dataset: training reads
    the manifest's autoencoder later, after any temporary download is gone)."""
    from svg_ray.serving import source

    if not source.is_registry_uri(cfg.autoencoder):
        return cfg.autoencoder
    model = source.resolve(cfg.autoencoder, cfg.tracking_uri, None, option="--tracking-uri")
    direct = source.reads_in_place(model.weights)
    if direct is not None:
        return storage.join(direct, BUNDLE_AE)
    target = storage.join(cfg.out, BUNDLE_AE)
    with source.local_files(model) as local:
        storage.write_bytes(target, Path(local, BUNDLE_AE).read_bytes())
    return target


def run_precompute(
    cfg: PrecomputeConfig,
    connect: Callable[[], None] | None = None,
    cluster_can_grow: bool = False,
) -> PrecomputeResult:
    """Plan, run the pending chunks on Ray, write the manifest last.

    ``connect`` starts or joins a Ray cluster; it is called only when there is work to do (after
    the inputs and checkpoint are validated), and not at all if Ray is already initialised.
    ``cluster_can_grow``: the cluster may autoscale, so missing CPUs/GPUs only warn.
    """
    t0 = time.perf_counter()
    # Cheap existence checks first: a typo should fail in a second, not after a model load.
    if not storage.exists(cfg.input):
        raise PrecomputeError(f"input not found: {cfg.input} (--input)")
    cfg = dataclasses.replace(cfg, autoencoder=_autoencoder_file(cfg))
    if not storage.exists(cfg.autoencoder):
        raise PrecomputeError(
            f"autoencoder checkpoint not found: {cfg.autoencoder} (--autoencoder)"
        )
    ae_info = autoencoder_info(cfg.autoencoder)
    resolution = cfg.resolution or ae_info["resolution"]
    if resolution != ae_info["resolution"]:
        raise ConfigError(
            f"--resolution {resolution} differs from the autoencoder's {ae_info['resolution']} "
            "(its position embeddings fix the input size); leave it at 0"
        )
    plan = plan_inputs(cfg)
    chunks = make_chunks(plan, cfg.rows_per_shard, cfg.chunk_seed)
    _check_or_write_job(cfg.out, _job_fingerprint(cfg, plan, ae_info["autoencoder_id"], resolution))
    done = _committed(cfg.out)
    pending = [c for c in chunks if c.index not in done]
    summaries: list[dict] = []
    if pending:
        import ray

        if connect is not None and not ray.is_initialized():
            connect()
        _cluster_check(cfg, cluster_can_grow)
        log.info("precompute: %d of %d chunks to run", len(pending), len(chunks))
        specs = [c.spec(plan.source_format, cfg.image_column) for c in pending]
        summaries = _run_chunks(cfg, specs, resolution)
        done = _committed(cfg.out)
    manifest = build_manifest(cfg, plan, chunks, done, ae_info)
    manifest.save(cfg.out)  # last: its presence marks the dataset complete
    fs, root = storage.filesystem(cfg.out)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.delete_dir_contents(f"{root}/{TMP_DIR}", missing_dir_ok=True)
        if fs.get_file_info(f"{root}/{TMP_DIR}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{TMP_DIR}")
    return PrecomputeResult(
        manifest=manifest,
        inputs=len(plan.ids),
        chunks_total=len(chunks),
        chunks_run=len(pending),
        images_run=sum(len(c.ids) for c in pending),
        seconds=time.perf_counter() - t0,
        stage_seconds={
            k: float(sum(s[f"{k}_s"] for s in summaries)) for k in ("decode", "encode", "write")
        },
        out=cfg.out,
    )
