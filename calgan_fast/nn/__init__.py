"""Modules of calgan_fast."""

from .discriminator import (
    CALGANDiscriminator,
    DiscriminatorConfig,
    DiscriminatorOutput,
    ExpertStats,
    Routing,
    feature_extractor,
)

__all__ = [
    "CALGANDiscriminator",
    "DiscriminatorConfig",
    "DiscriminatorOutput",
    "ExpertStats",
    "Routing",
    "feature_extractor",
]
