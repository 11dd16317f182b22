"""Shared test helpers: the one tolerance table, input makers, backend lists."""

from __future__ import annotations

import importlib.util

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


# Shared by the tests of the compiled backends (cpu, cuda) against the reference.
FLOAT_ARGS = (0, 2, 3, 4, 5, 6, 7)  # positions of x, gate, proj, w1, b1, w2, b2 in make_inputs
OUTPUT_NAMES = ["logits", "count", "mean", "var", "dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"]

# (M, c, N, hdim, expert kind): sizes off any block multiple, c not a power of two, N = 1, prime N,
# every row on one expert, an empty and a single-row expert, c >= 128 with an odd split.
BASE_CASES = [
    (300, 40, 5, None, "random"),
    (1, 16, 3, 4, "random"),
    (257, 24, 1, 7, "random"),
    (1000, 36, 13, None, "random"),
    (129, 20, 7, 3, "one_expert"),
    (200, 32, 6, 5, "empty_and_single"),
    (333, 130, 4, 16, "empty_and_single"),
]


def case_id(case) -> str:
    m, c, n, h, kind = case
    return f"M{m}-c{c}-N{n}-h{h}-{kind}"


def expert_ids(kind: str, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Expert ids of ``m`` rows over ``n`` experts: ``random``; ``one_expert`` (every row on the
    last expert, the others empty); ``empty_and_single`` (expert 0 empty, expert 1 one row, the
    rest random over 2..n-1); ``sparse`` (experts 0 and 2 only, and one row on the last)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(0, n, (m,), generator=g)
    if kind == "one_expert":
        return torch.full((m,), n - 1, dtype=torch.long)
    if kind == "empty_and_single":
        e = torch.randint(2, n, (m,), generator=g)
        e[m // 2] = 1
        return e
    if kind == "sparse":
        e = torch.randint(0, 2, (m,), generator=g) * 2
        e[m // 2] = n - 1
        return e
    raise ValueError(kind)


def run_head(inputs, backend):
    """``(outputs, gradients)`` of the routed head on ``inputs`` (as lists, in OUTPUT_NAMES order)."""
    out = calgan_fast.routed_head(*inputs, backend=backend)
    return list(out), list(grads_of(out, [inputs[i] for i in FLOAT_ARGS]))


def as_leaves(inputs, dtype):
    """The same inputs as fresh leaves, floats cast to ``dtype``."""
    return [t.detach().to(dtype).requires_grad_(True) if t.is_floating_point() else t for t in inputs]


def assert_close_to_ref(name, out, out_ref, out_pt, dtype):
    """The kernel's error against the fp64 reference is at most twice that of plain PyTorch in the
    same dtype (``out_pt``), plus the dtype's tolerance."""
    rtol, atol = TOL[dtype]
    ref = out_ref.double()
    err = (out.double() - ref).abs().max().item()
    err_pt = (out_pt.double() - ref).abs().max().item()
    bound = 2 * err_pt + atol + rtol * ref.abs().max().item()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (plain PyTorch: {err_pt:.3e})"


def load_module(name: str, path) -> object:
    """Imports the Python file at ``path`` (a script outside the package) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
