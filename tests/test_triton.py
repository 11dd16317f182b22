"""What is particular to the ``triton`` backend: its tile maps, and its kernels compiled for a GPU.

The backend-generic tests (against the reference, gradcheck, opcheck, determinism, strides, NaN)
run on it in test_routed_head.py. Unmarked tests here run the kernels on CPU tensors through the
Triton interpreter: the ``interp``
fixture sets ``TRITON_INTERPRET=1`` for the duration of each test only (other test files keep
their environment), and the backend defines its kernels again whenever the mode it was loaded in
differs from the one asked for. Shapes are tiny; the interpreter's tiles are 16 rows/channels and
its row slabs 32 rows, so experts span several tiles and slabs. Tests marked ``gpu`` run the
compiled kernels on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calgan_fast.reference import LRELU_SLOPE, routing_metadata_ref
from tests.utils import as_leaves, make_inputs, run_head

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture
def interp(monkeypatch):
    """The kernels package, defined for the Triton interpreter (CPU tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from calgan_fast.ops import triton_impl

    if not triton_impl._stdlib_interpreted():
        pytest.skip(
            "triton was imported in compiled mode before TRITON_INTERPRET=1 was set (a GPU "
            "session); run `TRITON_INTERPRET=1 pytest tests/test_triton.py` for these tests"
        )
    return triton_impl._kernels()


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` filled with NaN (floats) or -7 (ints): unwritten outputs fail loudly."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", empty)


# --------------------------------------------------------------------------------------------
# Routing metadata
# --------------------------------------------------------------------------------------------


def test_segment_map_covers_each_position_once(interp, nan_empty):
    expert = torch.tensor([0] * 33 + [2] * 1 + [3] * 16 + [5] * 17)
    _, offsets, _ = routing_metadata_ref(expert, 6)
    seg_off, seg_exp, seg_start, seg_stop = interp.segment_map(offsets, expert.numel(), 16)
    # Expert 0: 3 tiles, 2: 1, 3: 1, 5: 2; experts 1 and 4 none.
    assert seg_off.tolist() == [0, 3, 3, 4, 5, 5, 7]
    used = seg_exp >= 0
    assert seg_exp[used].tolist() == [0, 0, 0, 2, 3, 5, 5]
    assert not used[7:].any()
    covered = torch.zeros(expert.numel(), dtype=torch.long)
    for e, a, b in zip(seg_exp[used].tolist(), seg_start[used].tolist(), seg_stop[used].tolist()):
        assert 0 < b - a <= 16
        assert offsets[e] <= a and b <= offsets[e + 1]
        covered[a:b] += 1
    assert torch.equal(covered, torch.ones_like(covered))


def test_tile_maps_agree(interp, nan_empty):
    """The map built inside the routing scan equals the stand-alone one, alone or paired."""
    g = torch.Generator().manual_seed(11)
    expert = torch.randint(0, 4, (83,), generator=g) * 2  # experts 1, 3, 5 stay empty
    count, offsets, perm, tiles = interp.routing_metadata(expert, 7, 16)
    single = interp.segment_map(offsets, 83, 16)
    pair = interp.segment_maps(offsets, 83, 16, 48)
    for a, b, c in zip(tiles, single, pair[0]):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(pair[1], interp.segment_map(offsets, 83, 48)):
        assert torch.equal(a, b)


def test_kernels_compile_for_sm90():
    """Every compiled (non-interpreted) kernel lowers to sm_90 PTX with the GPU launch configuration.

    Needs no GPU, only Triton's bundled ptxas: it catches what the interpreter lets through
    (dot shape limits, loop-carried type changes, unsupported ops, too much shared memory).
    Where this process imported Triton for the interpreter, it runs in a fresh one. bf16 only,
    the GPU's working dtype (fp32 differs in operand types alone), to keep the suite quick.
    """
    from calgan_fast.ops import triton_impl

    if not triton_impl._stdlib_interpreted():
        _compile_all("bf16")
        return
    env = dict(os.environ, TRITON_INTERPRET="0")
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here), env.get("PYTHONPATH", "")])
    code = "import test_triton as t; t._compile_all('bf16')"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _compile_all(dtype: str) -> None:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from calgan_fast.ops import triton_impl

    k = triton_impl._kernels()
    assert not k.INTERPRET
    from calgan_fast.kernels.signature import signature

    rh, ro = k.routed_head, k.routing
    kernels = [
        (ro._routing_hist_kernel, {"BLOCK": 1024, "NP": 16}, {}),
        (ro._routing_scan_kernel, {"SEG_M": 64, "SEG_BLOCK": 256, "CHUNK": 64, "NP": 16}, {}),
        (ro._routing_scatter_kernel, {"BLOCK": 1024, "NP": 16}, {}),
        (ro._segment_map_kernel, {"SEG_A": 64, "SEG_B": 1024, "BLOCK": 256, "NP": 16}, {}),
        (ro._segment_sum_kernel, {"BLOCK": 1024}, {}),
        (rh._expert_stats_kernel, {"BLOCK_C": 256}, {}),
    ]
    for c in (256, 512):  # one channel block (u kept in the backward), and several
        cfg = rh._Cfg(
            65536, c, c // 8, torch.bfloat16 if dtype == "bf16" else torch.float32, torch.device("cpu")
        )
        gemm, head = cfg.gemm(), cfg.gemm(head=True)
        opts = {"num_warps": gemm.pop("num_warps"), "num_stages": gemm.pop("num_stages")}
        del head["num_warps"], head["num_stages"]
        head.update(SLOPE=LRELU_SLOPE, BLOCK_H=c // 8)
        kernels += [
            (rh._routed_head_fwd_kernel, head, opts),
            (rh._routed_head_bwd_dy_kernel, dict(head, BLOCK_N=cfg.dy_n, SINGLE=c <= cfg.dy_n), opts),
            (rh._routed_head_bwd_dx_kernel, gemm, opts),
            (rh._routed_head_bwd_dproj_kernel, gemm, opts),
            (
                rh._routed_head_bwd_dw1_kernel,
                {a: v for a, v in gemm.items() if a != "BLOCK_N"} | {"BLOCK_H": c // 8},
                opts,
            ),
        ]
    for fn, consts, options in kernels:
        sig = signature(fn, dtype, consts)
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts),
            target=GPUTarget("cuda", 90, 32),
            options=options or None,
        )
        assert ".entry" in compiled.asm["ptx"], fn.__name__
        assert compiled.metadata.shared <= 227 * 1024, fn.__name__


# --------------------------------------------------------------------------------------------
# GPU (compiled kernels)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_large_against_torch_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(65536, 256, 12, dtype=torch.float32, device="cuda", seed=0, requires_grad=True)
    out, grads = run_head(inputs, "triton")
    out_t, grads_t = run_head(as_leaves(inputs, torch.float32), "torch")
    for a, b in zip(out + grads, out_t + grads_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_tf32(monkeypatch):
    """With TF32 allowed, fp32 inputs use TF32 tensor cores: errors of order 1e-3 relative."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    inputs = make_inputs(4096, 256, 12, dtype=torch.float32, device="cuda", seed=1, requires_grad=True)
    out, grads = run_head(inputs, "triton")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
    for a, b in zip(out + grads, out_ref + grads_ref):
        b = b.to(a.dtype)
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3 * max(1.0, b.abs().max().item()))
