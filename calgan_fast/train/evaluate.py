"""Benchmark evaluation of SR methods over several test sets, laid out like the paper's Table 1.

A *set* is a folder of HR (ground-truth) images. Its LR inputs are made from the HR images with
the MATLAB-compatible bicubic (each HR image cropped to a multiple of the scale, then
``imresize(hr, 1/scale)``; this reproduces the published ``LR_bicubic`` sets bit for bit), unless
an LR folder is given. A *method* turns an LR image into an SR image: a generator, the bicubic
baseline (MATLAB bicubic upscaling of the same LR), or a folder of SR images made elsewhere.

Metrics: PSNR and SSIM are the library's own (BasicSR conventions: Y channel, ``scale`` pixels of
border removed); LPIPS, DISTS, BRISQUE, NIQE and FID are pyiqa's (:mod:`calgan_fast.metrics.iqa`).
FID is computed per set and method between the whole SR images and the whole HR images (cropped
to the SR size), each resized to 299x299 by clean-fid; see ``docs/evaluation.md``.

Results (``write_results``): ``metrics.json`` (everything), ``metrics_per_image.csv``,
``metrics_per_set.csv`` and ``metrics.md`` (rows: set x metric, columns: methods).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import ImageError, img2tensor, imresize, list_images, read_image, tensor2img, write_image
from ..metrics import psnr, ssim
from ..metrics.iqa import (
    DEFAULT_METRICS,
    IQA_METRICS,
    MetricWeightsError,
    build_metric,
    check_metric_names,
    fid_folders,
)
from .inference import upscale_tiled

__all__ = ["json_safe", "EvalSet", "Method", "MetricSuite", "bicubic_lr", "bicubic_method", "evaluate",
           "evaluate_folders", "folder_method", "markdown_table", "model_method", "resolve_sets",
           "write_results"]

_TITLES = {"psnr": "PSNR↑", "ssim": "SSIM↑", "lpips": "LPIPS↓", "lpips-vgg": "LPIPS-VGG↓", "dists": "DISTS↓",
           "brisque": "BRISQUE↓", "niqe": "NIQE↓", "fid": "FID↓"}


@dataclass
class EvalSet:
    """A test set: a name, its HR folder and, optionally, a folder of given LR inputs."""

    name: str
    gt_dir: Path
    lr_dir: Path | None = None


@dataclass
class Method:
    """An SR method: ``run(name, lr) -> sr`` with RGB uint8 arrays (``name`` is the HR file name)."""

    label: str
    run: Callable[[str, np.ndarray], np.ndarray]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The LR input of an HR image: cropped to a multiple of ``scale``, MATLAB bicubic ``1/scale``."""
    h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    if h == 0 or w == 0:
        raise ImageError(f"{hr.shape[1]}x{hr.shape[0]} image is smaller than the scale {scale}")
    return imresize(np.ascontiguousarray(hr[:h, :w]), 1.0 / scale)


def bicubic_method(scale: int) -> Method:
    """The bicubic baseline: MATLAB bicubic upscaling of the LR input (uint8)."""
    return Method("Bicubic", lambda name, lr: imresize(lr, float(scale)))


def model_method(model: torch.nn.Module, scale: int, label: str = "model", tile: int | None = None,
                 device: str | torch.device = "cpu", save_dir: str | os.PathLike | None = None) -> Method:
    """A generator as a method; with ``save_dir`` its SR images are written there as PNG."""
    dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def run(name: str, lr: np.ndarray) -> np.ndarray:
        lq = img2tensor(lr)[None].to(device, dtype)
        sr = tensor2img(upscale_tiled(model, lq, scale, tile)[0].float())
        if save_dir is not None:
            write_image(Path(save_dir) / f"{Path(name).stem}.png", sr)
        return sr

    return Method(label, run)


def _find_sr(sr_files: dict[str, Path], gt_name: str, scale: int) -> Path | None:
    stem = Path(gt_name).stem
    for c in (stem, f"{stem}x{scale}", f"{stem}_x{scale}", f"{stem}_SR", f"{stem}_out"):
        if c in sr_files:
            return sr_files[c]
    return None


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"``.

    Strict JSON has no ``Infinity``: the PSNR of an image identical to its ground truth is written
    as the string ``"inf"``.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _images_by_stem(folder, what: str) -> dict[str, Path]:
    """The images of ``folder`` by file stem; two files with one stem (``a.png``, ``a.jpg``) are an error."""
    files: dict[str, Path] = {}
    for p in list_images(folder, what):
        if p.stem in files:
            raise ImageError(f"{folder}: {files[p.stem].name} and {p.name} share the name {p.stem!r}; "
                             "keep one")
        files[p.stem] = p
    return files


