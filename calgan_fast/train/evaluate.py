"""Evaluation of SR results against ground truth: per-image and mean PSNR/SSIM (Y, border crop).

Outputs are written as ``metrics.csv``, ``metrics.json`` and ``metrics.md`` (a Markdown table).
``metrics.json`` is strict JSON: a value that is not a finite number (the PSNR of an image
identical to its ground truth is infinite) is written as the string ``"inf"``, ``"-inf"`` or
``"nan"``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..data import ImageError, img2tensor, list_images, read_image, tensor2img
from ..metrics import psnr, ssim
from .inference import upscale_tiled

__all__ = ["json_safe", "learned_metrics", "markdown_table", "evaluate_pairs", "evaluate_folders", "evaluate_model", "write_results"]


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: must be an integer >= 1, got {scale!r}")


def _match(sr_files: list[Path], gt_files: list[Path], scale: int, gt_dir) -> list[tuple[Path, Path]]:
    by_stem: dict[str, list[Path]] = {}
    for p in sr_files:
        by_stem.setdefault(p.stem, []).append(p)
    pairs, missing = [], []
    for g in gt_files:
        cands = [g.stem, f"{g.stem}x{scale}", f"{g.stem}_x{scale}", f"{g.stem}_SR", f"{g.stem}_out"]
        found = next((by_stem[c] for c in cands if c in by_stem), None)
        if found is not None and len(found) > 1:
            raise ImageError(f"{found[0].parent}: {' and '.join(p.name for p in found)} are both the image "
                             f"for {g.name}; keep one")
        s = found[0] if found else None
        (pairs.append((s, g)) if s is not None else missing.append(g.name))
    if missing:
        raise ImageError(f"{gt_dir}: no SR image for {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}")
    return pairs


def learned_metrics(vgg16=None, lpips_weights=None, dists_weights=None, inception=None,
                    notes: list | None = None) -> tuple[dict, object]:
    """The learned metrics whose weights are found: ``({"lpips": m, "dists": m}, fid_extractor)``.

    A metric whose file is missing is left out and a line naming the file is added to ``notes``.
    """
    from ..metrics import DISTS, LPIPS, InceptionFeatures

    found, fid_ext = {}, None
    for key, build in (("lpips", lambda: LPIPS(vgg16, lpips_weights)),
                       ("dists", lambda: DISTS(vgg16, dists_weights)),
                       ("fid", lambda: InceptionFeatures(inception))):
        try:
            m = build()
        except FileNotFoundError as exc:
            if notes is not None:
                notes.append(f"{key.upper()} skipped: {exc}")
            continue
        if key == "fid":
            fid_ext = m
        else:
            found[key] = m
    return found, fid_ext


def evaluate_pairs(pairs, scale: int, crop_border: int | None = None, test_y_channel: bool = True,
                   learned: dict | None = None, fid_extractor=None) -> dict:
    """``pairs``: iterable of ``(name, sr (H, W, 3) uint8, gt (H', W', 3) uint8)``.

    GT is cropped to the SR size when it is larger by less than ``scale`` (images whose size is
    not a multiple of the scale). ``learned`` maps a name to a metric module ``m(sr, gt) -> (B,)``
    (LPIPS, DISTS) computed per image; ``fid_extractor`` adds the set-level FID.
    Returns ``{"images": [{name, psnr, ssim, ...}], "mean": {...}, "fid": float | None}``.
    """
    from ..metrics import frechet_distance

    _check_scale(scale)
    border = scale if crop_border is None else crop_border
    learned = learned or {}
    rows, feats_sr, feats_gt = [], [], []
    for name, sr, gt in pairs:
        h, w = sr.shape[:2]
        if gt.shape[0] - h not in range(scale) or gt.shape[1] - w not in range(scale):
            raise ImageError(f"{name}: SR is {w}x{h} but GT is {gt.shape[1]}x{gt.shape[0]}")
        gt = gt[:h, :w]
        try:
            row = {"name": name, "psnr": psnr(sr, gt, border, test_y_channel),
                   "ssim": ssim(sr, gt, border, test_y_channel)}
        except ValueError as exc:  # the metrics name their arguments (img, crop_border): name the file
            msg = str(exc).removeprefix("img and ref: ").removeprefix("img: ")
            raise ImageError(f"{name}: {msg}") from None
        if learned or fid_extractor is not None:
            ts, tg = img2tensor(sr)[None], img2tensor(gt)[None]
            for key, m in learned.items():
                row[key] = float(m(ts, tg)[0])
            if fid_extractor is not None:
                feats_sr.append(fid_extractor(ts).double().numpy())
                feats_gt.append(fid_extractor(tg).double().numpy())
        rows.append(row)
    if not rows:
        raise ImageError("nothing to evaluate")
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    fid_value = None
    if feats_sr and len(feats_sr) >= 2:
        a, b = np.concatenate(feats_sr), np.concatenate(feats_gt)
        fid_value = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"images": rows, "mean": mean, "fid": fid_value, "crop_border": border, "y_channel": test_y_channel}


def evaluate_folders(sr_dir, gt_dir, scale: int = 4, crop_border: int | None = None,
                     test_y_channel: bool = True, learned: dict | None = None, fid_extractor=None) -> dict:
    """Compares every GT image with the SR image of the same name (or ``NAMEx4``...)."""
    _check_scale(scale)
    pairs = _match(list_images(sr_dir, "--sr folder"), list_images(gt_dir, "--gt folder"), scale, gt_dir)
    return evaluate_pairs(((g.name, read_image(s), read_image(g)) for s, g in pairs), scale,
                          crop_border, test_y_channel, learned, fid_extractor)


@torch.no_grad()
def evaluate_model(model, lr_dir, gt_dir, scale: int = 4, crop_border: int | None = None,
                   test_y_channel: bool = True, tile: int | None = None, device: str = "cpu",
                   learned: dict | None = None, fid_extractor=None) -> dict:
    """Runs ``model`` on the LR images (matched by name to GT) and evaluates its outputs."""
    _check_scale(scale)
    lrs = list_images(lr_dir, "--lr folder")
    pairs = _match(lrs, list_images(gt_dir, "--gt folder"), scale, gt_dir)

    def gen():
        for lr_path, g in pairs:
            lq = img2tensor(read_image(lr_path))[None].to(device)
            sr = upscale_tiled(model, lq, scale, tile)[0]
            yield g.name, tensor2img(sr), read_image(g)

    return evaluate_pairs(gen(), scale, crop_border, test_y_channel, learned, fid_extractor)


_TITLES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "dists": "DISTS"}


def markdown_table(res: dict) -> str:
    """The per-image results and their mean as a Markdown table."""
    keys = list(res["mean"])
    lines = ["| image | " + " | ".join(_TITLES.get(k, k) for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    lines += [f"| {r['name']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for r in res["images"]]
    lines.append("| **mean** | " + " | ".join(f"**{res['mean'][k]:.4f}**" for k in keys) + " |")
    note = "Y channel" if res["y_channel"] else "RGB"
    tail = f"\n\nPSNR/SSIM on {note}, {res['crop_border']}-pixel border removed."
    if res.get("fid") is not None:
        tail += f" FID over the set: {res['fid']:.4f}."
    return "\n".join(lines) + tail + "\n"


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
    keys = list(res["mean"])
    wr.writerow(["image", *keys])
    for r in res["images"]:
        wr.writerow([r["name"], *(f"{r[k]:.6f}" for k in keys)])
    wr.writerow(["mean", *(f"{res['mean'][k]:.6f}" for k in keys)])
    texts = [buf.getvalue(), json.dumps(json_safe(res), indent=2, allow_nan=False), markdown_table(res)]
    for p, text in zip(paths, texts):
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    return paths
