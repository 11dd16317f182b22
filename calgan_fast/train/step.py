"""The CAL-GAN losses of one training iteration, shared by the trainer
(:mod:`calgan_fast.train.trainer`) and the BasicSR model (:mod:`calgan_fast.integrations.basicsr`).

:class:`GANSettings` holds the options: the form of the adversarial loss, the loss weights and the
routing options. :class:`GANStep` computes, for a batch of HR images and the generator's SR images,

- the generator's adversarial loss L_gen: D scores SR with the experts of HR (docs/design.md §4);
- the discriminator's loss ``L_D = λ_b L_b + λ_o L_o + λ_d L_dist + λ_dis L_dis + λ_z L_z`` and
  D's accuracy on real and fake pixels;
- the experts' shares of the real pixels, for the logs;

and applies the routing options around an iteration: :meth:`GANStep.start_iteration` sets D's
Gumbel temperature from its schedule (before the iteration's first pass);
:meth:`GANStep.end_iteration` (after D's optimizer step) updates the moving average of the experts'
usage and, every ``revive_every`` iterations, revives the silent experts
(:meth:`calgan_fast.CALGANDiscriminator.revive_experts`).

A plain-GAN discriminator (``VGGStyleDiscriminator``, ``UNetDiscriminatorSN``) gets the standard
GAN losses only (``L_D = λ_dis L_dis``); the routing options do not apply to it. The callers own
autocast, the backward passes, the optimizers and the averaging of gradients over processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..losses import BALANCE_MODES, discriminator_loss, generator_adversarial_loss
from ..nn.baselines import plain_discriminator_loss, plain_generator_loss
from ..nn.discriminator import CALGANDiscriminator, DiscriminatorOutput

__all__ = ["GAN_TYPES", "GANSettings", "GANStep", "SettingError"]

GAN_TYPES = ("relativistic", "vanilla")

#: The training config's keys of the settings that are not under ``train.d_opt``.
_CONFIG_KEYS = {"gan_type": "train.gan_opt.gan_type", "lambda_g": "train.gan_opt.loss_weight"}


class SettingError(ValueError):
    """A bad value of the :class:`GANSettings` field ``field``; ``reason`` says what is expected."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _weight(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value >= 0


