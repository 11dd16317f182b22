"""The authors'-code-compatible discriminator and losses (docs/design.md §5), plain PyTorch.

For users moving over from the official CAL-GAN repository, and as a second oracle: ``OfficialMOD``
has the state_dict keys, shapes and forward outputs of the authors' ``MOD(num_in_ch, num_feat,
num_expert)``. Like the original it is dense: every expert's projection and classifier run on
every pixel and the top-1 expert's output is selected afterwards, so its head costs N times what
:class:`calgan_fast.CALGANDiscriminator` pays. Differences from the paper variant:

- projections are diagonal (an elementwise weight per expert on a shared ``Linear``), not full
  ``c x c`` orthogonal matrices, and the orthogonality loss is the mean squared cosine similarity
  of those weight vectors;
- one classifier is shared by all experts;
- the router is a bias-free matrix ``w_gating1`` with plain softmax routing (no Gumbel noise);
- the "LDA" loss is computed on the whole per-expert feature tensors, not on per-expert statistics
  of the routed pixels; balancing is the switch-style loss. The GAN loss is ESRGAN's (the same as
  :func:`calgan_fast.losses.gan_loss`): it halves both terms and detaches the opposite pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import balancing_loss
from .nn.discriminator import feature_extractor
from .reference import LRELU_SLOPE

__all__ = ["OfficialMOD", "official_d_losses", "official_gan_loss", "official_discriminator_loss",
           "OFFICIAL_WEIGHTS"]

#: Weights of the authors' discriminator losses.
OFFICIAL_WEIGHTS = {"ortho": 10.0, "lda": 10.0, "balance": 0.05}


class _Trans(nn.Module):
    """Holds ``weight (1, 1, c·N)``, multiplied elementwise (key ``orthonet.trans.weight``)."""

    def __init__(self, n: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, 1, n * width))
        with torch.no_grad():
            nn.init.orthogonal_(self.weight.view(n, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class _OrthoNet(nn.Module):
    def __init__(self, width: int, n: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width * n), nn.LeakyReLU(LRELU_SLOPE))
        self.trans = _Trans(n, width)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.trans(self.body(x)), LRELU_SLOPE)


class OfficialMOD(nn.Module):
    """The authors' discriminator ``MOD`` (docs/design.md §5).

    ``forward(x, routing=None) -> (out (B, hw, 1), routing (B, hw, N), features (N-tuple of
    (B, hw, 4nf)), ortho_weight (N, 4nf))``; ``x`` is ``(B, num_in_ch, H, W)``, H and W multiples
    of 4, ``hw = H/4 · W/4``. A given ``routing`` (the real image's) is used as is.
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, num_expert: int = 12):
        super().__init__()
        if num_feat < 2 or num_expert < 1 or num_in_ch < 1:
            raise ValueError(f"num_in_ch, num_feat, num_expert: got {num_in_ch}, {num_feat}, {num_expert}")
        c = 4 * num_feat
        self.num_in_ch, self.num_feat, self.num_expert, self.channels = num_in_ch, num_feat, num_expert, c
        self.FE = feature_extractor(num_in_ch, num_feat)
        self.w_gating1 = nn.Parameter(torch.randn(c, num_expert) / c**0.5)
        self.orthonet = _OrthoNet(c, num_expert)
        self.classifier = nn.Sequential(
            nn.Linear(c, num_feat // 2), nn.LeakyReLU(LRELU_SLOPE), nn.Linear(num_feat // 2, 1)
        )
        # The same module N times: the experts share one classifier, as in the original.
        self.classifiers = nn.ModuleList([self.classifier] * num_expert)

    def forward(self, x: Tensor, routing: Tensor | None = None):
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f"x: expected (B, {self.num_in_ch}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"x: H and W must be multiples of 4, got {x.shape[2]}x{x.shape[3]}")
        f = self.FE(x)
        b, c, h, w = f.shape
        rows = f.flatten(2).transpose(1, 2)  # (B, hw, c)
        if routing is None:
            routing = torch.softmax(rows @ self.w_gating1, dim=-1)
        elif tuple(routing.shape) != (b, h * w, self.num_expert):
            raise ValueError(f"routing: expected shape {(b, h * w, self.num_expert)}, "
                             f"got {tuple(routing.shape)}")
        features = self.orthonet(rows).split(c, dim=-1)
        # Dense, as in the original: every expert's classifier on every pixel, then select.
        # (B, hw, 1, N)
        scores = torch.stack([clf(feat) for clf, feat in zip(self.classifiers, features)], dim=-1)
        top = routing.argmax(dim=-1)  # (B, hw)
        out = scores.gather(-1, top[:, :, None, None]).squeeze(-1)
        ortho_weight = self.orthonet.trans.weight.view(self.num_expert, -1)
        return out, routing, features, ortho_weight


def official_d_losses(routing: Tensor, features, ortho_weight: Tensor) -> dict:
    """The authors' extra discriminator losses (docs/design.md §5) and their weighted sum ``total``.

    ``ortho``: mean of the squared cosine-similarity matrix of the rows of ``ortho_weight`` with a
    zeroed diagonal. ``lda``: ``Σ_{i<j} mean(f_i·f_j / (Σf_i · Σf_j + 1e-5)) + Σ_k var(f_k)``
    (unbiased variance over the whole tensor). ``balance``: the switch-style loss of ``routing``
    ``(B, hw, N)``.
    """
    wn = F.normalize(ortho_weight, dim=1)
    sim = wn @ wn.t()
    sim = sim - torch.diag_embed(torch.diagonal(sim))
    ortho = sim.square().mean()
    feats = list(features)
    between = routing.new_zeros(())
    sums = [f.sum() for f in feats]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            between = between + (feats[i] * feats[j] / (sums[i] * sums[j] + 1e-5)).mean()
    within = sum(f.var() for f in feats)
    lda = between + within
    b, hw, n = routing.shape
    expert = routing.argmax(-1)
    # The switch loss of the paper variant over a (B, N, 1, hw) layout gives the same value.
    balance = balancing_loss(routing.transpose(1, 2).reshape(b, n, 1, hw), expert.reshape(b, 1, hw), "switch")
    w = OFFICIAL_WEIGHTS
    total = w["ortho"] * ortho + w["lda"] * lda + w["balance"] * balance
    return {"ortho": ortho, "lda": lda, "balance": balance, "total": total}


def official_gan_loss(real_out: Tensor, fake_out: Tensor, for_discriminator: bool = True) -> Tensor:
    """The relativistic loss of the authors' training code, which is BasicSR's ``ESRGANModel``.

    For D (``l_d_real + l_d_fake``): ``0.5·BCE(real − mean(fake.detach()), 1)
    + 0.5·BCE(fake − mean(real.detach()), 0)``. For G (``l_g_gan``): ``(BCE(real.detach() −
    mean(fake), 0) + BCE(fake − mean(real.detach()), 1)) / 2``. The opposite pass is detached as
    ``ESRGANModel.optimize_parameters`` detaches it.
    """
    bce = F.binary_cross_entropy_with_logits
    if for_discriminator:
        l_d_real = 0.5 * bce(real_out - fake_out.detach().mean(), torch.ones_like(real_out))
        l_d_fake = 0.5 * bce(fake_out - real_out.detach().mean(), torch.zeros_like(fake_out))
        return l_d_real + l_d_fake
    real_d_pred = real_out.detach()
    l_g_real = bce(real_d_pred - fake_out.mean(), torch.zeros_like(real_d_pred))
    l_g_fake = bce(fake_out - real_d_pred.mean(), torch.ones_like(fake_out))
    return (l_g_real + l_g_fake) / 2


def official_discriminator_loss(D: OfficialMOD, hr: Tensor, sr: Tensor) -> dict:
    """One D loss of the authors' recipe: real pass, fake pass routed by the real routing, the
    extra losses of the real pass and the GAN loss. ``total`` is differentiable."""
    real_out, routing, features, ortho_weight = D(hr)
    fake_out, _, _, _ = D(sr.detach(), routing=routing.detach())
    extra = official_d_losses(routing, features, ortho_weight)
    adv = official_gan_loss(real_out, fake_out, for_discriminator=True)
    return {**extra, "adv": adv, "total": extra["total"] + adv}
