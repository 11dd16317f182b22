"""CAL-GAN in BasicSR: a discriminator arch, a ``CALGANModel`` and a training entry point.

Importing this module registers, in BasicSR's registries:

- ``ARCH_REGISTRY["CALGANFastDiscriminator"]``: :class:`CALGANFastDiscriminator`, the
  :class:`calgan_fast.CALGANDiscriminator` under a name no BasicSR arch uses. Use it as
  ``network_d: {type: CALGANFastDiscriminator, num_feat: 64, num_experts: 12}``.
- ``MODEL_REGISTRY["CALGANModel"]``: :class:`CALGANModel`, BasicSR's ``SRGANModel`` with the
  CAL-GAN generator and discriminator steps (docs/design.md §4), configured by ``train: calgan_opt:``.

Run BasicSR's own training loop with both registered::

    python -m calgan_fast.integrations.basicsr -opt examples/basicsr_calgan.yml

It accepts BasicSR's options (``--auto_resume``, ``--debug``, ``--force_yml``, ``--launcher``) and
writes ``experiments/`` and ``tb_logger/`` under the current directory.

BasicSR 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module current torchvision
no longer has; this module installs an in-process alias first
(see :mod:`calgan_fast.integrations._torchvision_compat`), so the
user's installed packages stay untouched.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from ...nn.discriminator import CALGANDiscriminator
from ...train.checkpoint import atomic_save
from ...train.step import GANSettings, GANStep, SettingError
from .._torchvision_compat import install_functional_tensor_alias

install_functional_tensor_alias()
try:
    from basicsr.models.srgan_model import SRGANModel
    from basicsr.utils import get_root_logger
    from basicsr.utils.dist_util import master_only
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "calgan_fast.integrations.basicsr needs BasicSR 1.4.2: "
        'pip install --no-build-isolation "calgan_fast[basicsr]" '
        "(BasicSR builds from source and its setup imports torch, hence --no-build-isolation)"
    ) from err

__all__ = ["ARCH_NAME", "MODEL_NAME", "SETTING_NAMES", "CALGANFastDiscriminator", "CALGANModel",
           "CALGANOptions", "main"]

ARCH_NAME = "CALGANFastDiscriminator"
MODEL_NAME = "CALGANModel"

#: λ_g of the paper (Eq. 1), used when neither ``calgan_opt.gen_weight`` nor ``gan_opt`` gives one.
DEFAULT_GEN_WEIGHT = 0.005


class CALGANFastDiscriminator(CALGANDiscriminator):
    """:class:`calgan_fast.CALGANDiscriminator` as a BasicSR arch (same parameters and state_dict).

    Accepts BasicSR's ``num_in_ch`` as another name for ``in_channels``, so a ``network_d:`` block
    written for ``VGGStyleDiscriminator`` or ``UNetDiscriminatorSN`` only needs its ``type`` changed
    (and ``num_experts`` added). ``forward(x)`` returns logits ``(B, 1, H/4, W/4)``, so BasicSR's stock
    GAN models can also drive it, without the HR routing reuse and the extra losses of :class:`CALGANModel`.
    """

    def __init__(self, in_channels: int = 3, num_feat: int = 64, num_experts: int = 12,
                 hidden: int | None = None, routing: str = "gumbel", tau: float = 1.0,
                 share_classifier: bool = False, backend: str = "auto", *, num_in_ch: int | None = None):
        if num_in_ch is not None:
            if in_channels not in (3, num_in_ch):
                raise ValueError(f"num_in_ch: {num_in_ch} contradicts in_channels={in_channels}; "
                                 "give one of them")
            in_channels = num_in_ch
        super().__init__(in_channels, num_feat, num_experts, hidden, routing, tau, share_classifier, backend)


#: The name of each ``calgan_opt`` key in :class:`calgan_fast.train.step.GANSettings` (the
#: trainer's ``train.d_opt`` / ``train.gan_opt`` keys).
SETTING_NAMES = {
    "balance_weight": "lambda_b",
    "ortho_weight": "lambda_o",
    "dist_weight": "lambda_d",
    "adv_weight": "lambda_dis",
    "z_weight": "lambda_z",
    "gen_weight": "lambda_g",
    "balance_mode": "balance",
    "gan": "gan_type",
    "tau_end": "tau_end",
    "revive_every": "revive_every",
    "revive_threshold": "revive_threshold",
    "usage_decay": "usage_decay",
}


@dataclass(frozen=True)
class CALGANOptions:
    """The ``train: calgan_opt:`` block of a BasicSR YAML (all keys optional).

    Attributes:
        balance_weight, ortho_weight, dist_weight, adv_weight: λ_b, λ_o, λ_d, λ_dis of
            ``L_D`` (defaults: the paper's 0.05, 10, 10, 1).
        z_weight: λ_z, the weight of the router z-loss (default 0: off, as in the paper).
        gen_weight: λ_g of the generator's adversarial loss. ``None`` takes ``gan_opt.loss_weight``
            when the YAML has a ``gan_opt`` block, else the paper's 0.005.
        balance_mode: ``"paper"`` (Eq. 4), ``"switch"`` (the authors' code), ``"usage"``,
            ``"entropy"`` or ``"mi"`` (:func:`calgan_fast.losses.balancing_loss`).
        gan: ``"relativistic"`` (the paper's) or ``"vanilla"``; used by both D and G.
        tau_end, revive_every, revive_threshold, usage_decay: the routing options of
            :class:`calgan_fast.train.step.GANSettings` (the temperature moves linearly from
            ``network_d``'s ``tau`` to ``tau_end`` over ``train.total_iter`` iterations).
    """

    balance_weight: float = 0.05
    ortho_weight: float = 10.0
    dist_weight: float = 10.0
    adv_weight: float = 1.0
    z_weight: float = 0.0
    gen_weight: float | None = None
    balance_mode: str = "paper"
    gan: str = "relativistic"
    tau_end: float | None = None
    revive_every: int = 0
    revive_threshold: float | None = None
    usage_decay: float = 0.99

    def __post_init__(self):
        try:
            self.gan_settings()
        except SettingError as exc:
            option = {v: k for k, v in SETTING_NAMES.items()}[exc.field]
            raise ValueError(f"train:calgan_opt:{option}: {exc.reason}") from None

    @classmethod
    def from_train_opt(cls, train_opt: Mapping) -> CALGANOptions:
        """Read ``train_opt["calgan_opt"]`` (missing or empty: the paper's settings)."""
        block = train_opt.get("calgan_opt") or {}
        if not isinstance(block, Mapping):
            raise ValueError(f"train:calgan_opt: expected a mapping, got {type(block).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(block) - known
        if unknown:
            raise ValueError(f"train:calgan_opt: unknown keys {sorted(unknown)}; "
                             f"expected a subset of {sorted(known)}")
        return cls(**dict(block))

    def gan_settings(self, train_opt: Mapping | None = None) -> GANSettings:
        """These options under the trainer's names (:class:`calgan_fast.train.step.GANSettings`,
        :data:`SETTING_NAMES`).

        ``gen_weight=None`` takes ``train_opt["gan_opt"]["loss_weight"]`` when ``train_opt`` has
        a ``gan_opt`` block, else the paper's 0.005.
        """
        values = {SETTING_NAMES[f.name]: getattr(self, f.name) for f in fields(self)}
        if self.gen_weight is None:
            gan_opt = (train_opt or {}).get("gan_opt")
            values["lambda_g"] = float(gan_opt.get("loss_weight", 1.0)) if gan_opt else DEFAULT_GEN_WEIGHT
        return GANSettings(**values)

    def d_weights(self) -> dict[str, float]:
        """The weights in the form :func:`calgan_fast.losses.discriminator_loss` takes."""
        return self.gan_settings().d_weights()


class CALGANModel(SRGANModel):
    """BasicSR's ``SRGANModel`` trained the CAL-GAN way (docs/design.md §4).

    Generator step (every ``net_d_iters`` iterations after ``net_d_init_iters``, as in BasicSR):
    ``pixel_opt`` and ``perceptual_opt`` losses as configured, plus ``gen_weight · L_gen`` where D
    scores the SR image with the experts of the HR image.

    Discriminator step (every iteration): the real (HR) pass first; its routing, detached, routes
    the SR pass; ``L_D = λ_b L_b + λ_o L_o + λ_d L_dist + λ_dis L_dis`` from the real pass's router
    and expert statistics. Both losses come from :class:`calgan_fast.train.step.GANStep`, as in
    ``calgan train``; :meth:`CALGANOptions.gan_settings` maps the ``calgan_opt`` keys to its settings.

    ``network_d`` must be a :class:`calgan_fast.CALGANDiscriminator` (e.g. ``type:
    CALGANFastDiscriminator``). ``gan_opt``, if present, only supplies the default ``gen_weight``:
    the form of the adversarial loss is ``calgan_opt.gan``. Logged values: ``l_g_pix``,
    ``l_g_percep``, ``l_g_style``, ``l_g_gan``, ``l_d_total``, ``l_d_adv``, ``l_d_balance``,
    ``l_d_ortho``, ``l_d_dist``, ``l_d_z`` (with ``z_weight``), ``acc_d_real``, ``acc_d_fake``,
    ``d_experts_used``.
    """

    def init_training_settings(self):
        super().init_training_settings()
        bare = self.get_bare_model(self.net_d)
        if not isinstance(bare, CALGANDiscriminator):
            raise TypeError(f"network_d: {MODEL_NAME} needs a CAL-GAN discriminator (type: {ARCH_NAME}), "
                            f"got {type(bare).__name__}")
        train_opt = self.opt["train"]
        self.calgan_opt = CALGANOptions.from_train_opt(train_opt)
        self.gan = GANStep(self.net_d, self.calgan_opt.gan_settings(train_opt),
                           total_iter=train_opt.get("total_iter", 0), seed=self.opt.get("manual_seed") or 0)
        self.gen_weight = self.gan.settings.lambda_g
        get_root_logger().info(f"CAL-GAN options: {asdict(self.calgan_opt)}; generator adversarial "
                               f"weight {self.gen_weight:g}")
        if bare.num_experts == 1:
            get_root_logger().info("one expert: the routing losses (balance, ortho, dist, z weights) are off")

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's training state (epoch, iteration, optimizers, schedulers) plus the CAL-GAN
        step's own state under ``"calgan"`` (the usage average that revival reads), written
        atomically to ``training_states/<iter>.state``, the file BasicSR resumes from."""
        if current_iter == -1:  # BasicSR's "latest" save writes no training state
            return
        state = {"epoch": epoch, "iter": current_iter,
                 "optimizers": [o.state_dict() for o in self.optimizers],
                 "schedulers": [s.state_dict() for s in self.schedulers],
                 "calgan": self.gan.state_dict()}
        atomic_save(state, os.path.join(self.opt["path"]["training_states"], f"{current_iter}.state"))

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if "calgan" in resume_state:
            self.gan.load_state_dict(resume_state["calgan"])
        elif self.gan.settings.revive_every:
            get_root_logger().warning("the training state has no CAL-GAN usage average (saved by another "
                                      "model); revival starts from even usage")

    def optimize_parameters(self, current_iter):
        gan = self.gan
        gan.start_iteration(current_iter)
        loss_dict = OrderedDict()

        # Generator: D's parameters get no gradient (the loss also freezes them, this saves the work).
        for p in self.net_d.parameters():
            p.requires_grad = False
        self.optimizer_g.zero_grad()
        self.output = self.net_g(self.lq)
        if current_iter % self.net_d_iters == 0 and current_iter > self.net_d_init_iters:
            l_g_total = 0
            if self.cri_pix:
                l_g_pix = self.cri_pix(self.output, self.gt)
                l_g_total += l_g_pix
                loss_dict["l_g_pix"] = l_g_pix
            if self.cri_perceptual:
                l_g_percep, l_g_style = self.cri_perceptual(self.output, self.gt)
                if l_g_percep is not None:
                    l_g_total += l_g_percep
                    loss_dict["l_g_percep"] = l_g_percep
                if l_g_style is not None:
                    l_g_total += l_g_style
                    loss_dict["l_g_style"] = l_g_style
            l_g_gan = self.gen_weight * gan.generator_loss(self.gt, self.output)
            l_g_total += l_g_gan
            loss_dict["l_g_gan"] = l_g_gan
            l_g_total.backward()
            self.optimizer_g.step()

        # Discriminator: real pass, SR pass routed by the real routing, all CAL-GAN losses.
        for p in self.net_d.parameters():
            p.requires_grad = True
        self.optimizer_d.zero_grad()
        d = gan.discriminator_loss(self.gt, self.output)
        d["total"].backward()
        self.optimizer_d.step()
        revived = gan.end_iteration(current_iter, d, self.optimizer_d)
        if revived:
            get_root_logger().info(f"iteration {current_iter}: revived silent expert(s) {revived} "
                                   "(calgan_opt.revive_every)")
        loss_dict["l_d_total"] = d["total"].detach()
        for key in ("adv", "balance", "ortho", "dist", "z"):
            if key in d:
                loss_dict[f"l_d_{key}"] = d[key].detach()
        loss_dict["acc_d_real"] = d["acc_d_real"]
        loss_dict["acc_d_fake"] = d["acc_d_fake"]
        loss_dict["d_experts_used"] = (d["stats"].count > 0).sum().float()

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)


def _register(registry, name: str, obj) -> None:
    """Register ``obj`` as ``name``; a reload of this module re-registers, a foreign object is an error."""
    if name in registry:
        old = registry.get(name)
        old_name = (getattr(old, "__module__", None), getattr(old, "__qualname__", None))
        if old_name != (obj.__module__, obj.__qualname__):
            raise RuntimeError(f"BasicSR's {registry._name} registry already holds a different {name!r} "
                               f"({old.__module__}.{old.__qualname__})")
        registry._obj_map[name] = obj
        return
    registry.register(obj)


_register(ARCH_REGISTRY, ARCH_NAME, CALGANFastDiscriminator)
_register(MODEL_REGISTRY, MODEL_NAME, CALGANModel)


def main(argv: Sequence[str] | None = None, root_path: str | os.PathLike | None = None) -> None:
    """Run BasicSR's ``train_pipeline`` with the CAL-GAN arch and model registered.

    Args:
        argv: BasicSR's command-line arguments (``["-opt", "X.yml", ...]``); ``None`` reads
            ``sys.argv[1:]``. BasicSR parses ``sys.argv`` itself, so a given ``argv`` replaces it
            for the duration of the call.
        root_path: where ``experiments/`` and ``tb_logger/`` go (default: the current directory).
    """
    from basicsr.train import train_pipeline

    root = os.path.abspath(os.fspath(root_path) if root_path is not None else os.getcwd())
    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0] if saved else "calgan_fast.integrations.basicsr", *argv]
    try:
        train_pipeline(root)
    finally:
        sys.argv = saved
