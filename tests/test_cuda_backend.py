"""What is particular to the ``cuda`` backend (CUDA kernels of ``calgan_fast._C``), on a GPU.

The backend-generic tests run on it in test_routed_head.py; tests/test_cuda_emulation.py runs the
same kernels on CPU tensors through a host emulation."""

from __future__ import annotations

import pytest
import torch

import calgan_fast
from tests.utils import (
    FLOAT_ARGS,
    OUTPUT_NAMES,
    as_leaves,
    assert_close_to_ref,
    case_id,
    expert_ids,
    make_inputs,
    run_head,
)

pytestmark = pytest.mark.cuda


def test_bad_input_names_argument():
    args = list(make_inputs(10, 8, 3, 2, device="cuda"))
    # An id out of range is clamped on the device (no host synchronisation), never used as an index.
    args[1] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, -1], device="cuda")
    got = torch.ops.calgan_fast_C.routed_head_fwd(*args)
    args[1] = args[1].clamp(0, 2)
    want = torch.ops.calgan_fast_C.routed_head_fwd(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    args = list(make_inputs(10, 8, 3, 2, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fp16/bf16/fp32"):
        torch.ops.calgan_fast_C.routed_head_fwd(*args)


def test_fp64_is_refused_with_the_way_out():
    args = make_inputs(10, 8, 3, 2, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        calgan_fast.routed_head(*args, backend="cuda")
    assert calgan_fast.routed_head(*args).logits.dtype == torch.float64  # auto skips cuda for fp64


# ---------------------------------------------------------------- the device-only backward


def _against_torch_backend(inputs, dtype):
    """Forward and every gradient of ``cuda`` against the ``torch`` backend run on fp32 copies of the
    same inputs (``ref``), by the rule of tests.utils.assert_close_to_ref with the ``torch`` backend
    in ``dtype`` (``pt``) as the yardstick."""
    out, grads = run_head(as_leaves(inputs, dtype), "cuda")
    out_pt, grads_pt = run_head(as_leaves(inputs, dtype), "torch")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float32), "torch")
    for name, a, r, p in zip(OUTPUT_NAMES, out + grads, out_ref + grads_ref, out_pt + grads_pt):
        assert a.dtype == p.dtype and a.shape == p.shape, name
        if name == "count":
            assert torch.equal(a, r)
        else:
            assert_close_to_ref(name, a, r, p, dtype)
    return out, grads


SMALL = [
    (257, 24, 5, 3, "random"),  # M off the tile, c off 64
    (64, 16, 1, 2, "random"),  # N = 1, one full tile
    (50, 8, 4, 1, "one_expert"),  # every row on one expert, the others empty
    (40, 12, 6, 2, "empty_and_single"),  # c off the 16-byte vector width
    (5000, 72, 3, 70, "one_expert"),  # several groups and slabs, two hidden chunks
    (3001, 130, 7, 16, "sparse"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", SMALL, ids=case_id)
def test_matches_torch_backend(case, dtype):
    m, c, n, hdim, kind = case
    inputs = make_inputs(m, c, n, hdim, dtype=dtype, device="cuda", expert=expert_ids(kind, m, n),
                         requires_grad=True)
    _against_torch_backend(inputs, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["random", "one_expert"])
def test_matches_torch_backend_realistic(dtype, kind):
    m, c, n, hdim = 200_003, 512, 16, 64  # M not a multiple of the 64-row tile
    inputs = make_inputs(m, c, n, hdim, dtype=dtype, device="cuda", expert=expert_ids(kind, m, n),
                         requires_grad=True)
    _against_torch_backend(inputs, dtype)


def test_backward_does_not_synchronise():
    inputs = make_inputs(3000, 64, 6, 8, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    floats = [inputs[i] for i in FLOAT_ARGS]
    g = torch.Generator(device="cuda").manual_seed(0)
    gl = torch.randn(3000, device="cuda", generator=g)
    gm = torch.randn(6, 64, device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = calgan_fast.routed_head(*inputs, backend="cuda", check_range=False)
        loss = (out.logits.float() * gl).sum() + (out.mean * gm).sum() + out.var.sum()
        grads = torch.autograd.grad(loss, floats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(t).all() for t in grads)


def test_aten_backward_agrees(monkeypatch):
    inputs = make_inputs(2000, 48, 5, 6, device="cuda", requires_grad=True)
    _, grads = run_head(as_leaves(inputs, torch.float32), "cuda")
    monkeypatch.setenv("CALGAN_FAST_CUDA_BWD", "aten")
    _, grads_aten = run_head(as_leaves(inputs, torch.float32), "cuda")
    for name, a, b in zip(OUTPUT_NAMES[4:], grads, grads_aten):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_backward_is_bitwise_reproducible():
    inputs = make_inputs(20_000, 256, 12, 32, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    first = [t.clone() for t in run_head(as_leaves(inputs, torch.bfloat16), "cuda")[1]]
    second = run_head(as_leaves(inputs, torch.bfloat16), "cuda")[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
