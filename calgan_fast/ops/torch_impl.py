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


def forward(
    x: Tensor, expert: Tensor, gate: Tensor, proj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensors7:
    """Returns ``(logits (M,) x.dtype, count (N,), mean (N, c), var (N,), perm (M,), offsets (N+1,),
    xcov (0,))``: the backward keeps nothing else of the forward, so ``xcov`` is empty."""
    m, c = x.shape
    num_experts = proj.shape[0]
    acc = stat_dtype(x.dtype)
    count, offsets, perm = routing_metadata(expert, num_experts)
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
        y = torch.mm(xs[lo:hi], proj[e].to(acc).t()).mul_(gs[lo:hi, None])
        z = F.leaky_relu_(torch.addmm(b1[e].to(acc), y, w1[e].to(acc).t()), LRELU_SLOPE)
        torch.addmv(b2[e].to(acc), z, w2[e].to(acc), out=logits_s[lo:hi])
        v, mu = torch.var_mean(y, dim=0, correction=0)
        mean[e] = mu
        var[e] = v.mean()
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
        # Statistics: d mean_e / d y_p = 1/count_e; d var_e / d y_p = 2 (y_p - mean_e) / (count_e c).
        k = gvar[e] * 2.0 / (rows * c)
        dy = torch.addmm(gmean[e] / rows - k * mean[e].to(acc), dh, w1_e).add_(y, alpha=k)
        torch.linalg.vecdot(dy, u, out=dgs[lo:hi])
        du = dy.mul_(ge)
        torch.mm(du.t(), xe, out=dproj[e])
        torch.mm(du, o_e, out=dxs[lo:hi])
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
