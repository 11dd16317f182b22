"""The CAL-GAN content-aware local discriminator (docs/design.md §2), with the fused routed head."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import routed_head
from ..reference import LRELU_SLOPE

__all__ = [
    "CALGANDiscriminator",
    "DiscriminatorConfig",
    "DiscriminatorOutput",
    "ExpertStats",
    "PATCH_SIZES",
    "Routing",
    "batch_statistics",
    "calibrate_bn",
    "feature_extractor",
    "real_statistics_only",
]

_ROUTINGS = ("gumbel", "argmax")
#: Patch sizes p of the paper's Table 5: each feature pixel covers p x p image pixels.
PATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Routing:
    """Top-1 routing of one image batch.

    Attributes:
        expert: ``(B, h, w)`` int64 expert id per feature pixel.
        gate: ``(B, h, w)`` gate value, 1.0 in the forward pass; in training it carries the
            straight-through gradient of the router.
        probs: ``(B, N, h, w)`` router softmax R'.
        logits: ``(B, N, h, w)`` router logits (fp32) when the discriminator routed this batch
            itself, for the router z-loss; ``None`` for a routing passed in.
    """

    expert: Tensor
    gate: Tensor
    probs: Tensor
    logits: Tensor | None = None

    def detach(self) -> Routing:
        """The same routing with no gradient: reused for the SR image of a pair, gate 1.0."""
        logits = None if self.logits is None else self.logits.detach()
        return Routing(self.expert.detach(), self.gate.detach(), self.probs.detach(), logits)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]


class ExpertStats(NamedTuple):
    """Per-expert statistics of the projected features y over the batch (docs/design.md §2)."""

    count: Tensor  # (N,) int64
    mean: Tensor  # (N, c) fp32
    var: Tensor  # (N,) fp32


class DiscriminatorOutput(NamedTuple):
    logits: Tensor  # (B, 1, h, w)
    routing: Routing
    stats: ExpertStats


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3
    num_feat: int = 64
    num_experts: int = 12
    hidden: int | None = None
    routing: str = "gumbel"
    tau: float = 1.0
    share_classifier: bool = False
    backend: str = "auto"
    patch_size: int = 4
    eval_bn: str = "batch"

    def __post_init__(self):
        for name in ("in_channels", "num_feat", "num_experts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden: must be >= 1 or None, got {self.hidden}")
        if self.routing not in _ROUTINGS:
            raise ValueError(f"routing: expected one of {_ROUTINGS}, got {self.routing!r}")
        if not self.tau > 0:
            raise ValueError(f"tau: must be > 0, got {self.tau}")
        if self.eval_bn not in ("batch", "running"):
            raise ValueError(f"eval_bn: expected 'batch' or 'running', got {self.eval_bn!r}")
        if isinstance(self.patch_size, bool) or self.patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size: expected one of {list(PATCH_SIZES)} (a power of two up to 16), "
                             f"got {self.patch_size!r}")


def feature_extractor(in_channels: int, nf: int, patch_size: int = 4) -> nn.Sequential:
    """The authors' feature extractor: ``(B, in, H, W) -> (B, 4nf, H/p, W/p)``.

    ``patch_size`` p = 4 is the authors' topology (20 modules, two conv4x4 stride-2 stages).
    p = 2 makes the second stride-2 stage (module 8) a conv3x3 stride 1; p = 1 makes both (modules
    2 and 8) conv3x3 stride 1. p = 8 and 16 append one and two stages ``conv4x4 s2 p1 (4nf→4nf) ·
    BN · LReLU`` after module 19, so modules 0..19 keep the authors' shapes.
    """
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"patch_size: expected one of {list(PATCH_SIZES)}, got {patch_size!r}")

    def lrelu():
        return nn.LeakyReLU(LRELU_SLOPE, inplace=True)

    down = {1: (False, False), 2: (True, False)}.get(patch_size, (True, True))
    layers: list[nn.Module] = [nn.Conv2d(in_channels, nf, 3, 1, 1, bias=True), lrelu()]
    plan = [(nf, nf, 4, 2), (nf, 2 * nf, 3, 1), (2 * nf, 2 * nf, 4, 2), (2 * nf, 4 * nf, 3, 1),
            (4 * nf, 4 * nf, 3, 1), (4 * nf, 4 * nf, 3, 1)]
    plan[0] = plan[0] if down[0] else (nf, nf, 3, 1)
    plan[2] = plan[2] if down[1] else (2 * nf, 2 * nf, 3, 1)
    extra = {8: 1, 16: 2}.get(patch_size, 0)
    plan += [(4 * nf, 4 * nf, 4, 2)] * extra
    for cin, cout, k, s in plan:
        layers += [nn.Conv2d(cin, cout, k, s, 1, bias=False), nn.BatchNorm2d(cout), lrelu()]
    return nn.Sequential(*layers)


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def real_statistics_only(module: nn.Module):
    """Passes inside do not change the BatchNorm running statistics of ``module``.

    In training mode BN still normalises with the batch's own statistics; only the running
    averages are left alone. Fake (SR) passes run inside it, so the running statistics are those of
    real images, not an average of real and fake batches.
    """
    saved = []
    for bn in _batch_norms(module):
        if bn.training and bn.track_running_stats:
            saved.append((bn, bn.momentum, bn.num_batches_tracked.clone()))
            bn.momentum = 0.0
    try:
        yield module
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def _batch_stats_forward(bn: nn.modules.batchnorm._BatchNorm):
    def forward(x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    return forward


@contextlib.contextmanager
def batch_statistics(module: nn.Module):
    """Passes inside normalise every BatchNorm of ``module`` with the batch's own statistics, as
    training mode does, and leave the running statistics unchanged, whatever the module's mode.

    Each process uses its own batch (a SyncBatchNorm does not communicate here), so a pass on one
    process alone, such as drawing a routing map, is safe under ``torch.distributed``.
    """
    bns = _batch_norms(module)
    for bn in bns:
        bn.forward = _batch_stats_forward(bn)  # an instance attribute shadows the class's forward
    try:
        yield module
    finally:
        for bn in bns:
            del bn.forward


@torch.no_grad()
def calibrate_bn(module: nn.Module, batches) -> nn.Module:
    """Recomputes the BatchNorm running statistics of ``module`` from real images.

    ``batches``: an iterable of ``(B, C, H, W)`` image tensors (real/HR images). The running means
    and variances become the plain average over these batches of each batch's statistics (as BN
    computes them in training mode); weights do not change. For a discriminator evaluated with its
    running statistics (``eval_bn="running"``) whose statistics mix real and fake passes (one
    trained elsewhere). Returns ``module`` in the mode it was in.
    """
    bns = _batch_norms(module)
    if not bns:
        return module
    was = module.training
    saved = [(bn, bn.momentum) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    module.train()
    seen = 0
    try:
        for x in batches:
            module(x)
            seen += 1
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        module.train(was)
    if seen == 0:
        raise ValueError("batches: no image batch given")
    return module


class CALGANDiscriminator(nn.Module):
    """CAL-GAN discriminator: feature extractor, router, N routed experts (docs/design.md §2).

    Args:
        in_channels: image channels (3).
        num_feat: ``nf``; features have ``c = 4 nf`` channels (64 -> 256; the paper's 512 is 128).
        num_experts: N.
        hidden: classifier hidden width ``hdim`` (default ``c // 8``).
        routing: ``"gumbel"`` (hard Gumbel-softmax in training) or ``"argmax"``. Eval mode always
            routes by argmax.
        tau: temperature of the training routing: the expert of a pixel is sampled from
            ``softmax(logits / tau)`` (hard Gumbel-softmax of ``logits / tau``, straight-through
            gradient). Below 1 the router's favourite is sampled more often, above 1 less. (A hard
            Gumbel-softmax's own temperature changes only the gradient, never the sample; at
            ``tau = 1`` the two agree.)
        share_classifier: one classifier for all experts, as in the authors' code.
        backend: routed-head backend (see :func:`calgan_fast.routed_head`).
        patch_size: p, the image patch of one feature pixel (1, 2, 4, 8 or 16; see
            :func:`feature_extractor`). The routed head does not depend on it.
        eval_bn: how BatchNorm normalises in eval mode. ``"batch"`` (default): with the statistics
            of the batch being scored, as in training, where the real and the fake batch are each
            normalised by their own statistics; the running statistics are not changed. Score real
            and fake images in separate batches, as training does. ``"running"``: torch's usual
            running averages, which come from real passes only (see below).

    ``forward(x, routing=None, return_aux=False)``: ``x`` is ``(B, in_channels, H, W)`` in
    [0, 1] with H, W multiples of p; returns logits ``(B, 1, H/p, W/p)``, or with
    ``return_aux=True`` a :class:`DiscriminatorOutput`. Pass ``routing=`` the detached routing of
    the real image to score the fake image of the same pair with the real image's experts.

    BatchNorm: a training-mode pass given ``routing=`` (the fake image of a pair) normalises with
    its own batch statistics but leaves the running statistics alone (:func:`real_statistics_only`),
    so these come from real passes only. A D trained with per-batch statistics is a different
    function under any fixed statistics (a fake batch normalised by real statistics is scored
    differently from how training scored it), hence ``eval_bn="batch"``: eval mode then routes and
    scores exactly as training mode with argmax routing does.
    """

    def __init__(self, in_channels: int = 3, num_feat: int = 64, num_experts: int = 12,
                 hidden: int | None = None, routing: str = "gumbel", tau: float = 1.0,
                 share_classifier: bool = False, backend: str = "auto", patch_size: int = 4,
                 eval_bn: str = "batch"):
        super().__init__()
        cfg = DiscriminatorConfig(in_channels, num_feat, num_experts, hidden, routing, tau,
                                  share_classifier, backend, patch_size, eval_bn)
        self.config = cfg
        c = 4 * num_feat
        hdim = hidden or max(1, c // 8)
        self.channels, self.hidden, self.num_experts = c, hdim, num_experts
        self.patch_size = patch_size
        self.features = feature_extractor(in_channels, num_feat, patch_size)
        self.router = nn.Conv2d(c, num_experts, 1, bias=True)
        self.proj = nn.Parameter(torch.empty(num_experts, c, c))
        nc = 1 if share_classifier else num_experts
        self.w1 = nn.Parameter(torch.empty(nc, hdim, c))
        self.b1 = nn.Parameter(torch.zeros(nc, hdim))
        self.w2 = nn.Parameter(torch.empty(nc, hdim))
        self.b2 = nn.Parameter(torch.zeros(nc))
        self.reset_head()

    @torch.no_grad()
    def reset_head(self) -> None:
        """Orthogonal experts with unit Frobenius norm (so ``psi(O) psi(O)^T ≈ I_N`` from the
        start), Kaiming-uniform classifiers."""
        num_experts, c, _ = self.proj.shape
        for i in range(num_experts):
            nn.init.orthogonal_(self.proj[i])
        self.proj.div_(c**0.5)
        for i in range(self.w1.shape[0]):
            nn.init.kaiming_uniform_(self.w1[i], a=LRELU_SLOPE)
        bound = 1.0 / self.hidden**0.5
        nn.init.uniform_(self.w2, -bound, bound)
        self.b1.zero_()
        self.b2.zero_()

    def set_tau(self, tau: float) -> None:
        """Sets the Gumbel-softmax temperature of the training routing (for annealing schedules)."""
        self.config = dataclasses.replace(self.config, tau=float(tau))

    @torch.no_grad()
    def revive_experts(self, usage: Tensor, threshold: float | None = None, optimizer=None,
                       generator: torch.Generator | None = None) -> list[int]:
        """Gives each silent expert half of the pixels of the busiest one; returns the revived ids.

        ``usage``: ``(N,)`` shares of the routed pixels (e.g. an average over recent batches).
        An expert is silent when its share is at most ``threshold`` (default ``1 / (4N)``, the
        ``experts_alive`` rule of :mod:`calgan_fast.analysis`). Each silent expert, in turn, takes
        the router row of the expert with the largest remaining share (plus noise of 1 % of that
        row's spread, so that ties split the pixels), and that share is halved. With a classifier
        per expert, the silent expert's classifier becomes the busy expert's composed with the
        change of projection (``w1_d = w1_b O_b pinv(O_d)``): both score their pixels alike at
        first, while the projections stay distinct (orthogonality is unchanged). ``optimizer``:
        its per-parameter state (Adam's moments) of the rewritten rows is zeroed.
        """
        n = self.num_experts
        share = torch.as_tensor(usage, dtype=torch.float64).flatten().cpu().clone()
        if share.numel() != n:
            raise ValueError(f"usage: expected {n} shares, got {share.numel()}")
        limit = 1.0 / (4 * n) if threshold is None else float(threshold)
        silent = [int(i) for i in torch.nonzero(share <= limit).flatten()]
        if not silent or len(silent) == n:
            return []
        w, b = self.router.weight, self.router.bias  # (N, c, 1, 1), (N,)
        per_expert = self.w1.shape[0] == n
        rows: list[tuple[int, int]] = []
        for d in silent:
            share[d] = -1.0
            src = int(share.argmax())
            share[src] /= 2
            share[d] = share[src]
            spread = w[src].std().clamp_min(1e-6)
            noise = torch.randn(w[src].shape, generator=generator, dtype=torch.float32).to(w)
            w[d].copy_(w[src] + 0.01 * spread * noise)
            b[d].copy_(b[src])
            if per_expert:
                o_src, o_d = self.proj[src].float(), self.proj[d].float()
                self.w1[d].copy_(self.w1[src].float() @ o_src @ torch.linalg.pinv(o_d))
                self.b1[d].copy_(self.b1[src])
                self.w2[d].copy_(self.w2[src])
                self.b2[d].copy_(self.b2[src])
            rows.append((d, src))
        if optimizer is not None:
            params = [w, b] + ([self.w1, self.b1, self.w2, self.b2] if per_expert else [])
            for p in params:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        for d, _ in rows:
                            value[d].zero_()
        return [d for d, _ in rows]

    def head_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(proj, w1, b1, w2, b2)`` with the classifier expanded to N experts when shared."""
        num_experts = self.num_experts
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if w1.shape[0] != num_experts:
            w1, b1, w2, b2 = (t.expand(num_experts, *t.shape[1:]) for t in (w1, b1, w2, b2))
        return self.proj, w1, b1, w2, b2

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected (B, C, H, W), got shape {tuple(x.shape)}")
        b, ch, h, w = x.shape
        if ch != self.config.in_channels:
            raise ValueError(f"x: expected {self.config.in_channels} channels, got {ch}")
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"x: H and W must be positive multiples of {p} (patch_size), got {h}x{w}")
        if b == 0:
            raise ValueError("x: empty batch (B = 0)")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x: expected a float tensor in [0, 1], got {x.dtype}")

    def route(self, logits: Tensor) -> Routing:
        """Routing from router logits ``(B, N, h, w)``."""
        logits = logits.float()
        probs = torch.softmax(logits, dim=1)
        if self.training and self.config.routing == "gumbel":
            y = F.gumbel_softmax(logits / self.config.tau, tau=1.0, hard=True, dim=1)
            expert = y.argmax(1)
            gate = y.gather(1, expert[:, None]).squeeze(1)
        else:
            expert = probs.argmax(1)
            if self.training:
                # 1.0 forward, straight-through gradient of R' backward.
                p = probs.gather(1, expert[:, None]).squeeze(1)
                gate = (p - p.detach()) + 1.0  # exactly 1.0: (p - p) is 0 before the 1 is added
            else:
                gate = torch.ones_like(expert, dtype=probs.dtype)
        return Routing(expert, gate, probs, logits)

    def _check_routing(self, routing: Routing, b: int, h: int, w: int) -> None:
        if not isinstance(routing, Routing):
            raise TypeError(f"routing: expected calgan_fast.Routing, got {type(routing).__name__}")
        if tuple(routing.expert.shape) != (b, h, w):
            raise ValueError(f"routing: expert map of shape {tuple(routing.expert.shape)} does not "
                             f"match this input's feature map ({b}, {h}, {w})")
        if tuple(routing.gate.shape) != (b, h, w):
            raise ValueError(f"routing: gate of shape {tuple(routing.gate.shape)}, expected ({b}, {h}, {w})")
        if routing.probs.shape[1] != self.num_experts:
            raise ValueError(f"routing: made for {routing.probs.shape[1]} experts, this "
                             f"discriminator has {self.num_experts}")

    def feature_map(self, x: Tensor, routing: Routing | None = None) -> Tensor:
        """The feature extractor's output ``(B, c, H/p, W/p)`` for ``x``, as :meth:`forward` computes it.

        In eval mode with ``eval_bn="batch"``, and for the fake image of a pair in training (marked
        by a given ``routing``), BatchNorm uses the batch's own statistics and leaves the running
        statistics untouched.
        """
        own_stats = (self.config.eval_bn == "batch") if not self.training else routing is not None
        if not own_stats:
            return self.features(x)
        if any(isinstance(m, nn.SyncBatchNorm) for m in self.features.modules()):
            # SyncBatchNorm keeps its own forward (its statistics span the processes in training).
            ctx = real_statistics_only if self.training else batch_statistics
            with ctx(self.features):
                return self.features(x)
        # Layer by layer, each BatchNorm as the functional batch norm of the batch's statistics:
        # the same numbers as training mode, no state changed, and traceable by torch.compile.
        for layer in self.features:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                x = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
            else:
                x = layer(x)
        return x

    def forward(self, x: Tensor, routing: Routing | None = None, return_aux: bool = False):
        self._check_input(x)
        feats = self.feature_map(x, routing)  # (B, c, h, w)
        b, c, h, w = feats.shape
        if routing is None:
            routing = self.route(self.router(feats))
        else:
            # The fake image of a pair is scored by the real image's experts, gate 1.0, no gradient.
            self._check_routing(routing, b, h, w)
            if routing.expert.device != feats.device:
                raise ValueError(f"routing: on {routing.expert.device}, but the input is on {feats.device}")
            routing = Routing(routing.expert.detach(), torch.ones_like(routing.gate, dtype=torch.float32),
                              routing.probs.detach())
        # Rows in NHWC order; for B = 1 this is a strided view of the NCHW map, not a copy.
        rows = feats.permute(0, 2, 3, 1).reshape(b * h * w, c)
        proj, w1, b1, w2, b2 = self.head_weights()
        out = routed_head(rows, routing.expert.reshape(-1), routing.gate.reshape(-1).to(rows.dtype),
                          proj, w1, b1, w2, b2, backend=self.config.backend)
        logits = out.logits.reshape(b, 1, h, w)
        if not return_aux:
            return logits
        return DiscriminatorOutput(logits, routing, ExpertStats(out.count, out.mean, out.var))

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"c={self.channels}, hidden={self.hidden}, num_experts={self.num_experts}, "
                f"routing={cfg.routing!r}, share_classifier={cfg.share_classifier}, backend={cfg.backend!r}, "
                f"patch_size={cfg.patch_size}")
