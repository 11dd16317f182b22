"""Image-quality metrics: PSNR/SSIM (BasicSR conventions); LPIPS, DISTS and FID from local weights.

NIQE and BRISQUE are not provided: no installed dependency computes them offline.
"""

from .learned import DISTS, LPIPS, InceptionFeatures, fid, frechet_distance, hub_file
from .psnr_ssim import psnr, rgb_to_y, ssim

__all__ = ["DISTS", "LPIPS", "InceptionFeatures", "fid", "frechet_distance", "hub_file", "psnr", "rgb_to_y", "ssim"]
