"""What a training run shows of itself: labelled SR panels, routing maps, the bicubic baseline.

* :func:`sr_panel`: rows of ``LR (nearest) | SR | HR`` crops, each labelled, the SR tile with the
  PSNR (Y channel) of its crop, from several crops of several validation images.
* :func:`routing_panel`: the discriminator's expert map of the same HR crops (argmax routing, as
  in evaluation), blended over the image, with a legend of the expert colours and the share of
  pixels each expert takes in the shown crops. That share is what the log reports as usage.
* :func:`bicubic_baseline`: PSNR/SSIM of MATLAB-bicubic upscaling on the validation images, the
  figure a trained generator has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import imresize, tensor2img
from ..metrics import psnr, ssim

__all__ = ["bicubic_baseline", "crops", "routing_panel", "routing_usage", "sr_panel"]

_LABEL_H = 14


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """``img`` with a black band above it holding ``text`` in white."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (img.shape[1], _LABEL_H), (0, 0, 0))
    ImageDraw.Draw(band).text((2, 1), text, fill=(255, 255, 255))
    return np.concatenate([np.asarray(band, dtype=np.uint8), img], 0)


def _gap(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, np.uint8)


def crops(items: Sequence[dict], per_image: int, size: int,
          scale: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``per_image`` ``(lq, gt)`` crops of HR side ``size`` from each item, spread along the diagonal.

    ``size`` is rounded down to a multiple of ``4 * scale`` (the discriminator needs multiples of 4).
    """
    out = []
    for item in items:
        gt, lq = item["gt"], item["lq"]
        side = min(gt.shape[1], gt.shape[2], size) // (4 * scale) * (4 * scale)
        if side == 0:
            continue
        h, w = gt.shape[1] // scale, gt.shape[2] // scale
        c = side // scale
        for k in range(per_image):
            f = (k + 1) / (per_image + 1)
            top, left = int((h - c) * f), int((w - c) * f)
            out.append((lq[:, top:top + c, left:left + c], gt[:, top * scale:(top + c) * scale,
                                                               left * scale:(left + c) * scale]))
    return out


@torch.no_grad()
def sr_panel(model: torch.nn.Module, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: int,
             device: torch.device, iteration: int | None = None) -> tuple[np.ndarray, list[float]]:
    """The labelled ``LR | SR | HR`` panel of ``pairs`` and the PSNR-Y of each SR crop.

    The LR tile (nearest-neighbour enlarged) carries the PSNR-Y of the crop's bicubic upscaling,
    the SR tile its own.
    """
    rows, scores = [], []
    for lq, gt in pairs:
        sr = model(lq[None].to(device)).clamp(0, 1)[0].float().cpu()
        up = F.interpolate(lq[None], scale_factor=scale, mode="nearest")[0]
        a, b = tensor2img(sr), tensor2img(gt)
        score = psnr(a, b, scale, True)
        base = psnr(imresize(tensor2img(lq), float(scale)), b, scale, True)
        scores.append(score)
        tiles = [_label(tensor2img(up), f"LR, bicubic {base:.2f}"),
                 _label(a, f"SR {score:.2f} dB"),
                 _label(b, "HR")]
        h = tiles[0].shape[0]
        rows.append(np.concatenate([tiles[0], _gap(h, 4), tiles[1], _gap(h, 4), tiles[2]], 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    panel = np.concatenate(rows, 0)
    if iteration is not None:
        panel = _label(panel, f"iter {iteration}: LR | SR (EMA) | HR")
    return panel, scores


def routing_usage(expert: torch.Tensor, num_experts: int) -> np.ndarray:
    """Share of pixels routed to each expert in an expert map ``(B, h, w)``."""
    count = torch.bincount(expert.reshape(-1).long().cpu(), minlength=num_experts).double()
    return (count / count.sum().clamp_min(1)).numpy()


@torch.no_grad()
def routing_panel(net_d: torch.nn.Module, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, iteration: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HR crops beside their expert maps (argmax routing, D in eval mode), with a colour legend.

    Returns the panel and the usage ``(num_experts,)`` over all shown pixels.
    """
    from ..viz import palette

    was = net_d.training
    net_d.eval()
    try:
        maps, experts = [], []
        for _, gt in pairs:
            out = net_d(gt[None].to(device), return_aux=True)
            experts.append(out.routing.expert[0].cpu())
            maps.append(gt)
        n = out.routing.probs.shape[1]
    finally:
        net_d.train(was)
    colours = palette(n)
    rows = []
    for gt, expert in zip(maps, experts):
        hr = tensor2img(gt)
        fy, fx = hr.shape[0] // expert.shape[0], hr.shape[1] // expert.shape[1]
        rmap = np.kron(colours[expert.long().numpy()], np.ones((fy, fx, 1), dtype=np.uint8))
        blend = (0.5 * hr.astype(np.float32) + 0.5 * rmap.astype(np.float32)).round().astype(np.uint8)
        rows.append(np.concatenate([hr, _gap(hr.shape[0], 4), blend, _gap(hr.shape[0], 4), rmap], 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    usage = routing_usage(torch.stack([e for e in experts]) if len({e.shape for e in experts}) == 1
                          else torch.cat([e.reshape(-1) for e in experts]), n)
    panel = np.concatenate([*rows, _legend(colours, usage, width)], 0)
    if iteration is not None:
        panel = _label(panel, f"iter {iteration}: D's experts (argmax)")
    return panel, usage


def _legend(colours: np.ndarray, usage: np.ndarray, width: int) -> np.ndarray:
    """Swatches ``expert i: share%``, as many per line as fit in ``width``."""
    from PIL import Image, ImageDraw

    cell = 78
    per_line = max(1, width // cell)
    lines = -(-len(colours) // per_line)
    img = Image.new("RGB", (max(width, cell), lines * 14 + 2), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (c, u) in enumerate(zip(colours, usage)):
        x, y = (i % per_line) * cell + 2, (i // per_line) * 14 + 2
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in c), outline=(0, 0, 0))
        draw.text((x + 13, y), f"{i}: {100 * u:.0f}%", fill=(0, 0, 0))
    return np.asarray(img, dtype=np.uint8)[:, :width]


def bicubic_baseline(dataset, n: int, border: int, y_channel: bool) -> dict:
    """Mean PSNR/SSIM of MATLAB-bicubic upscaling of the first ``n`` validation LR images."""
    p = s = 0.0
    for i in range(n):
        item = dataset[i]
        gt = tensor2img(item["gt"])
        up = imresize(tensor2img(item["lq"]), output_shape=gt.shape[:2])
        p += psnr(up, gt, border, y_channel)
        s += ssim(up, gt, border, y_channel)
    return {"psnr": p / n, "ssim": s / n}
