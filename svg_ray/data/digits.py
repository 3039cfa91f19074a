"""A small real image set that ships inside scikit-learn: 1,797 handwritten digits, 10 classes.

Each 8x8 greyscale digit is upsampled (bilinear) to an RGB square, so the demo and the tests run
on real images with nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = [str(i) for i in range(10)]


def load_digits_tensor(resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1] (N, 3, R, R) float32, labels (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


def write_image_folder(root: str | Path, resolution: int = 64, limit: int | None = None) -> int:
    """Write the digits as an ImageNet-style tree root/<class>/<id>.png; returns images written."""
    from PIL import Image

    images, labels = load_digits_tensor(resolution)
    n = len(images) if limit is None else min(limit, len(images))
    root = Path(root)
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    u8 = ((images[:n] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    for i in range(n):
        Image.fromarray(u8[i].numpy()).save(root / CLASS_NAMES[int(labels[i])] / f"{i:05d}.png")
    return n
