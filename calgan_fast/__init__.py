"""calgan_fast: the CAL-GAN content-aware local discriminator with a fused routed head.

Quick use::

    import calgan_fast as cf
    D = cf.CALGANDiscriminator(num_experts=12)
    logits = D(hr)                                   # (B, 1, H/4, W/4)
    losses = cf.losses.discriminator_loss(D, hr, sr)  # dict, losses["total"].backward()
"""

from . import compat, losses, viz
from .nn import CALGANDiscriminator, DiscriminatorOutput, ExpertStats, Routing
from .ops import available_backends, routed_head, routing_metadata
from .reference import routed_head_ref

__version__ = "0.1.0"

__all__ = [
    "CALGANDiscriminator",
    "DiscriminatorOutput",
    "ExpertStats",
    "Routing",
    "__version__",
    "available_backends",
    "compat",
    "losses",
    "routed_head",
    "routed_head_ref",
    "routing_metadata",
    "viz",
]
