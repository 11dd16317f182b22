"""Evaluation of SR results against ground truth: per-image and mean PSNR/SSIM (Y, border crop).

Outputs are written as ``metrics.csv``, ``metrics.json`` and ``metrics.md`` (a Markdown table).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..data import ImageError, img2tensor, list_images, read_image, tensor2img
from ..metrics import psnr, ssim
from .inference import upscale_tiled

__all__ = ["evaluate_pairs", "evaluate_folders", "evaluate_model", "write_results"]


def _match(sr_files: list[Path], gt_files: list[Path], scale: int, gt_dir) -> list[tuple[Path, Path]]:
    by_stem = {p.stem: p for p in sr_files}
    pairs, missing = [], []
    for g in gt_files:
        cands = [g.stem, f"{g.stem}x{scale}", f"{g.stem}_x{scale}", f"{g.stem}_SR", f"{g.stem}_out"]
        s = next((by_stem[c] for c in cands if c in by_stem), None)
        (pairs.append((s, g)) if s is not None else missing.append(g.name))
    if missing:
        raise ImageError(f"{gt_dir}: no SR image for {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}")
    return pairs


def evaluate_pairs(pairs, scale: int, crop_border: int | None = None, test_y_channel: bool = True) -> dict:
    """``pairs``: iterable of ``(name, sr (H, W, 3) uint8, gt (H', W', 3) uint8)``.

    GT is cropped to the SR size when it is larger by less than ``scale`` (images whose size is
    not a multiple of the scale). Returns ``{"images": [{name, psnr, ssim}], "mean": {...}}``.
    """
    border = scale if crop_border is None else crop_border
    rows = []
    for name, sr, gt in pairs:
        h, w = sr.shape[:2]
        if gt.shape[0] - h not in range(scale) or gt.shape[1] - w not in range(scale):
            raise ImageError(f"{name}: SR is {w}x{h} but GT is {gt.shape[1]}x{gt.shape[0]}")
        gt = gt[:h, :w]
        rows.append({"name": name, "psnr": psnr(sr, gt, border, test_y_channel),
                     "ssim": ssim(sr, gt, border, test_y_channel)})
    if not rows:
        raise ImageError("nothing to evaluate")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim")}
    return {"images": rows, "mean": mean, "crop_border": border, "y_channel": test_y_channel}


def evaluate_folders(sr_dir, gt_dir, scale: int = 4, crop_border: int | None = None,
                     test_y_channel: bool = True) -> dict:
    """Compares every GT image with the SR image of the same name (or ``NAMEx4``...)."""
    pairs = _match(list_images(sr_dir, "--sr folder"), list_images(gt_dir, "--gt folder"), scale, gt_dir)
    return evaluate_pairs(((g.name, read_image(s), read_image(g)) for s, g in pairs), scale,
                          crop_border, test_y_channel)


@torch.no_grad()
def evaluate_model(model, lr_dir, gt_dir, scale: int = 4, crop_border: int | None = None,
                   test_y_channel: bool = True, tile: int | None = None, device: str = "cpu") -> dict:
    """Runs ``model`` on the LR images (matched by name to GT) and evaluates its outputs."""
    lrs = list_images(lr_dir, "--lr folder")
    pairs = _match(lrs, list_images(gt_dir, "--gt folder"), scale, gt_dir)

    def gen():
        for lr_path, g in pairs:
            lq = img2tensor(read_image(lr_path))[None].to(device)
            sr = upscale_tiled(model, lq, scale, tile)[0]
            yield g.name, tensor2img(sr), read_image(g)

    return evaluate_pairs(gen(), scale, crop_border, test_y_channel)


def markdown_table(res: dict) -> str:
    lines = ["| image | PSNR (dB) | SSIM |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['psnr']:.4f} | {r['ssim']:.4f} |" for r in res["images"]]
    lines.append(f"| **mean** | **{res['mean']['psnr']:.4f}** | **{res['mean']['ssim']:.4f}** |")
    note = "Y channel" if res["y_channel"] else "RGB"
    return "\n".join(lines) + f"\n\nPSNR/SSIM on {note}, {res['crop_border']}-pixel border removed.\n"


def write_results(res: dict, out_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Writes ``metrics.{csv,json,md}`` into ``out_dir``; refuses to replace files unless asked."""
    out = Path(out_dir)
    paths = [out / f"metrics.{ext}" for ext in ("csv", "json", "md")]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["image", "psnr", "ssim"])
    for r in res["images"]:
        wr.writerow([r["name"], f"{r['psnr']:.6f}", f"{r['ssim']:.6f}"])
    wr.writerow(["mean", f"{res['mean']['psnr']:.6f}", f"{res['mean']['ssim']:.6f}"])
    texts = [buf.getvalue(), json.dumps(res, indent=2), markdown_table(res)]
    for p, text in zip(paths, texts):
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    return paths
