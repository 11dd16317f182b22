"""Learned perceptual metrics whose weights must be present locally: LPIPS (VGG), DISTS, FID.

Nothing is downloaded. Each metric takes the path of every file it needs (defaults: the file
names torchvision and the reference implementations use, looked up in the torch hub cache
``$TORCH_HOME/hub/checkpoints``) and raises ``FileNotFoundError`` naming the missing file.

- LPIPS (Zhang et al., 2018), VGG variant: VGG16 features at relu1_2 ... relu5_3, unit-normalised
  along channels, squared differences weighted by learned 1x1 "lin" layers, averaged over space,
  summed over layers. Needs torchvision's ``vgg16-397923af.pth`` and LPIPS's ``vgg.pth`` (v0.1).
- DISTS (Ding et al., 2020): VGG16 with L2 pooling, structure and texture similarity per channel
  weighted by learned alpha/beta. Needs ``vgg16-397923af.pth`` and the DISTS weights file.
- FID: Fréchet distance between Gaussians fitted to Inception-v3 pool features (2048-d) of two
  image sets. Needs an Inception-v3 state dict for torchvision's ``inception_v3``; with
  torchvision's ImageNet weights (``inception_v3_google-0cc3c7bd.pth``) the numbers are close to,
  but not the same as, those of the TensorFlow-ported weights that papers report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DISTS", "LPIPS", "InceptionFeatures", "frechet_distance", "fid", "hub_file"]

VGG16_FILE = "vgg16-397923af.pth"
LPIPS_VGG_FILE = "lpips_vgg_v0.1.pth"
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"


def hub_file(name: str) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<name>`` (where torchvision caches its weights)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _load(path: str | os.PathLike | None, default: str, what: str) -> dict:
    path = Path(path) if path is not None else hub_file(default)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: looked for {path} (nothing is downloaded; "
                                f"put the file there or pass its path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return state


# VGG16 ``features`` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features(state: dict, last: int) -> nn.Sequential:
    """torchvision's VGG16 ``features[:last + 1]`` loaded from ``state``, frozen, eval mode."""
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):  # no random init: every weight comes from the file
        feats = make_layers(cfgs["D"])[: last + 1]  # without the classifier: 120M fewer parameters
    sd = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or state
    sd = {k: v for k, v in sd.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= last}
    missing, _ = feats.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ValueError(f"VGG16 weights: missing {missing[:3]} (not a torchvision vgg16 state dict?)")
    for i, m in enumerate(feats):
        if isinstance(m, nn.ReLU):
            feats[i] = nn.ReLU(inplace=False)
    return feats.eval().requires_grad_(False)



