"""The ``torch`` backend of the routed head: sort rows by expert, one GEMM chain per expert.

Plain PyTorch, runs on any device. No ``(M, N, ·)`` tensor is formed; backward recomputes the
projection ``y`` and the hidden activation ``z`` of each expert's rows from ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import LRELU_SLOPE, routing_metadata_ref


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x, expert, gate, proj, w1, b1, w2, b2, backend="torch"):
    """Returns ``(logits (M,) x.dtype, count (N,), mean (N, c), var (N,), perm (M,), offsets (N+1,))``."""
    m, c = x.shape
    n_exp = proj.shape[0]
    acc = _acc_dtype(x.dtype)
    count, offsets, perm = routing_metadata_ref(expert, n_exp)
    logits = torch.empty(m, dtype=acc, device=x.device)
    mean = torch.zeros(n_exp, c, dtype=acc, device=x.device)
    var = torch.zeros(n_exp, dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(n_exp):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        idx = perm[lo:hi]
        xe = x.index_select(0, idx).to(acc)
        y = gate.index_select(0, idx).to(acc)[:, None] * (xe @ proj[e].to(acc).t())
        z = F.leaky_relu(torch.addmm(b1[e].to(acc), y, w1[e].to(acc).t()), LRELU_SLOPE)
        logits[idx] = z @ w2[e].to(acc) + b2[e].to(acc)
        mu = y.mean(0)
        mean[e] = mu
        var[e] = (y - mu).square().mean()
    return logits.to(x.dtype), count, mean, var, perm, offsets


def backward(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm, offsets, backend="torch"):
    """Gradients ``(dx, dgate, dproj, dw1, db1, dw2, db2)`` in the dtypes of the inputs."""
    m, c = x.shape
    n_exp = proj.shape[0]
    acc = _acc_dtype(x.dtype)
    dev = x.device
    dx = torch.zeros(m, c, dtype=acc, device=dev)
    dgate = torch.zeros(m, dtype=acc, device=dev)
    dproj = torch.zeros(proj.shape, dtype=acc, device=dev)
    dw1 = torch.zeros(w1.shape, dtype=acc, device=dev)
    db1 = torch.zeros(b1.shape, dtype=acc, device=dev)
    dw2 = torch.zeros(w2.shape, dtype=acc, device=dev)
    db2 = torch.zeros(b2.shape, dtype=acc, device=dev)
    glogits = glogits.to(acc)
    gmean = gmean.to(acc)
    gvar = gvar.to(acc)
    bounds = offsets.tolist()
    for e in range(n_exp):
        lo, hi = bounds[e], bounds[e + 1]
        n = hi - lo
        if n == 0:
            continue
        idx = perm[lo:hi]
        xe = x.index_select(0, idx).to(acc)
        ge = gate.index_select(0, idx).to(acc)
        o_e = proj[e].to(acc)
        w1_e = w1[e].to(acc)
        u = xe @ o_e.t()
        y = ge[:, None] * u
        h = torch.addmm(b1[e].to(acc), y, w1_e.t())
        z = F.leaky_relu(h, LRELU_SLOPE)
        gl = glogits.index_select(0, idx)
        dw2[e] = gl @ z
        db2[e] = gl.sum()
        slope = (h > 0).to(acc) * (1.0 - LRELU_SLOPE) + LRELU_SLOPE  # d leaky_relu / dh
        dh = (gl[:, None] * w2[e].to(acc)[None, :]) * slope
        dw1[e] = dh.t() @ y
        db1[e] = dh.sum(0)
        dy = dh @ w1_e
        # Statistics: d mean_e / d y_p = 1/n; d var_e / d y_p = 2 (y_p - mean_e) / (n c).
        dy = dy + gmean[e] / n + (gvar[e] * 2.0 / (n * c)) * (y - mean[e].to(acc))
        dgate[idx] = (dy * u).sum(1)
        du = ge[:, None] * dy
        dproj[e] = du.t() @ xe
        dx[idx] = du @ o_e
    return (
        dx.to(x.dtype),
        dgate.to(gate.dtype),
        dproj.to(proj.dtype),
        dw1.to(w1.dtype),
        db1.to(b1.dtype),
        dw2.to(w2.dtype),
        db2.to(b2.dtype),
    )
