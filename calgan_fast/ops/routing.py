"""Routing metadata: per-expert counts, offsets and the permutation that groups rows by expert."""

from __future__ import annotations

from torch import Tensor

from ..reference import routing_metadata_ref


def routing_metadata(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(count (N,), offsets (N+1,), perm (M,))``, all int64, from top-1 expert ids ``(M,)``.

    A stable counting sort: rows of one expert keep their original order, so the result is
    deterministic. Rows ``perm[offsets[i]:offsets[i + 1]]`` are those routed to expert ``i``.
    """
    if expert.dim() != 1:
        raise ValueError(f"expert: expected shape (M,), got {tuple(expert.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
    if expert.numel() and (int(expert.min()) < 0 or int(expert.max()) >= num_experts):
        raise ValueError(f"expert: ids must lie in [0, {num_experts})")
    return routing_metadata_ref(expert, num_experts)
