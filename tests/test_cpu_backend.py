"""The ``cpu`` backend (fused C++ kernels of ``calgan_fast._C``) against the reference."""

from __future__ import annotations

import pytest
import torch

import calgan_fast
from calgan_fast.ops.backends import BACKENDS, resolve_backend
from tests.utils import (
    OUTPUT_NAMES,
    TOL,
    as_leaves,
    assert_close_to_ref,
    assert_matches_reference,
    case_id,
    expert_ids,
    make_inputs,
    run_head,
)

_ok, _why = BACKENDS["cpu"].available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"cpu backend not built: {_why}")

# The cpu kernel's own routes (the generic cases are in test_routed_head.py): the benchmark's c and
# N, and the scatter-matrix route by bands.
ROUTE_CASES = [
    (700, 256, 12, 32, "random"),
    (700, 130, 2, 16, "random"),  # many rows per expert: the scatter-matrix route, bands of 64 + 2
    (1200, 256, 3, 32, "random"),  # the scatter-matrix route at the benchmark's c
    (3000, 40, 4, 5, "random"),  # with 2 threads: experts in parallel, q in chunks of rows
    (333, 130, 4, 16, "empty_and_single"),  # c >= 128 with an odd split
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ROUTE_CASES, ids=case_id)
def test_routes_match_reference(case, dtype):
    m, c, n, h, kind = case
    inputs = make_inputs(m, c, n, h, dtype=dtype, expert=expert_ids(kind, m, n), requires_grad=True)
    assert_matches_reference(inputs, "cpu")


# (M, c) with N = 3: experts of about M/3 rows take the scatter-matrix route when 5 n >= 4 c; the
# kernels gather an expert's rows minus the mean of up to 128 of them (all of them below 129 rows).
ROUTES = {
    "textbook-route": (60, 130),
    "textbook-route-over-128-rows": (540, 256),
    "scatter-route": (900, 130),
}


