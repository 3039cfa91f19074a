"""Per-image reconstruction metrics on uint8 images: PSNR and SSIM, computed in float64.

Both compare what a user would save: uint8 (n, H, W, 3) originals and reconstructions. SSIM is
Wang et al. 2004 with its standard constants (11x11 Gaussian window, sigma 1.5, K1 0.01,
K2 0.03, data range 1, population statistics, valid positions only), averaged over channels and
positions, as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PSNR_MAX_DB = 100.0
"""PSNR reported for identical images (their MSE is 0)."""
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float64 (n, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (n, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).to(torch.float64) / 255.0


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR in dB per image (n,) of uint8 images, data range 255; capped at PSNR_MAX_DB."""
    x, y = _as_float(a), _as_float(b)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))  # (n,) on the [0, 1] scale
    floor = 10.0 ** (-PSNR_MAX_DB / 10.0)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(floor))).numpy()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian (size, size), float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean SSIM per image (n,) of uint8 images (n, H, W, 3), H and W >= 11."""
    x, y = _as_float(a), _as_float(b)
    _, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {h}x{w}")
    win = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).expand(c, 1, -1, -1)  # (C, 1, k, k)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)  # (n, C, H-k+1, W-k+1): valid positions only

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()
