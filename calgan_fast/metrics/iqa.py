"""Perceptual and no-reference metrics through pyiqa, the implementation SR papers compare against.

``pip install calgan_fast[metrics]`` installs pyiqa. PSNR and SSIM stay the library's own
(:mod:`calgan_fast.metrics.psnr_ssim`, BasicSR conventions); every learned or no-reference metric
is pyiqa's, so its numbers can be set beside published ones:

=========== ================= ===== =============================================================
name        pyiqa metric      kind  what
=========== ================= ===== =============================================================
lpips       ``lpips``         FR    LPIPS v0.1, AlexNet backbone (the variant most SR papers use)
lpips-vgg   ``lpips-vgg``     FR    LPIPS v0.1, VGG16 backbone
dists       ``dists``         FR    DISTS
brisque     ``brisque``       NR    BRISQUE (Y channel)
niqe        ``niqe``          NR    NIQE (Y channel)
fid         ``fid``           set   FID between the SR and the HR images of a set (clean-fid)
=========== ================= ===== =============================================================

Weights are fetched by pyiqa (and torchvision, for backbones) into their caches the first time a
metric is built on a machine that is online. Where the download fails, :class:`MetricWeightsError`
names the missing file, the path it must be put at and the address it comes from.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["IQA_METRICS", "DEFAULT_METRICS", "MetricWeightsError", "build_metric", "check_metric_names",
           "fid_folders", "pyiqa_available"]

# name -> (pyiqa name, kind); kind "fr" (full reference), "nr" (no reference), "set" (FID).
IQA_METRICS = {
    "lpips": ("lpips", "fr"),
    "lpips-vgg": ("lpips-vgg", "fr"),
    "dists": ("dists", "fr"),
    "brisque": ("brisque", "nr"),
    "niqe": ("niqe", "nr"),
    "fid": ("fid", "set"),
}
#: What ``calgan eval`` computes when no ``--metrics`` are given (the paper's Table 1).
DEFAULT_METRICS = ("psnr", "ssim", "lpips", "dists", "brisque", "fid")
OWN_METRICS = ("psnr", "ssim")


class MetricWeightsError(FileNotFoundError):
    """A metric's weights file is not in the cache and cannot be downloaded."""


def pyiqa_available() -> bool:
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        return False
    return True


def check_metric_names(names) -> list[str]:
    """``names`` lower-cased, with an error naming any unknown one."""
    out = []
    for n in names:
        key = str(n).lower()
        if key not in OWN_METRICS and key not in IQA_METRICS:
            known = ", ".join((*OWN_METRICS, *IQA_METRICS))
            raise ValueError(f"--metrics: unknown metric {n!r} (known: {known})")
        if key not in out:
            out.append(key)
    return out


@contextlib.contextmanager
def _explain_downloads(metric: str):
    """Turns a failed weight download inside pyiqa or torchvision into :class:`MetricWeightsError`."""
    import torch.hub as hub
    from pyiqa.utils import download_util

    originals = {hub: hub.download_url_to_file, download_util: download_util.download_url_to_file}

    def make(orig):
        def download(url, dst, *args, **kwargs):
            try:
                return orig(url, dst, *args, **kwargs)
            except Exception as exc:
                reason = getattr(exc, "reason", None) or exc
                raise MetricWeightsError(
                    f"{metric}: weights file {Path(dst).name} is missing and could not be downloaded "
                    f"({reason}); put it at {dst} (it comes from {url})") from None
        return download

    for mod, orig in originals.items():
        mod.download_url_to_file = make(orig)
    try:
        yield
    finally:
        for mod, orig in originals.items():
            mod.download_url_to_file = orig


def build_metric(name: str, device: str | torch.device = "cpu"):
    """The pyiqa metric ``name`` (a key of :data:`IQA_METRICS`), built in eval mode.

    FR metrics are called ``m(sr, gt) -> (B,)``, NR metrics ``m(sr) -> (B,)``, on ``(B, 3, H, W)``
    RGB tensors in [0, 1]; the FID metric is used through :func:`fid_folders`.
    Raises ``ImportError`` (how to install pyiqa) or :class:`MetricWeightsError`.
    """
    if name not in IQA_METRICS:
        raise ValueError(f"metric: unknown pyiqa metric {name!r} (known: {', '.join(IQA_METRICS)})")
    try:
        import pyiqa
    except ImportError:
        raise ImportError(f"{name}: needs pyiqa (pip install 'calgan_fast[metrics]')") from None
    # pyiqa prints what it loads: to stderr, so that stdout keeps the results alone.
    with _explain_downloads(name), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # pyiqa builds torchvision backbones with arguments torchvision has deprecated.
        warnings.filterwarnings("ignore", message=r".*(parameter 'pretrained'|weight enum).*",
                                category=UserWarning)
        return pyiqa.create_metric(IQA_METRICS[name][0], device=torch.device(device), as_loss=False)


def fid_folders(metric, sr_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                device: str | torch.device = "cpu") -> float:
    """FID between the images of two folders: whole images, clean-fid resizing to 299x299."""
    return float(metric(str(sr_dir), str(gt_dir), mode="clean", num_workers=0, batch_size=8,
                        device=torch.device(device), verbose=False))
