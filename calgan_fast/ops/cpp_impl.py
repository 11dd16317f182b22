"""The ``cpu`` and ``cuda`` backends: thin calls into the fused kernels of ``calgan_fast._C``.

Both backends call the same ops, ``torch.ops.calgan_fast_C.routed_head_{fwd,bwd}`` and
``routing_metadata`` (one schema, see ``csrc/routed_head_schema.cpp``), which dispatch on the
device of their tensors to the kernels of ``csrc/cpu`` or ``csrc/cuda``. The autograd wiring and
the public custom ops are in :mod:`calgan_fast.ops.routed_head`; the algebra in docs/design.md §6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import REINSTALL, extension

Tensors7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _ops():
    if extension() is None:
        raise RuntimeError(f"calgan_fast._C is not built or does not load; {REINSTALL}")
    return torch.ops.calgan_fast_C


def forward(
    x: Tensor, expert: Tensor, gate: Tensor, proj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensors7:
    """Fused forward.

    Args:
        x: ``(M, c)`` fp32/bf16/fp16 (``cpu`` also fp64), any strides; expert ``(M,)`` int64; gate ``(M,)``;
            proj ``(N, c, c)``; w1 ``(N, hdim, c)``; b1 ``(N, hdim)``; w2 ``(N, hdim)``; b2 ``(N,)``,
            all floats in ``x.dtype`` and on x's device.

    Returns:
        ``(logits (M,) x.dtype, count (N,) int64, mean (N, c), var (N,), perm (M,) int64,
        offsets (N+1,) int64, xcov)``; statistics in :func:`~calgan_fast.reference.stat_dtype`.
        ``xcov`` is what the backward reuses: on CPU the ``(N, c, c)`` cross-covariances of each
        expert's ``y`` and gated rows, on CUDA nothing (empty).
    """
    return tuple(_ops().routed_head_fwd(x, expert.long(), gate, proj, w1, b1, w2, b2))


def backward(
    glogits: Tensor,
    gmean: Tensor,
    gvar: Tensor,
    x: Tensor,
    expert: Tensor,
    gate: Tensor,
    proj: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    count: Tensor,
    mean: Tensor,
    perm: Tensor,
    offsets: Tensor,
    xcov: Tensor,
) -> Tensors7:
    """Fused backward: ``(dx, dgate, dproj, dw1, db1, dw2, db2)`` in the dtypes of the inputs.

    ``glogits (M,)``, ``gmean (N, c)``, ``gvar (N,)`` are the upstream gradients; ``count``,
    ``mean``, ``perm``, ``offsets`` and ``xcov`` are the forward's outputs. No activation is saved:
    the hidden activations are recomputed from x; on CPU the gradients of ``y`` are formed
    algebraically from x, the gate and per-expert statistics, on CUDA per row tile on the device
    (docs/design.md §6, docs/backends.md).
    """
    return tuple(
        _ops().routed_head_bwd(
            glogits,
            gmean,
            gvar,
            x,
            expert.long(),
            gate,
            proj,
            w1,
            b1,
            w2,
            b2,
            count,
            mean,
            perm,
            offsets,
            xcov,
        )
    )


def routing_metadata(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(count (N,), offsets (N+1,), perm (M,))`` int64 from the kernels' own counting sort."""
    return tuple(_ops().routing_metadata(expert.long().contiguous(), num_experts))
