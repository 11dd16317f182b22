"""Training and evaluation datasets, and a resumable, rank-aware sampler.

Items are dicts ``{"lq": (3, h, w) float32 in [0, 1], "gt": (3, s*h, s*w) float32, "path": str}``.
Randomness (crop position, flips, rotations) comes from a per-sample seed handed over by
:class:`TrainSampler` together with the index, so a sample is the same whatever the number of
loader workers, the number of processes or where a resumed run restarts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .imresize import imresize
from .io import DEFAULT_MAX_PIXELS, ImageError, list_images, read_image

__all__ = [
    "HRFolderDataset",
    "PairedFolderDataset",
    "TrainSampler",
    "img2tensor",
    "tensor2img",
    "augment",
]


def img2tensor(img: np.ndarray) -> torch.Tensor:
    """RGB ``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def tensor2img(t: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> RGB ``(H, W, 3)`` uint8 (rounded, clipped)."""
    arr = t.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu().numpy()
    return arr.transpose(1, 2, 0)


def augment(imgs: list[np.ndarray], rng: np.random.Generator, hflip: bool, rot: bool) -> list[np.ndarray]:
    """The same random horizontal flip / vertical flip / transpose (the 8 dihedral views) on all."""
    do_h = hflip and rng.random() < 0.5
    do_v = rot and rng.random() < 0.5
    do_t = rot and rng.random() < 0.5
    out = []
    for im in imgs:
        if do_h:
            im = im[:, ::-1]
        if do_v:
            im = im[::-1]
        if do_t:
            im = im.transpose(1, 0, 2)
        out.append(np.ascontiguousarray(im))
    return out


def _key(item) -> tuple[int, int]:
    # Items come as (index, seed) from TrainSampler or as a plain index (evaluation: seed = index).
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), int(item)


class _FolderBase(Dataset):
    def __init__(self, skip_bad: bool, cache: bool, max_pixels: int):
        self.skip_bad = skip_bad
        self.cache = cache
        self.max_pixels = max_pixels
        self._mem: dict[Path, np.ndarray] = {}
        self._bad: set[int] = set()

    def _read(self, path: Path, min_size: int = 1) -> np.ndarray:
        if self.cache and path in self._mem:
            return self._mem[path]
        img = read_image(path, self.max_pixels, min_size)
        if self.cache:
            self._mem[path] = img
        return img

    def _screen(self, files: list[Path], min_size: int) -> list[Path]:
        """Header-level checks up front, so that a long run does not die on image 700."""
        from .io import image_size

        kept = []
        for p in files:
            try:
                size = image_size(p)
                if size is not None and size[0] * size[1] > self.max_pixels:
                    raise ImageError(f"{p}: {size[1]}x{size[0]} image exceeds the limit of "
                                     f"{self.max_pixels} pixels (datasets.*.max_pixels)")
                if size is not None and min(size) < min_size:
                    raise ImageError(f"{p}: {size[1]}x{size[0]} image is smaller than the "
                                     f"{min_size}-pixel side needed")
            except ImageError as exc:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping {exc}", stacklevel=3)
                continue
            kept.append(p)
        if not kept:
            raise ImageError(f"{files[0].parent}: no usable images left")
        return kept

    def _get_with_skip(self, index: int, seed: int, load):
        n = len(self)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return load(i, seed)
            except ImageError as exc:
                if not self.skip_bad:
                    raise
                self._bad.add(i)
                warnings.warn(f"skipping {exc}", stacklevel=2)
        raise ImageError("every image of the dataset failed to load")


class HRFolderDataset(_FolderBase):
    """High-resolution images; the LR input is made on the fly by MATLAB-compatible bicubic.

    Args:
        root: folder of HR images. scale: 2, 3 or 4.
        gt_size: HR crop side (a multiple of ``scale``), or None for the whole image cropped to a
            multiple of ``scale`` (evaluation).
        use_hflip, use_rot: random flips and 90° rotations.
        skip_bad: warn and skip unreadable/corrupt/too-small/huge images instead of raising.
        cache: keep decoded images in memory (small sets). max_pixels: decompression-bomb limit.
    """

    def __init__(self, root: str | os.PathLike, scale: int = 4, gt_size: int | None = 128,
                 use_hflip: bool = True, use_rot: bool = True, skip_bad: bool = False,
                 cache: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(skip_bad, cache, max_pixels)
        if gt_size is not None and gt_size % scale:
            raise ValueError(f"gt_size: {gt_size} is not a multiple of scale {scale}")
        self.scale, self.gt_size = scale, gt_size
        self.use_hflip, self.use_rot = use_hflip, use_rot
        self.files = self._screen(list_images(root, "dataroot_gt"), gt_size or scale)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int, seed: int) -> dict:
        path = self.files[index]
        s = self.scale
        hr = self._read(path, self.gt_size or s)
        if self.gt_size is None:
            hr = hr[: hr.shape[0] // s * s, : hr.shape[1] // s * s]
        else:
            rng = np.random.default_rng(seed)
            top = int(rng.integers(0, hr.shape[0] - self.gt_size + 1))
            left = int(rng.integers(0, hr.shape[1] - self.gt_size + 1))
            hr = hr[top:top + self.gt_size, left:left + self.gt_size]
            (hr,) = augment([hr], rng, self.use_hflip, self.use_rot)
        lq = imresize(hr, 1.0 / s)
        return {"lq": img2tensor(lq), "gt": img2tensor(hr), "path": str(path)}

    def __getitem__(self, item) -> dict:
        index, seed = _key(item)
        return self._get_with_skip(index, seed, self._load)


class PairedFolderDataset(_FolderBase):
    """Pairs of HR and LR images matched by name (``baby.png`` with ``baby.png`` or ``babyx4.png``).

    Args as :class:`HRFolderDataset`, plus ``root_lq``; crops are taken at matching positions.
    """

    def __init__(self, root_gt: str | os.PathLike, root_lq: str | os.PathLike, scale: int = 4,
                 gt_size: int | None = None, use_hflip: bool = True, use_rot: bool = True,
                 skip_bad: bool = False, cache: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(skip_bad, cache, max_pixels)
        if gt_size is not None and gt_size % scale:
            raise ValueError(f"gt_size: {gt_size} is not a multiple of scale {scale}")
        self.scale, self.gt_size = scale, gt_size
        self.use_hflip, self.use_rot = use_hflip, use_rot
        gts = list_images(root_gt, "dataroot_gt")
        lqs = {p.stem: p for p in list_images(root_lq, "dataroot_lq")}
        pairs, missing = [], []
        for g in gts:
            lq = lqs.get(g.stem) or lqs.get(f"{g.stem}x{scale}")
            (pairs.append((g, lq)) if lq is not None else missing.append(g.name))
        if missing:
            raise ImageError(f"{root_lq}: no LR image for {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''} (looked for NAME and NAMEx{scale})")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int, seed: int) -> dict:
        gpath, lpath = self.pairs[index]
        s = self.scale
        hr, lq = self._read(gpath), self._read(lpath)
        h, w = lq.shape[:2]
        if hr.shape[0] < h * s or hr.shape[1] < w * s:
            raise ImageError(f"{gpath}: {hr.shape[1]}x{hr.shape[0]} is smaller than x{s} its LR image "
                             f"{lpath.name} ({w}x{h})")
        hr = hr[: h * s, : w * s]
        if self.gt_size is not None:
            lsz = self.gt_size // s
            if min(h, w) < lsz:
                raise ImageError(f"{lpath}: {w}x{h} image is smaller than the {lsz}-pixel crop needed")
            rng = np.random.default_rng(seed)
            top, left = int(rng.integers(0, h - lsz + 1)), int(rng.integers(0, w - lsz + 1))
            lq = lq[top:top + lsz, left:left + lsz]
            hr = hr[top * s:(top + lsz) * s, left * s:(left + lsz) * s]
            hr, lq = augment([hr, lq], rng, self.use_hflip, self.use_rot)
        return {"lq": img2tensor(lq), "gt": img2tensor(hr), "path": str(gpath)}

    def __getitem__(self, item) -> dict:
        index, seed = _key(item)
        return self._get_with_skip(index, seed, self._load)


class TrainSampler(Sampler):
    """Endless shuffled ``(index, seed)`` stream, split across ranks, restartable at any sample.

    Epoch ``e`` visits ``randperm(n)`` drawn from ``seed + e``; global position ``g`` of the
    stream goes to rank ``g % world_size``. ``start`` is the number of items this rank has
    already consumed (``iteration * batch_size`` on resume). Each item carries its own seed for
    the dataset's random crop and augmentation.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.start
        epoch, perm = -1, None
        while True:
            g = k * self.world + self.rank
            e, pos = divmod(g, self.n)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            # A 63-bit sample seed, distinct per (run seed, global position).
            sample_seed = (self.seed * 1_000_003 + g * 7919 + 12345) % (2**63)
            yield int(perm[pos]), sample_seed
            k += 1
