"""DIV2K-style dataset preparation: sub-image crops of the HR images and their bicubic LR copies.

``prepare(hr, out)`` cuts every image of ``hr`` into overlapping ``crop_size`` squares the way
BasicSR's ``extract_subimages.py`` does (480 x 480, step 240, threshold 48 by default: along each
side the crops start at 0, step, 2*step, ... while they fit, and one more crop flush with the far
edge is added when more than ``thresh_size`` pixels would otherwise be left out), and writes each
crop's MATLAB-exact bicubic downscale (:func:`calgan_fast.data.imresize`) for every scale::

    out/HR_sub/0001_s001.png ...             crop_size x crop_size
    out/LR_bicubic_sub/X2/0001_s001.png ...  crop_size/2 (X3, X4: crop_size/3, crop_size/4)

HR and LR files share names, so ``PairedFolderDataset(out/"HR_sub", out/"LR_bicubic_sub/X4")``
reads the pairs. Each LR crop is the downscale of its HR crop, so the pair aligns exactly at
every scale. Files are written atomically and a finished source image is recorded under
``out/.done``: a second run skips it, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

from .imresize import imresize
from .io import ImageError, list_images, read_image, write_image

__all__ = ["crop_positions", "expected_count", "prepare"]


def crop_positions(length: int, crop_size: int = 480, step: int = 240, thresh_size: int = 48) -> list[int]:
    """Start offsets of the crops along a side of ``length`` pixels (BasicSR's rule).

    A side shorter than ``crop_size`` gives no crop.
    """
    if length < crop_size:
        return []
    starts = list(range(0, length - crop_size + 1, step))
    if length - (starts[-1] + crop_size) > thresh_size:
        starts.append(length - crop_size)
    return starts


def expected_count(h: int, w: int, crop_size: int = 480, step: int = 240, thresh_size: int = 48) -> int:
    """Number of sub-images an ``h x w`` image gives."""
    return len(crop_positions(h, crop_size, step, thresh_size)) * len(crop_positions(w, crop_size, step,
                                                                                      thresh_size))


def _process(job) -> tuple[str, int]:
    path, out, scales, crop_size, step, thresh_size, max_pixels = job
    img = read_image(path, max_pixels=max_pixels)
    h, w = img.shape[:2]
    index = 0
    for y in crop_positions(h, crop_size, step, thresh_size):
        for x in crop_positions(w, crop_size, step, thresh_size):
            index += 1
            name = f"{path.stem}_s{index:03d}.png"
            crop = img[y:y + crop_size, x:x + crop_size]
            write_image(out / "HR_sub" / name, crop)
            for s in scales:
                write_image(out / "LR_bicubic_sub" / f"X{s}" / name, imresize(crop, 1.0 / s))
    done = out / ".done" / path.stem
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(str(index))
    return path.stem, index


def prepare(hr: str | os.PathLike, out: str | os.PathLike, scales: Sequence[int] = (2, 3, 4),
            crop_size: int = 480, step: int = 240, thresh_size: int = 48, workers: int | None = None,
            progress: bool = True, max_pixels: int = 256 * 1024 * 1024) -> dict:
    """Prepares ``hr`` into ``out`` (see the module doc); returns a summary.

    ``{"images": sources, "skipped": already finished, "sub_images": crops written now}``.
    Raises ``ImageError`` naming an unreadable source file, ``ValueError`` for settings that do
    not fit (a crop size not divisible by a scale, ``out`` prepared with other settings).
    """
    scales = sorted({int(s) for s in scales})
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"scales: expected integers >= 1, got {list(scales)}")
    if crop_size < 1 or step < 1 or thresh_size < 0:
        raise ValueError(f"crop_size/step/thresh_size: got {crop_size}/{step}/{thresh_size}")
    bad = [s for s in scales if crop_size % s]
    if bad:
        raise ValueError(f"crop_size {crop_size} is not divisible by scale(s) {bad}: the LR crops would "
                         "not align with the HR crops")
    files = list_images(hr, "HR folder")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ImageError(f"{p}: same name as {stems[p.stem].name}; sub-image names would collide")
        stems[p.stem] = p
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"crop_size": crop_size, "step": step, "thresh_size": thresh_size, "scales": scales}
    record = out / "prepare.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old != settings:
            raise ValueError(f"{out}: prepared with other settings ({old}); use another --out")
    else:
        tmp = record.with_name(".prepare.json.tmp")
        tmp.write_text(json.dumps(settings))
        os.replace(tmp, record)
    todo = [p for p in files if not (out / ".done" / p.stem).is_file()]
    jobs = [(p, out, scales, crop_size, step, thresh_size, max_pixels) for p in todo]
    workers = max(1, min(workers or (os.cpu_count() or 1), len(jobs) or 1))
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="img", desc="prepare", disable=not progress or not jobs)
    written = 0
    if workers == 1:
        for job in jobs:
            written += _process(job)[1]
            bar.update()
    else:
        with get_context("spawn").Pool(workers) as pool:
            for _, n in pool.imap_unordered(_process, jobs):
                written += n
                bar.update()
    bar.close()
    return {"images": len(files), "skipped": len(files) - len(todo), "sub_images": written}
