"""Seeded differential fuzz of the routed head: every fast backend that runs on CPU tensors here
(``torch``, and ``cpu`` when the extension is built) against the reference computed in fp64 on the
same values, over a few hundred small random cases.

A case draws M, c, N and hdim, a dtype, an expert layout (uniform, skewed, all rows on one expert,
experts left empty), gates (ones, random, some zero, negative), inputs that are non-contiguous or
start at a storage offset, and data offset far from zero. Forward outputs and the gradients of a
random functional of (logits, mean, var) must match the oracle within a tolerance of the dtype,
relative to the largest value of each output. ``triton`` runs on CPU tensors only under its
interpreter, at seconds per call: it has its own tests (tests/test_triton.py) and is left out here.
"""

from __future__ import annotations

import math

import pytest
import torch

import calgan_fast
from calgan_fast import routed_head

BACKENDS = [b for b in calgan_fast.available_backends("cpu") if b not in ("reference", "triton")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Max error relative to the largest |value| of the output (forward) or gradient.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
N_CASES = 240
NAMES = ["logits", "mean", "var", "dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"]


def _layout(g: torch.Generator, kind: str, m: int, n: int) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, n, (m,), generator=g)
    if kind == "skewed":  # geometric: expert 0 takes most rows, the last ones few or none
        p = torch.tensor([0.6**i for i in range(n)])
        return torch.multinomial(p / p.sum(), m, replacement=True, generator=g)
    if kind == "one":
        return torch.full((m,), int(torch.randint(0, n, (1,), generator=g)), dtype=torch.long)
    # "gaps": only even experts are used (odd ones stay empty), one row on the last expert
    e = torch.randint(0, (n + 1) // 2, (m,), generator=g) * 2
    e[int(torch.randint(0, m, (1,), generator=g))] = n - 1
    return e


def _place(t: torch.Tensor, g: torch.Generator, how: str) -> torch.Tensor:
    """The same values as a non-contiguous view or at a storage offset."""
    if how == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if how == "strided":
        big = torch.zeros((t.shape[0] * 2, *t.shape[1:]), dtype=t.dtype)
        big[::2] = t
        return big[::2]
    if how == "offset":
        flat = torch.zeros(t.numel() + 7, dtype=t.dtype)
        flat[7:] = t.reshape(-1)
        return flat[7:].view(t.shape)
    return t


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    m = pick([1, 2, 3, 7, 16, 33, 64, 129])
    c = pick([1, 2, 3, 4, 5, 8, 13, 16])
    n = pick([1, 2, 3, 5, 8])
    hdim = pick([1, 2, 3, 7])
    dtype = pick(DTYPES)
    layout = pick(["uniform", "skewed", "one", "gaps"])
    gates = pick(["ones", "random", "some_zero", "negative"])
    place = pick(["contiguous", "transposed", "strided", "offset"])
    offset = pick([0.0, 0.0, 3.0, 100.0])
    x = torch.randn(m, c, generator=g) + offset
    expert = _layout(g, layout, m, n)
    if gates == "ones":
        gate = torch.ones(m)
    elif gates == "random":
        gate = torch.rand(m, generator=g) + 0.5
    elif gates == "some_zero":
        gate = (torch.rand(m, generator=g) > 0.3).float() * torch.rand(m, generator=g)
    else:
        gate = torch.randn(m, generator=g)
    proj = torch.randn(n, c, c, generator=g) / math.sqrt(c)
    w1 = torch.randn(n, hdim, c, generator=g) / math.sqrt(c)
    b1 = torch.randn(n, hdim, generator=g) * 0.1
    w2 = torch.randn(n, hdim, generator=g) / math.sqrt(hdim)
    b2 = torch.randn(n, generator=g) * 0.1
    floats = [t.to(dtype) for t in (x, gate, proj, w1, b1, w2, b2)]
    # The logits' cotangent is rounded to the dtype: the backends receive it in the logits' dtype.
    cot = [torch.randn(m, generator=g).to(dtype), torch.randn(n, c, generator=g), torch.randn(n, generator=g)]
    desc = f"seed={seed} M={m} c={c} N={n} hdim={hdim} {dtype} {layout} gates={gates} {place} offset={offset}"
    return floats, expert, place, cot, desc


def _run(floats, expert, backend, place, cot):
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    g = torch.Generator().manual_seed(0)
    args = [_place(t, g, place) for t in leaves]
    x, gate, proj, w1, b1, w2, b2 = args
    out = routed_head(x, _place(expert, g, place), gate, proj, w1, b1, w2, b2, backend=backend)
    sd = out.mean.dtype
    loss = ((out.logits.to(sd) * cot[0].to(sd)).sum() + (out.mean * cot[1].to(sd)).sum()
            + (out.var * cot[2].to(sd)).sum())
    grads = torch.autograd.grad(loss, leaves)
    return out, [out.logits, out.mean, out.var, *grads]


@pytest.mark.skipif(not BACKENDS, reason="no fast backend runs on CPU tensors here")
@pytest.mark.parametrize("chunk", range(4))
def test_fuzz_backends_against_fp64_reference(chunk):
    failures = []
    worst: dict[tuple, float] = {}
    for seed in range(chunk, N_CASES, 4):
        floats, expert, place, cot, desc = _case(seed)
        dtype = floats[0].dtype
        ref_out, ref = _run([t.double() for t in floats], expert, "reference", "contiguous", cot)
        for backend in BACKENDS:
            out, got = _run(floats, expert, backend, place, cot)
            if not torch.equal(out.count, ref_out.count):
                failures.append(f"{backend} {desc}: count {out.count.tolist()} != {ref_out.count.tolist()}")
                continue
            for name, a, b in zip(NAMES, got, ref):
                assert a.dtype == (floats[0].dtype if name == "logits" else a.dtype)
                scale = b.abs().max().item()
                err = (a.double() - b).abs().max().item() if a.numel() else 0.0
                rel = err / max(scale, 1e-6)
                key = (backend, dtype, name)
                worst[key] = max(worst.get(key, 0.0), rel)
                if not math.isfinite(err) or rel > REL_TOL[dtype]:
                    failures.append(f"{backend} {desc}: {name} error {err:.3e} (relative {rel:.2e})")
    assert not failures, "\n".join(failures[:20])
