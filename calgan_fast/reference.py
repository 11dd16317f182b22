"""Reference implementations: the plainest correct code, the oracle of tests and benchmarks.

Every ``*_ref`` here has the public signature of the op it checks, computes in fp64 whatever the
input dtype (so that, as the oracle of the tests, its own rounding is far below any tolerance it
checks, offset data included), returns fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 ones, and
is differentiable through plain PyTorch autograd. None of it is meant to be fast:
``routed_head_ref`` runs every expert on every pixel and selects afterwards, exactly the dense
computation the fused backends avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["routed_head_ref", "routing_metadata_ref", "stat_dtype", "LRELU_SLOPE"]

#: Negative slope of every LeakyReLU of the discriminator.
LRELU_SLOPE = 0.2


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics and accumulations for inputs of ``dtype``: fp64 for fp64, else fp32.

    Every backend computes ``mean``/``var`` (and accumulates its GEMMs) in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def routing_metadata_ref(
    expert: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count (N,) int64, offsets (N+1,) int64, perm (M,) int64)`` of a top-1 routing.

    ``perm`` lists the rows grouped by expert, in their original order inside each group
    (a stable sort); rows ``perm[offsets[i]:offsets[i+1]]`` are those routed to expert ``i``.
    """
    expert = expert.long()
    count = torch.bincount(expert, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=expert.device)
    offsets[1:] = torch.cumsum(count, 0)
    perm = torch.argsort(expert, stable=True)
    return count, offsets, perm


def routed_head_ref(
    x: torch.Tensor,
    expert: torch.Tensor,
    gate: torch.Tensor,
    proj: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense, masked reference of the routed head (docs/design.md §3).

    Args:
        x: ``(M, c)`` pixel rows. expert: ``(M,)`` expert id per row. gate: ``(M,)``.
        proj: ``(N, c, c)``. w1: ``(N, hdim, c)``. b1: ``(N, hdim)``. w2: ``(N, hdim)``. b2: ``(N,)``.

    Returns:
        ``logits (M,)`` (fp32, or fp64 for fp64 inputs), ``count (N,)`` int64, ``mean (N, c)`` and
        ``var (N,)`` in the same dtype; all computed in fp64.
    """
    out_dt = stat_dtype(x.dtype)
    dt = torch.float64
    x, gate, proj, w1, b1, w2, b2 = (t.to(dt) for t in (x, gate, proj, w1, b1, w2, b2))
    num_experts, c = proj.shape[0], proj.shape[1]
    expert = expert.long()
    # Every expert on every pixel: (M, N, c) -> (M, N, hdim) -> (M, N).
    y_all = gate[:, None, None] * torch.einsum("mc,ndc->mnd", x, proj)
    z_all = F.leaky_relu(torch.einsum("mnd,nhd->mnh", y_all, w1) + b1[None], LRELU_SLOPE)
    s_all = torch.einsum("mnh,nh->mn", z_all, w2) + b2[None]
    onehot = F.one_hot(expert, num_experts).to(dt)  # (M, N)
    logits = (s_all * onehot).sum(1)
    y = (y_all * onehot[:, :, None]).sum(1)  # (M, c): each row projected by its own expert
    count = onehot.sum(0)
    safe = count.clamp(min=1)
    mean = onehot.t() @ y / safe[:, None]
    dev = y[:, None, :] - mean[None]  # (M, N, c)
    var = (onehot[:, :, None] * dev.square()).sum((0, 2)) / (safe * c)
    return logits.to(out_dt), count.long(), mean.to(out_dt), var.to(out_dt)
