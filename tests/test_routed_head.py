"""The routed head: every CPU backend against the reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

import calgan_fast
from calgan_fast import routed_head, routed_head_ref, routing_metadata
from calgan_fast.ops import backend_ops
from tests.utils import cpu_backends, expert_ids, grads_of, make_inputs, tol

BACKENDS = cpu_backends()

# (M, c, N, hdim, expert pattern)
CASES = [
    (257, 24, 5, 3, "random"),  # M not a multiple of any block, c not a power of two
    (64, 16, 1, 2, "random"),  # N = 1
    (97, 20, 7, "auto", "random"),  # prime N
    (50, 8, 4, 1, "one_expert"),  # every pixel on one expert, the others empty
    (40, 12, 6, 2, "sparse"),  # empty experts and an expert with a single pixel
    (1, 8, 3, 1, "random"),  # a single row
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}c{c[1]}N{c[2]}{c[4]}")
def test_matches_reference(backend, dtype, case):
    m, c, n, hdim, pattern = case
    hdim = None if hdim == "auto" else hdim
    inputs = make_inputs(m, c, n, hdim, dtype=dtype, expert=expert_ids(pattern, m, n), requires_grad=True)
    out = routed_head(*inputs, backend=backend)
    ref = routed_head_ref(*inputs)
    t = tol(dtype)
    assert out.logits.dtype == dtype
    assert out.count.dtype == torch.long
    torch.testing.assert_close(out.count, ref[1])
    for a, b in zip((out.logits, out.mean, out.var), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(a, b.to(a.dtype), **t)
    floats = [inputs[0], *inputs[2:]]
    g_out = grads_of(out, floats)
    g_ref = grads_of(ref, floats)
    names = ["x", "gate", "proj", "w1", "b1", "w2", "b2"]
    for name, a, b in zip(names, g_out, g_ref):
        torch.testing.assert_close(a, b.to(a.dtype), **t, msg=lambda s, name=name: f"grad {name}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_expert_statistics(backend):
    m, c, n = 30, 8, 5
    expert = torch.zeros(m, dtype=torch.long)
    expert[7] = 3  # expert 3 has one pixel, experts 1, 2, 4 none
    inputs = make_inputs(m, c, n, 2, expert=expert)
    out = routed_head(*inputs, backend=backend)
    assert out.count.tolist() == [m - 1, 0, 0, 1, 0]
    for i in (1, 2, 4):
        assert torch.all(out.mean[i] == 0) and out.var[i] == 0
    assert out.var[3] == 0
    assert torch.all(torch.isfinite(out.logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_rows(backend):
    # An NCHW feature map viewed as (M, c) rows, as the discriminator does for B = 1.
    fmap = torch.randn(1, 24, 5, 7)
    x = fmap.flatten(2).transpose(1, 2).reshape(35, 24)
    assert not x.is_contiguous()
    _, expert, gate, proj, w1, b1, w2, b2 = make_inputs(35, 24, 4, 3)
    out = routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend=backend)
    ref = routed_head_ref(x.contiguous(), expert, gate, proj, w1, b1, w2, b2)
    torch.testing.assert_close(out.logits, ref[0], **tol(torch.float32))
    torch.testing.assert_close(out.mean, ref[2], **tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    inputs = make_inputs(300, 32, 6, 4, requires_grad=True)
    floats = [inputs[0], *inputs[2:]]
    runs = []
    for _ in range(2):
        out = routed_head(*inputs, backend=backend)
        runs.append((out.logits, out.mean, out.var, *grads_of(out, floats)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_gradcheck_fp64(backend):
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(23, 6, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, gate, proj, w1, b1, w2, b2):
        out = routed_head(x, expert, gate, proj, w1, b1, w2, b2, backend=backend)
        return out.logits, out.mean, out.var

    assert torch.autograd.gradcheck(f, (x, gate, proj, w1, b1, w2, b2), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(backend, dtype):
    # Low-precision inputs, fp32 accumulation: the error against the fp32 oracle on the unrounded
    # values is at most 2x that of the reference run on the rounded inputs (out_pt) plus atol.
    inputs32 = make_inputs(200, 32, 5, 4)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs32]
    out = routed_head(*low, backend=backend)
    ref = routed_head_ref(*inputs32)
    ref_pt = routed_head_ref(*[t.float() if t.is_floating_point() else t for t in low])
    assert out.logits.dtype == dtype and out.mean.dtype == torch.float32
    atol = tol(dtype)["atol"]
    pairs = [(out.logits.float(), ref_pt[0].to(dtype).float(), ref[0]),
             (out.mean, ref_pt[2], ref[2]), (out.var, ref_pt[3], ref[3])]
    for got, pt, want in pairs:
        assert (got - want).abs().max() <= 2 * (pt - want).abs().max() + atol


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fwd, _ = backend_ops(backend)
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(40, 8, 3, 2, requires_grad=True)
    torch.library.opcheck(fwd, (x, expert, gate, proj, w1, b1, w2, b2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    inputs = make_inputs(20, 8, 2, 2, requires_grad=True)
    out = routed_head(*inputs, backend=backend)
    (gx,) = torch.autograd.grad(out.logits.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gx.square().sum(), inputs[3])


def test_mixed_precision_weights_get_fp32_grads():
    x, expert, gate, proj, w1, b1, w2, b2 = make_inputs(50, 8, 3, 2, requires_grad=True)
    out = routed_head(x.detach().bfloat16(), expert, gate, proj, w1, b1, w2, b2, backend="torch")
    out.logits.float().sum().backward()
    assert proj.grad is not None and proj.grad.dtype == torch.float32


def test_routing_metadata():
    expert = torch.tensor([2, 0, 2, 1, 0, 2])
    count, offsets, perm = routing_metadata(expert, 4)
    assert count.tolist() == [2, 1, 3, 0]
    assert offsets.tolist() == [0, 2, 3, 6, 6]
    assert perm.tolist() == [1, 4, 3, 0, 2, 5]  # stable within each expert
    with pytest.raises(ValueError, match="expert"):
        routing_metadata(torch.tensor([0, 4]), 4)


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