@dataclass(frozen=True)
class GANSettings:
    """Options of the adversarial losses and of the routing (defaults: the paper's).

    Attributes:
        gan_type: ``"relativistic"`` (the paper's) or ``"vanilla"``, for D and G.
        balance: the balancing loss, a mode of :func:`calgan_fast.losses.balancing_loss`:
            ``"paper"`` (Eq. 4), ``"switch"``, ``"usage"``, ``"entropy"`` or ``"mi"``.
        lambda_b, lambda_o, lambda_d, lambda_dis: λ_b, λ_o, λ_d, λ_dis of ``L_D``.
        lambda_z: λ_z, the weight of the router z-loss (:func:`calgan_fast.losses.router_z_loss`);
            0 (the paper's) leaves it out.
        lambda_g: λ_g, the weight of L_gen in the generator's loss.
        tau_end: the Gumbel temperature at the last adversarial iteration; the temperature moves
            linearly from the discriminator's own ``tau`` (at the first) to it. ``None``: ``tau``
            throughout.
        revive_every: every this many adversarial iterations, each expert whose moving-average
            share of the real pixels is at most ``revive_threshold`` takes half of the pixels of
            the busiest one; 0: never.
        revive_threshold: the share at or below which an expert counts as silent; ``None``:
            ``1 / (4N)`` (the ``experts_alive`` rule of :mod:`calgan_fast.analysis`).
        usage_decay: decay of the exponential moving average of the experts' shares that revival
            reads (updated every iteration while revival is on).
    """

    gan_type: str = "relativistic"
    balance: str = "paper"
    lambda_b: float = 0.05
    lambda_o: float = 10.0
    lambda_d: float = 10.0
    lambda_dis: float = 1.0
    lambda_z: float = 0.0
    lambda_g: float = 0.005
    tau_end: float | None = None
    revive_every: int = 0
    revive_threshold: float | None = None
    usage_decay: float = 0.99

    def __post_init__(self):
        if self.gan_type not in GAN_TYPES:
            raise SettingError("gan_type", f"expected one of {list(GAN_TYPES)}, got {self.gan_type!r}")
        if self.balance not in BALANCE_MODES:
            raise SettingError("balance", f"expected one of {list(BALANCE_MODES)}, got {self.balance!r}")
        for name in ("lambda_b", "lambda_o", "lambda_d", "lambda_dis", "lambda_z", "lambda_g"):
            value = getattr(self, name)
            if not _weight(value):
                raise SettingError(name, f"expected a finite number >= 0, got {value!r}")
        t = self.tau_end
        if t is not None and not (_weight(t) and t > 0):
            raise SettingError("tau_end", f"expected a number > 0 or null, got {t!r}")
        r = self.revive_every
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise SettingError("revive_every", f"expected an integer >= 0 (0: off), got {r!r}")
        t = self.revive_threshold
        if t is not None and not (_weight(t) and t < 1):
            raise SettingError("revive_threshold", f"expected a share in [0, 1) or null, got {t!r}")
        t = self.usage_decay
        if not (_weight(t) and t < 1):
            raise SettingError("usage_decay", f"expected a number in [0, 1), got {t!r}")

    @staticmethod
    def config_key(name: str) -> str:
        """The training config's key of the setting ``name`` (e.g. ``train.d_opt.lambda_z``)."""
        return _CONFIG_KEYS.get(name, f"train.d_opt.{name}")

    @classmethod
    def from_config(cls, train: Mapping) -> GANSettings:
        """The settings of a training config's ``train`` section (``gan_opt`` and ``d_opt``).

        Raises :class:`SettingError` whose message names the config key.
        """
        do, go = train["d_opt"], train["gan_opt"]
        values = {f.name: do[f.name] for f in fields(cls) if f.name in do}
        for name in ("tau_end", "revive_threshold"):  # YAML reads 1e-1 (no dot) as a string
            if isinstance(values.get(name), str):
                try:
                    values[name] = float(values[name])
                except ValueError:
                    pass
        try:
            return cls(gan_type=go["gan_type"], lambda_g=go["loss_weight"], **values)
        except SettingError as exc:
            raise SettingError(cls.config_key(exc.field), exc.reason) from None

    def without_routing_losses(self) -> GANSettings:
        """These settings with λ_b = λ_o = λ_d = λ_z = 0 (one expert: the standard GAN configuration)."""
        return replace(self, lambda_b=0.0, lambda_o=0.0, lambda_d=0.0, lambda_z=0.0)

    def d_weights(self) -> dict[str, float]:
        """The weights in the form :func:`calgan_fast.losses.discriminator_loss` takes."""
        return {"lambda_b": self.lambda_b, "lambda_o": self.lambda_o, "lambda_d": self.lambda_d,
                "lambda_dis": self.lambda_dis, "lambda_z": self.lambda_z}