def folder_method(sr_dir: str | os.PathLike, scale: int, label: str = "SR") -> Method:
    """SR images made elsewhere, matched to each HR image by name (``baby.png``, ``babyx4.png``...)."""
    files = _images_by_stem(sr_dir, "--sr folder")

    def run(name: str, lr: np.ndarray) -> np.ndarray:
        p = _find_sr(files, name, scale)
        if p is None:
            raise ImageError(f"{sr_dir}: no SR image for {name}")
        return read_image(p)

    return Method(label, run)


def resolve_sets(entries: Sequence[str], data_root: str | os.PathLike | None = None) -> list[EvalSet]:
    """Test sets from ``--sets`` entries: a folder of HR images, a folder holding ``HR/``, or a name
    looked up under ``data_root`` (``<root>/<name>/HR`` or ``<root>/<name>``)."""
    sets = []
    for e in entries:
        cands = [Path(e)]
        if data_root is not None:
            cands.insert(0, Path(data_root) / e)
        found = None
        for c in cands:
            if (c / "HR").is_dir():
                found = c / "HR"
            elif c.is_dir():
                found = c
            if found is not None:
                break
        if found is None:
            where = f" under --data-root {data_root}" if data_root is not None else " (give --data-root)"
            raise ImageError(f"{e}: test set not found{where}; expected <set>/HR or a folder of HR images")
        name = Path(e).name if found.name != "HR" else found.parent.name
        sets.append(EvalSet(name, found))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"--sets: two sets share a name ({', '.join(names)})")
    return sets


class MetricSuite:
    """The metrics of one evaluation: the library's PSNR/SSIM and the pyiqa metrics asked for.

    ``names=None`` is the default set (:data:`calgan_fast.metrics.iqa.DEFAULT_METRICS`): a metric of it
    that cannot be built (pyiqa not installed, weights missing offline) is left out and a note is
    added to ``notes``. A metric asked for by name that cannot be built raises.
    """

    def __init__(self, names: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 crop_border: int = 4, test_y_channel: bool = True, notes: list | None = None):
        strict = names is not None
        self.names = check_metric_names(DEFAULT_METRICS if names is None else names)
        self.device, self.crop_border, self.test_y_channel = device, crop_border, test_y_channel
        self.iqa: dict = {}
        kept = []
        for n in self.names:
            if n in IQA_METRICS:
                try:
                    self.iqa[n] = build_metric(n, device)
                except (ImportError, MetricWeightsError) as exc:
                    if strict and isinstance(exc, ImportError):
                        raise ValueError(str(exc)) from None
                    if strict:
                        raise
                    if notes is not None:
                        notes.append(f"{n} left out: {exc}")
                    continue
            kept.append(n)
        self.names = kept

    @property
    def per_image(self) -> list[str]:
        return [n for n in self.names if IQA_METRICS.get(n, ("", ""))[1] != "set"]

    @property
    def wants_fid(self) -> bool:
        return "fid" in self.iqa

    @torch.no_grad()
    def score(self, sr: np.ndarray, gt: np.ndarray) -> dict:
        row = {}
        ts = tg = None
        for n in self.per_image:
            if n == "psnr":
                row[n] = psnr(sr, gt, self.crop_border, self.test_y_channel)
            elif n == "ssim":
                row[n] = ssim(sr, gt, self.crop_border, self.test_y_channel)
            else:
                if ts is None:
                    ts = img2tensor(sr)[None].to(self.device)
                    tg = img2tensor(gt)[None].to(self.device)
                m = self.iqa[n]
                v = m(ts, tg) if IQA_METRICS[n][1] == "fr" else m(ts)
                row[n] = float(torch.as_tensor(v).reshape(-1)[0])
        return row


def _fit_gt(name: str, sr: np.ndarray, gt: np.ndarray, scale: int) -> np.ndarray:
    h, w = sr.shape[:2]
    if gt.shape[0] - h not in range(scale) or gt.shape[1] - w not in range(scale):
        raise ImageError(f"{name}: SR is {w}x{h} but GT is {gt.shape[1]}x{gt.shape[0]}")
    return gt[:h, :w]


