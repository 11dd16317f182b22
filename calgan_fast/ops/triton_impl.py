"""The ``triton`` backend of the routed head: fused Triton kernels from ``calgan_fast.kernels``.

Triton is imported lazily, on the first call, and no CUDA state is queried at import. Tensors live
on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1`` (the interpreter): there bf16 is
computed through fp32 casts, because the interpreter cannot multiply bf16 arrays.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor

from .. import _env
from .._kernels import load_kernels


def _kernels():
    """The kernels package, defined in the mode (compiled or interpreted) that is asked for now."""
    k = load_kernels()
    if k.INTERPRET != _env.triton_interpret():
        # Triton fixes the mode when a kernel is defined: define the kernels again.
        for name in [
            n for n in sys.modules if n == "calgan_fast.kernels" or n.startswith("calgan_fast.kernels.")
        ]:
            del sys.modules[name]
        k = load_kernels()
    if k.INTERPRET and not _stdlib_interpreted():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported in compiled mode; the Triton "
            "interpreter needs it set before the first `import triton` (e.g. in the environment)"
        )
    return k


def _stdlib_interpreted() -> bool:
    """Whether triton.language's own jit functions (tl.sum, ...) were defined for the interpreter."""
    import triton.language.standard as std  # noqa: PLC0415 - Triton is imported lazily

    return type(getattr(std, "sum", None)).__name__ == "InterpretedFunction"


def _compute_dtype(k, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if (k.INTERPRET and dtype == torch.bfloat16) else dtype


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


Tensors7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def forward(
    x: Tensor, expert: Tensor, gate: Tensor, proj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensors7:
    """Fused forward. Returns ``(logits (M,) x.dtype, count (N,) int64, mean (N, c), var (N,),
    perm (M,) int64, offsets (N+1,) int64, xcov (0,))``; statistics fp32 (fp64 for fp64 inputs).
    The backward keeps nothing else of the forward: ``xcov`` is empty."""
    k = _kernels()
    dt = x.dtype
    cd = _compute_dtype(k, dt)
    if cd != dt:
        x = x.to(cd)
    gate, proj, w1, b1, w2, b2 = (t.to(cd).contiguous() for t in (gate, proj, w1, b1, w2, b2))
    expert = expert.to(torch.int64).contiguous()
    with _device_ctx(x):
        logits, count, mean, var, perm, offsets = k.routed_head_fwd(x, expert, gate, proj, w1, b1, w2, b2)
    return logits.to(dt), count, mean, var, perm, offsets, mean.new_empty(0)


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
    """Fused backward. Returns ``(dx, dgate, dproj, dw1, db1, dw2, db2)`` in the inputs' dtypes
    (``expert``, ``count`` and the empty ``xcov`` are not needed: perm and offsets hold the routing)."""
    k = _kernels()
    dtypes = [t.dtype for t in (x, gate, proj, w1, b1, w2, b2)]
    cd = _compute_dtype(k, x.dtype)
    if cd != x.dtype:
        x = x.to(cd)
    glogits = glogits.to(cd).contiguous()
    gate, proj, w1, b1, w2, b2 = (t.to(cd).contiguous() for t in (gate, proj, w1, b1, w2, b2))
    with _device_ctx(x):
        grads = k.routed_head_bwd(
            glogits,
            gmean,
            gvar,
            x,
            gate,
            proj,
            w1,
            b1,
            w2,
            b2,
            mean.contiguous(),
            perm.contiguous(),
            offsets.contiguous(),
        )
    return tuple(g.to(d) for g, d in zip(grads, dtypes))


def routing_metadata(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(count (N,), offsets (N+1,), perm (M,))`` int64 from the Triton routing kernels."""
    k = _kernels()
    with _device_ctx(expert):
        count, offsets, perm = k.routing_metadata(expert.to(torch.int64).contiguous(), num_experts)[:3]
    return count, offsets, perm
