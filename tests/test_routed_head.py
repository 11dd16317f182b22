"""The routed head on every backend: the backend-generic tests, written once.

Every test that takes the ``backend`` fixture runs on each fused backend as it runs on this
machine (see :func:`tests.utils.head_backends`): ``torch`` and ``cpu`` on CPU tensors, ``triton``
on a GPU or through the Triton interpreter on CPU tensors, ``cuda`` on a GPU. One case table
(``tests.utils.CASES``) and one comparison rule (``tests.utils.assert_close_to_ref``) serve them
all; backend-specific tests live in test_cpu_backend.py, test_triton.py and test_cuda_backend.py.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import calgan_fast
from calgan_fast import routed_head, routing_metadata
from calgan_fast.ops import BACKENDS, backend_ops
from calgan_fast.reference import routing_metadata_ref
from tests.utils import (
    CASES,
    FLOAT_ARGS,
    INTERPRETER_MAX_SIZE,
    as_leaves,
    assert_matches_reference,
    case_id,
    expert_ids,
    head_backends,
    make_inputs,
    run_head,
)


class Where(NamedTuple):
    name: str  # the backend
    device: str

    @property
    def interpreted(self) -> bool:
        return BACKENDS[self.name].interpreter and self.device == "cpu"

    def inputs(self, m, c, n, hdim=None, kind="random", dtype=torch.float32, **kw):
        return make_inputs(
            m, c, n, hdim, dtype=dtype, device=self.device, expert=expert_ids(kind, m, n), **kw
        )


@pytest.fixture(params=head_backends())
def backend(request, monkeypatch) -> Where:
    where = Where(*request.param)
    if where.interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from calgan_fast.ops import triton_impl

        if not triton_impl._stdlib_interpreted():
            pytest.skip(
                "triton was imported in compiled mode before TRITON_INTERPRET=1 was set; run "
                "`TRITON_INTERPRET=1 pytest tests/test_routed_head.py` for the interpreter"
            )
    return where


def _takes(where: Where, dtype: torch.dtype) -> None:
    if dtype not in BACKENDS[where.name].dtypes:
        pytest.skip(f"{where.name} does not take {dtype}")


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case, dtype):
    _takes(backend, dtype)
    m, c, n, hdim, kind = case
    if backend.interpreted and (
        m * c > INTERPRETER_MAX_SIZE or (dtype != torch.float32 and case != CASES[0])
    ):
        pytest.skip("the Triton interpreter runs fp32 on the small cases, other dtypes on the first")
    inputs = backend.inputs(m, c, n, hdim, kind, dtype=dtype, requires_grad=True)
    assert_matches_reference(inputs, backend.name)


def test_empty_and_single_expert_statistics(backend):
    m, c, n = 30, 8, 5
    expert = torch.zeros(m, dtype=torch.long)
    expert[7] = 3  # expert 3 has one row, experts 1, 2, 4 none
    inputs = make_inputs(m, c, n, 2, expert=expert, device=backend.device)
    out = routed_head(*inputs, backend=backend.name)
    assert out.count.tolist() == [m - 1, 0, 0, 1, 0]
    zeros = torch.zeros_like(out.mean[0])
    for i in (1, 2, 4):
        assert torch.equal(out.mean[i], zeros) and out.var[i].item() == 0
    assert out.var[3].item() == 0
    y3 = inputs[2][7] * (inputs[3][3] @ inputs[0][7])  # the single row's projection is its mean
    torch.testing.assert_close(out.mean[3], y3, rtol=1e-5, atol=1e-6)


def test_non_contiguous_x(backend):
    # An NCHW feature map (B = 1) viewed as (M, c) rows, and a column-sliced view.
    c, hh, ww, n = 24, 5, 7, 4
    fmap = torch.randn(1, c, hh, ww, device=backend.device)
    views = [
        fmap.flatten(2).transpose(1, 2).reshape(hh * ww, c),
        torch.randn(hh * ww, 2 * c, device=backend.device)[:, ::2],
    ]
    _, expert, gate, proj, w1, b1, w2, b2 = make_inputs(hh * ww, c, n, 3, device=backend.device)
    for x in views:
        assert not x.is_contiguous()
        inputs = as_leaves([x, expert, gate, proj, w1, b1, w2, b2], torch.float32)
        assert not inputs[0].is_contiguous()
        out, grads = assert_matches_reference(inputs, backend.name)
        out_c, grads_c = run_head(as_leaves([x.contiguous(), *inputs[1:]], torch.float32), backend.name)
        for a, b in zip(out + grads, out_c + grads_c):
            assert torch.equal(a, b)  # the strides change nothing in the results


def test_deterministic(backend):
    m, c = (120, 16) if backend.interpreted else (3000, 64)
    inputs = backend.inputs(m, c, 6, 4, requires_grad=True)
    first = [t.clone() for t in sum(run_head(inputs, backend.name), [])]
    second = [t.clone() for t in sum(run_head(as_leaves(inputs, torch.float32), backend.name), [])]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradcheck_fp64(backend):
    _takes(backend, torch.float64)
    inputs = backend.inputs(23, 6, 4, 2, "empty_and_single", dtype=torch.float64, requires_grad=True)
    expert = inputs[1]

    def f(x, gate, proj, w1, b1, w2, b2):
        out = routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend=backend.name)
        return out.logits, out.mean, out.var

    assert torch.autograd.gradcheck(f, tuple(inputs[i] for i in FLOAT_ARGS), fast_mode=True)


def test_opcheck(backend):
    fwd, bwd = backend_ops(backend.name)
    dtypes = [d for d in (torch.float32, torch.float64) if d in BACKENDS[backend.name].dtypes]
    if backend.interpreted:
        dtypes = dtypes[:1]  # the interpreter is slow: fp32 only
    for dtype in dtypes:
        inputs = backend.inputs(40, 8, 4, 3, "empty_and_single", dtype=dtype, requires_grad=True)
        torch.library.opcheck(fwd, tuple(inputs))
        with torch.no_grad():
            _, count, mean, _, perm, offsets, xcov = fwd(*inputs)
        assert xcov.shape == BACKENDS[backend.name].xcov_shape(8, 4)
        g = torch.Generator().manual_seed(0)
        upstream = [
            torch.randn(s, generator=g).to(device=backend.device, dtype=d)
            for s, d in ((40, dtype), ((4, 8), mean.dtype), (4, mean.dtype))
        ]
        args = tuple(t.detach() for t in (*upstream, *inputs, count, mean, perm, offsets, xcov))
        torch.library.opcheck(bwd, args)


def test_double_backward_raises(backend):
    inputs = backend.inputs(20, 8, 2, 2, requires_grad=True)
    out = routed_head(*inputs, backend=backend.name)
    (gx,) = torch.autograd.grad(out.logits.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gx.square().sum(), inputs[3])


def test_nan_stays_in_its_row_and_expert(backend):
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(
        40, 8, 3, expert=torch.arange(40) % 3, device=backend.device
    )
    x[7, 3] = float("nan")  # row 7 goes to expert 1
    out = routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend=backend.name)
    clean = routed_head(x.nan_to_num(0.0), expert, gate, proj, w1, b1, w2, b2, backend=backend.name)
    others = torch.arange(40, device=backend.device) != 7
    assert torch.isnan(out.logits[7])
    torch.testing.assert_close(out.logits[others], clean.logits[others])
    assert torch.isnan(out.mean[1]).any() and torch.isnan(out.var[1])
    torch.testing.assert_close(out.mean[[0, 2]], clean.mean[[0, 2]])
    torch.testing.assert_close(out.var[[0, 2]], clean.var[[0, 2]])


def test_autocast_does_not_recast(backend):
    # Under autocast the kernels keep their own precisions (fp32 accumulation for fp32 inputs).
    inputs = backend.inputs(120, 16, 3, 4, requires_grad=True)
    plain = sum(run_head(inputs, backend.name), [])
    low = torch.bfloat16 if backend.device == "cpu" else torch.float16
    with torch.autocast(backend.device, dtype=low):
        auto = sum(run_head(as_leaves(inputs, torch.float32), backend.name), [])
    for a, b in zip(plain, auto):
        assert torch.equal(a, b)


ROUTING_CASES = [
    (1, 1, "random"),
    (100, 7, "random"),
    (45, 1, "random"),
    (70, 4, "one_expert"),
    (64, 16, "sparse"),
    (1000, 13, "random"),
]


@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-{c[2]}")
def test_routing_metadata_matches_reference(backend, case):
    m, n, kind = case
    expert = expert_ids(kind, m, n).to(backend.device)
    got = routing_metadata(expert, n, backend=backend.name)
    want = routing_metadata_ref(expert, n)
    for name, a, b in zip(("count", "offsets", "perm"), got, want):
        assert a.dtype == torch.long and torch.equal(a, b), name  # the stable order, exactly


def test_routing_metadata_auto_and_reference():
    expert = torch.tensor([2, 0, 2, 1, 0, 2])
    for name in ("auto", "reference", "torch"):
        count, offsets, perm = routing_metadata(expert, 4, backend=name)
        assert count.tolist() == [2, 1, 3, 0]
        assert offsets.tolist() == [0, 2, 3, 6, 6]
        assert perm.tolist() == [1, 4, 3, 0, 2, 5]  # stable within each expert
    with pytest.raises(ValueError, match="expert"):
        routing_metadata(torch.tensor([0, 4]), 4)
    with pytest.raises(TypeError, match="expert"):
        routing_metadata(torch.tensor([0.0, 1.0]), 4)


def test_mixed_precision_weights_get_fp32_grads():
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(50, 8, 3, 2, requires_grad=True)
    out = routed_head(x.detach().bfloat16(), expert, gate, proj, w1, b1, w2, b2, backend="torch")
    out.logits.float().sum().backward()
    assert proj.grad is not None and proj.grad.dtype == torch.float32


# ------------------------------------------------------------------------------- bad input


def _good():
    return list(make_inputs(10, 8, 3, 2))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.__setitem__(1, torch.tensor([0] * 9 + [3])), "expert: ids must lie in"),
        (lambda a: a.__setitem__(1, torch.tensor([0] * 9 + [-1])), "expert: ids must lie in"),
        (lambda a: a.__setitem__(0, a[0][:0]), "x: M = 0"),
        (lambda a: a.__setitem__(0, a[0][None]), r"x: expected shape \(M, c\)"),
        (lambda a: a.__setitem__(3, a[3][:, :4]), "proj"),
        (lambda a: a.__setitem__(4, a[4][:, :, :4]), "w1"),
        (lambda a: a.__setitem__(5, a[5][:, :1]), "b1"),
        (lambda a: a.__setitem__(6, a[6][:2]), "w2"),
        (lambda a: a.__setitem__(7, a[7][:2]), "b2"),
        (lambda a: a.__setitem__(2, a[2][:5]), "gate"),
        (lambda a: a.__setitem__(1, a[1][:5]), "expert"),
    ],
)
def test_bad_input(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        routed_head(*args, backend="torch")


def test_bad_dtypes_and_backend():
    args = _good()
    with pytest.raises(TypeError, match="expert"):
        routed_head(args[0], args[1].float(), *args[2:], backend="torch")
    with pytest.raises(TypeError, match="x"):
        routed_head(args[0].long(), *args[1:], backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        routed_head(*args, backend="nope")
    with pytest.raises(RuntimeError, match="cuda"):
        routed_head(*args, backend="cuda")


def test_backend_env_override(monkeypatch):
    from calgan_fast.ops import resolve_backend

    monkeypatch.setenv("CALGAN_FAST_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")).name == "reference"
    assert resolve_backend("torch", torch.device("cpu")).name == "torch"  # explicit wins
    monkeypatch.delenv("CALGAN_FAST_BACKEND")
    assert resolve_backend("auto", torch.device("cpu")).name in ("cpu", "torch")
    assert "reference" in calgan_fast.available_backends("cpu")


def test_torch_compile_traces_the_op():
    inputs = make_inputs(40, 8, 3, 2, requires_grad=True)
    floats = [inputs[0], *inputs[2:]]

    def f(*args):
        out = routed_head(*args, backend="torch")  # the default range check included
        return out.logits.sum() + out.mean.sum() + out.var.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*inputs)
    (g_got,) = torch.autograd.grad(got, [floats[2]])
    want = f(*inputs)
    (g_want,) = torch.autograd.grad(want, [floats[2]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_torch_compile_keeps_the_range_check():
    x, expert, *rest = make_inputs(40, 8, 3, 2)
    compiled = torch.compile(lambda *a: routed_head(*a, backend="torch").logits, backend="aot_eager",
                             fullgraph=True)
    compiled(x, expert, *rest)
    bad = expert.clone()
    bad[5] = 3
    with pytest.raises(Exception, match=r"ids must lie in \[0, 3\).*\[0, 3\]"):
        compiled(x, bad, *rest)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_torch_compile_fullgraph_discriminator_default(backend):
    torch.manual_seed(0)
    d = calgan_fast.CALGANDiscriminator(num_feat=4, num_experts=3, routing="argmax", backend=backend).eval()
    img = torch.rand(1, 3, 16, 16)
    compiled = torch.compile(d, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(img), d(img))
