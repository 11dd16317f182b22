"""PSNR and SSIM with the BasicSR conventions used by SR papers.

Images are RGB ``(H, W, 3)`` uint8 (or float in [0, 255]). With ``test_y_channel`` both are
converted to the Y channel of ITU-R BT.601 YCbCr (studio range, ``16 + 65.481 R' + 128.553 G' +
24.966 B'`` with R', G', B' in [0, 1], no rounding) and ``crop_border`` pixels are removed on every
side (the scale, by convention). SSIM is Wang et al.'s with an 11x11 Gaussian window (sigma 1.5),
constants for a 255 range, averaged over the valid (unpadded) window positions and the channels.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["psnr", "ssim", "rgb_to_y"]


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """RGB ``(H, W, 3)`` in [0, 255] -> Y ``(H, W)`` float64 in [16, 235]."""
    x = img.astype(np.float64) / 255.0
    return 16.0 + x @ np.array([65.481, 128.553, 24.966])


def _prepare(img: np.ndarray, ref: np.ndarray, crop_border: int, test_y_channel: bool):
    if img.shape != ref.shape:
        raise ValueError(f"img and ref: shapes differ, {img.shape} vs {ref.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border: must be >= 0, got {crop_border}")
    if test_y_channel and img.ndim == 3 and img.shape[2] == 3:
        img, ref = rgb_to_y(img), rgb_to_y(ref)
    else:
        img, ref = img.astype(np.float64), ref.astype(np.float64)
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
        ref = ref[crop_border:-crop_border, crop_border:-crop_border]
    if img.size == 0:
        raise ValueError(f"crop_border: {crop_border} leaves nothing of a {ref.shape} image")
    return img, ref


def psnr(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """PSNR in dB of ``img`` against ``ref`` (both ``(H, W[, 3])`` in [0, 255]); inf when equal."""
    a, b = _prepare(img, ref, crop_border, test_y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _ssim_2d(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    win = g @ g.T
    f = lambda t: cv2.filter2D(t, -1, win)[5:-5, 5:-5]  # valid positions only
    mu_a, mu_b = f(a), f(b)
    var_a = f(a * a) - mu_a**2
    var_b = f(b * b) - mu_b**2
    cov = f(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """SSIM of ``img`` against ``ref`` (both ``(H, W[, 3])`` in [0, 255]), in [-1, 1]."""
    a, b = _prepare(img, ref, crop_border, test_y_channel)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after the crop, got {a.shape[:2]}")
    if a.ndim == 2:
        return _ssim_2d(a, b)
    return float(np.mean([_ssim_2d(a[..., i], b[..., i]) for i in range(a.shape[2])]))
