"""Image-quality metrics: the library's PSNR/SSIM (BasicSR conventions) and pyiqa's learned and
no-reference metrics (LPIPS, DISTS, BRISQUE, NIQE, FID; ``pip install calgan_fast[metrics]``)."""

from .iqa import DEFAULT_METRICS, IQA_METRICS, MetricWeightsError, build_metric
from .psnr_ssim import psnr, rgb_to_y, ssim

__all__ = ["DEFAULT_METRICS", "IQA_METRICS", "MetricWeightsError", "build_metric", "psnr", "rgb_to_y", "ssim"]
