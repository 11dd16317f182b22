"""The CAL-GAN losses of one training iteration, shared by the trainer
(:mod:`calgan_fast.train.trainer`) and the BasicSR model (:mod:`calgan_fast.integrations.basicsr`).

:class:`GANSettings` holds the options: the form of the adversarial loss and the loss weights.
:class:`GANStep` computes, for a batch of HR images and the generator's SR images,

- the generator's adversarial loss L_gen: D scores SR with the experts of HR (docs/design.md §4);
- the discriminator's loss ``L_D = λ_b L_b + λ_o L_o + λ_d L_dist + λ_dis L_dis`` and D's accuracy
  on real and fake pixels;
- the experts' shares of the real pixels, for the logs.

A plain-GAN discriminator (``VGGStyleDiscriminator``, ``UNetDiscriminatorSN``) gets the standard
GAN losses only (``L_D = λ_dis L_dis``). The callers own autocast, the backward passes, the
optimizers and the averaging of gradients over processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..losses import BALANCE_MODES, discriminator_loss, generator_adversarial_loss
from ..nn.baselines import plain_discriminator_loss, plain_generator_loss
from ..nn.discriminator import CALGANDiscriminator, DiscriminatorOutput

__all__ = ["GAN_TYPES", "GANSettings", "GANStep"]

GAN_TYPES = ("relativistic", "vanilla")


@dataclass(frozen=True)
class GANSettings:
    """Options of the adversarial losses (defaults: the paper's).

    Attributes:
        gan_type: ``"relativistic"`` (the paper's) or ``"vanilla"``, for D and G.
        balance: the balancing loss, a mode of :func:`calgan_fast.losses.balancing_loss`
            (``"paper"``: Eq. 4).
        lambda_b, lambda_o, lambda_d, lambda_dis: λ_b, λ_o, λ_d, λ_dis of ``L_D``.
        lambda_g: λ_g, the weight of L_gen in the generator's loss.
    """

    gan_type: str = "relativistic"
    balance: str = "paper"
    lambda_b: float = 0.05
    lambda_o: float = 10.0
    lambda_d: float = 10.0
    lambda_dis: float = 1.0
    lambda_g: float = 0.005

    def __post_init__(self):
        if self.gan_type not in GAN_TYPES:
            raise ValueError(f"gan_type: expected one of {list(GAN_TYPES)}, got {self.gan_type!r}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance: expected one of {list(BALANCE_MODES)}, got {self.balance!r}")
        for name in ("lambda_b", "lambda_o", "lambda_d", "lambda_dis", "lambda_g"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")

    @classmethod
    def from_config(cls, train: Mapping) -> GANSettings:
        """The settings of a training config's ``train`` section (``gan_opt`` and ``d_opt``)."""
        do, go = train["d_opt"], train["gan_opt"]
        return cls(gan_type=go["gan_type"], balance=do["balance"], lambda_b=do["lambda_b"],
                   lambda_o=do["lambda_o"], lambda_d=do["lambda_d"], lambda_dis=do["lambda_dis"],
                   lambda_g=go["loss_weight"])

    def without_routing_losses(self) -> GANSettings:
        """These settings with λ_b = λ_o = λ_d = 0 (one expert: the standard GAN configuration)."""
        return replace(self, lambda_b=0.0, lambda_o=0.0, lambda_d=0.0)

    def d_weights(self) -> dict[str, float]:
        """The weights in the form :func:`calgan_fast.losses.discriminator_loss` takes."""
        return {"lambda_b": self.lambda_b, "lambda_o": self.lambda_o, "lambda_d": self.lambda_d,
                "lambda_dis": self.lambda_dis}


def _bare(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel


class GANStep:
    """The adversarial losses of one iteration for discriminator ``net_d`` (module or DDP-wrapped).

    Args:
        net_d: a :class:`calgan_fast.CALGANDiscriminator` (routed) or a plain-GAN discriminator.
        settings: the loss options.
    """

    def __init__(self, net_d: nn.Module, settings: GANSettings):
        self.net_d, self.settings = net_d, settings
        self.routed = isinstance(_bare(net_d), CALGANDiscriminator)

    def real_pass(self, hr: Tensor) -> DiscriminatorOutput | Tensor:
        """``D(hr)`` with gradient, to share between :meth:`generator_loss` and
        :meth:`discriminator_loss` (one HR pass and one Gumbel routing per iteration)."""
        return self.net_d(hr, return_aux=True) if self.routed else self.net_d(hr)

    def generator_loss(self, hr: Tensor, sr: Tensor, real=None) -> Tensor:
        """L_gen (unweighted; the generator's loss adds ``lambda_g`` times it). D's parameters get
        no gradient. ``real``: :meth:`real_pass` of ``hr``; by default an HR pass without
        gradient runs here."""
        s = self.settings
        if self.routed:
            return generator_adversarial_loss(self.net_d, hr, sr, s.gan_type, real=real)
        return plain_generator_loss(self.net_d, hr, sr, s.gan_type, real=real)

    def discriminator_loss(self, hr: Tensor, sr: Tensor, real=None) -> dict:
        """D's loss of the batch: the dict of :func:`calgan_fast.losses.discriminator_loss`
        (``total``, ``adv``, ``balance``, ``ortho``, ``dist``, ``acc_d_real``, ``acc_d_fake``,
        ``routing``, ``stats``, ...); for a plain discriminator ``adv``, ``total`` (``λ_dis ·
        adv``) and the accuracies. ``sr`` is detached here; ``real`` as in :meth:`generator_loss`."""
        s = self.settings
        if self.routed:
            return discriminator_loss(self.net_d, hr, sr.detach(), s.d_weights(), s.balance, s.gan_type,
                                      real=real)
        d = plain_discriminator_loss(self.net_d, hr, sr.detach(), s.gan_type, real=real)
        d["total"] = s.lambda_dis * d["adv"]
        return d

    def routing_usage(self, d: dict) -> dict[str, Tensor]:
        """Routing figures of the real pass of :meth:`discriminator_loss`'s result ``d``, over
        the pixels of every process: ``usage`` (share of the pixels per expert, by argmax of the
        routing probabilities, as the routing maps show it), ``usage_sampled`` (by the sampled
        experts the losses use), ``routing_entropy`` (of ``usage``, over log N) and
        ``routing_pixel_entropy`` (mean entropy of each pixel's routing probabilities, over log N).
        Empty for a plain discriminator."""
        if not self.routed:
            return {}
        probs = d["routing"].probs.float()
        n = probs.shape[1]
        count = torch.stack([d["stats"].count.float(),
                             torch.bincount(probs.argmax(1).reshape(-1), minlength=n).float()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
        usage = count[1] / count[1].sum().clamp_min(1)
        ent = -(usage * usage.clamp_min(1e-12).log()).sum() / max(math.log(n), 1e-12)
        pix_ent = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean() / max(math.log(n), 1e-12)
        return {"usage": usage, "usage_sampled": count[0] / count[0].sum().clamp_min(1),
                "routing_entropy": ent, "routing_pixel_entropy": pix_ent}
