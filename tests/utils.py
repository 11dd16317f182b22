"""Shared test helpers: the one tolerance table, input makers, backend lists."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import calgan_fast
from calgan_fast.ops import BACKENDS
from calgan_fast.reference import stat_dtype

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


def make_inputs(
    m,
    c,
    n,
    hdim=None,
    *,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    expert=None,
    requires_grad=False,
    gate_random=True,
):
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


def has_gpu() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def head_backends() -> list:
    """``(backend, device)`` params of every fused backend, as each runs on this machine.

    ``torch`` runs on CPU (and CUDA with a GPU), ``cpu`` on CPU, ``cuda`` on CUDA, ``triton`` on
    CUDA with a GPU and otherwise on CPU tensors through the interpreter. A backend that cannot run
    here is listed as skipped, with the reason, so the summary shows what was not tested.
    """
    gpu = has_gpu()
    params = []
    for name, b in BACKENDS.items():
        if not b.fused:
            continue
        if b.interpreter:
            devices = ["cuda" if gpu else "cpu"]
        else:
            devices = [
                d for d in ("cpu", "cuda") if d in b.devices and (d == "cpu" or gpu or len(b.devices) == 1)
            ]
        ok, why = b.available()
        for d in devices:
            marks = []
            if not ok:
                marks.append(pytest.mark.skip(reason=f"{name}: {why}"))
            elif d == "cuda" and not gpu:
                marks.append(pytest.mark.skip(reason=f"{name}: needs a GPU"))
            params.append(pytest.param((name, d), id=f"{name}-{d}", marks=marks))
    return params


def cpu_backends() -> list[str]:
    """Fast backends that run on CPU tensors here (reference excluded)."""
    return [b for b in calgan_fast.available_backends("cpu") if b != "reference"]


def grads_of(outputs, inputs, seed=1):
    """Gradients of a random linear functional of (logits, mean, var) w.r.t. ``inputs``."""
    logits, _count, mean, var = outputs
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(logits.shape, generator=g).to(logits)
    gm = torch.randn(mean.shape, generator=g).to(mean)
    gv = torch.randn(var.shape, generator=g).to(var)
    loss = (
        (logits.float() * gl.float()).sum()
        + (mean.float() * gm.float()).sum()
        + (var.float() * gv.float()).sum()
    )
    return torch.autograd.grad(loss, inputs, allow_unused=True)


FLOAT_ARGS = (0, 2, 3, 4, 5, 6, 7)  # positions of x, gate, proj, w1, b1, w2, b2 in make_inputs
OUTPUT_NAMES = ["logits", "count", "mean", "var", "dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"]

# The one case table of the backend-generic tests: (M, c, N, hdim, expert kind).
CASES = [
    (257, 24, 5, 3, "random"),  # M off any block multiple, c not a power of two
    (64, 16, 1, 2, "random"),  # N = 1
    (97, 20, 7, None, "random"),  # prime N, the default hdim
    (50, 8, 4, 1, "one_expert"),  # every row on one expert, the others empty
    (40, 12, 6, 2, "empty_and_single"),  # an empty and a single-row expert
    (5, 24, 3, 2, "random"),  # fewer rows than a tile
    (1, 8, 3, 1, "random"),  # a single row
    (1030, 256, 12, 32, "random"),  # the benchmark's c and N (not under the Triton interpreter)
]

#: Rows x channels above which the Triton interpreter (CPU) is too slow for a test case.
INTERPRETER_MAX_SIZE = 20_000


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
    """The comparison rule: the error of ``out`` against the fp64 reference ``out_ref`` is at most
    twice that of the reference run on the same (rounded) inputs in ``dtype`` (``out_pt``), plus
    the dtype's tolerance. For fp64 ``out_pt`` is the oracle itself, so the rule is the tolerance."""
    rtol, atol = TOL[dtype]
    ref = out_ref.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    err_pt = (out_pt.double() - ref).abs().max().item() if out.numel() else 0.0
    bound = 2 * err_pt + atol + rtol * (ref.abs().max().item() if out.numel() else 0.0)
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= bound, (
        f"{name}: max error {err:.3e} > bound {bound:.3e} (reference in {dtype}: {err_pt:.3e})"
    )


def assert_matches_reference(inputs, backend):
    """Outputs and every gradient of ``backend`` on ``inputs`` against the reference, by the one
    rule of :func:`assert_close_to_ref`; dtypes and ``count`` exactly as the reference gives them."""
    dtype = inputs[0].dtype
    out, grads = run_head(inputs, backend)
    out_pt, grads_pt = run_head(as_leaves(inputs, dtype), "reference")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
    assert out[2].dtype == stat_dtype(dtype) and out[3].dtype == stat_dtype(dtype)
    for name, a, r, p in zip(OUTPUT_NAMES, out + grads, out_ref + grads_ref, out_pt + grads_pt):
        assert a.dtype == p.dtype and a.shape == p.shape, (
            f"{name}: {a.dtype} {tuple(a.shape)}, want {p.dtype} {tuple(p.shape)}"
        )
        if name == "count":
            assert torch.equal(a, r), "count"
        else:
            assert_close_to_ref(name, a, r, p, dtype)
    return out, grads


def load_module(name: str, path) -> object:
    """Imports the Python file at ``path`` (a script outside the package) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
