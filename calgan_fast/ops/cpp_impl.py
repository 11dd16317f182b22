"""The ``cpu`` and ``cuda`` backends: thin calls into the fused kernels of ``calgan_fast._C``.

The kernels are registered as ``torch.ops.calgan_fast_C.routed_head_{fwd,bwd}_{cpu,cuda}`` (see
``csrc/``); this module only picks the pair for the calling backend. The autograd wiring and the
public custom ops are in :mod:`calgan_fast.ops.routed_head`.
"""

from __future__ import annotations

import torch

from .backends import REINSTALL, extension


def _ops(backend: str):
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend: calgan_fast._C serves 'cpu' and 'cuda', not {backend!r}")
    if extension() is None:
        raise RuntimeError(f"backend {backend!r}: calgan_fast._C is not built; {REINSTALL}")
    ns = torch.ops.calgan_fast_C
    fwd_name, bwd_name = f"routed_head_fwd_{backend}", f"routed_head_bwd_{backend}"
    if not hasattr(ns, fwd_name):
        raise RuntimeError(f"backend {backend!r}: calgan_fast._C was built without it; {REINSTALL}")
    return getattr(ns, fwd_name), getattr(ns, bwd_name)


def forward(x, expert, gate, proj, w1, b1, w2, b2, backend="cpu"):
    """Fused forward.

    Args:
        x: ``(M, c)`` fp32/bf16/fp16 (``cpu`` also fp64), any strides; expert ``(M,)`` int64; gate ``(M,)``;
            proj ``(N, c, c)``; w1 ``(N, hdim, c)``; b1 ``(N, hdim)``; w2 ``(N, hdim)``; b2 ``(N,)``,
            all floats in ``x.dtype`` and on x's device.
        backend: ``"cpu"`` or ``"cuda"``, the backend that called.

    Returns:
        ``(logits (M,) x.dtype, count (N,) int64, mean (N, c), var (N,), perm (M,) int64,
        offsets (N+1,) int64, aux)``; mean/var fp32 (fp64 for fp64 x). ``aux`` is what the
        backward reuses: for ``cpu`` the ``(N, c, c)`` cross-covariances of each expert's ``y`` and gated rows
        (see ``csrc/cpu/routed_head_cpu.cpp``), for ``cuda`` nothing (empty).
    """
    fwd, _ = _ops(backend)
    out = fwd(x, expert.long(), gate, proj, w1, b1, w2, b2)
    if backend == "cuda":
        out = (*out, out[2].new_empty(0))
    return tuple(out)


def backward(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm, offsets,
             aux, backend="cpu"):
    """Fused backward: ``(dx, dgate, dproj, dw1, db1, dw2, db2)`` in the dtypes of the inputs.

    ``glogits (M,)``, ``gmean (N, c)``, ``gvar (N,)`` are the upstream gradients; ``count``,
    ``mean``, ``perm``, ``offsets`` and ``aux`` are the forward's outputs. No activation is saved:
    the hidden activations are recomputed from x, and the gradients of ``y`` are formed
    algebraically from x, the gate and per-expert statistics (see ``csrc/cpu/routed_head_cpu.cpp``).
    """
    _, bwd = _ops(backend)
    args = (glogits, gmean, gvar, x, expert.long(), gate, proj, w1, b1, w2, b2, count, mean, perm, offsets)
    return bwd(*args, aux) if backend == "cpu" else bwd(*args)
