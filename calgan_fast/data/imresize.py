"""Bicubic resizing that reproduces MATLAB's ``imresize`` (the convention of published LR sets).

MATLAB's ``imresize(img, 1/s, 'bicubic')`` uses Keys' cubic kernel with a = -0.5, widens the
kernel by ``s`` when downscaling (antialiasing), mirrors the image at its borders, resizes one
dimension at a time (the one shrunk most first) in double precision and, for uint8 images,
rounds back to uint8 after *each* pass (this reproduces published LR sets bit for bit). Each 1-D
pass is a small dense ``(out, in)`` weight matrix, so a resize is two matrix products.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize", "resize_weights"]


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The ``(out_len, in_len)`` float64 matrix of one bicubic 1-D pass (rows sum to 1)."""
    width = 4.0
    if scale < 1 and antialias:
        kernel = lambda t: scale * _cubic(scale * t)
        width = width / scale
    else:
        kernel = _cubic
    # Output pixel i (1-based) sits at input coordinate u; MATLAB's pixel-centre convention.
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    w = kernel(u[:, None] - idx)
    w /= w.sum(axis=1, keepdims=True)
    # Out-of-range taps are mirrored (symmetric padding, the edge pixel repeated).
    period = 2 * in_len
    j = np.mod(idx.astype(np.int64) - 1, period)
    j = np.where(j < in_len, j, period - 1 - j)
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), j.ravel()), w.ravel())
    return mat


def imresize(img: np.ndarray, scale: float | None = None, output_shape: tuple[int, int] | None = None,
             antialias: bool = True) -> np.ndarray:
    """MATLAB-compatible bicubic resize.

    Args:
        img: ``(H, W)`` or ``(H, W, C)`` uint8 or float array (floats are not clipped).
        scale: factor for both dimensions (``0.25`` for x4 downscaling); output size is
            ``ceil(H * scale), ceil(W * scale)`` as in MATLAB.
        output_shape: ``(h, w)`` instead of ``scale``.
    Returns:
        the resized array: uint8 (rounded and clipped) for uint8 input, else in the input's float
        dtype (float64 for integer types other than uint8).
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"img: expected (H, W) or (H, W, C), got shape {img.shape}")
    h, w = img.shape[:2]
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize: give exactly one of scale and output_shape")
    if output_shape is None:
        if scale <= 0:
            raise ValueError(f"scale: must be positive, got {scale}")
        sh = sw = float(scale)
        out_h, out_w = math.ceil(h * sh - 1e-9), math.ceil(w * sw - 1e-9)
    else:
        out_h, out_w = output_shape
        sh, sw = out_h / h, out_w / w
    if out_h < 1 or out_w < 1:
        raise ValueError(f"imresize: output size {(out_h, out_w)} is empty for input {(h, w)}")
    x = img.astype(np.float64)
    wh = resize_weights(h, out_h, sh, antialias)
    ww = resize_weights(w, out_w, sw, antialias)
    # MATLAB shrinks the dimension with the smaller scale first (rows on ties).
    to_u8 = img.dtype == np.uint8
    rows = lambda a: np.tensordot(wh, a, axes=(1, 0))
    cols = lambda a: np.moveaxis(np.tensordot(ww, a, axes=(1, 1)), 0, 1)
    first, second = (rows, cols) if sh <= sw else (cols, rows)
    x = first(x)
    if to_u8:  # MATLAB returns the input class from every 1-D pass
        x = np.clip(np.floor(x + 0.5), 0, 255)
    x = second(x)
    if to_u8:
        return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)
    return x.astype(img.dtype if np.issubdtype(img.dtype, np.floating) else np.float64)
