"""Image bytes -> RGB uint8 -> ADM centre crop (or a seeded random crop), robust to bad files.

Every failure becomes a *reason string*, never an exception that escapes: a dataset job must not
die on one corrupt file, and every skipped file must be listed with why (the manifest does that).

Preprocessing is the ADM/DiT ``center_crop_arr`` (openai/guided-diffusion
``image_datasets.py``, copied by facebookresearch/DiT ``train.py``): halve with a BOX filter while
the short side is at least twice the target, BICUBIC-resize so the short side equals the target,
then crop the centre square. SVG's diffusion stage trains on exactly this crop.

The reference autoencoder trains on a random square of the short-side-resized image (taming's
ImagePaths: SmallestMaxSize then RandomCrop). ``random_crop_arr`` resizes the same way as the
centre crop and picks the window from a generator; ``crop_rng`` derives that generator from a
seed and the image bytes, so a resumed run (or another worker) cuts the same window.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Default bound on decoded pixels (W*H): ~300 MB as RGB, far above any real ImageNet photo."""
MAX_ASPECT = 4.0
"""Long/short side ratio above which the long side is pre-cropped (see center_crop_arr)."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | str:
    """Decode image bytes to an RGB PIL image, or return why that is impossible.

    Greyscale, 16-bit, palette, CMYK and alpha images are converted to RGB (alpha is composited
    onto white, so transparent regions get a defined colour instead of whatever RGB hid under
    them). EXIF orientation is applied. Images above ``max_pixels`` are refused from their header,
    before any pixel is decoded (decompression bombs).
    """
    if not data:
        return "empty file (0 bytes)"
    old_limit = Image.MAX_IMAGE_PIXELS
    # PIL's own bomb check warns above the limit and errors above twice it; make both errors
    # with *our* limit, then restore the global for the rest of the process.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img: Image.Image = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                return "not an image: no decoder recognises the bytes"
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                return f"too large: {e} (max_pixels {max_pixels})"
            w, h = img.size
            if w * h > max_pixels:
                return f"too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}"
            if w < 1 or h < 1:
                return f"degenerate size {w}x{h}"
            img.load()  # truncated and corrupt files fail here, not at open()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"too large: {e}"
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error...
        return f"corrupt or truncated: {type(e).__name__}: {e}"
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: PIL's convert('RGB') clips at 255; scale to 8 bits instead.
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


Crop = Literal["center", "random"]


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: RGB PIL image -> uint8 array (size, size, 3).

    One deviation, only for extreme aspect ratios (long/short > MAX_ASPECT): the long side is
    first cropped to MAX_ASPECT x the short side around the centre. The final crop keeps only the
    central square, so this changes at most the sub-pixel alignment of the halving steps, and
    without it a 5x100000 strip would be upscaled to billions of pixels.
    """
    arr = resize_short_side(img, size)
    y0 = (arr.shape[0] - size) // 2
    x0 = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[y0 : y0 + size, x0 : x0 + size])


def random_crop_arr(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed (size, size) window of the short-side-``size`` image (the reference
    autoencoder's training crop); uint8 (size, size, 3). Resizing as ``center_crop_arr``."""
    arr = resize_short_side(img, size)
    y0 = int(rng.integers(0, arr.shape[0] - size + 1))
    x0 = int(rng.integers(0, arr.shape[1] - size + 1))
    return np.ascontiguousarray(arr[y0 : y0 + size, x0 : x0 + size])


def crop_rng(seed: int, data: bytes) -> np.random.Generator:
    """The crop generator of one image: a function of the run's seed and the image bytes only
    (not of file order, worker or batch), so every pass with this seed cuts the same window."""
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def resize_short_side(img: Image.Image, size: int) -> np.ndarray:
    """ADM resize: BOX-halve while the short side is >= 2 * size, BICUBIC to short side
    ``size``; uint8 (H, W, 3) with min(H, W) == size (long side pre-cropped to MAX_ASPECT x)."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        keep = int(MAX_ASPECT * min(w, h))
        left, top = (w - min(w, keep)) // 2, (h - min(h, keep)) // 2
        img = img.crop((left, top, left + min(w, keep), top + min(h, keep)))
    while min(*img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(*img.size)
    target = (round(img.width * scale), round(img.height * scale))
    img = img.resize(target, resample=Image.Resampling.BICUBIC)
    return np.asarray(img)


def prepare_image(
    data: bytes,
    resolution: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    crop: Crop = "center",
    seed: int = 0,
) -> np.ndarray | str:
    """Image bytes -> cropped uint8 (resolution, resolution, 3), or a reason string.

    ``crop='center'``: the ADM centre crop; ``'random'``: ``random_crop_arr`` with the window
    drawn from ``crop_rng(seed, data)``.
    """
    img = decode_rgb(data, max_pixels)
    if isinstance(img, str):
        return img
    try:
        if crop == "random":
            arr = random_crop_arr(img, resolution, crop_rng(seed, data))
        else:
            arr = center_crop_arr(img, resolution)
    except Exception as e:  # e.g. MemoryError on a pathological size: skip, do not die
        return f"resize failed: {type(e).__name__}: {e}"
    if arr.shape != (resolution, resolution, 3):
        return f"resize failed: got shape {arr.shape}"
    return arr


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], the input of ``encode``."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # Ray hands out read-only views; torch warns on those
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
