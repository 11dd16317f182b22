"""The ``cuda`` backend (CUDA kernels of ``calgan_fast._C``) against the reference, on a GPU."""

from __future__ import annotations

import pytest
import torch

import calgan_fast
from calgan_fast.ops.routed_head import backend_ops
from calgan_fast.reference import routing_metadata_ref
from tests.utils import TOL, grads_of, make_inputs

pytestmark = pytest.mark.cuda

FLOAT_ARGS = (0, 2, 3, 4, 5, 6, 7)
NAMES = ["logits", "count", "mean", "var", "dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"]

# (M, c, N, hdim, expert kind) as in the CPU tests: odd sizes, N = 1, prime N, one expert, empty experts.
CASES = [
    (300, 40, 5, None, "random"),
    (1, 16, 3, 4, "random"),
    (257, 24, 1, 7, "random"),
    (1000, 36, 13, None, "random"),
    (129, 20, 7, 3, "one_expert"),
    (200, 32, 6, 5, "empty_and_single"),
    (4100, 256, 12, 32, "random"),
    (333, 130, 4, 16, "empty_and_single"),
]


def _expert(kind, m, n):
    g = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.randint(0, n, (m,), generator=g)
    if kind == "one_expert":
        return torch.full((m,), n - 1, dtype=torch.long)
    e = torch.randint(2, n, (m,), generator=g)
    e[m // 2] = 1
    return e


def _run(inputs, backend):
    out = calgan_fast.routed_head(*inputs, backend=backend)
    return list(out), list(grads_of(out, [inputs[i] for i in FLOAT_ARGS]))


def _leaf(inputs, dtype):
    return [t.detach().to(dtype).requires_grad_(True) if t.is_floating_point() else t for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-c{c[1]}-N{c[2]}-{c[4]}")
def test_matches_reference(case, dtype):
    m, c, n, h, kind = case
    inputs = make_inputs(m, c, n, h, dtype=dtype, device="cuda", expert=_expert(kind, m, n), requires_grad=True)
    out, grads = _run(inputs, "cuda")
    out_pt, grads_pt = _run(_leaf(inputs, dtype), "torch")
    out_ref, grads_ref = _run(_leaf(inputs, torch.float64), "reference")
    rtol, atol = TOL[dtype]
    for name, a, r, p in zip(NAMES, out + grads, out_ref + grads_ref, out_pt + grads_pt):
        if name == "count":
            assert torch.equal(a, r)
            continue
        ref = r.double()
        err = (a.double() - ref).abs().max().item()
        bound = 2 * (p.double() - ref).abs().max().item() + atol + rtol * ref.abs().max().item()
        assert torch.isfinite(a).all(), name
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def test_deterministic_and_metadata():
    inputs = make_inputs(5000, 256, 12, 32, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    a = [t.clone() for t in sum(_run(inputs, "cuda"), [])]
    b = [t.clone() for t in sum(_run(_leaf(inputs, torch.bfloat16), "cuda"), [])]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    expert = inputs[1]
    for got, want in zip(torch.ops.calgan_fast_C.routing_metadata(expert, 12), routing_metadata_ref(expert, 12)):
        assert torch.equal(got, want)


def test_non_contiguous_x():
    c, hh, ww = 24, 9, 11
    x = torch.randn(c, hh, ww, device="cuda").view(c, hh * ww).t()
    _, expert, gate, proj, w1, b1, w2, b2 = make_inputs(hh * ww, c, 5, device="cuda")
    o1 = calgan_fast.routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend="cuda")
    o2 = calgan_fast.routed_head(x.contiguous(), expert, gate, proj, w1, b1, w2, b2, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))


def test_bad_input_names_argument():
    args = list(make_inputs(10, 8, 3, 2, device="cuda"))
    args[1] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2], device="cuda")
    with pytest.raises(RuntimeError, match="expert"):
        torch.ops.calgan_fast_C.routed_head_fwd_cuda(*args)
    args = list(make_inputs(10, 8, 3, 2, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fp16/bf16/fp32"):
        torch.ops.calgan_fast_C.routed_head_fwd_cuda(*args)


def test_opcheck():
    fwd, _ = backend_ops("cuda")
    inputs = make_inputs(50, 12, 4, 3, device="cuda", expert=_expert("empty_and_single", 50, 4), requires_grad=True)
    torch.library.opcheck(fwd, tuple(inputs))
