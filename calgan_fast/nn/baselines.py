"""Plain-GAN discriminators that CAL-GAN is compared against, and the discriminator factory.

- :class:`VGGStyleDiscriminator`: ESRGAN's discriminator, one logit per 128x128 (or 256x256) image.
- :class:`UNetDiscriminatorSN`: Real-ESRGAN's U-Net discriminator with spectral normalisation, one
  logit per pixel.

Both have the state-dict keys of BasicSR's classes of the same names
(``basicsr.archs.discriminator_arch``), so BasicSR checkpoints load into them. They train with the
standard GAN losses only (:func:`plain_discriminator_loss`, :func:`plain_generator_loss`): no
routing, no balancing, orthogonality or distribution loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from ..reference import LRELU_SLOPE
from .discriminator import CALGANDiscriminator, real_statistics_only

__all__ = [
    "DISCRIMINATOR_TYPES",
    "UNetDiscriminatorSN",
    "VGGStyleDiscriminator",
    "build_discriminator",
    "plain_discriminator_loss",
    "plain_generator_loss",
]


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's VGG-style discriminator (BasicSR's ``VGGStyleDiscriminator``).

    Five (six for ``input_size=256``) stages ``conv3x3 · BN · LReLU · conv4x4 s2 · BN · LReLU``
    (the first without BN after its 3x3 conv), doubling channels up to ``8·num_feat``, then
    ``Linear(8·num_feat·16, 100) · LReLU · Linear(100, 1)``. Input ``(B, num_in_ch, S, S)`` with
    ``S = input_size``; output ``(B, 1)`` logits.
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, input_size: int = 128):
        super().__init__()
        if input_size not in (128, 256):
            raise ValueError(f"input_size: expected 128 or 256, got {input_size!r}")
        if num_feat < 1 or num_in_ch < 1:
            raise ValueError(f"num_in_ch, num_feat: must be >= 1, got {num_in_ch}, {num_feat}")
        self.input_size, self.num_in_ch = input_size, num_in_ch
        widths = [num_feat, 2 * num_feat, 4 * num_feat, 8 * num_feat, 8 * num_feat]
        if input_size == 256:
            widths.append(8 * num_feat)
        self.num_stages = len(widths)
        cin = num_in_ch
        for i, w in enumerate(widths):
            # Stage 0 starts with a biased conv and no BN; the others with conv (no bias) and BN.
            setattr(self, f"conv{i}_0", nn.Conv2d(cin, w, 3, 1, 1, bias=i == 0))
            if i > 0:
                setattr(self, f"bn{i}_0", nn.BatchNorm2d(w))
            setattr(self, f"conv{i}_1", nn.Conv2d(w, w, 4, 2, 1, bias=False))
            setattr(self, f"bn{i}_1", nn.BatchNorm2d(w))
            cin = w
        self.linear1 = nn.Linear(8 * num_feat * 4 * 4, 100)
        self.linear2 = nn.Linear(100, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f"x: expected (B, {self.num_in_ch}, H, W), got {tuple(x.shape)}")
        if x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"x: VGGStyleDiscriminator takes {self.input_size}x{self.input_size} images "
                f"(datasets.train.gt_size), got {x.shape[2]}x{x.shape[3]}"
            )
        h = x
        for i in range(self.num_stages):
            h = getattr(self, f"conv{i}_0")(h)
            if i > 0:
                h = getattr(self, f"bn{i}_0")(h)
            h = F.leaky_relu(h, LRELU_SLOPE)
            h = F.leaky_relu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(h)), LRELU_SLOPE)
        h = F.leaky_relu(self.linear1(h.flatten(1)), LRELU_SLOPE)
        return self.linear2(h)


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral normalisation (BasicSR's ``UNetDiscriminatorSN``).

    Three conv4x4 stride-2 downsampling convs (``num_feat`` → ``8·num_feat``), three bilinear x2
    upsamplings each followed by a conv3x3 (with skip connections to the encoder when
    ``skip_connection``), two more conv3x3 and a conv3x3 to one channel; every conv but the first
    and the last is spectrally normalised. Input ``(B, num_in_ch, H, W)``, H and W multiples of 8;
    output ``(B, 1, H, W)`` logits.
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True):
        super().__init__()
        if num_feat < 1 or num_in_ch < 1:
            raise ValueError(f"num_in_ch, num_feat: must be >= 1, got {num_in_ch}, {num_feat}")
        self.num_in_ch, self.skip_connection = num_in_ch, skip_connection
        nf = num_feat

        def sn(cin, cout, k, s):
            return spectral_norm(nn.Conv2d(cin, cout, k, s, 1, bias=False))

        self.conv0 = nn.Conv2d(num_in_ch, nf, 3, 1, 1)
        self.conv1, self.conv2, self.conv3 = (
            sn(nf, 2 * nf, 4, 2),
            sn(2 * nf, 4 * nf, 4, 2),
            sn(4 * nf, 8 * nf, 4, 2),
        )
        self.conv4, self.conv5, self.conv6 = (
            sn(8 * nf, 4 * nf, 3, 1),
            sn(4 * nf, 2 * nf, 3, 1),
            sn(2 * nf, nf, 3, 1),
        )
        self.conv7, self.conv8 = sn(nf, nf, 3, 1), sn(nf, nf, 3, 1)
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f"x: expected (B, {self.num_in_ch}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(
                f"x: UNetDiscriminatorSN needs H and W multiples of 8, got {x.shape[2]}x{x.shape[3]}"
            )

        def act(t):
            return F.leaky_relu(t, LRELU_SLOPE)

        def up(t):
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        h = act(self.conv4(up(x3)))
        if self.skip_connection:
            h = h + x2
        h = act(self.conv5(up(h)))
        if self.skip_connection:
            h = h + x1
        h = act(self.conv6(up(h)))
        if self.skip_connection:
            h = h + x0
        h = act(self.conv8(act(self.conv7(h))))
        return self.conv9(h)


#: ``network_d.type`` values: CAL-GAN's discriminator and the two plain-GAN baselines.
DISCRIMINATOR_TYPES = ("CALGANDiscriminator", "VGGStyleDiscriminator", "UNetDiscriminatorSN")

# network_d keys each type reads (the others must keep their defaults or are ignored).
_CALGAN_KEYS = (
    "num_feat",
    "num_experts",
    "hidden",
    "routing",
    "tau",
    "share_classifier",
    "backend",
    "patch_size",
)


def build_discriminator(spec: Mapping, gt_size: int | None = None) -> nn.Module:
    """The discriminator a ``network_d`` config section describes.

    ``type``: one of :data:`DISCRIMINATOR_TYPES` (default ``CALGANDiscriminator``). The CAL-GAN
    discriminator reads ``num_feat``, ``num_experts``, ``hidden``, ``routing``, ``tau``,
    ``share_classifier``, ``backend`` and ``patch_size``; the baselines read ``num_feat`` only
    (``VGGStyleDiscriminator`` takes ``input_size = gt_size``, 128 or 256).
    """
    kind = spec.get("type", "CALGANDiscriminator")
    if kind == "CALGANDiscriminator":
        return CALGANDiscriminator(**{k: spec[k] for k in _CALGAN_KEYS if k in spec})
    if kind == "VGGStyleDiscriminator":
        size = 128 if gt_size is None else gt_size
        if size not in (128, 256):
            raise ValueError(
                f"network_d.type = VGGStyleDiscriminator takes 128x128 or 256x256 crops: "
                f"datasets.train.gt_size = {size!r}"
            )
        return VGGStyleDiscriminator(3, spec.get("num_feat", 64), size)
    if kind == "UNetDiscriminatorSN":
        return UNetDiscriminatorSN(3, spec.get("num_feat", 64))
    raise ValueError(f"network_d.type = {kind!r}; expected one of {list(DISCRIMINATOR_TYPES)}")


def plain_discriminator_loss(
    D: nn.Module, hr: Tensor, sr: Tensor, gan_type: str = "relativistic", real: Tensor | None = None
) -> dict:
    """The standard GAN loss of D on one (HR, SR) batch.

    Returns ``adv`` (= ``total``), ``acc_d_real`` and ``acc_d_fake``.

    ``real``: D's logits of ``hr`` computed with gradient by the caller (one real pass per step);
    by default computed here. ``sr`` is detached; its pass leaves BatchNorm running statistics alone.
    """
    from ..losses import _accuracy, gan_loss

    if real is None:
        real = D(hr)
    with real_statistics_only(D):
        fake = D(sr.detach())
    adv = gan_loss(real, fake, gan_type, for_discriminator=True)
    acc_real, acc_fake = _accuracy(real, fake, gan_type)
    return {"adv": adv, "total": adv, "acc_d_real": acc_real, "acc_d_fake": acc_fake}


def plain_generator_loss(
    D: nn.Module, hr: Tensor, sr: Tensor, gan_type: str = "relativistic", real: Tensor | None = None
) -> Tensor:
    """The generator's standard GAN loss: D's parameters get no gradient, ``sr`` does.

    ``real``: D's logits of ``hr`` when the caller has them (detached here); by default computed
    without gradient. The SR pass leaves BatchNorm running statistics alone.
    """
    from ..losses import frozen, gan_loss

    if real is None:
        with torch.no_grad():
            real = D(hr)
    with frozen(D), real_statistics_only(D):
        fake = D(sr)
    return gan_loss(real.detach(), fake, gan_type, for_discriminator=False)
