"""Image-quality metrics: PSNR/SSIM (BasicSR conventions) and learned metrics with local weights."""

from .psnr_ssim import psnr, rgb_to_y, ssim

__all__ = ["psnr", "rgb_to_y", "ssim"]
