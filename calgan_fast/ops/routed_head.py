"""The routed-head op: input checks, ``torch.library`` custom ops per backend, public function.

Every fast backend is exposed as two custom ops with one schema,
``calgan_fast::routed_head_fwd_<backend>`` and ``calgan_fast::routed_head_bwd_<backend>``, with
fake (meta) implementations so that ``torch.library.opcheck`` passes and ``torch.compile`` can
trace models that use them. Autograd saves the inputs, the routing metadata, the expert means and
the backend's ``xcov`` per-expert statistics (the ``(N, c, c)`` cross-covariances of ``y`` and the
gated rows for ``cpu``, nothing for the others), and calls the backward op, which recomputes what it needs of
the forward (``y`` and ``z`` in the ``torch``, ``triton`` and ``cuda`` backends; ``z`` and an
algebraic form of ``y`` in ``cpu``). The backward op itself has no autograd formula: a double backward
(an R1 penalty through D) raises instead of being wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..reference import stat_dtype
from .backends import BACKENDS, resolve_backend

__all__ = ["routed_head", "RoutedHeadOutput", "check_routed_head_inputs", "backend_ops"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RoutedHeadOutput(NamedTuple):
    logits: Tensor  # (M,) in x.dtype
    count: Tensor  # (N,) int64
    mean: Tensor  # (N, c) fp32 (fp64 for fp64 inputs)
    var: Tensor  # (N,) fp32 (fp64 for fp64 inputs)


def _no_autocast(device: torch.device):
    """The kernels choose their own precisions (fp32 accumulation): autocast must not recast
    the matmuls of the ``torch`` backend or the reference when a model runs under AMP."""
    return torch.autocast(device_type=device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)


def _make_ops(name: str) -> tuple:
    fwd_name = f"calgan_fast::routed_head_fwd_{name}"
    bwd_name = f"calgan_fast::routed_head_bwd_{name}"

    @torch.library.custom_op(fwd_name, mutates_args=())
    def fwd(
        x: Tensor,
        expert: Tensor,
        gate: Tensor,
        proj: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with _no_autocast(x.device):
            return tuple(BACKENDS[name].impl().forward(x, expert, gate, proj, w1, b1, w2, b2))

    @fwd.register_fake
    def _fwd_fake(x, expert, gate, proj, w1, b1, w2, b2):
        m, c = x.shape
        num_experts = proj.shape[0]
        sd = stat_dtype(x.dtype)
        return (
            x.new_empty(m),
            x.new_empty(num_experts, dtype=torch.long),
            x.new_empty(num_experts, c, dtype=sd),
            x.new_empty(num_experts, dtype=sd),
            x.new_empty(m, dtype=torch.long),
            x.new_empty(num_experts + 1, dtype=torch.long),
            x.new_empty(BACKENDS[name].xcov_shape(c, num_experts), dtype=sd),
        )

    @torch.library.custom_op(bwd_name, mutates_args=())
    def bwd(
        glogits: Tensor,
        gmean: Tensor,
        gvar: Tensor,
        x: Tensor,
        expert: Tensor,
        gate: Tensor,
        proj: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
        count: Tensor,
        mean: Tensor,
        perm: Tensor,
        offsets: Tensor,
        xcov: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with _no_autocast(x.device):
            return tuple(
                BACKENDS[name]
                .impl()
                .backward(
                    glogits,
                    gmean,
                    gvar,
                    x,
                    expert,
                    gate,
                    proj,
                    w1,
                    b1,
                    w2,
                    b2,
                    count,
                    mean,
                    perm,
                    offsets,
                    xcov,
                )
            )

    @bwd.register_fake
    def _bwd_fake(
        glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm, offsets, xcov
    ):
        return (
            x.new_empty(x.shape),
            gate.new_empty(gate.shape),
            proj.new_empty(proj.shape),
            w1.new_empty(w1.shape),
            b1.new_empty(b1.shape),
            w2.new_empty(w2.shape),
            b2.new_empty(b2.shape),
        )

    def setup_context(ctx, inputs, output):
        x, expert, gate, proj, w1, b1, w2, b2 = inputs
        _, count, mean, _, perm, offsets, xcov = output
        ctx.mark_non_differentiable(xcov)  # per-expert statistics for the backward, not a result
        ctx.save_for_backward(x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm, offsets, xcov)

    def backward(ctx, glogits, _gcount, gmean, gvar, _gperm, _goffsets, _gxcov):
        x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm, offsets, xcov = ctx.saved_tensors
        if glogits is None:
            glogits = x.new_zeros(x.shape[0])
        if gmean is None:
            gmean = mean.new_zeros(mean.shape)
        if gvar is None:
            gvar = mean.new_zeros(mean.shape[0])
        dx, dgate, dproj, dw1, db1, dw2, db2 = bwd(
            glogits.contiguous(),
            gmean.contiguous(),
            gvar.contiguous(),
            x,
            expert,
            gate,
            proj,
            w1,
            b1,
            w2,
            b2,
            count,
            mean,
            perm,
            offsets,
            xcov,
        )
        return dx, None, dgate, dproj, dw1, db1, dw2, db2

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


_OPS: dict[str, tuple] = {}


def backend_ops(name: str) -> tuple:
    """``(fwd, bwd)`` custom ops of the fused backend ``name``, defined on first use."""
    if name not in BACKENDS or not BACKENDS[name].fused:
        raise ValueError(f"backend: {name!r} has no custom ops")
    if name not in _OPS:
        _OPS[name] = _make_ops(name)
    return _OPS[name]


# Define every backend's ops at import so that they exist for torch.compile and opcheck;
# the implementations (and Triton, the extension) still load only when first called.
for _name, _backend in BACKENDS.items():
    if _backend.fused:
        backend_ops(_name)
    elif _backend.available()[0]:
        _backend.impl()  # plain PyTorch, cheap to import; keeps the import out of compiled graphs
# The CPU-tensor backends' probes (no Triton import): `auto` on CPU then traces no probe.
for _name in ("cpu", "torch"):
    BACKENDS[_name].available()


@torch.library.custom_op("calgan_fast::expert_ids", mutates_args=())
def _expert_ids(expert: Tensor, num_experts: int, check_range: bool) -> Tensor:
    """``expert`` as int64 (a new tensor); with ``check_range`` a ``ValueError`` when an id lies
    outside ``[0, num_experts)``. An op of its own so that ``torch.compile(fullgraph=True)`` traces
    the checked call without a data-dependent guard: the check runs when the graph runs."""
    if check_range:
        _check_expert_range(expert, num_experts)
    return expert.to(torch.long, copy=True)


@_expert_ids.register_fake
def _expert_ids_fake(expert, num_experts, check_range):
    return expert.new_empty(expert.shape, dtype=torch.long)


def _check_expert_range(expert: Tensor, n: int) -> None:
    if expert.device.type == "meta" or expert.numel() == 0:
        return
    lo, hi = torch.aminmax(expert)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n:
        raise ValueError(f"expert: ids must lie in [0, {n}) for {n} experts, found range [{lo}, {hi}]")


def check_routed_head_inputs(x, expert, gate, proj, w1, b1, w2, b2, *, check_range: bool = True):
    """Raise ``ValueError``/``TypeError`` naming the first bad argument of :func:`routed_head`."""
    for nm, t in (
        ("x", x),
        ("expert", expert),
        ("gate", gate),
        ("proj", proj),
        ("w1", w1),
        ("b1", b1),
        ("w2", w2),
        ("b2", b2),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (M, c), got {tuple(x.shape)}")
    m, c = x.shape
    if m == 0:
        raise ValueError("x: M = 0 rows; the routed head needs at least one pixel")
    if c == 0:
        raise ValueError("x: c = 0 channels")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if proj.dim() != 3 or proj.shape[1] != c or proj.shape[2] != c:
        raise ValueError(f"proj: expected shape (N, {c}, {c}) for x of {c} channels, got {tuple(proj.shape)}")
    num_experts = proj.shape[0]
    if num_experts == 0:
        raise ValueError("proj: N = 0 experts")
    if w1.dim() != 3 or w1.shape[0] != num_experts or w1.shape[2] != c:
        raise ValueError(f"w1: expected shape ({num_experts}, hdim, {c}), got {tuple(w1.shape)}")
    hdim = w1.shape[1]
    if hdim == 0:
        raise ValueError("w1: hdim = 0")
    expected = {
        "b1": (num_experts, hdim),
        "w2": (num_experts, hdim),
        "b2": (num_experts,),
        "gate": (m,),
        "expert": (m,),
    }
    for nm, t in (("b1", b1), ("w2", w2), ("b2", b2), ("gate", gate), ("expert", expert)):
        if tuple(t.shape) != expected[nm]:
            raise ValueError(f"{nm}: expected shape {expected[nm]}, got {tuple(t.shape)}")
    for nm, t in (("gate", gate), ("proj", proj), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{nm}: expected a floating-point tensor, got {t.dtype}")
    if expert.dtype.is_floating_point or expert.dtype.is_complex or expert.dtype == torch.bool:
        raise TypeError(f"expert: expected an integer tensor, got {expert.dtype}")
    for nm, t in (
        ("expert", expert),
        ("gate", gate),
        ("proj", proj),
        ("w1", w1),
        ("b1", b1),
        ("w2", w2),
        ("b2", b2),
    ):
        if t.device != x.device:
            raise ValueError(f"{nm}: on {t.device}, but x is on {x.device}")
    if check_range:
        _check_expert_range(expert, num_experts)


def routed_head(
    x: Tensor,
    expert: Tensor,
    gate: Tensor,
    proj: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    backend: str = "auto",
    check_range: bool = True,
) -> RoutedHeadOutput:
    """The CAL-GAN routed head (docs/design.md §3), computed only for each pixel's own expert.

    Per row ``p`` with ``e = expert[p]``: ``y = gate[p] * proj[e] @ x[p]``,
    ``z = leaky_relu(w1[e] @ y + b1[e], 0.2)``, ``logits[p] = w2[e] · z + b2[e]``; and per expert
    ``i`` over its rows: ``count[i]``, ``mean[i]`` (of y) and ``var[i]`` (mean over channels of the
    population variance of y; 0 for experts with fewer than two rows).

    Args:
        x: ``(M, c)`` float16/bfloat16/float32/float64, any strides (an NCHW map viewed as rows).
        expert: ``(M,)`` integer expert ids in ``[0, N)``.
        gate: ``(M,)`` gate values (1.0 for hard routing; carries the router's gradient).
        proj: ``(N, c, c)``; w1: ``(N, hdim, c)``; b1: ``(N, hdim)``; w2: ``(N, hdim)``; b2: ``(N,)``.
            Cast to ``x.dtype`` (differentiably) when they differ, e.g. fp32 weights under AMP.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
        check_range: check ``0 <= expert < N`` (one device synchronisation on GPU).

    Returns:
        :class:`RoutedHeadOutput` ``(logits (M,) x.dtype, count (N,) int64, mean (N, c) fp32,
        var (N,) fp32)``; fp64 inputs give fp64 statistics. Differentiable in x, gate, proj, w1,
        b1, w2, b2 through logits, mean and var.

    NaN policy: inputs are not scanned; a NaN in a row of ``x`` (or in an expert's weights)
    propagates to that row's logit and to the statistics of its expert, and nowhere else.
    """
    # The range check runs inside an op (see _expert_ids), which torch.compile traces as is.
    check_routed_head_inputs(x, expert, gate, proj, w1, b1, w2, b2, check_range=False)
    expert = _expert_ids(expert, proj.shape[0], bool(check_range))
    b = resolve_backend(backend, x.device, x.dtype)
    if not b.fused:
        with _no_autocast(x.device):
            logits, count, mean, var = b.impl().head(x, expert, gate, proj, w1, b1, w2, b2)
        sd = stat_dtype(x.dtype)
        return RoutedHeadOutput(logits.to(x.dtype), count, mean.to(sd), var.to(sd))
    dt = x.dtype
    gate, proj, w1, b1, w2, b2 = (t if t.dtype == dt else t.to(dt) for t in (gate, proj, w1, b1, w2, b2))
    fwd, _ = backend_ops(b.name)
    logits, count, mean, var = fwd(x, expert, gate, proj, w1, b1, w2, b2)[:4]
    return RoutedHeadOutput(logits, count, mean, var)
