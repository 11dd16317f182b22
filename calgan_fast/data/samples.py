"""Sample photographs for the quick start, taken from scikit-image's bundled data.

They are written as PNG into a folder on first use so that the quick start goes through the same
folder dataset as a real training set.
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import list_images, read_image, write_image

__all__ = ["SAMPLE_NAMES", "sample_images"]

#: Colour photographs that scikit-image installs with the package (no download needed).
SAMPLE_NAMES = ("astronaut.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "coffee.png")
# Held out for validation in the quick start.
VAL_NAMES = ("coffee.png",)


def sample_images(folder: str | os.PathLike, split: str = "train") -> Path:
    """Writes the sample photos into ``folder/<split>`` (once) and returns that folder.

    ``split="train"`` holds every sample but the validation one; ``"val"`` holds that one.
    """
    try:
        import skimage.data as skdata
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the sample images come from scikit-image: pip install scikit-image "
                          "(or install calgan_fast with the [train] extra)") from exc
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    out = Path(folder) / split
    names = [n for n in SAMPLE_NAMES if (n in VAL_NAMES) == (split == "val")]
    src_dir = Path(skdata.__file__).parent
    for name in names:
        path = out / f"{Path(name).stem}.png"
        if not path.exists():
            write_image(path, read_image(src_dir / name))
    list_images(out)
    return out
