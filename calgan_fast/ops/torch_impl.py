"""The ``torch`` backend of the routed head: sort rows by expert, one GEMM chain per expert.

Plain PyTorch, runs on any device. No ``(M, N, ·)`` tensor is formed; backward recomputes the
projection ``y`` and the hidden activation ``z`` of each expert's rows from ``x``. The rows are
gathered into expert order once, each expert works on a contiguous slice, and results go back to
pixel order with one scatter, so the cost is the per-expert GEMMs plus a few passes over ``(M, c)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import LRELU_SLOPE, stat_dtype
from ..reference import routing_metadata_ref as routing_metadata

Tensors7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]

__all__ = ["backward", "forward", "routing_metadata"]


def _centred(w: Tensor) -> Tensor:
    """``w`` minus its column means, in two passes: the second removes what rounding the first
    mean left (an error of the order of ``w``'s ulp, not of its spread)."""
    w = w - w.mean(0, keepdim=True)
    return w.sub_(w.mean(0, keepdim=True))


def forward(
    x: Tensor, expert: Tensor, gate: Tensor, proj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensors7:
    """Returns ``(logits (M,) x.dtype, count (N,), mean (N, c), var (N,), perm (M,), offsets (N+1,),
    xcov (0,))``: the backward keeps nothing else of the forward, so ``xcov`` is empty."""
    m, c = x.shape
    num_experts = proj.shape[0]
    acc = stat_dtype(x.dtype)
    # An id out of range (possible with check_range=False) is clamped, never used as an index.
    count, offsets, perm = routing_metadata(expert.clamp(0, num_experts - 1), num_experts)
    xs = x.index_select(0, perm).to(acc)  # rows in expert order
    gs = gate.index_select(0, perm).to(acc)
    logits_s = torch.empty(m, dtype=acc, device=x.device)
    mean = torch.zeros(num_experts, c, dtype=acc, device=x.device)
    var = torch.zeros(num_experts, dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        o_e = proj[e].to(acc)
        y = torch.mm(xs[lo:hi], o_e.t()).mul_(gs[lo:hi, None])
        z = F.leaky_relu_(torch.addmm(b1[e].to(acc), y, w1[e].to(acc).t()), LRELU_SLOPE)
        torch.addmv(b2[e].to(acc), z, w2[e].to(acc), out=logits_s[lo:hi])
        mean[e] = y.mean(0)
        # The variance from the centred gated rows: exact however large the mean is against the spread.
        # A second GEMM on purpose: the logits come from y itself, not from the centred rows, so that a
        # NaN in one row stays in that row's logit (centring would spread it over the expert's rows).
        var[e] = torch.mm(_centred(xs[lo:hi] * gs[lo:hi, None]), o_e.t()).square().mean()
    logits = torch.empty_like(logits_s).index_copy_(0, perm, logits_s)
    return logits.to(x.dtype), count, mean, var, perm, offsets, mean.new_empty(0)


def backward(
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
) -> Tensors7:
    """Gradients ``(dx, dgate, dproj, dw1, db1, dw2, db2)`` in the dtypes of the inputs."""
    m, c = x.shape
    num_experts = proj.shape[0]
    acc = stat_dtype(x.dtype)
    dev = x.device
    xs = x.index_select(0, perm).to(acc)
    gs = gate.index_select(0, perm).to(acc)
    gls = glogits.index_select(0, perm).to(acc)
    gmean = gmean.to(acc)
    gvar = gvar.to(acc)
    dxs = torch.zeros(m, c, dtype=acc, device=dev)
    dgs = torch.zeros(m, dtype=acc, device=dev)
    dproj = torch.zeros(proj.shape, dtype=acc, device=dev)
    dw1 = torch.zeros(w1.shape, dtype=acc, device=dev)
    db1 = torch.zeros(b1.shape, dtype=acc, device=dev)
    dw2 = torch.zeros(w2.shape, dtype=acc, device=dev)
    db2 = torch.zeros(b2.shape, dtype=acc, device=dev)
    bounds = offsets.tolist()
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        rows = hi - lo
        if rows == 0:
            continue
        xe, ge, gl = xs[lo:hi], gs[lo:hi, None], gls[lo:hi]
        o_e = proj[e].to(acc)
        w1_e = w1[e].to(acc)
        u = torch.mm(xe, o_e.t())
        y = u * ge
        h = torch.addmm(b1[e].to(acc), y, w1_e.t())
        z = F.leaky_relu(h, LRELU_SLOPE)
        torch.mv(z.t(), gl, out=dw2[e])
        db2[e] = gl.sum()
        slope = (h > 0).to(acc).mul_(1.0 - LRELU_SLOPE).add_(LRELU_SLOPE)  # d leaky_relu / dh
        dh = slope.mul_(gl[:, None]).mul_(w2[e].to(acc))
        torch.mm(dh.t(), y, out=dw1[e])
        db1[e] = dh.sum(0)
        # Statistics: d mean_e / d y_p = 1/count_e; d var_e / d y_p = 2 (y_p - mean_e) / (count_e c). With the
        # gated rows w_p = gate_p x_p centred, y_p - mean_e = proj_e (w_p - mean w) =: yc_p is formed
        # without cancellation, and the variance's share of d proj_e, k sum_p yc_p w_p^T, equals
        # k yc^T (w - mean w) (the yc_p sum to zero): a cross-covariance, never a difference of
        # large sums.
        k = gvar[e] * 2.0 / (rows * c)
        wc = _centred(xe * ge)
        yc = torch.mm(wc, o_e.t())
        dy_rest = torch.addmm(gmean[e] / rows, dh, w1_e)
        dy = dy_rest + k * yc
        torch.linalg.vecdot(dy, u, out=dgs[lo:hi])
        torch.mm(dy_rest.mul_(ge).t(), xe, out=dproj[e])
        dproj[e].addmm_(yc.t(), wc, alpha=k)
        torch.mm(dy.mul_(ge), o_e, out=dxs[lo:hi])
    dx = torch.empty_like(dxs).index_copy_(0, perm, dxs)
    dgate = torch.empty_like(dgs).index_copy_(0, perm, dgs)
    return (
        dx.to(x.dtype),
        dgate.to(gate.dtype),
        dproj.to(proj.dtype),
        dw1.to(w1.dtype),
        db1.to(b1.dtype),
        dw2.to(w2.dtype),
        db2.to(b2.dtype),
    )