def shift_rows(n: int) -> set[int]:
    """The rows of an n-row expert whose mean the kernels take as its shift (spread evenly)."""
    rows = min(n, 128)
    return {i * n // rows for i in range(rows)}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("gate", [1e-6, 0.5])
def test_small_gates_keep_dgate_accurate(route, gate):
    """dgate = O^T dy . x must not lose digits when the gated rows are small next to the expert mean."""
    m, c = ROUTES[route]
    inputs = list(make_inputs(m, c, 3, seed=5))
    inputs[0] = inputs[0] + 3.0  # an offset: the expert means are large next to the small gated rows
    inputs[2][::2] = gate
    inputs = [t.requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    out, grads = run_head(inputs, "cpu")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
    dgate, dgate_ref = grads[1].double(), grads_ref[1]
    err = ((dgate - dgate_ref).abs() / (dgate_ref.abs() + 1e-3)).max().item()
    assert err < 1e-3, f"dgate: max relative error {err:.2e}"


@pytest.mark.parametrize("route", ROUTES)
def test_zero_gates(route):
    """Rows with gate 0 (y = 0) still get dgate = O^T dy . x: the backward reads their x rows."""
    m, c = ROUTES[route]
    inputs = make_inputs(m, c, 3, dtype=torch.float64, seed=3)
    inputs[2][::4] = 0.0
    inputs = [t.requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    out, grads = run_head(inputs, "cpu")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
    rtol, atol = TOL[torch.float64]
    for name, a, r in zip(OUTPUT_NAMES, out + grads, out_ref + grads_ref):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, msg=lambda s, nm=name: f"{nm}: {s}")
    assert grads[1][::4].abs().max() > 0  # dgate of the zero-gate rows is not trivially zero


def test_statistics_of_tiny_experts():
    # Expert 0 empty, 1 with one row, 2 with two rows: mean/var exactly as docs/design.md §2 defines them.
    x, _, gate, proj, w1, b1, w2, b2 = make_inputs(3, 8, 3, 2, dtype=torch.float64)
    expert = torch.tensor([2, 1, 2])
    out = calgan_fast.routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend="cpu")
    y = gate[:, None] * torch.einsum("mc,mdc->md", x, proj[expert])
    assert out.count.tolist() == [0, 1, 2]
    assert torch.equal(out.mean[0], torch.zeros(8, dtype=torch.float64)) and out.var[0] == 0
    torch.testing.assert_close(out.mean[1], y[1])
    assert out.var[1] == 0
    torch.testing.assert_close(out.mean[2], (y[0] + y[2]) / 2)
    torch.testing.assert_close(out.var[2], ((y[0] - y[2]) / 2).square().mean())


@pytest.mark.parametrize("spread", [1e-2, 1e-3])
def test_statistics_stable_with_large_offset(spread):
    # A large common offset in y: E[y^2] - E[y]^2 in fp32 would lose the variance entirely, and an
    # expert mean summed in fp32 would leave an offset in every centred row.
    m, c = 4096, 16
    x = (torch.randn(m, c, dtype=torch.float64) * spread + 1e3).float().double()  # exact in fp32
    eye = torch.eye(c, dtype=torch.float64)[None]
    args = (
        x,
        torch.zeros(m, dtype=torch.long),
        torch.ones(m, dtype=torch.float64),
        eye,
        torch.zeros(1, 2, c, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
    )
    var64 = calgan_fast.routed_head(*args, backend="cpu").var
    var32 = calgan_fast.routed_head(
        *(a.float() if a.is_floating_point() else a for a in args), backend="cpu"
    ).var
    torch.testing.assert_close(var64, x.var(0, unbiased=False).mean()[None], rtol=1e-9, atol=0)
    torch.testing.assert_close(var32.double(), var64, rtol=1e-3, atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_variance_gradient_stable_with_large_offset(route):
    """The variance's gradient, alone (glogits = gmean = 0), with rows whose mean is 100x their spread:
    the kernels form it from rows shifted by an estimate of their mean, so fp32 keeps about the
    digits of the spread (the dx GEMM on uncentred rows gives 3e-5 on the scatter route here)."""
    m, c = ROUTES[route]
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(
        m, c, 3, dtype=torch.float64, seed=11, gate_random=False
    )
    x = (x + 100.0).float().double()  # exact in fp32

    def var_grads(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, gate, proj)]
        out = calgan_fast.routed_head(
            leaves[0], expert, leaves[1], leaves[2], *(t.to(dtype) for t in (w1, b1, w2, b2)), backend="cpu"
        )
        out.var.sum().backward()
        return [t.grad.double() for t in leaves]

    for name, a, r in zip(("dx", "dgate", "dproj"), var_grads(torch.float32), var_grads(torch.float64)):
        err = ((a - r).abs().max() / r.abs().max()).item()
        assert err < 1e-5, f"{name}: max error {err:.2e} of the largest entry"


def test_rows_that_drift_within_an_expert():
    """Each expert's first 128 rows in pixel order lie 50 sigma away from its later ones (as rows of
    one image after another may): every output and gradient still matches the reference, on the
    textbook route (180 rows at c = 256) and the scatter-matrix route (400 rows)."""
    c, sizes = 256, (180, 400)
    m = sum(sizes)
    expert = torch.cat([torch.full((k,), e) for e, k in enumerate(sizes)])
    inputs = list(make_inputs(m, c, 2, dtype=torch.float64, seed=12, expert=expert))
    first = torch.cat([torch.arange(k) < 128 for k in sizes])
    inputs[0] = (inputs[0] + 50.0 * first[:, None]).float().double()
    # The hidden units far from the LeakyReLU's kink (|W1 y| is about 100 here): a unit whose slope
    # fp32 rounding flips against the fp64 reference would swamp every classifier gradient.
    inputs[5] = torch.full_like(inputs[5], 1e4)
    inputs = [t.float().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    out, grads = run_head(inputs, "cpu")
    out_pt, grads_pt = run_head(as_leaves(inputs, torch.float32), "torch")
    out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
    for name, a, r, p in zip(OUTPUT_NAMES, out + grads, out_ref + grads_ref, out_pt + grads_pt):
        if name != "count":
            assert_close_to_ref(name, a, r, p, torch.float32)


# Experts of the first route have under 129 rows, all of them sampled for the shift.
NAN_CASES = [
    (r, w)
    for r in ROUTES
    for w in ("sampled-row", "unsampled-row")
    if (r, w) != ("textbook-route", "unsampled-row")
]


@pytest.mark.parametrize(("route", "where"), NAN_CASES, ids=lambda v: v)
def test_nan_stays_in_its_row_and_expert(route, where):
    """The documented NaN policy: a NaN row of x poisons its logit and its expert's statistics only,
    on both routes, wherever it lies among its expert's rows (the rows are gathered minus a shift
    taken from a sample of the expert's rows, which is zero where one of them is not finite)."""
    m, c = ROUTES[route]
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(m, c, 3, 4, seed=8, expert=torch.arange(m) % 3)
    # A row of expert 1 (rows p with p % 3 == 1, the k-th of them at p = 3 k + 1) that is, or is
    # not, among those its shift is taken from.
    n1 = len(range(1, m, 3))
    sampled = shift_rows(n1)
    ks = sorted(sampled) if where == "sampled-row" else sorted(set(range(n1)) - sampled)
    row = 3 * ks[len(ks) // 2] + 1
    x[row, 3] = float("nan")
    out = calgan_fast.routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend="cpu")
    assert torch.isnan(out.logits[row]) and torch.isfinite(out.logits[torch.arange(m) != row]).all()
    assert torch.isnan(out.mean[1]).any() and torch.isnan(out.var[1])
    assert torch.isfinite(out.mean[[0, 2]]).all() and torch.isfinite(out.var[[0, 2]]).all()


def _all_outputs(inputs):
    out, grads = run_head(inputs, "cpu")
    return [t.detach().clone() for t in out + grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1500, 256, 12, 32), (2600, 256, 4, 32)], ids=["textbook", "scatter"])
def test_deterministic(dtype, shape):
    inputs = make_inputs(*shape, dtype=dtype, requires_grad=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # experts on workers where the shape allows
        first = _all_outputs(inputs)
        second = _all_outputs(as_leaves(inputs, dtype))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_a = _all_outputs(as_leaves(inputs, dtype))
        one_b = _all_outputs(as_leaves(inputs, dtype))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one_a, one_b))


