"""The GPU backends at a training-sized shape: M = 200k rows, c = 512, N = 16, bf16 and fp16.

Every output and gradient of ``triton`` and ``cuda`` is compared with the ``torch`` backend run on
fp32 copies of the same inputs: the error may be at most twice that of the ``torch`` backend run
in the input dtype, plus the dtype's tolerance (the rule of the other backend tests, with the
fp32 ``torch`` backend standing in for the fp64 reference, which does not fit at this size).
"""

from __future__ import annotations

import pytest
import torch

from tests.utils import OUTPUT_NAMES, as_leaves, assert_close_to_ref, make_inputs, run_head

pytestmark = pytest.mark.gpu

M, C, N, HDIM = 200_000, 512, 16, 64


@pytest.fixture(scope="module")
def baseline():
    """Inputs and the fp32 ``torch`` backend's outputs and gradients, per dtype."""
    return {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_against_torch_backend(baseline, backend, dtype, monkeypatch):
    from calgan_fast.ops.backends import BACKENDS

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backend == "cuda":
        from tests.conftest import _has_cuda_ext

        if not _has_cuda_ext():
            pytest.skip("calgan_fast._C is not built with CUDA")
    assert backend in BACKENDS
    if dtype not in baseline:
        inputs = make_inputs(M, C, N, HDIM, dtype=dtype, device="cuda", seed=0, requires_grad=True)
        out_pt, grads_pt = run_head(as_leaves(inputs, dtype), "torch")
        out_ref, grads_ref = run_head(as_leaves(inputs, torch.float32), "torch")
        baseline[dtype] = (inputs, [t.detach() for t in out_pt + grads_pt],
                           [t.detach() for t in out_ref + grads_ref])
    inputs, pt, ref = baseline[dtype]
    out, grads = run_head(as_leaves(inputs, dtype), backend)
    for name, a, r, p in zip(OUTPUT_NAMES, out + grads, ref, pt):
        if name == "count":
            assert torch.equal(a, r)
            continue
        assert_close_to_ref(name, a, r, p, dtype)
