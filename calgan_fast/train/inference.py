"""Inference utilities: tiled super-resolution of large images and EMA of generator weights."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["EMA", "upscale_tiled"]


@torch.no_grad()
def upscale_tiled(model: nn.Module, lq: Tensor, scale: int, tile: int | None = None,
                  overlap: int = 16) -> Tensor:
    """Runs ``model`` on ``lq: (B, 3, h, w)`` and returns ``(B, 3, scale*h, scale*w)``.

    With ``tile`` the image is cut into ``tile x tile`` LR blocks; each is run with ``overlap``
    extra LR pixels of context on every side (clipped at the image border) and only its own block
    of the output is kept. When ``overlap`` covers the network's receptive field the result equals
    the untiled one up to float rounding; smaller overlaps trade accuracy for memory.
    """
    if lq.dim() != 4:
        raise ValueError(f"lq: expected (B, C, h, w), got {tuple(lq.shape)}")
    b, c, h, w = lq.shape
    if tile is None or (tile >= h and tile >= w):
        return model(lq)
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile/overlap: expected tile >= 1 and overlap >= 0, got {tile}, {overlap}")
    out = None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            py1, px1 = min(y1 + overlap, h), min(x1 + overlap, w)
            sr = model(lq[:, :, py0:py1, px0:px1])
            if out is None:
                out = sr.new_zeros(b, sr.shape[1], h * scale, w * scale)
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                sr[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    ``update()`` after each optimiser step: ``ema = decay * ema + (1 - decay) * param``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = dict(model.named_parameters())
        for name, p in self.model.named_parameters():
            p.lerp_(src[name].detach(), 1.0 - self.decay)
        srcb = dict(model.named_buffers())
        for name, buf in self.model.named_buffers():
            buf.copy_(srcb[name])

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())