# (M, c, N, hdim): experts of several hundred rows on the scatter-matrix route.
WORKER_CASES = {
    "library-gemms": (3000, 40, 4, 5),  # c not a multiple of 16: ATen's GEMMs
    "tile-gemms-3-column-tiles": (3000, 48, 4, 16),  # fp32, c a multiple of 16: the tile kernels
    "tile-gemms-hdim-5": (3000, 48, 4, 5),  # h through ATen, [W_s | dh] rows padded apart
    "tile-gemms-benchmark-c": (2600, 256, 4, 32),  # padded rows, several reduction blocks
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WORKER_CASES)
def test_parallel_experts_with_chunked_q(case, dtype, threads):
    """N >= 2 threads: experts run on workers (one per thread), and q of the backward is formed in
    chunks of rows (experts of more than 96 rows); checked against the reference."""
    m, c, n, h = WORKER_CASES[case]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        inputs = make_inputs(m, c, n, h, dtype=dtype, expert=expert_ids("random", m, n), requires_grad=True)
        out, grads = run_head(inputs, "cpu")
        out_ref, grads_ref = run_head(as_leaves(inputs, torch.float64), "reference")
        out_pt, grads_pt = run_head(as_leaves(inputs, dtype), "torch")
    finally:
        torch.set_num_threads(old)
    for name, a, r, t in zip(OUTPUT_NAMES, out + grads, out_ref + grads_ref, out_pt + grads_pt):
        if name == "count":
            assert torch.equal(a, r)
        else:
            assert_close_to_ref(name, a, r, t, dtype)


