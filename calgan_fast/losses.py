"""CAL-GAN losses (docs/design.md §4): balancing, orthogonality, distribution, adversarial, perceptual."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.discriminator import DiscriminatorOutput, ExpertStats

__all__ = [
    "DEFAULT_WEIGHTS",
    "PerceptualLoss",
    "balancing_loss",
    "discriminator_loss",
    "distribution_loss",
    "gan_loss",
    "generator_adversarial_loss",
    "orthogonal_loss",
    "resolve_weights",
    "router_z_loss",
]

#: Modes of :func:`balancing_loss`.
BALANCE_MODES = ("paper", "switch", "usage", "entropy", "mi")

#: The paper's weights of L_D = λ_b L_b + λ_o L_o + λ_d L_dist + λ_dis L_dis, and the router
#: z-loss's λ_z (not in the paper: 0).
DEFAULT_WEIGHTS: dict[str, float] = {"lambda_b": 0.05, "lambda_o": 10.0, "lambda_d": 10.0, "lambda_dis": 1.0,
                                     "lambda_z": 0.0}


def resolve_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """The paper's weights updated with ``weights``; an unknown key is an error."""
    out = dict(DEFAULT_WEIGHTS)
    if weights:
        unknown = set(weights) - set(out)
        if unknown:
            raise ValueError(f"weights: unknown keys {sorted(unknown)}; expected a subset of {sorted(out)}")
        out.update({k: float(v) for k, v in weights.items()})
    return out


def balancing_loss(probs: Tensor, expert: Tensor, mode: str = "paper") -> Tensor:
    """Balancing loss of a routing.

    Args:
        probs: ``(B, N, h, w)`` router softmax R'. expert: ``(B, h, w)`` top-1 ids.
        mode:

            - ``"paper"`` (Eq. 4): ``(N/M) · Σ_p max_k R'[p, k]``. It is lowest when every pixel's
              router output is flat, whatever the experts' usage.
            - ``"switch"`` (the authors' code): ``mean_{b,i}(f[b,i] · P[b,i]) · N² / (h·w)``, f the
              fraction of image b's pixels routed to i and P the mean of R'[:, i] over them.
            - ``"usage"``: the Switch Transformer's term over the whole batch,
              ``N · Σ_i f_i · P_i``, f_i the fraction of the batch's pixels routed to i and P_i the
              mean of R'[:, i] over all of them; 1 at even usage. It balances the experts' usage
              over the batch and leaves each pixel free to choose its expert with confidence.
            - ``"entropy"``: ``1 − H(P) / log N``, P the batch mean of R'; 0 at even mean usage.
            - ``"mi"``: ``1 − (H(P) − mean_p H(R'[p])) / log N``, one minus the mutual information of
              pixel and expert (in units of log N): 0 when the experts are used evenly over the
              batch and each pixel's router output is certain. It asks for a balanced, confident
              partition of the feature pixels.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs: expected (B, N, h, w), got {tuple(probs.shape)}")
    b, n, h, w = probs.shape
    if tuple(expert.shape) != (b, h, w):
        raise ValueError(f"expert: expected shape {(b, h, w)}, got {tuple(expert.shape)}")
    if mode == "paper":
        return n * probs.amax(dim=1).mean()
    if mode == "switch":
        f = F.one_hot(expert.long(), n).to(probs.dtype).mean(dim=(1, 2))  # (B, N)
        p = probs.mean(dim=(2, 3))  # (B, N)
        return (f * p).mean() * (n * n) / (h * w)
    if mode == "usage":
        f = torch.bincount(expert.reshape(-1).long(), minlength=n).to(probs.dtype) / expert.numel()
        return n * (f * probs.mean(dim=(0, 2, 3))).sum()
    if mode == "entropy":
        p = probs.float().mean(dim=(0, 2, 3))
        ent = -(p * p.clamp_min(1e-12).log()).sum()
        return 1.0 - ent / math.log(n) if n > 1 else ent * 0.0
    if mode == "mi":
        p32 = probs.float()
        p = p32.mean(dim=(0, 2, 3))
        ent = -(p * p.clamp_min(1e-12).log()).sum()
        pixel_ent = -(p32 * p32.clamp_min(1e-12).log()).sum(1).mean()
        return 1.0 - (ent - pixel_ent) / math.log(n) if n > 1 else ent * 0.0
    raise ValueError(f"mode: expected one of {list(BALANCE_MODES)}, got {mode!r}")


def router_z_loss(logits: Tensor) -> Tensor:
    """The router z-loss of ST-MoE: the mean over pixels of ``logsumexp_k(logits[:, k])²``.
    logits: ``(B, N, h, w)``. It keeps the router's logits small, so the softmax stays responsive."""
    if logits.dim() != 4:
        raise ValueError(f"logits: expected (B, N, h, w), got {tuple(logits.shape)}")
    return torch.logsumexp(logits.float(), dim=1).square().mean()


