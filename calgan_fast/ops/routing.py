"""Routing metadata: per-expert counts, offsets and the permutation that groups rows by expert."""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import resolve_backend


def routing_metadata(
    expert: Tensor, num_experts: int, *, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count (N,), offsets (N+1,), perm (M,))``, all int64, from top-1 expert ids ``(M,)``.

    A stable counting sort: rows of one expert keep their original order, so the result is
    deterministic and the same on every backend. Rows ``perm[offsets[i]:offsets[i + 1]]`` are
    those routed to expert ``i``. ``backend`` is chosen as for :func:`~calgan_fast.routed_head`
    (``"auto"`` takes the fastest that runs on ``expert``'s device).
    """
    if expert.dim() != 1:
        raise ValueError(f"expert: expected shape (M,), got {tuple(expert.shape)}")
    if expert.dtype.is_floating_point or expert.dtype.is_complex or expert.dtype == torch.bool:
        raise TypeError(f"expert: expected an integer tensor, got {expert.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
    if expert.numel() and (int(expert.min()) < 0 or int(expert.max()) >= num_experts):
        raise ValueError(f"expert: ids must lie in [0, {num_experts})")
    b = resolve_backend(backend, expert.device)
    return b.impl().routing_metadata(expert.long(), num_experts)