def test_raw_routing_op_rejects_bad_ids():
    with pytest.raises(RuntimeError, match="expert"):
        torch.ops.calgan_fast_C.routing_metadata(torch.tensor([0, 3]), 3)


def test_auto_picks_cpu(monkeypatch):
    monkeypatch.delenv("CALGAN_FAST_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"


def _raw_args(m=10, c=8, n=3):
    return list(make_inputs(m, c, n, 2))


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (1, torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2]), "expert"),  # id 3 with 3 experts
        (1, torch.tensor([0, -1, 2, 1, 0, 1, 2, 0, 1, 2]), "expert"),
        (1, torch.zeros(10, dtype=torch.int32), "expert"),
        (2, torch.ones(9), "gate"),
        (3, torch.randn(3, 8, 7), "proj"),
        (4, torch.randn(2, 2, 8), "w1"),
        (4, torch.randn(3, 2, 8, dtype=torch.float64), "w1"),
        (5, torch.randn(3, 3), "b1"),
        (6, torch.randn(3, 5), "w2"),
        (7, torch.randn(4), "b2"),
        (0, torch.randn(0, 8), "x"),
        (0, torch.randn(10, 8, 1), "x"),
    ],
)
def test_bad_input_raw_op_names_argument(index, bad, match):
    args = _raw_args()
    args[index] = bad
    with pytest.raises(RuntimeError, match=match):
        torch.ops.calgan_fast_C.routed_head_fwd(*args)


def test_bad_input_public_api():
    args = _raw_args()
    args[1] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="expert"):
        calgan_fast.routed_head(*args, backend="cpu")


def test_bad_backward_args_name_argument():
    args = _raw_args()
    x, expert, gate, proj, w1, b1, w2, b2 = args
    _, count, mean, _, perm, offsets, xcov = torch.ops.calgan_fast_C.routed_head_fwd(*args)
    good = [torch.randn(10), torch.randn(3, 8), torch.randn(3), *args, count, mean, perm, offsets, xcov]
    torch.ops.calgan_fast_C.routed_head_bwd(*good)
    for index, bad, match in (
        (0, torch.randn(9), "glogits"),
        (1, torch.randn(3, 7), "gmean"),
        (2, torch.randn(4), "gvar"),
        (14, torch.zeros(3, dtype=torch.long), "offsets"),
        (15, torch.zeros(3, 8, 7), "xcov"),
    ):
        args_bad = list(good)
        args_bad[index] = bad
        with pytest.raises(RuntimeError, match=match):
            torch.ops.calgan_fast_C.routed_head_bwd(*args_bad)


def test_bad_routing_metadata_in_backward_raises():
    # Direct calls with inconsistent metadata must raise, not write out of bounds.
    args = _raw_args()
    _, count, mean, _, perm, offsets, xcov = torch.ops.calgan_fast_C.routed_head_fwd(*args)
    grads = [torch.randn(10), torch.randn(3, 8), torch.randn(3)]

    def call(count=count, perm=perm, offsets=offsets):
        return torch.ops.calgan_fast_C.routed_head_bwd(*grads, *args, count, mean, perm, offsets, xcov)

    call()
    bad_perm = perm.clone()
    bad_perm[0] = 10
    with pytest.raises(RuntimeError, match="perm: entry 0"):
        call(perm=bad_perm)
    dup = perm.clone()
    dup[1] = dup[0]
    with pytest.raises(RuntimeError, match="perm: row"):
        call(perm=dup)
    non_mono = torch.tensor([0, 6, 3, 10])
    with pytest.raises(RuntimeError, match="offsets: must be non-decreasing"):
        call(offsets=non_mono, count=torch.tensor([6, -3, 7]))
    with pytest.raises(RuntimeError, match="count"):
        call(count=count + torch.tensor([1, -1, 0]))
