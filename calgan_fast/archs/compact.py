"""A compact generator: a plain VGG-style body that adds a residual to the upsampled input.

The layout of its layers follows Real-ESRGAN's ``SRVGGNetCompact`` (``body`` = first conv,
activation, ``num_conv`` x (conv, activation), last conv; then a pixel shuffle), so that
``upsample="nearest"`` computes what that network computes. The default adds the residual to a
bicubic upsampling of the input, and the last convolution starts small: an untrained network is
close to bicubic upscaling, and training only has to learn what bicubic misses. This is what lets a
few-minute CPU run end above bicubic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CompactSR"]


class CompactSR(nn.Module):
    """``num_conv`` 3x3 convolutions at LR resolution, a pixel shuffle, plus the upsampled input.

    Args:
        num_in_ch, num_out_ch: image channels. num_feat: channels of the body.
        num_conv: convolutions between the first and the last one. scale: upscaling factor.
        act_type: ``prelu``, ``relu`` or ``leakyrelu``.
        upsample: how the input is upsampled before the residual is added (``bicubic``,
            ``bilinear`` or ``nearest``).
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 32, num_conv: int = 8,
                 scale: int = 4, act_type: str = "prelu", upsample: str = "bicubic"):
        super().__init__()
        acts = {"prelu": lambda: nn.PReLU(num_parameters=num_feat), "relu": lambda: nn.ReLU(inplace=True),
                "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=True)}
        if act_type not in acts:
            raise ValueError(f"act_type: expected one of {list(acts)}, got {act_type!r}")
        if upsample not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"upsample: expected bicubic, bilinear or nearest, got {upsample!r}")
        self.scale, self.upsample = scale, upsample
        body: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), acts[act_type]()]
        for _ in range(num_conv):
            body += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), acts[act_type]()]
        last = nn.Conv2d(num_feat, num_out_ch * scale * scale, 3, 1, 1)
        with torch.no_grad():  # small, not zero: the body gets gradients from the first step
            last.weight.mul_(0.1)
            last.bias.zero_()
        body.append(last)
        self.body = nn.ModuleList(body)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        out = self.upsampler(out)
        kw = {} if self.upsample == "nearest" else {"align_corners": False}
        return out + F.interpolate(x, scale_factor=self.scale, mode=self.upsample, **kw)
