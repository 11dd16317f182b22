"""calgan_fast: the CAL-GAN content-aware local discriminator with a fused routed head."""

from .ops import available_backends, routed_head
from .reference import routed_head_ref

__version__ = "0.1.0"

__all__ = ["__version__", "available_backends", "routed_head", "routed_head_ref"]
