"""PNG encoding for responses: byte-for-byte deterministic for the same pixels."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image

from svg_ray.generate import image_grid


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes. PIL writes no timestamp, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def grid_png(images: list[np.ndarray]) -> bytes:
    """Several uint8 (H, W, 3) images as one near-square PNG grid (one image: itself)."""
    if len(images) == 1:
        return encode_png(images[0])
    nrow = math.ceil(math.sqrt(len(images)))
    grid = image_grid(torch.from_numpy(np.stack(images)), nrow=nrow)
    return encode_png(grid.numpy())


def b64(data: bytes) -> str:
    """Standard base64 text for JSON."""
    return base64.b64encode(data).decode("ascii")


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3); for clients and tests."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