def _lr_for(s: EvalSet, gt_path: Path, hr: np.ndarray, scale: int, lr_files: dict | None) -> np.ndarray:
    if lr_files is None:
        return bicubic_lr(hr, scale)
    p = _find_sr(lr_files, gt_path.name, scale)
    if p is None:
        raise ImageError(f"{s.lr_dir}: no LR image for {gt_path.name}")
    return read_image(p)


def evaluate(sets: Sequence[EvalSet], methods: Sequence[Method], suite: MetricSuite, scale: int = 4,
             progress: bool = False) -> dict:
    """Every method on every set. Returns ``{"protocol": {...}, "sets": {set: {method: result}}}``
    with ``result = {"images": [{"name", metric...}], "mean": {metric: value}}`` (FID in ``mean``)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: must be an integer >= 1, got {scale!r}")
    if not methods:
        raise ValueError("nothing to evaluate: no method")
    out: dict = {"protocol": {"scale": scale, "crop_border": suite.crop_border,
                              "y_channel": suite.test_y_channel, "metrics": suite.names,
                              "lr": "MATLAB bicubic of the HR image cropped to a multiple of the scale, "
                              "unless an LR folder is given",
                              "fid": "whole images, SR vs HR cropped to the SR size, clean-fid 299x299"},
                 "methods": [m.label for m in methods], "sets": {}}
    for s in sets:
        gts = list_images(s.gt_dir, f"{s.name} HR folder")
        lr_files = _images_by_stem(s.lr_dir, f"{s.name} LR folder") if s.lr_dir else None
        per = {m.label: {"images": []} for m in methods}
        with tempfile.TemporaryDirectory(prefix="calgan_fid_") as tmp:
            tmp = Path(tmp)
            for gi, g in enumerate(gts):
                hr = read_image(g)
                lr = _lr_for(s, g, hr, scale, lr_files)
                for mi, m in enumerate(methods):
                    sr = m.run(g.name, lr)
                    gt = _fit_gt(g.name, sr, hr, scale)
                    try:
                        scores = suite.score(sr, gt)
                    except ValueError as exc:  # e.g. an image too small for SSIM: name the file
                        raise ImageError(f"{s.name}/{g.name}: {exc}") from None
                    per[m.label]["images"].append({"name": g.name, **scores})
                    if suite.wants_fid:
                        write_image(tmp / f"sr{mi}" / f"{gi:05d}.png", sr)
                        write_image(tmp / f"gt{mi}" / f"{gi:05d}.png", gt)
                if progress:
                    print(f"{s.name}: {gi + 1}/{len(gts)} {g.name}", file=sys.stderr)
            for mi, m in enumerate(methods):
                rows = per[m.label]["images"]
                keys = [k for k in rows[0] if k != "name"]
                mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
                if suite.wants_fid:
                    mean["fid"] = (fid_folders(suite.iqa["fid"], tmp / f"sr{mi}", tmp / f"gt{mi}",
                                               suite.device)
                                   if len(rows) >= 2 else float("nan"))
                per[m.label]["mean"] = mean
        out["sets"][s.name] = per
    return out


def evaluate_folders(sr_dir, gt_dir, scale: int = 4, suite: MetricSuite | None = None) -> dict:
    """SR images of one folder against the HR images of another (matched by name)."""
    suite = suite or MetricSuite(["psnr", "ssim"], crop_border=scale)
    return evaluate([EvalSet(Path(gt_dir).name, Path(gt_dir))], [folder_method(sr_dir, scale)], suite, scale)


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def markdown_table(res: dict) -> str:
    """Rows: set x metric; columns: methods (the paper's Table 1 layout); the best value in bold."""
    methods = res["methods"]
    lines = ["| Set | Metric | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
    for sname, per in res["sets"].items():
        metrics = list(per[methods[0]]["mean"])
        for i, k in enumerate(metrics):
            vals = [per[m]["mean"].get(k) for m in methods]
            finite = [v for v in vals if v is not None and not math.isnan(v)]
            best = None
            if len(methods) > 1 and finite:
                best = max(finite) if k in ("psnr", "ssim") else min(finite)
            cells = [f"**{_fmt(v)}**" if v == best else _fmt(v) for v in vals]
            lines.append(f"| {sname if i == 0 else ''} | {_TITLES.get(k, k)} | " + " | ".join(cells) + " |")
    p = res["protocol"]
    note = (f"\n\nPSNR/SSIM on the {'Y channel' if p['y_channel'] else 'RGB'}, "
            f"{p['crop_border']}-pixel border removed; x{p['scale']}.")
    if "fid" in p["metrics"]:
        note += f" FID: {p['fid']}."

    return "\n".join(lines) + note + "\n"


def _csvs(res: dict) -> tuple[str, str]:
    keys: list[str] = []
    for per in res["sets"].values():
        for r in per.values():
            keys += [k for k in r["mean"] if k not in keys]
    per_image, per_set = io.StringIO(), io.StringIO()
    wi, ws = csv.writer(per_image), csv.writer(per_set)
    wi.writerow(["set", "method", "image", *[k for k in keys if k != "fid"]])
    ws.writerow(["set", "method", "images", *keys])
    for sname, per in res["sets"].items():
        for m, r in per.items():
            for row in r["images"]:
                wi.writerow([sname, m, row["name"],
                             *(f"{row[k]:.6f}" if k in row else "" for k in keys if k != "fid")])
            ws.writerow([sname, m, len(r["images"]),
                         *(f"{r['mean'][k]:.6f}" if k in r["mean"] else "" for k in keys)])
    return per_image.getvalue(), per_set.getvalue()


def write_results(res: dict, out_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Writes ``metrics.json``, ``metrics_per_image.csv``, ``metrics_per_set.csv`` and ``metrics.md``
    into ``out_dir`` (atomically); refuses to replace them unless asked."""
    out = Path(out_dir)
    names = ("metrics.json", "metrics_per_image.csv", "metrics_per_set.csv", "metrics.md")
    paths = [out / n for n in names]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    per_image, per_set = _csvs(res)
    texts = [json.dumps(json_safe(res), indent=2, allow_nan=False), per_image, per_set, markdown_table(res)]
    for p, text in zip(paths, texts):
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    return paths


def cmd_eval(args, load_model) -> int:
    """``calgan eval`` (see :func:`calgan_fast.cli.build_parser`)."""
    if args.sets and args.gt:
        raise ValueError("give either --sets or --gt, not both")
    if not args.sets and not args.gt:
        raise ValueError("give the test sets: --sets NAME_OR_DIR ... (with --data-root), or --gt DIR")
    if args.lr and not args.gt:
        raise ValueError("--lr goes with --gt (the sets of --sets get their LR inputs by MATLAB bicubic)")
    if args.sr and (args.model or not args.gt):
        raise ValueError("--sr DIR is compared with --gt DIR and cannot be combined with --model")
    if args.save_sr and not args.model:
        raise ValueError("--save-sr needs --model")
    if args.sets:
        sets = resolve_sets(args.sets, args.data_root)
    else:
        gt = Path(args.gt)
        list_images(gt, "--gt folder")
        name = gt.parent.name if gt.name == "HR" and gt.parent.name else gt.name
        sets = [EvalSet(name, gt, Path(args.lr) if args.lr else None)]
    model = None
    scale, device = args.scale, "cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.model:
        model, device, scale = load_model(args)
        model.eval()
    border = scale if args.crop_border is None else args.crop_border
    names = ["psnr", "ssim"] if args.psnr_only else args.metrics
    notes: list[str] = []
    suite = MetricSuite(names, device, border, not args.rgb, notes)
    for n in notes:
        print(f"calgan: note: {n}", file=sys.stderr)
    if args.out and not args.overwrite:
        for n in ("metrics.json", "metrics_per_image.csv", "metrics_per_set.csv", "metrics.md"):
            if (Path(args.out) / n).exists():
                raise FileExistsError(f"{Path(args.out) / n}: already exists (use --overwrite to replace it)")
    methods: list[Method] = [] if args.no_bicubic else [bicubic_method(scale)]
    if args.sr:
        methods.append(folder_method(args.sr, scale, Path(args.sr).name or "SR"))
    res = None
    if model is not None:
        label = Path(args.model).stem
        res = {"protocol": None, "methods": [], "sets": {}}
        # One set at a time, so that --save-sr gets a subfolder per set.
        for s in sets:
            save = Path(args.save_sr) / s.name if args.save_sr else None
            ms = [*methods, model_method(model, scale, label, args.tile, device, save)]
            r = evaluate([s], ms, suite, scale)
            res["protocol"], res["methods"] = r["protocol"], r["methods"]
            res["sets"].update(r["sets"])
    else:
        if not methods:
            raise ValueError("nothing to evaluate: --no-bicubic without --model or --sr")
        res = evaluate(sets, methods, suite, scale)
    print(markdown_table(res), end="")
    if args.out:
        paths = write_results(res, args.out, args.overwrite)
        print("results: " + ", ".join(map(str, paths)))
    if args.save_sr:
        print(f"SR images: {args.save_sr}")
    return 0
