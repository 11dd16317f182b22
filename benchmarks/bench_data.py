"""Training data loading speed: samples per second of the three ways to feed the trainer.

    python -m benchmarks.bench_data --out benchmarks/results/cpu_data.json

* ``hr_folder``: ``HRFolderDataset`` on whole DIV2K-sized images, the LR crop made on the fly by
  the MATLAB-exact bicubic;
* ``paired``: ``PairedFolderDataset`` on whole HR images and their x4 LR copies;
* ``sub_images``: ``PairedFolderDataset`` on the output of ``calgan prepare`` (480 x 480 HR
  sub-images and their 120 x 120 LR copies).

The images are synthetic photographs of DIV2K's size (2040 x 1356 by default: smooth colour
fields with grain, so that PNG decoding costs what it costs on photos), written to a temporary
folder. Each case loads ``--batches`` batches of ``--batch`` training crops (``--gt-size``, x4)
through a ``DataLoader`` with 0 and with ``--workers`` worker processes, after one warm-up batch,
and reports samples per second. For the sub-images it also splits one file's cost into reading
its bytes and decoding them: an LMDB (BasicSR's format stores the same PNG bytes) can only save
the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from calgan_fast.data import HRFolderDataset, PairedFolderDataset, TrainSampler, imresize, write_image
from calgan_fast.data.prepare import prepare


def _photos(folder: Path, n: int, h: int, w: int) -> None:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.stack([np.sin(xx / (37 + 5 * c + i)) * np.cos(yy / (23 + 3 * c)) for c in range(3)], 2)
        img = (img * 90 + 128 + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
        write_image(folder / f"{i:04d}.png", img)


def _rate(ds, batch: int, batches: int, workers: int, seed: int = 0) -> float:
    loader = DataLoader(
        ds,
        batch_size=batch,
        sampler=TrainSampler(len(ds), seed=seed),
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    it = iter(loader)
    next(it)  # warm-up: worker start, first decodes
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", default="1356x2040", help="HxW of the synthetic images")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--gt-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()
    h, w = map(int, args.size.split("x"))
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _photos(root / "hr", args.images, h, w)
        (root / "lr").mkdir()
        from calgan_fast.data import read_image

        for p in sorted((root / "hr").iterdir()):
            write_image(root / "lr" / p.name, imresize(read_image(p), 0.25))
        prepare(root / "hr", root / "prep", scales=[4], workers=args.workers, progress=False)
        cases = {
            "hr_folder": HRFolderDataset(root / "hr", 4, args.gt_size),
            "paired": PairedFolderDataset(root / "hr", root / "lr", 4, args.gt_size),
            "sub_images": PairedFolderDataset(
                root / "prep" / "HR_sub", root / "prep" / "LR_bicubic_sub" / "X4", 4, args.gt_size
            ),
        }
        for name, ds in cases.items():
            for workers in (0, args.workers):
                rate = _rate(ds, args.batch, args.batches, workers)
                results.append(
                    {
                        "case": name,
                        "workers": workers,
                        "samples_per_s": round(rate, 1),
                        "dataset_images": len(ds),
                    }
                )
                print(f"{name:11s} workers={workers}  {rate:7.1f} samples/s")
        import cv2

        subs = sorted((root / "prep" / "HR_sub").iterdir())
        t0 = time.perf_counter()
        bufs = [np.fromfile(str(p), dtype=np.uint8) for p in subs]
        t1 = time.perf_counter()
        for b in bufs:
            cv2.imdecode(b, cv2.IMREAD_UNCHANGED)
        t2 = time.perf_counter()
        split = {
            "files": len(subs),
            "read_bytes_ms": round(1e3 * (t1 - t0) / len(subs), 3),
            "decode_ms": round(1e3 * (t2 - t1) / len(subs), 3),
        }
        print(f"sub-image file: read {split['read_bytes_ms']} ms, decode {split['decode_ms']} ms")
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {
            "images": args.images,
            "size": [h, w],
            "batch": args.batch,
            "batches": args.batches,
            "gt_size": args.gt_size,
            "scale": 4,
        },
        "results": results,
        "sub_image_file": split,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
