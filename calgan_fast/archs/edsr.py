"""EDSR (Lim et al., 2017): residual blocks without batch norm and a sub-pixel upsampler.

Parameter names follow the BasicSR layout (``conv_first``, ``body.<i>.conv{1,2}``,
``conv_after_body``, ``upsample.<j>``, ``conv_last``). ``EDSR.baseline`` is 16 blocks x 64
features; ``EDSR.paper`` is 32 blocks x 256 features with residual scaling 0.1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Mean of the DIV2K training images (RGB), subtracted before the network as EDSR does.
_DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv, scaled by ``res_scale`` and added back. ``(B, C, h, w)`` -> same."""

    def __init__(self, num_feat: int = 64, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.conv2(self.relu(self.conv1(x)))


def _upsampler(scale: int, num_feat: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"EDSR: scale must be a power of 2 or 3, got {scale}")
    return nn.Sequential(*layers)


class EDSR(nn.Module):
    """EDSR: ``x: (B, num_in_ch, h, w)`` in [0, 1] -> ``(B, num_out_ch, scale*h, scale*w)``.

    Args:
        scale: 2, 3 or 4. num_feat / num_block / res_scale: width, depth and residual scaling
        (baseline 64 / 16 / 1.0; paper 256 / 32 / 0.1). img_range: the network works on
        ``(x - mean) * img_range`` as the original does (255).
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 16, res_scale: float = 1.0, img_range: float = 255.0,
                 rgb_mean: tuple[float, ...] = _DIV2K_MEAN):
        super().__init__()
        self.scale = scale
        self.img_range = img_range
        self.register_buffer("mean", torch.tensor(rgb_mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = _upsampler(scale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    @classmethod
    def baseline(cls, scale: int = 4, **kw) -> EDSR:
        """16 residual blocks of 64 features, no residual scaling."""
        return cls(scale=scale, num_feat=64, num_block=16, res_scale=1.0, **kw)

    @classmethod
    def paper(cls, scale: int = 4, **kw) -> EDSR:
        """32 residual blocks of 256 features with residual scaling 0.1."""
        return cls(scale=scale, num_feat=256, num_block=32, res_scale=0.1, **kw)

    def forward(self, x: Tensor) -> Tensor:
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        x = x + self.conv_after_body(self.body(x))
        x = self.conv_last(self.upsample(x))
        return x / self.img_range + mean
