"""The inputs every benchmark times: routed-head operands and discriminator steps, made one way.

- :func:`head_inputs`: the operands of ``routed_head`` (features, routing, weights);
- :func:`head_output_grads`: gradients of its outputs, for the backward pass;
- :func:`matmul_operands`: the same-shape ``(M, c) x (c, c)`` matmul (the speed of light);
- :func:`dstep_images` and :func:`make_dstep`: one discriminator step, the paper variant or the
  authors'-code-compatible module, at ``num_feat`` 64 and 12 experts.

Random values are drawn on the CPU from seeded generators and then moved, so every device and
dtype times the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import calgan_fast
from calgan_fast.compat import OfficialMOD, official_discriminator_loss
from calgan_fast.losses import discriminator_loss

__all__ = ["DSTEP_EXPERTS", "DSTEP_FEAT", "dstep_images", "head_inputs", "head_output_grads", "make_dstep",
           "matmul_operands"]

#: ``num_feat`` and ``num_experts`` of the discriminator-step benchmarks (docs/design.md §7).
DSTEP_FEAT, DSTEP_EXPERTS = 64, 12


def head_inputs(m: int, c: int, n: int, *, device="cpu", dtype: torch.dtype = torch.float32,
                requires_grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x, expert, gate, proj, w1, b1, w2, b2)`` of ``routed_head`` at ``M = m`` rows, ``c``
    channels, ``n`` experts and ``hdim = c / 8``.

    ``x: (M, c)`` standard normal; ``expert: (M,)`` int64, uniform over the experts; ``gate: (M,)``
    ones; ``proj: (N, c, c)`` and ``w1: (N, hdim, c)`` normal over ``sqrt(c)``; ``w2: (N, hdim)``
    normal over ``sqrt(hdim)``; ``b1``, ``b2`` zeros (outputs of order 1). The float tensors are in
    ``dtype`` on ``device``, leaves with ``requires_grad`` as given.
    """
    g = torch.Generator().manual_seed(seed)
    hdim = max(1, c // 8)
    x = torch.randn(m, c, generator=g)
    expert = torch.randint(0, n, (m,), generator=g)
    gate = torch.ones(m)
    proj = torch.randn(n, c, c, generator=g) / c**0.5
    w1 = torch.randn(n, hdim, c, generator=g) / c**0.5
    b1 = torch.zeros(n, hdim)
    w2 = torch.randn(n, hdim, generator=g) / hdim**0.5
    b2 = torch.zeros(n)
    x, gate, proj, w1, b1, w2, b2 = (t.to(device, dtype).requires_grad_(requires_grad)
                                     for t in (x, gate, proj, w1, b1, w2, b2))
    return x, expert.to(device), gate, proj, w1, b1, w2, b2


def head_output_grads(m: int, c: int, n: int, *, device="cpu", logits_dtype: torch.dtype = torch.float32,
                      seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal gradients of ``routed_head``'s ``(logits (M,), mean (N, c), var (N,))``;
    the logits' in ``logits_dtype``, the statistics' in fp32 (their dtype)."""
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(m, generator=g).to(device, logits_dtype)
    gm = torch.randn(n, c, generator=g).to(device)
    gv = torch.randn(n, generator=g).to(device)
    return gl, gm, gv


def matmul_operands(m: int, c: int, *, device="cpu", dtype: torch.dtype = torch.float32,
                    requires_grad: bool = False, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``a: (M, c)`` standard normal and ``b: (c, c)`` normal over ``sqrt(c)``: the operands of the
    matmul of the head's shape."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, c, generator=g)
    b = torch.randn(c, c, generator=g) / c**0.5
    return tuple(t.to(device, dtype).requires_grad_(requires_grad) for t in (a, b))


def dstep_images(b: int, h: int, w: int, *, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hr, sr)``: ``(B, 3, H, W)`` uniform HR images and noisy copies as the SR images.
    Seeds torch's global generator (the discriminators built next draw their weights from it)."""
    torch.manual_seed(seed)
    hr = torch.rand(b, 3, h, w, device=device)
    sr = (hr + 0.05 * torch.randn_like(hr)).clamp(0, 1)
    return hr, sr


def make_dstep(model: str, hr: torch.Tensor, sr: torch.Tensor, *, backend: str = "auto",
               sync: Callable[[], None] | None = None) -> Callable[[], None]:
    """One discriminator step as a callable: gradients cleared, real pass, fake pass routed by the
    real routing, every loss, backward (then ``sync``).

    ``model``: ``"calgan"`` (``CALGANDiscriminator`` with routed-head ``backend`` and
    ``calgan_fast.losses.discriminator_loss``) or ``"compat"`` (``OfficialMOD`` and
    ``official_discriminator_loss``, the authors' formulation).
    """
    if model == "compat":
        d = OfficialMOD(num_in_ch=3, num_feat=DSTEP_FEAT, num_expert=DSTEP_EXPERTS).to(hr.device).train()

        def loss():
            return official_discriminator_loss(d, hr, sr)["total"]
    elif model == "calgan":
        d = calgan_fast.CALGANDiscriminator(in_channels=3, num_feat=DSTEP_FEAT, num_experts=DSTEP_EXPERTS,
                                            backend=backend).to(hr.device).train()

        def loss():
            return discriminator_loss(d, hr, sr)["total"]
    else:
        raise ValueError(f"model: expected 'calgan' or 'compat', got {model!r}")

    def step():
        d.zero_grad(set_to_none=True)
        loss().backward()
        if sync is not None:
            sync()

    return step