def _bare(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel


def _global_sum(t: Tensor) -> Tensor:
    """``t`` summed over the processes (in place) when there are several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class GANStep:
    """The adversarial losses of one iteration for discriminator ``net_d`` (module or DDP-wrapped),
    and the routing options around it.

    Args:
        net_d: a :class:`calgan_fast.CALGANDiscriminator` (routed) or a plain-GAN discriminator.
        settings: the options.
        total_iter: adversarial iterations in the run (the length of the temperature schedule).
        seed: seeds the noise of revived experts' router rows, with the iteration (every process
            revives alike, and a resumed run as an uninterrupted one).
    """

    def __init__(self, net_d: nn.Module, settings: GANSettings, total_iter: int = 0, seed: int = 0):
        self.total_iter, self.seed = int(total_iter), int(seed)
        bare = _bare(net_d)
        self.routed = isinstance(bare, CALGANDiscriminator)
        if self.routed and bare.num_experts == 1:
            # N = 1 is the standard GAN configuration: one classifier, no routing losses.
            settings = settings.without_routing_losses()
        self.net_d, self.settings = net_d, settings
        self.tau_start = bare.config.tau if self.routed else None
        n = bare.num_experts if self.routed else 0
        #: Moving average of the experts' shares of the real pixels (float64, on the CPU).
        self.usage = torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)

    # ---------------------------------------------------------------- routing options
    def tau_at(self, i: int) -> float:
        """The Gumbel temperature of adversarial iteration ``i`` (1-based)."""
        end = self.settings.tau_end
        if end is None or not self.routed:
            return self.tau_start
        last = max(self.total_iter, 1)
        frac = min(max(i - 1, 0), last - 1) / max(last - 1, 1)
        return self.tau_start + (end - self.tau_start) * frac

    def start_iteration(self, i: int) -> None:
        """Before adversarial iteration ``i`` (1-based): D's temperature from the schedule."""
        if self.routed and self.settings.tau_end is not None:
            _bare(self.net_d).set_tau(self.tau_at(i))

    def end_iteration(self, i: int, d: dict, optimizer: torch.optim.Optimizer | None = None,
                      shares: Tensor | None = None) -> list[int]:
        """After D's optimizer step of adversarial iteration ``i``: the usage average takes the
        shares of :meth:`discriminator_loss`'s result ``d`` and, every ``revive_every``
        iterations, the silent experts are revived (``optimizer``: its state of the rewritten
        rows is cleared). The shares are those of the argmax of the router (the routing of eval
        mode): Gumbel sampling spreads pixels over experts that the argmax never picks, so the
        sampled shares hide a silent expert. ``shares``: those shares over every process when the
        caller has them (:meth:`routing_usage`'s ``usage``), else counted here. Returns the
        revived ids."""
        s = self.settings
        if not self.routed or not s.revive_every:
            return []
        if shares is None:
            probs = d["routing"].probs
            count = _global_sum(torch.bincount(probs.argmax(1).reshape(-1), minlength=probs.shape[1]).float())
            shares = count / count.sum().clamp_min(1)
        self.usage.mul_(s.usage_decay).add_(shares.detach().double().cpu(), alpha=1 - s.usage_decay)
        if i % s.revive_every:
            return []
        gen = torch.Generator().manual_seed((self.seed % 2**31) * 2**32 + i % 2**32)
        revived = _bare(self.net_d).revive_experts(self.usage, s.revive_threshold, optimizer, gen)
        for k in revived:
            self.usage[k] = 1.0 / len(self.usage)  # counted as alive until its own usage says otherwise
        return revived

    def state_dict(self) -> dict:
        """What a resumed run needs to continue alike: the usage average."""
        return {"usage": self.usage.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        # A state loaded with a map_location (BasicSR's resume maps to the GPU) comes back to the CPU.
        usage = torch.as_tensor(state["usage"]).to(device="cpu", dtype=torch.float64)
        if usage.shape != self.usage.shape:
            raise ValueError(f"usage: expected shape {tuple(self.usage.shape)}, got {tuple(usage.shape)}")
        self.usage = usage.clone()

    # ---------------------------------------------------------------- losses
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
        (``total``, ``adv``, ``balance``, ``ortho``, ``dist``, ``z`` when λ_z > 0, ``acc_d_real``,
        ``acc_d_fake``, ``routing``, ``stats``, ...); for a plain discriminator ``adv``, ``total``
        (``λ_dis · adv``) and the accuracies. ``sr`` is detached here; ``real`` as in
        :meth:`generator_loss`."""
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
        count = _global_sum(torch.stack([d["stats"].count.float(),
                                         torch.bincount(probs.argmax(1).reshape(-1), minlength=n).float()]))
        usage = count[1] / count[1].sum().clamp_min(1)
        ent = -(usage * usage.clamp_min(1e-12).log()).sum() / max(math.log(n), 1e-12)
        pix_ent = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean() / max(math.log(n), 1e-12)
        return {"usage": usage, "usage_sampled": count[0] / count[0].sum().clamp_min(1),
                "routing_entropy": ent, "routing_pixel_entropy": pix_ent}