def orthogonal_loss(proj: Tensor) -> Tensor:
    """Eq. 6: ``|| psi(O) psi(O)^T − I_N ||_F²`` with ``psi(O) = O.reshape(N, c·c)``. proj: ``(N, c, c)``."""
    if proj.dim() != 3:
        raise ValueError(f"proj: expected (N, c, c), got {tuple(proj.shape)}")
    psi = proj.reshape(proj.shape[0], -1).float()
    gram = psi @ psi.t()
    return (gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)).square().sum()


def distribution_loss(stats: ExpertStats, return_parts: bool = False):
    """Eq. 7: ``L_btw + L_wi``; ``L_btw = Σ_{i<j} cos(mu_i, mu_j)²`` over experts with ``n ≥ 1``,
    ``L_wi = Σ_i var_i``. With ``return_parts`` returns ``(total, between, within)``."""
    count, mean, var = stats
    used = count > 0
    mu = F.normalize(mean.float(), dim=1, eps=1e-12)
    cos = mu @ mu.t()
    pair = used[:, None] & used[None, :]
    pair = torch.triu(pair, diagonal=1)
    between = (cos.square() * pair).sum()
    within = var.float().sum()
    total = between + within
    return (total, between, within) if return_parts else total


def gan_loss(real: Tensor, fake: Tensor, gan_type: str = "relativistic",
             for_discriminator: bool = True) -> Tensor:
    """Adversarial loss on logits, in the convention of ESRGAN, BasicSR and the authors' code.

    ``relativistic`` (RaGAN, each BCE averaged over the batch's pixels), ``r`` and ``f`` the real
    and fake logits:

    - for D, ``0.5·BCE(r − mean(f.detach()), 1) + 0.5·BCE(f − mean(r.detach()), 0)``;
    - for G, ``0.5·BCE(r.detach() − mean(f), 0) + 0.5·BCE(f − mean(r.detach()), 1)``.

    ``vanilla`` (Eq. 9 of the paper): for D ``BCE(r, 1) + BCE(f, 0)``; for G ``BCE(f, 1)``
    (``real`` unused).
    """
    bce = F.binary_cross_entropy_with_logits
    real, fake = real.float(), fake.float()
    if gan_type == "relativistic":
        if for_discriminator:
            dr = real - fake.detach().mean()
            df = fake - real.detach().mean()
            return 0.5 * bce(dr, torch.ones_like(dr)) + 0.5 * bce(df, torch.zeros_like(df))
        dr = real.detach() - fake.mean()
        df = fake - real.detach().mean()
        return 0.5 * bce(dr, torch.zeros_like(dr)) + 0.5 * bce(df, torch.ones_like(df))
    if gan_type == "vanilla":
        if for_discriminator:
            return bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
        return bce(fake, torch.ones_like(fake))
    raise ValueError(f"gan_type: expected 'relativistic' or 'vanilla', got {gan_type!r}")


def _accuracy(real: Tensor, fake: Tensor, gan_type: str) -> tuple[Tensor, Tensor]:
    """Fraction of real and of fake pixels that D classifies right (the rule its loss uses)."""
    real, fake = real.detach().float(), fake.detach().float()
    if gan_type == "relativistic":
        return (real > fake.mean()).float().mean(), (fake < real.mean()).float().mean()
    return (real > 0).float().mean(), (fake < 0).float().mean()


