"""Modules of calgan_fast."""

from .discriminator import (
    PATCH_SIZES,
    CALGANDiscriminator,
    DiscriminatorConfig,
    DiscriminatorOutput,
    ExpertStats,
    Routing,
    batch_statistics,
    calibrate_bn,
    feature_extractor,
    real_statistics_only,
)

__all__ = [
    "CALGANDiscriminator",
    "DiscriminatorConfig",
    "DiscriminatorOutput",
    "ExpertStats",
    "PATCH_SIZES",
    "Routing",
    "batch_statistics",
    "calibrate_bn",
    "feature_extractor",
    "real_statistics_only",
]
