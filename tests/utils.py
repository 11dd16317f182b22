"""Shared test helpers: the one tolerance table, input makers, backend lists."""

from __future__ import annotations

import torch

import calgan_fast
from calgan_fast.ops import BACKENDS

# One dtype-keyed table (rtol, atol). fp32 assumes TF32 off; low precision is further checked
# against the error of the reference computed in the input dtype (see assert_close_to_ref).
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def make_inputs(m, c, n, hdim=None, *, dtype=torch.float32, device="cpu", seed=0, expert=None,
                requires_grad=False, gate_random=True):
    """Random routed-head inputs with weights scaled like a trained head (outputs O(1))."""
    g = torch.Generator().manual_seed(seed)
    hdim = hdim or max(1, c // 8)
    x = torch.randn(m, c, generator=g)
    if expert is None:
        expert = torch.randint(0, n, (m,), generator=g)
    gate = torch.rand(m, generator=g) + 0.5 if gate_random else torch.ones(m)
    proj = torch.randn(n, c, c, generator=g) / c**0.5
    w1 = torch.randn(n, hdim, c, generator=g) / c**0.5
    b1 = torch.randn(n, hdim, generator=g) * 0.1
    w2 = torch.randn(n, hdim, generator=g) / hdim**0.5
    b2 = torch.randn(n, generator=g) * 0.1
    floats = [x, gate, proj, w1, b1, w2, b2]
    floats = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in floats]
    x, gate, proj, w1, b1, w2, b2 = floats
    return x, expert.to(device), gate, proj, w1, b1, w2, b2


def cpu_backends() -> list[str]:
    """Fast backends that run on CPU tensors here (reference excluded)."""
    return [b for b in calgan_fast.available_backends("cpu") if b != "reference"]


def all_backend_names() -> list[str]:
    return list(BACKENDS)


def grads_of(outputs, inputs, seed=1):
    """Gradients of a random linear functional of (logits, mean, var) w.r.t. ``inputs``."""
    logits, _count, mean, var = outputs
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(logits.shape, generator=g).to(logits)
    gm = torch.randn(mean.shape, generator=g).to(mean)
    gv = torch.randn(var.shape, generator=g).to(var)
    loss = (logits.float() * gl.float()).sum() + (mean.float() * gm.float()).sum() + (var.float() * gv.float()).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)
