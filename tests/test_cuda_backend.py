"""What is particular to the ``cuda`` backend (CUDA kernels of ``calgan_fast._C``), on a GPU.

The backend-generic tests run on it in test_routed_head.py."""

from __future__ import annotations

import pytest
import torch

import calgan_fast
from tests.utils import make_inputs

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