def _unwrap(d: nn.Module) -> nn.Module:
    return getattr(d, "module", d)  # DistributedDataParallel


def discriminator_loss(D: nn.Module, hr: Tensor, sr: Tensor, weights: Mapping[str, float] | None = None,
                       balance: str = "paper", gan_type: str = "relativistic",
                       real: DiscriminatorOutput | None = None) -> dict:
    """The discriminator's loss of one (HR, SR) batch (docs/design.md §4).

    The real pass comes first; its routing (detached) routes the fake pass; ``sr`` is detached.
    Returns a dict of scalar tensors ``balance``, ``ortho``, ``dist``, ``dist_between``,
    ``dist_within``, ``adv``, ``total`` (the weighted sum, differentiable), detached ``acc_d_real``
    and ``acc_d_fake``, and ``routing``/``stats`` of the real pass (detached) for logging.

    ``real``: the output of ``D(hr, return_aux=True)`` computed with gradient by the caller (for
    example once per training step, shared with :func:`generator_adversarial_loss`); by default
    the real pass is run here.
    """
    w = resolve_weights(weights)
    if real is None:
        real = D(hr, return_aux=True)
    fake = D(sr.detach(), routing=real.routing.detach(), return_aux=True)
    l_b = balancing_loss(real.routing.probs, real.routing.expert, balance)
    l_o = orthogonal_loss(_unwrap(D).proj)
    l_d, l_btw, l_wi = distribution_loss(real.stats, return_parts=True)
    l_adv = gan_loss(real.logits, fake.logits, gan_type, for_discriminator=True)
    total = w["lambda_b"] * l_b + w["lambda_o"] * l_o + w["lambda_d"] * l_d + w["lambda_dis"] * l_adv
    extra = {}
    if w["lambda_z"] and real.routing.logits is not None:
        extra["z"] = router_z_loss(real.routing.logits)
        total = total + w["lambda_z"] * extra["z"]
    acc_real, acc_fake = _accuracy(real.logits, fake.logits, gan_type)
    stats = ExpertStats(real.stats.count, real.stats.mean.detach(), real.stats.var.detach())
    return {
        "balance": l_b, "ortho": l_o, "dist": l_d, "dist_between": l_btw, "dist_within": l_wi,
        "adv": l_adv, "total": total, "acc_d_real": acc_real, "acc_d_fake": acc_fake,
        "routing": real.routing.detach(), "stats": stats, **extra,
    }


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients into ``module``'s parameters (gradients still flow through it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_adversarial_loss(D: nn.Module, hr: Tensor, sr: Tensor, gan_type: str = "relativistic",
                               real: DiscriminatorOutput | None = None) -> Tensor:
    """L_gen (Eq. 1): D scores ``sr`` with the experts of ``hr`` (HR routing reused); D's
    parameters receive no gradient, ``sr`` does.

    ``real``: the output of ``D(hr, return_aux=True)`` when the caller already has it (a training
    step can run the real pass once, with gradient, and hand it to both this function and
    :func:`discriminator_loss`: one HR pass and one Gumbel routing per step). By default the HR
    pass runs here without gradient in D's current mode: in training it draws its own Gumbel
    routing and, like any train-mode pass, updates BatchNorm running statistics.
    """
    if real is None:
        with torch.no_grad():
            real = D(hr, return_aux=True)
    with frozen(D):
        fake = D(sr, routing=real.routing)
    return gan_loss(real.logits.detach(), fake, gan_type, for_discriminator=False)


# --------------------------------------------------------------------------------------------
# Perceptual loss

#: File name torchvision gives the ImageNet VGG19 weights in the torch hub cache.
VGG19_FILE = "vgg19-dcbb9e9d.pth"
#: Indices in ``torchvision.models.vgg19().features`` of the convs whose outputs (before ReLU) are used.
VGG19_LAYERS = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}
DEFAULT_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}


