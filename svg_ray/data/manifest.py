"""The manifest of a precomputed latent dataset: what produced the shards and how to read them.

``<root>/manifest.json`` is written LAST by the precompute job, so a dataset without it is
incomplete (the job died or is still running) and training refuses it. Field names are a contract
with the training and serving code: add fields, never rename them.

Layout of a dataset root (local path or ``s3://bucket/prefix``)::

    manifest.json            this file (DatasetManifest)
    shards/part-000000.parquet ...   one row per image: id, label, latent[, latent_flip]
    chunks/chunk-000000.json ...     per-chunk commit records (rows, skipped inputs, moments,
                                     label histogram)
    job.json                 the job's fingerprint; a rerun with other settings is refused
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from svg_ray import storage
from svg_ray.config import from_dict
from svg_ray.data import schema
from svg_ray.data.latents import LATENT_DTYPES, LatentStats
from svg_ray.errors import SvgRayError

MANIFEST_FORMAT = "svg-ray-latents/1"
MIXED_FRACTION = 0.8
"""Shards count as mixed when their median class count reaches this share of a random sample's."""


class ManifestError(SvgRayError, RuntimeError):
    """A precomputed dataset is missing, incomplete or malformed."""


@dataclass
class SkippedInput:
    """An input image that was not encoded, and why."""

    id: str
    """The image id it would have had (relative path, or ``file.parquet:row``)."""
    reason: str
    """Human-readable cause, e.g. ``undecodable: cannot identify image file``."""


def expected_classes(counts: np.ndarray, n: int) -> float:
    """Distinct labels expected among ``n`` draws with replacement from rows with these per-class
    ``counts`` (the iid baseline of a shard or batch)."""
    p = np.asarray(counts, np.float64)
    p = p[p > 0] / p.sum()
    return float((1.0 - (1.0 - p) ** n).sum())


