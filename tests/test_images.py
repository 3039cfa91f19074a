"""Image decoding and the ADM centre crop: exact values, every bad-file kind, the pixel bound."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svg_ray.data.images import (
    center_crop_arr,
    decode_rgb,
    prepare_image,
    random_crop_arr,
    resize_short_side,
    to_model_input,
)

RES = 64


def _png(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (structure for the resize filters to act on)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


# The bad-image set, shared with test_precompute: name -> (bytes, kept?, reason prefix).
def bad_image_set() -> dict[str, tuple[bytes, bool, str]]:
    """Every kind of awkward input a real dataset holds; ``kept`` says whether it is usable."""
    good_png = _png(_photo(80, 60, 1))
    corrupt = bytearray(_png(_photo(80, 60, 6)))
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 20 : idat + 60] = bytes(b ^ 0x5A for b in corrupt[idat + 20 : idat + 60])
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    pal = _photo(50, 40, 2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgba = Image.new("RGBA", (30, 30), (10, 20, 30, 0))  # fully transparent
    grey16 = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    return {
        "corrupt.png": (bytes(corrupt), False, "corrupt"),  # valid header, garbled pixel data
        "garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, False, "not an image"),
        "truncated.png": (good_png[: len(good_png) // 2], False, "corrupt"),
        "empty.png": (b"", False, "empty file"),
        "notes.txt": (b"not an image, just some text\n" * 10, False, "not an image"),
        "huge.png": (_png(Image.new("L", (2200, 2000))), False, "too large"),
        "cmyk.jpg": (_png(cmyk, "JPEG", quality=95), True, ""),
        "grey.png": (_png(_photo(40, 40, 3).convert("L")), True, ""),
        "grey16.png": (_png(grey16), True, ""),
        "palette.png": (_png(pal), True, ""),
        "rgba.png": (_png(rgba), True, ""),
        "tiny.png": (_png(_photo(5, 5, 4)), True, ""),
        "strip.png": (_png(_photo(400, 3, 5)), True, ""),
    }


BAD_SET_MAX_PIXELS = 4_000_000
"""Pixel bound used with the bad-image set (huge.png has 4.4M pixels)."""


def write_bad_images(folder: Path) -> dict[str, tuple[bool, str]]:
    """Write the set into ``folder``; returns name -> (kept, reason prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (data, kept, reason) in bad_image_set().items():
        (folder / name).write_bytes(data)
        out[name] = (kept, reason)
    return out


def adm_center_crop_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """openai/guided-diffusion image_datasets.center_crop_arr, as DiT copies it (the oracle)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size),  # type: ignore[arg-type]
            resample=Image.BOX,
        )
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size),  # type: ignore[arg-type]
        resample=Image.BICUBIC,
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("size", [(64, 64), (300, 200), (200, 300), (700, 517), (5, 5), (129, 64)])
def test_center_crop_matches_adm_exactly(size: tuple[int, int]) -> None:
    img = _photo(*size)
    got = center_crop_arr(img, RES)
    assert got.shape == (RES, RES, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, adm_center_crop_reference(img, RES))


def test_extreme_aspect_is_bounded_and_centred() -> None:
    # 4 x 2000: plain ADM would resize to 64 x 32000; the pre-crop keeps it at 64 x 256.
    ramp = np.linspace(0, 255, 2000).round().astype(np.uint8)  # value = position along the strip
    strip = np.repeat(ramp[:, None, None], 4, axis=1).repeat(3, axis=2)
    got = center_crop_arr(Image.fromarray(strip), RES)
    assert got.shape == (RES, RES, 3)
    assert abs(got.astype(float).mean() - 127.5) < 1.0  # only the middle 4 rows are visible
    assert int(got.max()) - int(got.min()) <= 2


def test_mode_conversions_give_the_right_rgb() -> None:
    s = bad_image_set()
    red = decode_rgb(s["cmyk.jpg"][0])
    assert isinstance(red, Image.Image) and red.mode == "RGB"
    r, g, b = np.asarray(red).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15
    grey = np.asarray(decode_rgb(s["grey.png"][0]))
    assert grey.shape == (40, 40, 3)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    white = np.asarray(decode_rgb(s["rgba.png"][0]))  # transparent -> composited on white
    assert (white == 255).all()
    g16 = np.asarray(decode_rgb(s["grey16.png"][0]))  # 16-bit full scale -> 255, not clipped junk
    assert (g16 == 255).all()
    pal = decode_rgb(s["palette.png"][0])
    assert isinstance(pal, Image.Image) and pal.mode == "RGB"


@pytest.mark.parametrize("name", sorted(bad_image_set()))
def test_bad_image_set_never_raises(name: str) -> None:
    data, kept, reason = bad_image_set()[name]
    res = prepare_image(data, RES, max_pixels=BAD_SET_MAX_PIXELS)
    if kept:
        assert isinstance(res, np.ndarray) and res.shape == (RES, RES, 3), res
    else:
        assert isinstance(res, str) and res.startswith(reason), res


def test_pixel_bound_is_checked_from_the_header_and_restored() -> None:
    before = Image.MAX_IMAGE_PIXELS
    data = _png(Image.new("RGB", (1200, 1000)))
    res = decode_rgb(data, max_pixels=1_000_000)
    assert isinstance(res, str) and res.startswith("too large") and "1000000" in res
    # Far above PIL's own 2x limit: PIL raises DecompressionBombError inside open().
    res = decode_rgb(data, max_pixels=100_000)
    assert isinstance(res, str) and res.startswith("too large")
    assert Image.MAX_IMAGE_PIXELS == before
    assert isinstance(decode_rgb(data, max_pixels=1_200_000), Image.Image)


def test_to_model_input_range_and_layout() -> None:
    u8 = np.zeros((2, 4, 4, 3), np.uint8)
    u8[0, :, :, 0] = 255
    u8.flags.writeable = False  # what Ray hands to a stage
    x = to_model_input(u8)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert x[0, 0].eq(1).all() and x[0, 1].eq(-1).all() and x[1].eq(-1).all()


def _find_window(full: np.ndarray, crop: np.ndarray) -> tuple[int, int]:
    """(y0, x0) where ``crop`` sits in ``full`` (exactly), or fail."""
    size = crop.shape[0]
    hits = [
        (y, x)
        for y in range(full.shape[0] - size + 1)
        for x in range(full.shape[1] - size + 1)
        if np.array_equal(full[y : y + size, x : x + size], crop)
    ]
    assert hits, "the random crop is not a window of the resized image"
    return hits[0]


def test_random_crop_is_a_uniform_window_of_the_adm_resize() -> None:
    """A window of the short-side-RES image (ADM resizing: the centre crop is one of them),
    anywhere along the long side, never across the short side."""
    img = _photo(300, 200)  # resized to 96 x 64: windows at x0 in 0..32
    full = resize_short_side(img, RES)
    assert full.shape == (RES, 96, 3)
    np.testing.assert_array_equal(full[:, 16:80], adm_center_crop_reference(img, RES))
    offsets = []
    for seed in range(60):
        crop = random_crop_arr(img, RES, np.random.default_rng(seed))
        assert crop.shape == (RES, RES, 3) and crop.dtype == np.uint8
        y0, x0 = _find_window(full, crop)
        assert y0 == 0
        offsets.append(x0)
    assert min(offsets) <= 3 and max(offsets) >= 29 and len(set(offsets)) > 20


def test_random_crop_depends_on_seed_and_bytes_only() -> None:
    """prepare_image(crop='random') cuts the same window for the same (seed, bytes), whatever
    else happened in between (resumed runs, other workers), and another for another seed."""
    buf = io.BytesIO()
    _photo(260, 130).save(buf, format="PNG")
    data = buf.getvalue()
    a = prepare_image(data, RES, crop="random", seed=7)
    np.random.seed(123)  # global numpy state plays no part
    b = prepare_image(data, RES, crop="random", seed=7)
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    np.testing.assert_array_equal(a, b)
    others = [prepare_image(data, RES, crop="random", seed=s) for s in range(8)]
    assert any(not np.array_equal(a, o) for o in others)
    centre = prepare_image(data, RES)  # the default stays the ADM centre crop
    np.testing.assert_array_equal(centre, adm_center_crop_reference(_photo(260, 130), RES))


def test_training_decode_stage_passes_the_crop_and_its_seed(tmp_path: Path) -> None:
    """The autoencoder job's decode stage cuts the same seeded window as prepare_image."""
    from svg_ray.data import schema
    from svg_ray.training.image_data import ImageInput, decode_sources

    f = tmp_path / "wide.png"
    _photo(300, 150).save(f)
    src = ImageInput(str(tmp_path), resolution=RES, crop="random")
    out = decode_sources([str(f)], "folder", src, crop_seed=5)
    want = prepare_image(f.read_bytes(), RES, crop="random", seed=5)
    assert isinstance(want, np.ndarray) and out["ok"].all()
    np.testing.assert_array_equal(out[schema.COL_IMAGE][0], want)
    centre = decode_sources([str(f)], "folder", ImageInput(str(tmp_path), resolution=RES))
    assert not np.array_equal(centre[schema.COL_IMAGE][0], want)  # one of 65 windows
