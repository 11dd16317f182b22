"""Image files: reading with clear errors, header-only size checks, writing atomically.

Images are handled as RGB ``(H, W, 3)`` uint8 numpy arrays (OpenCV reads BGR; converted here).
The pixel count is read from the file header before decoding so that a decompression bomb is
rejected without allocating it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "image_size", "list_images", "read_image", "write_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Default pixel limit (about a 16k x 16k photo); DIV2K images are ~2.8 Mpx.
DEFAULT_MAX_PIXELS = 256 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be used; the message starts with the file's path."""


def list_images(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """Sorted image files directly in ``folder``; ``ImageError`` when missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: {what} not found (or not a directory)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ImageError(f"{folder}: {what} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(2)
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        code = marker[1]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        length = struct.unpack(">H", seg)[0]
        if code in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return h, w
        f.seek(length - 2, 1)


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(H, W)`` from the header of a PNG, JPEG or BMP file without decoding; None if unknown.

    Raises ``ImageError`` when the file cannot be opened. A header claiming an empty image is
    reported as unknown: decoding will then say the file is corrupt.
    """
    size = _header_size(path)
    return size if size is not None and min(size) > 0 else None


def _header_size(path) -> tuple[int, int] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(26)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return h, w
            if head[:2] == b"\xff\xd8":
                return _jpeg_size(f)
            if head[:2] == b"BM" and len(head) >= 26:
                w, h = struct.unpack("<ii", head[18:26])
                return abs(h), abs(w)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open ({exc.strerror or exc})") from None
    return None


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = 1) -> np.ndarray:
    """Reads an image as RGB ``(H, W, 3)`` uint8 (grey is expanded, alpha dropped, 16 bit scaled).

    Raises ``ImageError`` naming the file when it is unreadable, corrupt, smaller than
    ``min_size`` on a side, or larger than ``max_pixels`` (checked on the header first).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    size = image_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(f"{path}: {size[1]}x{size[0]} image exceeds the limit of {max_pixels} pixels "
                         "(datasets.*.max_pixels)")
    buf = np.fromfile(str(path), dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    except cv2.error as exc:  # OpenCV's own pixel limit, truncated streams, ...
        raise ImageError(f"{path}: cannot decode image ({str(exc).strip().splitlines()[-1]})") from None
    if img is None:
        raise ImageError(f"{path}: cannot decode image (corrupt or unsupported format)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageError(f"{path}: {img.shape[1]}x{img.shape[0]} image exceeds the limit of {max_pixels} "
                         "pixels (datasets.*.max_pixels)")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"{path}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if min(img.shape[:2]) < min_size:
        raise ImageError(f"{path}: {img.shape[1]}x{img.shape[0]} image is smaller than the "
                         f"{min_size}-pixel side needed")
    return np.ascontiguousarray(img[:, :, ::-1])


def write_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Writes RGB ``(H, W, 3)`` uint8 (or ``(H, W)``) via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img[:, :, ::-1] if img.ndim == 3 else img
    ok, enc = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(arr))
    if not ok:
        raise ImageError(f"{path}: cannot encode image")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    enc.tofile(str(tmp))
    os.replace(tmp, path)