@dataclass
class ShardLabelSummary:
    """How many classes the shards hold, against a random sample of the same size."""

    shards: int
    """Non-empty shards summarised."""
    classes_min: int
    """Fewest distinct labels in one shard."""
    classes_median: float
    """Median distinct labels per shard."""
    classes_max: int
    """Most distinct labels in one shard."""
    iid_classes: float
    """Distinct labels expected in a random sample of the median shard size from the dataset."""

    @property
    def mixed(self) -> bool:
        """Whether shards look like random samples of the dataset (not class-sorted runs)."""
        return self.classes_median >= MIXED_FRACTION * self.iid_classes

    @classmethod
    def of(cls, histograms: list[dict[int, int]]) -> ShardLabelSummary:
        """Summarise per-shard label histograms (label -> rows); empty shards are ignored."""
        hists = [h for h in histograms if sum(h.values()) > 0]
        if not hists:
            raise ValueError("no non-empty shard histograms to summarise")
        classes = np.array([len([c for c in h.values() if c > 0]) for h in hists])
        totals: dict[int, int] = {}
        for h in hists:
            for label, c in h.items():
                totals[label] = totals.get(label, 0) + c
        n = int(np.median([sum(h.values()) for h in hists]))
        return cls(
            shards=len(hists),
            classes_min=int(classes.min()),
            classes_median=float(np.median(classes)),
            classes_max=int(classes.max()),
            iid_classes=expected_classes(np.array(list(totals.values())), n),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (with the derived ``mixed`` flag, for people reading the file)."""
        d = dataclasses.asdict(self)
        return {**d, "iid_classes": round(self.iid_classes, 3), "mixed": self.mixed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardLabelSummary:
        """Inverse of to_dict (``mixed`` is recomputed)."""
        return from_dict(cls, {k: v for k, v in d.items() if k != "mixed"}, "shard_labels")


@dataclass
class DatasetManifest:
    """Everything a reader needs to trust and use a latent dataset."""

    encoder: str
    """timm architecture name of the frozen DINO encoder."""
    encoder_sha256: str
    """sha256 of the DINO weights the autoencoder was built with ('random' in tests)."""
    autoencoder_id: str
    """Content id of the autoencoder checkpoint (``checkpoint.autoencoder_id``)."""
    autoencoder_uri: str
    """Where that checkpoint was read from."""
    resolution: int
    """Square image size the images were centre-cropped to."""
    dtype: str
    """Storage dtype of the latent columns: 'float16' or 'bfloat16' (bf16 stored as uint16 bits)."""
    latent_shape: tuple[int, int, int]
    """(C, h, w) of one latent."""
    num_rows: int
    """Rows over all shards: one per successfully encoded image."""
    has_flip: bool
    """Whether the ``latent_flip`` column (horizontally flipped image) is present."""
    class_names: list[str]
    """Label index -> class name (sorted names for folder inputs)."""
    latent_stats: LatentStats
    """Per-channel mean/std (C values each) over every stored latent (flips included)."""
    skipped: list[SkippedInput] = field(default_factory=list)
    """Inputs that could not be used, with reasons."""
    source_uri: str = ""
    """The input folder or Parquet location."""
    source_format: str = "folder"
    """'folder' (ImageNet-style tree) or 'parquet' (encoded bytes + label column)."""
    shards: list[str] = field(default_factory=list)
    """Shard paths relative to the dataset root, in chunk order."""
    shuffle_seed: int | None = None
    """Seed of the random assignment of inputs to shards; None: shards hold consecutive runs of
    the sorted input list (written by an older precompute, or with --shuffle-seed -1)."""
    shard_labels: ShardLabelSummary | None = None
    """Classes per shard against a random sample's; None for datasets of older precomputes."""
    bytes_per_row: float = 0.0
    """Average stored shard bytes per row (latent columns dominate)."""
    created: str = ""
    """UTC creation time, ISO 8601."""
    format: str = MANIFEST_FORMAT
    """Format tag of this file."""

    def __post_init__(self) -> None:
        if self.dtype not in LATENT_DTYPES:
            raise ManifestError(f"manifest dtype {self.dtype!r} is not one of {LATENT_DTYPES}")
        self.latent_shape = (
            int(self.latent_shape[0]),
            int(self.latent_shape[1]),
            int(self.latent_shape[2]),
        )
        if self.latent_stats.channels != self.latent_shape[0]:
            raise ManifestError(
                f"latent stats have {self.latent_stats.channels} channels but latents have "
                f"{self.latent_shape[0]}"
            )
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @property
    def num_skipped(self) -> int:
        """How many inputs were skipped."""
        return len(self.skipped)

    @property
    def shards_mixed(self) -> bool:
        """Whether every shard is a random sample of the dataset. Older precomputes (no label
        summary) cut the sorted input list: class-sorted shards for a class-folder tree."""
        if self.shard_labels is not None:
            return self.shard_labels.mixed
        return False

    @property
    def columns(self) -> list[str]:
        """The shard columns."""
        cols = [schema.COL_ID, schema.COL_LABEL, schema.COL_LATENT]
        return [*cols, schema.COL_LATENT_FLIP] if self.has_flip else cols

    def shard_uris(self, root: str) -> list[str]:
        """Full URIs of the shards below dataset ``root``."""
        return [storage.join(root, s) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "format": self.format,
            "encoder": self.encoder,
            "encoder_sha256": self.encoder_sha256,
            "autoencoder_id": self.autoencoder_id,
            "autoencoder_uri": self.autoencoder_uri,
            "resolution": self.resolution,
            "dtype": self.dtype,
            "latent_shape": list(self.latent_shape),
            "num_rows": self.num_rows,
            "has_flip": self.has_flip,
            "class_names": list(self.class_names),
            "latent_stats": self.latent_stats.to_dict(),
            "skipped": [{"id": s.id, "reason": s.reason} for s in self.skipped],
            "source_uri": self.source_uri,
            "source_format": self.source_format,
            "shards": list(self.shards),
            "bytes_per_row": self.bytes_per_row,
            "shuffle_seed": self.shuffle_seed,
            "shard_labels": self.shard_labels.to_dict() if self.shard_labels else None,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetManifest:
        """Inverse of to_dict; rejects other formats."""
        if d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"manifest format {d.get('format')!r} is not {MANIFEST_FORMAT!r} "
                "(written by another version of svg-ray?)"
            )
        try:
            return cls(
                encoder=str(d["encoder"]),
                encoder_sha256=str(d["encoder_sha256"]),
                autoencoder_id=str(d["autoencoder_id"]),
                autoencoder_uri=str(d["autoencoder_uri"]),
                resolution=int(d["resolution"]),
                dtype=str(d["dtype"]),
                latent_shape=tuple(d["latent_shape"]),  # type: ignore[arg-type]
                num_rows=int(d["num_rows"]),
                has_flip=bool(d["has_flip"]),
                class_names=[str(c) for c in d["class_names"]],
                latent_stats=LatentStats.from_dict(d["latent_stats"]),
                skipped=[SkippedInput(str(s["id"]), str(s["reason"])) for s in d["skipped"]],
                source_uri=str(d.get("source_uri", "")),
                source_format=str(d.get("source_format", "folder")),
                shards=[str(s) for s in d.get("shards", [])],
                bytes_per_row=float(d.get("bytes_per_row", 0.0)),
                shuffle_seed=None if d.get("shuffle_seed") is None else int(d["shuffle_seed"]),
                shard_labels=(
                    ShardLabelSummary.from_dict(d["shard_labels"])
                    if d.get("shard_labels")
                    else None
                ),
                created=str(d.get("created", "")),
            )
        except KeyError as e:
            raise ManifestError(f"manifest lacks field {e}") from None

    def save(self, root: str) -> None:
        """Write ``<root>/manifest.json`` (atomically on local paths; S3 PUT is atomic)."""
        storage.write_json(storage.join(root, schema.MANIFEST), self.to_dict())


def manifest_uri(uri: str) -> str:
    """The manifest file for a dataset root, or ``uri`` itself if it names the file."""
    return uri if uri.rstrip("/").endswith(schema.MANIFEST) else storage.join(uri, schema.MANIFEST)


def load_manifest(uri: str) -> DatasetManifest:
    """Read the manifest of the dataset at ``uri`` (its root or the manifest file itself)."""
    path = manifest_uri(uri)
    if not storage.exists(path):
        raise ManifestError(
            f"no precomputed dataset at {uri}: {schema.MANIFEST} is missing. The precompute job "
            "writes it last, so the job either never ran there or did not finish; rerun "
            "`svg-ray precompute --out ...` with the same settings to resume it."
        )
    try:
        data = storage.read_json(path)
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    return DatasetManifest.from_dict(data)
