"""The ``cuda`` backend (CUDA kernels of ``calgan_fast._C``) against the reference, on a GPU."""

from __future__ import annotations

import pytest
import torch

import calgan_fast
from calgan_fast.ops.routed_head import backend_ops
from calgan_fast.reference import routing_metadata_ref
from tests.utils import (
    BASE_CASES,
    OUTPUT_NAMES,
    as_leaves,
    assert_close_to_ref,
    case_id,
    expert_ids,
    make_inputs,
    run_head,
)

pytestmark = pytest.mark.cuda

# BASE_CASES plus the benchmark's c and N at a GPU-sized M.
CASES = [*BASE_CASES, (4100, 256, 12, 32, "random")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    m, c, n, h, kind = case
    inputs = make_inputs(m, c, n, h, dtype=dtype, device="cuda", expert=expert_ids(kind, m, n), requires_grad=True)
    out, grads = run_head(inputs, "cuda")
    out_pt, grads_pt = run_head(as_leaves(inputs, dtype), "torch")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
    for name, a, r, p in zip(OUTPUT_NAMES, out + grads, out_ref + grads_ref, out_pt + grads_pt):
        if name == "count":
            assert torch.equal(a, r)
            continue
        assert_close_to_ref(name, a, r, p, dtype)


def test_deterministic_and_metadata():
    inputs = make_inputs(5000, 256, 12, 32, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    a = [t.clone() for t in sum(run_head(inputs, "cuda"), [])]
    b = [t.clone() for t in sum(run_head(as_leaves(inputs, torch.bfloat16), "cuda"), [])]
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
    # An id out of range is clamped on the device (no host synchronisation), never used as an index.
    args[1] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, -1], device="cuda")
    got = torch.ops.calgan_fast_C.routed_head_fwd_cuda(*args)
    args[1] = args[1].clamp(0, 2)
    want = torch.ops.calgan_fast_C.routed_head_fwd_cuda(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    args = list(make_inputs(10, 8, 3, 2, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fp16/bf16/fp32"):
        torch.ops.calgan_fast_C.routed_head_fwd_cuda(*args)


def test_opcheck():
    fwd, _ = backend_ops("cuda")
    inputs = make_inputs(50, 12, 4, 3, device="cuda", expert=expert_ids("empty_and_single", 50, 4), requires_grad=True)
    torch.library.opcheck(fwd, tuple(inputs))
