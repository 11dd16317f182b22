"""The CUDA kernels of ``csrc/cuda`` run on CPU tensors through the host emulation of
``csrc/tests/cuda_emu.h``, against the ``torch`` backend: the kernels' own code (tiles, maps, slabs,
WMMA fragments, merges) is checked on machines without a GPU.

The emulated ops are built here with ``torch.utils.cpp_extension.load`` (a minute or two the first
time; cached afterwards). Every ``torch.empty`` of the kernels is filled with NaN
(``fill_uninitialized_memory``), so a value read before it is written shows up as NaN. The
emulation cannot show timing, races between CTAs or the tensor cores' internal summation order;
the ``cuda``-marked tests do that on a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from calgan_fast.ops import torch_impl
from tests.utils import assert_close_to_ref, case_id, expert_ids, make_inputs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

GRAD_NAMES = ["dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"]


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed (torch.utils.cpp_extension.load needs it)")
    cpp_extension.load(
        name="calgan_fast_cuda_emu",
        sources=[str(ROOT / "csrc/tests/cuda_emu_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc/tests")],
        extra_cflags=["-O2"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.calgan_fast_emu


@pytest.fixture(autouse=True)
def _nan_filled_empty():
    old = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


def _upstream(m, c, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, generator=g), torch.randn(n, c, generator=g), torch.randn(n, generator=g)


def _torch_backend(inputs, up, dtype):
    """Forward and backward of the ``torch`` backend with the inputs and upstream gradients in ``dtype``."""
    x, expert, *w = inputs
    args = [x.to(dtype), expert] + [t.to(dtype) for t in w]
    out = torch_impl.forward(*args)
    gl, gm, gv = up
    count, mean, perm, offsets, xcov = out[1], out[2], out[4], out[5], out[6]
    gm, gv = gm.to(mean.dtype), gv.to(mean.dtype)
    grads = torch_impl.backward(gl.to(dtype), gm, gv, *args, count, mean, perm, offsets, xcov)
    return list(out[:4]), list(grads)


def _run(emu, inputs, up, x_view=None):
    x, expert, gate, proj, w1, b1, w2, b2 = inputs
    xk = x if x_view is None else x_view
    logits, count, mean, var, perm, offsets = emu.routed_head_fwd(xk, expert, gate, proj, w1, b1, w2, b2)
    gl, gm, gv = up
    grads = emu.routed_head_bwd(gl.to(x.dtype), gm, gv, xk, gate, proj, w1, b1, w2, mean, perm, offsets)
    return [logits, count, mean, var], list(grads)


def _compare(emu, inputs, dtype):
    m, c = inputs[0].shape
    n = inputs[3].shape[0]
    up = _upstream(m, c, n)
    out, grads = _run(emu, inputs, up)
    out_ref, grads_ref = _torch_backend(inputs, up, torch.float64)
    out_pt, grads_pt = _torch_backend(inputs, up, dtype)
    assert torch.equal(out[1], out_ref[1]), "count"
    for name, a, r, p in zip(["logits", "mean", "var"] + GRAD_NAMES, [out[0], out[2], out[3]] + grads,
                             [out_ref[0], out_ref[2], out_ref[3]] + grads_ref,
                             [out_pt[0], out_pt[2], out_pt[3]] + grads_pt):
        assert a.dtype == p.dtype and a.shape == p.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert_close_to_ref(name, a, r, p, dtype)
    return out, grads


# (M, c, N, hdim, expert kind): the generic table's shapes that the emulation runs in seconds, plus
# experts spanning several groups and slabs, two hidden chunks, c off the vector width.
EMU_CASES = [
    (257, 24, 5, 3, "random"),
    (64, 16, 1, 2, "random"),
    (97, 20, 7, None, "random"),
    (50, 8, 4, 1, "one_expert"),
    (40, 12, 6, 2, "empty_and_single"),
    (5, 24, 3, 2, "random"),
    (1, 8, 3, 1, "random"),
    (4500, 16, 3, 4, "one_expert"),  # one expert: 71 tiles, 3 groups, many slabs
    (300, 72, 4, 70, "sparse"),  # hdim > 64: two hidden chunks; c > 64: two column chunks
    (200, 130, 3, 16, "random"),  # c = 130: partial vectors and chunks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", EMU_CASES, ids=case_id)
def test_emulated_kernels_match_torch_backend(emu, case, dtype):
    m, c, n, hdim, kind = case
    inputs = make_inputs(m, c, n, hdim, dtype=dtype, expert=expert_ids(kind, m, n))
    _compare(emu, inputs, dtype)


def test_emulated_benchmark_shape(emu):
    m, c, n, hdim = 1030, 256, 12, 32
    inputs = make_inputs(m, c, n, hdim, dtype=torch.bfloat16, expert=expert_ids("random", m, n))
    _compare(emu, inputs, torch.bfloat16)


def test_emulated_strided_x(emu):
    # An NCHW map (B = 1) read as rows: the forward reads it in place, the backward copies it once.
    c, hh, ww, n = 24, 5, 13, 4
    fmap = torch.randn(1, c, hh, ww)
    x = fmap.flatten(2).transpose(1, 2).reshape(hh * ww, c)
    assert x.stride(1) != 1
    _, expert, gate, proj, w1, b1, w2, b2 = make_inputs(hh * ww, c, n, 3)
    up = _upstream(hh * ww, c, n)
    strided = _run(emu, [x, expert, gate, proj, w1, b1, w2, b2], up)
    dense = _run(emu, [x.contiguous(), expert, gate, proj, w1, b1, w2, b2], up)
    for a, b in zip(strided[0] + strided[1], dense[0] + dense[1]):
        assert torch.equal(a, b)


def test_forward_names_a_hidden_width_beyond_shared_memory(emu, monkeypatch):
    # The launcher compares the forward's dynamic shared memory with what a block may use.
    inputs = make_inputs(70, 16, 3, 4, expert=expert_ids("random", 70, 3))
    monkeypatch.setenv("CALGAN_FAST_EMU_MAX_DYN_SMEM", "1000")
    with pytest.raises(RuntimeError, match="hidden width 4 needs .* bytes of dynamic shared memory"):
        emu.routed_head_fwd(*inputs)
    monkeypatch.setenv("CALGAN_FAST_EMU_MAX_DYN_SMEM", str(1 << 20))
    assert emu.routed_head_fwd(*inputs)[0].shape == (70,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emulated_unaligned_x(emu, dtype):
    # Rows of x off a 16-byte boundary take the element-wise loads; the 16-byte loads of aligned rows
    # stage the same values, so the two give identical results.
    m, c, n, hdim = 150, 64, 3, 20
    inputs = make_inputs(m, c, n, hdim, dtype=dtype)
    x = inputs[0]
    base = torch.empty(m * c + 1, dtype=dtype)
    shifted = base[1:].view(m, c)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    up = _upstream(m, c, n)
    out_s, grads_s = _run(emu, [shifted, *inputs[1:]], up)
    out_a, grads_a = _run(emu, list(inputs), up)
    for a, b in zip(out_s + grads_s, out_a + grads_a):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(300, 72, 4, 70, "sparse"), (200, 130, 3, 16, "random")], ids=case_id)
def test_emulated_kernels_do_not_depend_on_thread_order(emu, case, dtype):
    # Threads run in reverse order between barriers: a shared-memory read that a missing barrier
    # leaves racing with its write sees other data, so forward and backward would differ.
    m, c, n, hdim, kind = case
    inputs = make_inputs(m, c, n, hdim, dtype=dtype, expert=expert_ids(kind, m, n))
    up = _upstream(m, c, n)
    forward = _run(emu, inputs, up)
    emu.set_reverse_thread_order(True)
    try:
        reverse = _run(emu, inputs, up)
    finally:
        emu.set_reverse_thread_order(False)
    for a, b in zip(forward[0] + forward[1], reverse[0] + reverse[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 12])
def test_backward_launches_do_not_depend_on_n(emu, n):
    inputs = make_inputs(300, 32, n, 4)
    x, expert, gate, proj, w1, b1, w2, b2 = inputs
    logits, count, mean, var, perm, offsets = emu.routed_head_fwd(*inputs)
    gl, gm, gv = _upstream(300, 32, n)
    before = emu.launches()
    emu.routed_head_bwd(gl, gm, gv, x, gate, proj, w1, b1, w2, mean, perm, offsets)
    assert emu.launches() - before == emu.bwd_launches() == 11
