"""Pictures of the routing: the expert map of an image as a colour image (the paper's Fig. 3)."""

from __future__ import annotations

import colorsys

import numpy as np
import torch

__all__ = ["PALETTE", "palette", "routing_image", "routing_map"]

# 16 hand-picked, well separated colours (RGB); more experts get golden-ratio hues.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (220, 190, 255),
        (170, 110, 40),
        (128, 0, 0),
        (170, 255, 195),
        (0, 0, 128),
    ],
    dtype=np.uint8,
)


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, fixed for a given expert index."""
    if n <= len(PALETTE):
        return PALETTE[:n].copy()
    extra = []
    for i in range(n - len(PALETTE)):
        h = (0.137 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.3 * (i % 2), 0.95 - 0.25 * ((i // 2) % 2))
        extra.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.concatenate([PALETTE, np.array(extra, dtype=np.uint8)])


def routing_image(routing, index: int = 0) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB image of the expert map of image ``index`` of a batch.

    ``routing`` is a :class:`calgan_fast.Routing` (or an expert-id tensor ``(B, h, w)``).
    """
    expert = routing.expert if hasattr(routing, "expert") else routing
    n = routing.probs.shape[1] if hasattr(routing, "probs") else int(torch.as_tensor(expert).max()) + 1
    expert = torch.as_tensor(expert)
    if expert.dim() != 3:
        raise ValueError(f"routing: expected an expert map (B, h, w), got {tuple(expert.shape)}")
    if not 0 <= index < expert.shape[0]:
        raise IndexError(f"index: {index} out of range for a batch of {expert.shape[0]}")
    ids = expert[index].detach().cpu().long().numpy()
    return palette(n)[ids]


@torch.no_grad()
def routing_map(D, image, index: int = 0, calibrate=None) -> np.ndarray:
    """``(H', W', 3)`` uint8 expert map of ``image`` as ``D`` routes it, at image resolution.

    ``D`` (a :class:`calgan_fast.CALGANDiscriminator`) runs in eval mode: argmax routing, and
    BatchNorm as in training, with the statistics of the batch being scored (``eval_bn="batch"``,
    the default), so the map is the routing training used (with argmax in place of Gumbel noise).
    ``calibrate``: an iterable of real image batches, for ``eval_bn="running"``: the running
    statistics are first recomputed from them (:func:`calgan_fast.nn.calibrate_bn`).
    ``image``: ``(B, 3, H, W)`` or ``(3, H, W)`` in [0, 1]; it is cropped to multiples
    of D's patch size p (``H' = H // p · p``) and each feature pixel is drawn as a p x p block.
    """
    from .nn import calibrate_bn

    if calibrate is not None:
        calibrate_bn(D, calibrate)
    x = image[None] if image.dim() == 3 else image
    p = getattr(D, "patch_size", 4)
    h, w = x.shape[-2] // p * p, x.shape[-1] // p * p
    if h == 0 or w == 0:
        raise ValueError(f"image: {x.shape[-2]}x{x.shape[-1]} is smaller than the patch size {p}")
    was = D.training
    D.eval()
    try:
        out = D(x[..., :h, :w], return_aux=True)
    finally:
        D.train(was)
    return np.kron(routing_image(out.routing, index), np.ones((p, p, 1), dtype=np.uint8))