def default_vgg19_path() -> Path:
    """Where torchvision caches the ImageNet VGG19 weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def _download_vgg19(path: Path) -> None:
    """torchvision's download of its ImageNet VGG19 file into the torch hub cache; a failure
    (offline machine) is left to the caller's missing-file error."""
    import warnings

    from torchvision.models import VGG19_Weights

    try:
        torch.hub.load_state_dict_from_url(VGG19_Weights.IMAGENET1K_V1.url, model_dir=str(path.parent),
                                           progress=False, check_hash=True)
    except Exception as exc:  # network errors, a partial file, a bad hash
        warnings.warn(f"could not download the VGG19 weights ({type(exc).__name__}: {exc})", stacklevel=3)


class PerceptualLoss(nn.Module):
    """L1 distance of VGG19 features before ReLU (ESRGAN's perceptual loss).

    Args:
        weights: ``"imagenet"`` (default) loads torchvision's ImageNet VGG19 from the torch hub cache
            (``default_vgg19_path()``); a path loads that file (a torchvision ``vgg19`` state dict,
            whole or ``features.*`` only); ``None`` keeps random weights (tests only). A missing
            file raises ``FileNotFoundError`` naming where it looked.
        layer_weights: mapping of ``conv1_2 … conv5_4`` to weights (default 0.1, 0.1, 1, 1, 1).
        download: with ``weights="imagenet"`` and no file in the cache, fetch it with torchvision's
            own download (``VGG19_Weights.IMAGENET1K_V1`` into the torch hub cache). Offline, the
            download fails and the same ``FileNotFoundError`` says where the file goes.

    ``forward(sr, hr)``: ``(B, 3, H, W)`` images in [0, 1]; returns a scalar.
    """

    def __init__(self, weights: str | os.PathLike | None = "imagenet",
                 layer_weights: Mapping[str, float] | None = None, download: bool = False):
        super().__init__()
        from torchvision.models import vgg19

        lw = dict(DEFAULT_LAYER_WEIGHTS if layer_weights is None else layer_weights)
        unknown = set(lw) - set(VGG19_LAYERS)
        if unknown:
            raise ValueError(f"layer_weights: unknown layers {sorted(unknown)}; "
                             f"choose from {sorted(VGG19_LAYERS)}")
        if not lw:
            raise ValueError("layer_weights: empty")
        self.layer_weights = lw
        last = max(VGG19_LAYERS[k] for k in lw)
        features = vgg19(weights=None).features[: last + 1]
        if weights is not None:
            path = default_vgg19_path() if weights == "imagenet" else Path(weights)
            if weights == "imagenet" and download and not path.is_file():
                _download_vgg19(path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"VGG19 weights not found: looked for {path}. Put torchvision's ImageNet VGG19 "
                    f"file ({VGG19_FILE}) there, pass weights=PATH, or turn the perceptual loss off "
                    f"in the config."
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("params", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise ValueError(f"{path}: expected a VGG19 state dict, found {type(state).__name__}")
            feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            feats = feats or dict(state)
            keep = {k: v for k, v in feats.items()
                    if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= last}
            missing, unexpected = features.load_state_dict(keep, strict=False)
            if missing:
                raise ValueError(f"{path}: not a VGG19 state dict (missing {missing[:4]}...)")
        for i, m in enumerate(features):
            if isinstance(m, nn.ReLU):
                features[i] = nn.ReLU(inplace=False)
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self._taps = {VGG19_LAYERS[k]: k for k in lw}

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # VGG stays in eval mode
        return self

    def _feats(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        h = (x - self.mean) / self.std
        for i, m in enumerate(self.features):
            h = m(h)
            if i in self._taps:
                out[self._taps[i]] = h
        return out

    def forward(self, sr: Tensor, hr: Tensor) -> Tensor:
        if sr.shape != hr.shape:
            raise ValueError(f"sr and hr: shapes differ, {tuple(sr.shape)} vs {tuple(hr.shape)}")
        fs = self._feats(sr)
        with torch.no_grad():
            fh = self._feats(hr)
        return sum(self.layer_weights[k] * F.l1_loss(fs[k], fh[k]) for k in self.layer_weights)
