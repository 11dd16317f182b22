"""The ``triton`` backend of the routed head against the reference.

Unmarked tests run the kernels on CPU tensors through the Triton interpreter: the ``interp``
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
import torch.nn.functional as F

import calgan_fast
from calgan_fast.ops.routed_head import backend_ops
from calgan_fast.reference import LRELU_SLOPE, routing_metadata_ref
from tests.utils import grads_of, make_inputs, tol

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture
def interp(monkeypatch):
    """The kernels package, defined for the Triton interpreter (CPU tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from calgan_fast.ops import triton_impl

    if not triton_impl._stdlib_interpreted():
        pytest.skip("triton was imported in compiled mode before TRITON_INTERPRET=1 was set (a GPU "
                    "session); run `TRITON_INTERPRET=1 pytest tests/test_triton.py` for these tests")
    return triton_impl._kernels()


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` filled with NaN (floats) or -7 (ints): unwritten outputs fail loudly."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", empty)


def _run(inputs, backend):
    """Outputs and the gradients of a fixed random functional of (logits, mean, var)."""
    out = calgan_fast.routed_head(*inputs, backend=backend)
    floats = [inputs[i] for i in (0, 2, 3, 4, 5, 6, 7)]
    return out, grads_of(out, floats)


def _head_in_dtype(x, expert, gate, proj, w1, b1, w2, b2):
    """The head computed in the inputs' own (low) precision: the ``out_pt`` of the error rule."""
    e = expert.long()
    y = gate[:, None] * torch.einsum("mc,mdc->md", x, proj[e])
    z = F.leaky_relu(torch.einsum("md,mhd->mh", y, w1[e]) + b1[e], LRELU_SLOPE)
    logits = (z * w2[e]).sum(1) + b2[e]
    n = proj.shape[0]
    onehot = F.one_hot(e, n).to(y.dtype)
    count = onehot.sum(0).clamp(min=1)
    mean = (onehot.t() @ y) / count[:, None]
    var = ((y - mean[e]).square().sum(1) * onehot.t()).sum(1) / (count * y.shape[1])
    return logits, torch.bincount(e, minlength=n), mean, var


def _fresh(inputs, dtype=None):
    out = []
    for i, t in enumerate(inputs):
        if i == 1:
            out.append(t)
        else:
            out.append(t.detach().to(dtype or t.dtype).requires_grad_(True))
    return out


def _assert_matches_ref(inputs, strict: bool | None = None):
    """Outputs and gradients of the triton backend against the reference on the same inputs.

    ``strict`` (default: fp32/fp64 inputs): within the dtype's tolerance of the reference.
    Otherwise (fp16/bf16, and fp32 at GPU sizes where the reference's own rounding is of the order
    of the tolerance): the error against the fp64 reference is at most twice that of the same math
    run by PyTorch in the input dtype, plus the dtype's atol.
    """
    dt = inputs[0].dtype
    strict = dt not in LOWP if strict is None else strict
    out, grads = _run(inputs, "triton")
    ref_dtype = torch.float32 if strict and dt != torch.float64 else torch.float64
    out_ref, grads_ref = _run(_fresh(inputs, ref_dtype), "reference")
    names = ["logits", "count", "mean", "var"]
    gnames = ["dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"]
    assert torch.equal(out.count, out_ref.count)
    assert out.logits.dtype == dt and out.logits.shape == out_ref.logits.shape
    stat_dtype = torch.float64 if dt == torch.float64 else torch.float32
    assert out.mean.dtype == stat_dtype and out.var.dtype == stat_dtype
    for g, t in zip(grads, [inputs[i] for i in (0, 2, 3, 4, 5, 6, 7)]):
        assert g.dtype == t.dtype and g.shape == t.shape
    if strict:
        for nm, a, b in zip(names + gnames, [*out, *grads], [*out_ref, *grads_ref]):
            torch.testing.assert_close(a, b.to(a.dtype), **tol(dt), msg=lambda m, nm=nm: f"{nm}: {m}")
        return
    pt_inputs = _fresh(inputs)
    out_pt = _head_in_dtype(*pt_inputs)
    grads_pt = grads_of(out_pt, [pt_inputs[i] for i in (0, 2, 3, 4, 5, 6, 7)])
    atol = tol(dt)["atol"]
    for nm, a, b, p in zip(names + gnames, [*out, *grads], [*out_ref, *grads_ref], [*out_pt, *grads_pt]):
        if nm == "count":
            continue
        assert torch.isfinite(a).all(), f"{nm}: non-finite values"
        err = (a.double() - b.double()).abs().max().item()
        err_pt = (p.double() - b.double()).abs().max().item()
        assert err <= 2 * err_pt + atol, f"{nm}: error {err:.3g} vs {err_pt:.3g} of the {dt} reference"


# --------------------------------------------------------------------------------------------
# Routing metadata
# --------------------------------------------------------------------------------------------

ROUTING_CASES = [
    ("one row", 1, 1, None),
    ("random, prime N", 100, 7, None),
    ("N = 1", 45, 1, None),
    ("all rows on one expert", 70, 4, lambda m: torch.full((m,), 2)),
    ("empty experts", 64, 16, lambda m: torch.randint(0, 3, (m,)) * 5),
]


@pytest.mark.parametrize("case", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
def test_routing_metadata_matches_reference(interp, nan_empty, case):
    _, m, n, make = case
    g = torch.Generator().manual_seed(m)
    expert = make(m) if make else torch.randint(0, n, (m,), generator=g)
    count, offsets, perm = interp.routing_metadata(expert, n)
    count_ref, offsets_ref, perm_ref = routing_metadata_ref(expert, n)
    assert torch.equal(count, count_ref)
    assert torch.equal(offsets, offsets_ref)
    assert torch.equal(perm, perm_ref)  # the stable order, exactly


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


# --------------------------------------------------------------------------------------------
# Forward and every gradient against the reference (interpreter)
# --------------------------------------------------------------------------------------------

HEAD_CASES = [
    # name, M, c, N, expert maker
    ("random", 50, 8, 3, None),
    ("M odd, c=24, prime N", 97, 24, 5, None),
    ("N = 1, c = 12", 40, 12, 1, None),
    ("empty and one-row experts", 37, 8, 5, lambda m: torch.tensor([0] * (m - 1) + [3])),
    ("all rows on one expert", 48, 12, 3, lambda m: torch.ones(m, dtype=torch.long)),
    ("fewer rows than a tile", 5, 24, 3, None),
    ("one row", 1, 8, 3, lambda m: torch.tensor([2])),
]


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_matches_reference_fp32(interp, nan_empty, case):
    _, m, c, n, make = case
    expert = make(m) if make else None
    inputs = make_inputs(m, c, n, dtype=torch.float32, seed=m + c, expert=expert, requires_grad=True)
    _assert_matches_ref(inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_matches_reference_other_dtypes(interp, nan_empty, dtype):
    inputs = make_inputs(61, 24, 3, dtype=dtype, seed=3, requires_grad=True)
    _assert_matches_ref(inputs)


def test_noncontiguous_x(interp, nan_empty):
    c, h, w = 12, 5, 9
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, c, h, w, generator=g)
    x = fmap[1].flatten(1).t()  # (h*w, c) rows of an NCHW map: strides (1, h*w)
    assert not x.is_contiguous()
    _, expert, gate, proj, w1, b1, w2, b2 = make_inputs(h * w, c, 3, seed=1)
    inputs = [t.requires_grad_(True) if t.is_floating_point() else t
              for t in (x.clone().t().contiguous().t(), expert, gate, proj, w1, b1, w2, b2)]
    assert not inputs[0].is_contiguous()
    _assert_matches_ref(inputs)


def test_nan_stays_in_its_row_and_expert(interp):
    """The documented NaN policy: a NaN row of x poisons its logit and its expert's statistics only."""
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(40, 8, 3, seed=8, expert=torch.arange(40) % 3)
    x[7, 3] = float("nan")  # row 7 goes to expert 1
    out = calgan_fast.routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend="triton")
    assert torch.isnan(out.logits[7]) and torch.isfinite(out.logits[torch.arange(40) != 7]).all()
    assert torch.isnan(out.mean[1]).any() and torch.isnan(out.var[1])
    assert torch.isfinite(out.mean[[0, 2]]).all() and torch.isfinite(out.var[[0, 2]]).all()


def test_two_runs_bitwise_identical(interp):
    inputs = make_inputs(90, 24, 5, seed=7, requires_grad=True)
    out1, g1 = _run(inputs, "triton")
    out2, g2 = _run(inputs, "triton")
    for a, b in zip([*out1, *g1], [*out2, *g2]):
        assert torch.equal(a, b)


def test_gradcheck_fp64_fixed_routing(interp):
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(23, 8, 3, dtype=torch.float64, seed=5,
                                                        requires_grad=True)

    def head(x, gate, proj, w1, b1, w2, b2):
        out = calgan_fast.routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend="triton")
        return out.logits, out.mean, out.var

    assert torch.autograd.gradcheck(head, (x, gate, proj, w1, b1, w2, b2), fast_mode=True,
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck(interp):
    fwd, bwd = backend_ops("triton")
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(30, 8, 3, seed=2, requires_grad=True)
    torch.library.opcheck(fwd, (x, expert, gate, proj, w1, b1, w2, b2))
    with torch.no_grad():
        _, count, mean, _, perm, offsets, aux = fwd(x, expert, gate, proj, w1, b1, w2, b2)
    gl, gm, gv = torch.randn(30), torch.randn(3, 8), torch.randn(3)
    torch.library.opcheck(bwd, (gl, gm, gv, x.detach(), expert, gate.detach(), proj.detach(),
                                w1.detach(), b1.detach(), w2.detach(), b2.detach(), count, mean,
                                perm, offsets, aux))


def test_double_backward_fails_loudly(interp):
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(20, 8, 2, seed=4, requires_grad=True)
    out = calgan_fast.routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend="triton")
    (gx,) = torch.autograd.grad(out.logits.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


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
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _compile_all(dtype: str) -> None:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from calgan_fast.ops import triton_impl

    k = triton_impl._kernels()
    assert not k.INTERPRET
    rh, ro = k.routed_head, k.routing
    acc = "fp32"
    types = {"perm_ptr": "*i64", "offsets_ptr": "*i64", "expert_ptr": "*i64", "count_ptr": "*i64",
             "seg_off_ptr": "*i64", "off_a_ptr": "*i64", "off_b_ptr": "*i64", "tile_off_ptr": "*i64",
             "blk_count_ptr": "*i32", "blk_base_ptr": "*i32"}
    for nm in ("tile_sum", "tile_m2", "gmean", "gvar", "mean", "var", "cls_part", "proj_part", "part", "out",
               "dh", "d_part"):
        types[nm + "_ptr"] = "*" + acc
    for nm in ("tile_expert", "tile_start", "tile_stop", "slab_expert", "slab_start", "slab_stop",
               "seg_expert", "seg_start", "seg_stop", "exp_a", "start_a", "stop_a", "exp_b", "start_b",
               "stop_b"):
        types[nm + "_ptr"] = "*i32"
    kernels = [
        (ro._routing_hist_kernel, {"BLOCK": 1024, "NP": 16}, {}),
        (ro._routing_scan_kernel, {"SEG_M": 64, "SEG_BLOCK": 256, "CHUNK": 64, "NP": 16}, {}),
        (ro._routing_scatter_kernel, {"BLOCK": 1024, "NP": 16}, {}),
        (ro._segment_map_kernel, {"SEG_A": 64, "SEG_B": 1024, "BLOCK": 256, "NP": 16}, {}),
        (ro._segment_sum_kernel, {"BLOCK": 1024}, {}),
        (rh._expert_stats_kernel, {"BLOCK_C": 256}, {}),
    ]
    for c in (256, 512):  # one channel block (u kept in the backward), and several
        cfg = rh._Cfg(65536, c, c // 8, torch.bfloat16 if dtype == "bf16" else torch.float32,
                      torch.device("cpu"))
        gemm, head = cfg.gemm(), cfg.gemm(head=True)
        opts = {"num_warps": gemm.pop("num_warps"), "num_stages": gemm.pop("num_stages")}
        del head["num_warps"], head["num_stages"]
        head.update(SLOPE=LRELU_SLOPE, BLOCK_H=c // 8)
        kernels += [
            (rh._routed_head_fwd_kernel, head, opts),
            (rh._routed_head_bwd_dy_kernel, dict(head, BLOCK_N=cfg.dy_n, SINGLE=c <= cfg.dy_n), opts),
            (rh._routed_head_bwd_dx_kernel, gemm, opts),
            (rh._routed_head_bwd_dproj_kernel, gemm, opts),
            (rh._routed_head_bwd_dw1_kernel, {a: v for a, v in gemm.items() if a != "BLOCK_N"} | {"BLOCK_H": c // 8},
             opts),
        ]
    for fn, consts, options in kernels:
        sig = {a: types.get(a, ("*" + dtype) if a.endswith("_ptr") else "i32")
               for a in fn.arg_names if a not in consts}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=options or None)
        assert ".entry" in compiled.asm["ptx"], fn.__name__
        assert compiled.metadata.shared <= 227 * 1024, fn.__name__


# --------------------------------------------------------------------------------------------
# GPU (compiled kernels)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_matches_reference(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for m, c, n in ((1000, 64, 5), (777, 24, 3), (4096, 256, 12)):
        inputs = make_inputs(m, c, n, dtype=dtype, device="cuda", seed=m, requires_grad=True)
        _assert_matches_ref(inputs, strict=False)


@pytest.mark.gpu
def test_gpu_large_against_torch_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(65536, 256, 12, dtype=torch.float32, device="cuda", seed=0, requires_grad=True)
    out, grads = _run(inputs, "triton")
    out_t, grads_t = _run(_fresh(inputs), "torch")
    for a, b in zip([*out, *grads], [*out_t, *grads_t]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_tf32(monkeypatch):
    """With TF32 allowed, fp32 inputs use TF32 tensor cores: errors of order 1e-3 relative."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    inputs = make_inputs(4096, 256, 12, dtype=torch.float32, device="cuda", seed=1, requires_grad=True)
    out, grads = _run(inputs, "triton")
    out_ref, grads_ref = _run(_fresh(inputs, torch.float64), "reference")
    for a, b in zip([*out, *grads], [*out_ref, *grads_ref]):
        b = b.to(a.dtype)
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.gpu
def test_gpu_bitwise_deterministic(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(20000, 256, 12, dtype=torch.bfloat16, device="cuda", seed=3, requires_grad=True)
    out1, g1 = _run(inputs, "triton")
    out2, g2 = _run(inputs, "triton")
    for a, b in zip([*out1, *g1], [*out2, *g2]):
        assert torch.equal(a, b)
