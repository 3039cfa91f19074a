"""Column and file names shared by the precompute job, training and tools: defined once here."""

from __future__ import annotations

# Latent Parquet shards (one row per image).
COL_ID = "id"
"""Stable image id (relative path or source key); unique per dataset."""
COL_LABEL = "label"
"""Class index (int), from the sorted class names."""
COL_LATENT = "latent"
"""Latent of the image, fixed-shape tensor (C, h, w) in the manifest's dtype."""
COL_LATENT_FLIP = "latent_flip"
"""Latent of the horizontally flipped image (present when precomputed with flips)."""

# Image inputs.
COL_IMAGE = "image"
"""Encoded image bytes (Parquet input) or a decoded uint8 (H, W, 3) array between stages."""
COL_PATH = "path"
"""Source path/URI of an image."""

# Files inside a precomputed dataset directory.
MANIFEST = "manifest.json"
"""Written last: a dataset without it is incomplete."""
SHARDS_DIR = "shards"
"""Parquet shards live below this folder."""
CHUNKS_DIR = "chunks"
"""Per-chunk commit records of the precompute job (rows, skipped inputs, latent moments)."""
JOB_FILE = "job.json"
"""The precompute job's fingerprint; a rerun into the same root must match it."""