def _check_pair(a: Tensor, b: Tensor) -> None:
    """The two image batches a learned metric compares: (B, 3, H, W) each, of one shape."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a and b: expected two (B, 3, H, W) of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")

class LPIPS(nn.Module):
    """LPIPS distance (VGG). ``forward(a, b)``: ``(B, 3, H, W)`` in [0, 1] -> ``(B,)``.

    Args:
        vgg_path: torchvision VGG16 state dict (whole or ``features.*``); default the hub cache's
            ``vgg16-397923af.pth``.
        lin_path: LPIPS linear-layer weights (keys ``lin{0..4}.model.1.weight``, shapes
            ``(1, C, 1, 1)``); default ``lpips_vgg_v0.1.pth`` in the hub cache.
    """

    def __init__(self, vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None):
        super().__init__()
        vgg_state = _load(vgg_path, VGG16_FILE, "VGG16 (LPIPS backbone)")
        lin_state = _load(lin_path, LPIPS_VGG_FILE, "LPIPS linear layers")
        self.features = _vgg16_features(vgg_state, _VGG16_TAPS[-1])
        lins = []
        for i, c in enumerate(_VGG16_CHANNELS):
            w = lin_state.get(f"lin{i}.model.1.weight", lin_state.get(f"lins.{i}.model.1.weight"))
            if w is None or tuple(w.shape) != (1, c, 1, 1):
                raise ValueError(f"LPIPS linear layers: lin{i}.model.1.weight of shape (1, {c}, 1, 1) not found")
            lins.append(w.float())
        self.register_buffer("lin", torch.cat([w.reshape(-1) for w in lins]), persistent=False)
        # LPIPS's input scaling of [-1, 1] images.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        h = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, m in enumerate(self.features):
            h = m(h)
            if i in _VGG16_TAPS:
                out.append(h)
        return out

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        _check_pair(a, b)
        total = a.new_zeros(a.shape[0])
        offset = 0
        for fa, fb, c in zip(self._taps(a), self._taps(b), _VGG16_CHANNELS):
            na = fa / (fa.square().sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.square().sum(1, keepdim=True).sqrt() + 1e-10)
            w = self.lin[offset:offset + c].view(1, c, 1, 1)
            total = total + ((na - nb).square() * w).sum(1).mean((1, 2))
            offset += c
        return total


DISTS_FILE = "dists_weights.pt"
_DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)


class _L2Pool(nn.Module):
    """DISTS's replacement for max pooling: sqrt of a Hanning-blurred square, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])
        g = a[:, None] * a[None, :]
        self.register_buffer("filt", (g / g.sum()).expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (F.conv2d(x * x, self.filt, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS (Ding et al., 2020): ``forward(a, b)``, ``(B, 3, H, W)`` in [0, 1] -> ``(B,)``, 0 for equal images.

    VGG16 with L2 pooling; at the input and after each of the 5 stages, per channel, a structure
    term (means) and a texture term (variances, covariance) weighted by learned ``alpha``/``beta``.

    Args:
        vgg_path: torchvision VGG16 state dict; default the hub cache's ``vgg16-397923af.pth``.
        weights_path: the DISTS ``alpha``/``beta`` file (each ``(1, 1475, 1, 1)``); default
            ``dists_weights.pt`` in the hub cache.
    """

    def __init__(self, vgg_path: str | os.PathLike | None = None, weights_path: str | os.PathLike | None = None):
        super().__init__()
        vgg = _vgg16_features(_load(vgg_path, VGG16_FILE, "VGG16 (DISTS backbone)"), _VGG16_TAPS[-1])
        ab = _load(weights_path, DISTS_FILE, "DISTS alpha/beta")
        total = sum(_DISTS_CHANNELS)
        for key in ("alpha", "beta"):
            if key not in ab or ab[key].numel() != total:
                raise ValueError(f"DISTS alpha/beta: {key!r} with {total} values not found")
        # Stages end at relu1_2 .. relu5_3; every max pool becomes an L2 pool.
        stages, start = [], 0
        for tap in _VGG16_TAPS:
            layers = [(_L2Pool(m_prev.out_channels) if isinstance(m, nn.MaxPool2d) else m)
                      for m, m_prev in zip(vgg[start:tap + 1], _prev_convs(vgg, start, tap))]
            stages.append(nn.Sequential(*layers))
            start = tap + 1
        self.stages = nn.ModuleList(stages).eval().requires_grad_(False)
        self.register_buffer("alpha", ab["alpha"].float().reshape(-1), persistent=False)
        self.register_buffer("beta", ab["beta"].float().reshape(-1), persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def _feats(self, x: Tensor) -> list[Tensor]:
        h = (x - self.mean) / self.std
        out = [x]  # the input stage uses the raw image, as DISTS does
        for st in self.stages:
            h = st(h)
            out.append(h)
        return out

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        _check_pair(a, b)
        c1 = c2 = 1e-6
        wsum = self.alpha.sum() + self.beta.sum()
        s1 = s2 = a.new_zeros(a.shape[0])
        off = 0
        for fa, fb, c in zip(self._feats(a), self._feats(b), _DISTS_CHANNELS):
            al = (self.alpha[off:off + c] / wsum).view(1, c)
            be = (self.beta[off:off + c] / wsum).view(1, c)
            ma, mb = fa.mean((2, 3)), fb.mean((2, 3))
            va = (fa - ma[..., None, None]).square().mean((2, 3))
            vb = (fb - mb[..., None, None]).square().mean((2, 3))
            cov = (fa * fb).mean((2, 3)) - ma * mb
            s1 = s1 + (al * (2 * ma * mb + c1) / (ma * ma + mb * mb + c1)).sum(1)
            s2 = s2 + (be * (2 * cov + c2) / (va + vb + c2)).sum(1)
            off += c
        return 1 - (s1 + s2)


def _prev_convs(vgg: nn.Sequential, start: int, stop: int) -> list[nn.Module]:
    """For each layer in ``vgg[start:stop + 1]``, the last conv at or before it (channel count)."""
    last, out = None, []
    for i, m in enumerate(vgg):
        if isinstance(m, nn.Conv2d):
            last = m
        if start <= i <= stop:
            out.append(last)
    return out


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 2048)`` (input resized to 299)."""

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models import inception_v3

        state = _load(weights_path, INCEPTION_FILE, "Inception-v3 (FID)")
        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        missing, _ = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"Inception-v3 weights: missing {missing[:3]} (not a torchvision inception_v3 state dict?)")
        net.fc = nn.Identity()
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|² + tr(cov1 + cov2 - 2 (cov1 cov2)^½)`` in float64."""
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        # Near-singular products: a small ridge keeps the square root defined.
        eps = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def _stats(extractor: nn.Module, batches: Iterable[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    feats = np.concatenate([extractor(b).double().cpu().numpy() for b in batches])
    if feats.shape[0] < 2:
        raise ValueError("fid: needs at least 2 images per set")
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid(extractor: nn.Module, batches_a: Iterable[Tensor], batches_b: Iterable[Tensor]) -> float:
    """FID between two image sets given as iterables of ``(B, 3, H, W)`` batches in [0, 1]."""
    return frechet_distance(*_stats(extractor, batches_a), *_stats(extractor, batches_b))
