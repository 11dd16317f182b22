"""Training: configuration and presets, the two-phase CAL-GAN loop, tiled inference."""

from .config import DEFAULTS, PRESETS, ConfigError, load_config
from .inference import EMA, upscale_tiled
from .trainer import RunFolderError, Trainer, train

__all__ = ["DEFAULTS", "EMA", "PRESETS", "ConfigError", "RunFolderError", "Trainer", "load_config",
           "train", "upscale_tiled"]
