"""Fused Triton kernels of the routed head (forward and backward), and their launchers.

Notation: M rows, c channels, N experts, hdim hidden units; ``e`` is a row's expert, ``g`` its
gate. Rows are processed in *tiles* of ``BLOCK_M`` consecutive positions of ``perm`` that all
belong to one expert (the tile map of :func:`segment_maps`), so each tile is a small dense GEMM
chain against that expert's weights, and rows of x are gathered through ``perm`` inside the GEMM
(no permuted copy of x is made).

Forward, ``_routed_head_fwd_kernel``, one program per tile; for each block of BLOCK_N output
channels: ``u = x_tile @ O_e[nblk]^T`` (fp32 accumulation over BLOCK_K slices), ``y = g * u``;
while y is in registers: ``h += y @ W1_e[:, nblk]^T``, the tile's channel sums of y and its M2
(sum of squared deviations from the tile mean, summed over channels). After the last block:
``z = lrelu(h + b1_e, 0.2)``, ``logit = z . w2_e + b2_e`` stored at the rows' own (pixel-order)
positions. ``_expert_stats_kernel``, one program per expert, merges the tiles of its expert in
tile order with Chan's formula (n, mean, M2) -> mean, var = M2 / (n c); where the tiles are many,
``_stats_group_kernel`` first merges groups of them, so the expert's program walks the groups.
The same order every run, hence deterministic, and stable (no E[y^2] - E[y]^2).

Backward (y and z recomputed, not saved):
- ``_routed_head_bwd_dy_kernel``, per tile: recompute h, then ``dh = glogit * w2_e * lrelu'(h)``;
  stores ``dh`` (fp32, perm order) and per tile partials of db1, dw2 (``glogit z``), db2; for each
  channel block
  recompute u, y and ``dy = dh @ W1_e + gmean_e / n_e + gvar_e * 2 / (n_e c) * (y - mean_e)``,
  ``dgate += sum_c dy * u``, and store ``du = g * dy`` to a scratch in perm order. When one block
  spans all c channels (``SINGLE``), the u computed for h is kept instead of recomputed.
- ``_routed_head_bwd_dx_kernel``, per tile: ``dx = du @ O_e``, stored at the rows' own
  positions: top-1 routing writes every row exactly once, so no atomics.
- ``_routed_head_bwd_dproj_kernel``, per (row slab, channel block pair): partial
  ``dO_e = du_slab^T @ x_slab``; slabs of one expert are summed in slab order by
  ``segment_sum`` (deterministic), which also reduces the classifier partials.
- ``_routed_head_bwd_dw1_kernel``, per (row slab, channel block): partial
  ``D_e = dh_slab^T (g x)_slab`` from the fp32 dh; after the slab sum ``dW1_e = D_e O_e^T`` (a
  batched matmul of N small matrices), so dW1 takes tens of partials, not one per tile.
- Merges over the tiles or slabs of an expert run in two levels when there are many: groups of
  ``merge_group()`` consecutive ones, then the groups of each expert, in a fixed order.

Tensors (T_max = cdiv(M, BLOCK_M) + N tiles, S_max = cdiv(M, SLAB_M) + N slabs; "dt" is the input
dtype, "acc" is fp32, or fp64 for fp64 inputs):
    x        (M, c)          dt    any strides (stride_xm, stride_xc)
    perm     (M,)            int64 rows grouped by expert;  offsets (N+1,) int64
    gate     (M,)            dt;   proj (N, c, c), w1 (N, hdim, c), b1 (N, hdim), w2 (N, hdim),
                                   b2 (N,)  dt, contiguous
    tile_expert/start/stop (T_max,) int32   the tile map (expert -1: no tile)
    logits   (M,)            dt    (pixel order)
    tile_sum (T_max, c)      acc   per-tile channel sums of y;  tile_m2 (T_max,) acc
    mean     (N, c), var (N,) acc
    glogits  (M,) dt;  gmean (N, c), gvar (N,) acc
    du       (M, c)          dt    scratch, perm order
    dh       (M, hdim)       acc   scratch, perm order
    cls_part (T_max, 2*hdim + 1) acc   per-tile [db1 | dw2 | db2]
    d_part   (S_max, hdim*c) acc   per-slab dh^T (g x)
    proj_part(S_max, c*c)    acc   per-slab dO
    dx (M, c) dt contiguous; dgate (M,) dt; dproj, dw1, db1, dw2, db2 like their weights
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, next_pow2
from .routing import routing_metadata, segment_groups, segment_maps, segment_sum

LRELU_SLOPE = 0.2


@triton.jit
def _tile_rows(perm_ptr, gate_ptr, tile_start_ptr, tile_stop_ptr, t, ACC: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """Positions in perm, validity, row ids and gates (0 for padding) of tile t."""
    start = tl.load(tile_start_ptr + t)
    stop = tl.load(tile_stop_ptr + t)
    pos = start + tl.arange(0, BLOCK_M)
    ok = pos < stop
    rows = tl.load(perm_ptr + pos, mask=ok, other=0)
    g = tl.load(gate_ptr + rows, mask=ok, other=0.0).to(ACC)
    return pos, ok, rows, g


@triton.jit
def _project_block(x_ptr, stride_xm, stride_xc, rows, ok, o_ptr, n0, C,
                   ACC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``u[:, n0:n0+BLOCK_N] = x[rows] @ O_e[n0:n0+BLOCK_N]^T`` with ``ACC`` accumulation."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        xb = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xc,
                     mask=ok[:, None] & k_ok[None, :], other=0.0)
        ob = tl.load(o_ptr + offs_n[None, :] * C + offs_k[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xb, ob, acc, input_precision=PREC)
    return acc


@triton.jit
def _hidden(x_ptr, stride_xm, stride_xc, rows, ok, g, o_ptr, w1e_ptr, C, H,
            ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Pre-activation ``h = (g * x[rows] @ O_e^T) @ W1_e^T`` of one tile, ``(BLOCK_M, BLOCK_H)``."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    h = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < C
        y = g[:, None] * _project_block(x_ptr, stride_xm, stride_xc, rows, ok, o_ptr, n0, C,
                                        ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        w1t = tl.load(w1e_ptr + offs_h[None, :] * C + offs_n[:, None],
                      mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        h = tl.dot(y.to(w1t.dtype), w1t, h, input_precision=PREC)
    return h


@triton.jit
def _routed_head_fwd_kernel(
    x_ptr, stride_xm, stride_xc, perm_ptr, gate_ptr, proj_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
    logits_ptr, tile_sum_ptr, tile_m2_ptr,
    C, H,
    SLOPE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        e64 = e.to(tl.int64)
        pos, ok, rows, g = _tile_rows(perm_ptr, gate_ptr, tile_start_ptr, tile_stop_ptr, t, ACC, BLOCK_M)
        n_t = tl.sum(ok.to(ACC), axis=0)
        o_ptr = proj_ptr + e64 * C * C
        w1e_ptr = w1_ptr + e64 * H * C
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        h = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
        m2 = tl.zeros([BLOCK_N], dtype=ACC)
        for n0 in range(0, C, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < C
            y = g[:, None] * _project_block(x_ptr, stride_xm, stride_xc, rows, ok, o_ptr, n0, C,
                                            ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            w1t = tl.load(w1e_ptr + offs_h[None, :] * C + offs_n[:, None],
                          mask=n_ok[:, None] & h_ok[None, :], other=0.0)
            h = tl.dot(y.to(w1t.dtype), w1t, h, input_precision=PREC)
            # Statistics of the tile while y is in registers: padded rows hold y = 0.
            s = tl.sum(y, axis=0)
            tl.store(tile_sum_ptr + t * C + offs_n, s, mask=n_ok)
            d = tl.where(ok[:, None], y - (s / n_t)[None, :], 0.0)
            m2 += tl.sum(d * d, axis=0)
        tl.store(tile_m2_ptr + t, tl.sum(m2, axis=0))
        b1v = tl.load(b1_ptr + e64 * H + offs_h, mask=h_ok, other=0.0).to(ACC)
        w2v = tl.load(w2_ptr + e64 * H + offs_h, mask=h_ok, other=0.0).to(ACC)
        hz = h + b1v[None, :]
        z = tl.where(hz > 0, hz, hz * SLOPE)
        logit = tl.sum(z * w2v[None, :], axis=1) + tl.load(b2_ptr + e64).to(ACC)
        tl.store(logits_ptr + rows, logit, mask=ok)


@triton.jit
def _chan_walk(tile_sum_ptr, tile_m2_ptr, tile_start_ptr, tile_stop_ptr, t0, t1, C, offs_c, c_ok,
               BLOCK_C: tl.constexpr):
    """(n, mean, M2) of the row sets t0 .. t1 (channel sums, M2, rows [start, stop)), merged in
    order with Chan's formula."""
    mean = tl.zeros([BLOCK_C], dtype=tile_sum_ptr.dtype.element_ty)
    n = tl.sum(mean, axis=0)  # scalar zeros of the statistics dtype
    m2 = n
    for t in range(t0, t1):
        nb = (tl.load(tile_stop_ptr + t) - tl.load(tile_start_ptr + t)).to(mean.dtype)
        mb = tl.load(tile_sum_ptr + t * C + offs_c, mask=c_ok, other=0.0) / nb
        n_new = n + nb
        delta = mb - mean
        mean += delta * (nb / n_new)
        m2 += tl.load(tile_m2_ptr + t) + tl.sum(delta * delta, axis=0) * (n * nb / n_new)
        n = n_new
    return n, mean, m2


@triton.jit
def _stats_group_kernel(tile_sum_ptr, tile_m2_ptr, tile_start_ptr, tile_stop_ptr,
                        grp_expert_ptr, grp_start_ptr, grp_stop_ptr,
                        g_sum_ptr, g_m2_ptr, g_start_ptr, g_stop_ptr, C, BLOCK_C: tl.constexpr):
    # First level of the statistics merge: the tiles of one group, as one row set (its channel
    # sums, M2 and the rows [start, stop) it covers) for the second level.
    gi = tl.program_id(0)
    if tl.load(grp_expert_ptr + gi) >= 0:
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        t0 = tl.load(grp_start_ptr + gi)
        t1 = tl.load(grp_stop_ptr + gi)
        n, mean, m2 = _chan_walk(tile_sum_ptr, tile_m2_ptr, tile_start_ptr, tile_stop_ptr, t0, t1, C,
                                 offs_c, c_ok, BLOCK_C)
        tl.store(g_sum_ptr + gi.to(tl.int64) * C + offs_c, mean * n, mask=c_ok)
        tl.store(g_m2_ptr + gi, m2)
        tl.store(g_start_ptr + gi, tl.load(tile_start_ptr + t0))
        tl.store(g_stop_ptr + gi, tl.load(tile_stop_ptr + t1 - 1))


@triton.jit
def _expert_stats_kernel(tile_sum_ptr, tile_m2_ptr, tile_start_ptr, tile_stop_ptr, tile_off_ptr,
                         mean_ptr, var_ptr, C, BLOCK_C: tl.constexpr):
    e = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    t0 = tl.load(tile_off_ptr + e)
    t1 = tl.load(tile_off_ptr + e + 1)
    n, mean, m2 = _chan_walk(tile_sum_ptr, tile_m2_ptr, tile_start_ptr, tile_stop_ptr, t0, t1, C,
                             offs_c, c_ok, BLOCK_C)
    tl.store(mean_ptr + e * C + offs_c, mean, mask=c_ok)
    tl.store(var_ptr + e, tl.where(n > 0, m2 / (tl.maximum(n, 1.0) * C), 0.0))


@triton.jit
def _classifier_grad(h, gl, e64, b1_ptr, w2_ptr, part, H,
                     SLOPE: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dh`` of a tile (in ``ACC``) from its pre-activation ``h`` and logit gradients ``gl`` (0 on
    padding); stores the tile's db1, dw2 and db2 partials at ``part``."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    hz = h + tl.load(b1_ptr + e64 * H + offs_h, mask=h_ok, other=0.0).to(ACC)[None, :]
    z = tl.where(hz > 0, hz, hz * SLOPE)
    w2v = tl.load(w2_ptr + e64 * H + offs_h, mask=h_ok, other=0.0).to(ACC)
    dz = gl[:, None] * w2v[None, :]
    dh = tl.where(hz > 0, dz, dz * SLOPE)  # a tensor times SLOPE keeps fp64 exact
    tl.store(part + offs_h, tl.sum(dh, axis=0), mask=h_ok)
    tl.store(part + H + offs_h, tl.sum(gl[:, None] * z, axis=0), mask=h_ok)
    tl.store(part + 2 * H, tl.sum(gl, axis=0))
    return dh


@triton.jit
def _dy_block(u, g, ok, pos, n0, dh, e64, n_e, coef, w1e_ptr, gmean_ptr, mean_ptr, du_ptr, C, H,
              ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """One channel block of the tile's backward from ``u = x O_e^T`` of that block: stores
    ``du = g * dy``, returns the block's share of dgate ``(BLOCK_M,)``. ``dh`` stays in ``ACC``
    (fp32): in fp16 it is often below the smallest normal number (a mean loss over M rows)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    y = g[:, None] * u
    w1b = tl.load(w1e_ptr + offs_h[:, None] * C + offs_n[None, :],
                  mask=h_ok[:, None] & n_ok[None, :], other=0.0)
    dy = tl.dot(dh, w1b.to(ACC), input_precision=PREC)
    gm = tl.load(gmean_ptr + e64 * C + offs_n, mask=n_ok, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + e64 * C + offs_n, mask=n_ok, other=0.0).to(ACC)
    # d mean_e / d y = 1 / n_e;  d var_e / d y = 2 (y - mean_e) / (n_e c)  (coef = gvar_e * 2 / (n_e c)).
    dy += gm[None, :] / n_e + coef * (y - mu[None, :])
    dy = tl.where(ok[:, None], dy, 0.0)
    tl.store(du_ptr + pos.to(tl.int64)[:, None] * C + offs_n[None, :], g[:, None] * dy,
             mask=ok[:, None] & n_ok[None, :])
    return tl.sum(dy * u, axis=1)


@triton.jit
def _store_dh(dh_ptr, pos, ok, H, BLOCK_H: tl.constexpr, dh):
    offs_h = tl.arange(0, BLOCK_H)
    tl.store(dh_ptr + pos.to(tl.int64)[:, None] * H + offs_h[None, :], dh,
             mask=ok[:, None] & (offs_h < H)[None, :])


@triton.jit
def _routed_head_bwd_dy_kernel(
    x_ptr, stride_xm, stride_xc, perm_ptr, gate_ptr, proj_ptr, w1_ptr, b1_ptr, w2_ptr,
    glogits_ptr, gmean_ptr, gvar_ptr, mean_ptr, offsets_ptr,
    tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
    du_ptr, dh_ptr, dgate_ptr, cls_part_ptr,
    C, H, LC,
    SLOPE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # SINGLE (c <= BLOCK_N): the one block of u computed for h is kept for dy, one GEMM fewer.
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        e64 = e.to(tl.int64)
        pos, ok, rows, g = _tile_rows(perm_ptr, gate_ptr, tile_start_ptr, tile_stop_ptr, t, ACC, BLOCK_M)
        n_e = (tl.load(offsets_ptr + e64 + 1) - tl.load(offsets_ptr + e64)).to(ACC)
        coef = tl.load(gvar_ptr + e64).to(ACC) * 2.0 / (n_e * C)
        o_ptr = proj_ptr + e64 * C * C
        w1e_ptr = w1_ptr + e64 * H * C
        gl = tl.load(glogits_ptr + rows, mask=ok, other=0.0).to(ACC)  # 0 on padded rows
        part = cls_part_ptr + t.to(tl.int64) * LC
        if SINGLE:
            u = _project_block(x_ptr, stride_xm, stride_xc, rows, ok, o_ptr, 0, C,
                               ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            offs_n = tl.arange(0, BLOCK_N)
            offs_h = tl.arange(0, BLOCK_H)
            w1t = tl.load(w1e_ptr + offs_h[None, :] * C + offs_n[:, None],
                          mask=(offs_n < C)[:, None] & (offs_h < H)[None, :], other=0.0)
            h = tl.dot((g[:, None] * u).to(w1t.dtype), w1t, input_precision=PREC).to(ACC)
            dh = _classifier_grad(h, gl, e64, b1_ptr, w2_ptr, part, H, SLOPE, ACC, BLOCK_H)
            _store_dh(dh_ptr, pos, ok, H, BLOCK_H, dh)
            dg = _dy_block(u, g, ok, pos, 0, dh, e64, n_e, coef, w1e_ptr, gmean_ptr, mean_ptr, du_ptr,
                           C, H, ACC, PREC, BLOCK_N, BLOCK_H)
        else:
            h = _hidden(x_ptr, stride_xm, stride_xc, rows, ok, g, o_ptr, w1e_ptr, C, H,
                        ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_H)
            dh = _classifier_grad(h, gl, e64, b1_ptr, w2_ptr, part, H, SLOPE, ACC, BLOCK_H)
            _store_dh(dh_ptr, pos, ok, H, BLOCK_H, dh)
            dg = tl.zeros([BLOCK_M], dtype=ACC)
            for n0 in range(0, C, BLOCK_N):
                u = _project_block(x_ptr, stride_xm, stride_xc, rows, ok, o_ptr, n0, C,
                                   ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
                dg += _dy_block(u, g, ok, pos, n0, dh, e64, n_e, coef, w1e_ptr, gmean_ptr, mean_ptr,
                                du_ptr, C, H, ACC, PREC, BLOCK_N, BLOCK_H)
        tl.store(dgate_ptr + rows, dg, mask=ok)


@triton.jit
def _routed_head_bwd_dx_kernel(
    du_ptr, perm_ptr, proj_ptr, tile_expert_ptr, tile_start_ptr, tile_stop_ptr, dx_ptr, C,
    ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    kb = tl.program_id(1)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        o_ptr = proj_ptr + e.to(tl.int64) * C * C
        start = tl.load(tile_start_ptr + t)
        stop = tl.load(tile_stop_ptr + t)
        pos = start + tl.arange(0, BLOCK_M)
        ok = pos < stop
        rows = tl.load(perm_ptr + pos, mask=ok, other=0)
        offs_k = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = offs_k < C
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for n0 in range(0, C, BLOCK_K):
            offs_n = n0 + tl.arange(0, BLOCK_K)
            n_ok = offs_n < C
            dub = tl.load(du_ptr + pos.to(tl.int64)[:, None] * C + offs_n[None, :],
                          mask=ok[:, None] & n_ok[None, :], other=0.0)
            ob = tl.load(o_ptr + offs_n[:, None] * C + offs_k[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dub, ob, acc, input_precision=PREC)
        tl.store(dx_ptr + rows[:, None] * C + offs_k[None, :], acc, mask=ok[:, None] & k_ok[None, :])


@triton.jit
def _routed_head_bwd_dproj_kernel(
    du_ptr, x_ptr, stride_xm, stride_xc, perm_ptr, slab_expert_ptr, slab_start_ptr, slab_stop_ptr,
    proj_part_ptr, C,
    ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s = tl.program_id(0)
    e = tl.load(slab_expert_ptr + s)
    if e >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = offs_n < C
        k_ok = offs_k < C
        start = tl.load(slab_start_ptr + s)
        stop = tl.load(slab_stop_ptr + s)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        for r0 in range(start, stop, BLOCK_M):
            pos = r0 + tl.arange(0, BLOCK_M)
            ok = pos < stop
            rows = tl.load(perm_ptr + pos, mask=ok, other=0)
            dut = tl.load(du_ptr + pos.to(tl.int64)[None, :] * C + offs_n[:, None],
                          mask=n_ok[:, None] & ok[None, :], other=0.0)
            xb = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xc,
                         mask=ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dut, xb, acc, input_precision=PREC)
        tl.store(proj_part_ptr + s.to(tl.int64) * C * C + offs_n[:, None] * C + offs_k[None, :], acc,
                 mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _routed_head_bwd_dw1_kernel(
    dh_ptr, x_ptr, stride_xm, stride_xc, perm_ptr, gate_ptr, slab_expert_ptr, slab_start_ptr, slab_stop_ptr,
    d_part_ptr, C, H,
    ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Per row slab and block of input channels: D = sum over the slab of dh^T (g x) in ACC, with fp32
    # (TF32 for fp16/bf16 inputs) operands; dW1_e = D_e O_e^T once the slabs are summed.
    s = tl.program_id(0)
    e = tl.load(slab_expert_ptr + s)
    if e >= 0:
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        start = tl.load(slab_start_ptr + s)
        stop = tl.load(slab_stop_ptr + s)
        acc = tl.zeros([BLOCK_H, BLOCK_K], dtype=ACC)
        for r0 in range(start, stop, BLOCK_M):
            pos = r0 + tl.arange(0, BLOCK_M)
            ok = pos < stop
            rows = tl.load(perm_ptr + pos, mask=ok, other=0)
            g = tl.load(gate_ptr + rows, mask=ok, other=0.0).to(ACC)
            dht = tl.load(dh_ptr + pos.to(tl.int64)[None, :] * H + offs_h[:, None],
                          mask=h_ok[:, None] & ok[None, :], other=0.0)
            xb = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xc,
                         mask=ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
            acc = tl.dot(dht, xb * g[:, None], acc, input_precision=PREC)
        tl.store(d_part_ptr + s.to(tl.int64) * H * C + offs_h[:, None] * C + offs_k[None, :], acc,
                 mask=h_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _config(m: int, c: int, hdim: int, dtype: torch.dtype, device: torch.device) -> _Cfg:
    return _Cfg(m, c, hdim, dtype, device)


class _Cfg:
    """Tile sizes and launch options for one (M, c, hdim, dtype, device).

    Fixed per shape rather than autotuned: an autotuner may pick different tiles in different
    processes, which changes the order of the reductions and breaks run-to-run bitwise equality.
    """

    def __init__(self, m: int, c: int, hdim: int, dtype: torch.dtype, device: torch.device,
                 sms: int | None = None):
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.tl_acc = tl.float64 if dtype == torch.float64 else tl.float32
        self.block_h = max(16, next_pow2(hdim))
        self.block_c = next_pow2(c)
        if INTERPRET:
            # Tiles smaller than the test shapes so that experts span several tiles and slabs.
            self.block_m = 16
            self.head_n = self.head_k = self.block_n = self.block_k = self.dy_n = 16
            self.slab_m = 32
            self.num_warps, self.num_stages = 1, 1
            self.prec, self.tf32_capable = "ieee", False  # the interpreter's dots are exact anyway
            return
        cp = max(16, next_pow2(c))
        self.block_m = 64
        self.num_warps = 8 if cp >= 128 else 4
        self.num_stages = 3
        # Fused head kernels (forward, dy): up to c = 256 a tile's whole row block of y (64 x 256
        # fp32) stays in registers, so x is read once per tile and the backward keeps u instead
        # of recomputing it; 32-wide k slices keep that free of register spills on sm_90.
        # 128-wide channel blocks: a 64 x 256 fp32 block of y does not fit the registers next to h
        # without spills on sm_80; the dy kernel, which also holds dh and dgate, takes 64.
        self.head_n = min(128, cp)
        self.head_k = min(32, cp)
        self.dy_n = min(64, cp)
        # Plain GEMMs (dx, dO): 64 x 128 x 32 tiles (64-deep k slices spill 16 B in dx on sm_80).
        self.block_n = min(128, cp)
        self.block_k = min(32, cp)
        if dtype == torch.float32:
            # Exact fp32 dots run on FMA units and hold their operands in registers: smaller tiles
            # (32-row tiles and 16-deep k slices keep them free of spills on sm_80 and sm_90).
            self.block_m = 32
            self.head_n = self.block_n = min(64, cp)
            self.dy_n = min(32, cp)
            self.head_k = self.block_k = min(16, cp)
            self.num_warps = 8
        if dtype == torch.float64:
            # fp64 tiles are 4x the bytes of bf16 ones: smaller tiles, fewer stages.
            self.head_n = self.dy_n = self.block_n = min(64, cp)
            self.head_k = self.block_k = min(32, cp)
            self.num_warps, self.num_stages = 4, 2
        # With fp16/bf16 inputs every dot has fp16/bf16 operands, for which this is ignored;
        # fp32 inputs follow torch's TF32 switch at each call (see gemm()).
        self.prec = "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
        self.tf32_capable = dtype == torch.float32
        # Row slabs of the dO reduction: enough (slab, block, block) programs to fill the GPU
        # a few times over, so that even c = 256 with few experts keeps every SM busy.
        blocks = triton.cdiv(c, self.block_n) * triton.cdiv(c, self.block_k)
        if sms is None:  # the multiprocessors of the device (a compile report names its own)
            cuda = device.type == "cuda"
            sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
        slabs = max(1, (4 * sms) // blocks)
        self.slab_m = max(self.block_m, triton.cdiv(triton.cdiv(m, slabs), self.block_m) * self.block_m)

    def gemm(self, head: bool | str = False):
        """Launch keywords of the fused forward (``head=True``), of the dy kernel (``head="dy"``) or
        of the plain GEMM kernels."""
        # fp32 dots follow torch.backends.cuda.matmul.allow_tf32 (off by default: exact fp32).
        prec = "tf32" if (self.tf32_capable and torch.backends.cuda.matmul.allow_tf32) else self.prec
        return {"ACC": self.tl_acc, "PREC": prec, "BLOCK_M": self.block_m,
                "BLOCK_N": self.dy_n if head == "dy" else (self.head_n if head else self.block_n),
                "BLOCK_K": self.head_k if head else self.block_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


def routed_head_fwd(x, expert, gate, proj, w1, b1, w2, b2):
    """Fused forward of the routed head.

    Args: x ``(M, c)`` (any strides), expert ``(M,)`` int64, gate ``(M,)``, proj ``(N, c, c)``,
    w1 ``(N, hdim, c)``, b1 ``(N, hdim)``, w2 ``(N, hdim)``, b2 ``(N,)``, all floats in one dtype
    (fp16, bf16 on GPU only, fp32 or fp64), weights contiguous.

    Returns ``(logits (M,) x.dtype, count (N,) int64, mean (N, c), var (N,), perm (M,) int64,
    offsets (N+1,) int64)``, statistics in fp32 (fp64 for fp64 inputs).
    """
    m, c = x.shape
    n_exp, hdim = w1.shape[0], w1.shape[1]
    cfg = _config(m, c, hdim, x.dtype, x.device)
    count, offsets, perm, tiles = routing_metadata(expert, n_exp, cfg.block_m)
    tile_off, tile_expert, tile_start, tile_stop = tiles
    t_max = tile_expert.shape[0]
    logits = torch.empty(m, dtype=x.dtype, device=x.device)
    tile_sum = torch.empty(t_max, c, dtype=cfg.acc, device=x.device)
    tile_m2 = torch.empty(t_max, dtype=cfg.acc, device=x.device)
    _routed_head_fwd_kernel[(t_max,)](
        x, x.stride(0), x.stride(1), perm, gate, proj, w1, b1, w2, b2,
        tile_expert, tile_start, tile_stop, logits, tile_sum, tile_m2, c, hdim,
        SLOPE=LRELU_SLOPE, BLOCK_H=cfg.block_h, **cfg.gemm(head=True),
    )
    mean = torch.empty(n_exp, c, dtype=cfg.acc, device=x.device)
    var = torch.empty(n_exp, dtype=cfg.acc, device=x.device)
    groups = segment_groups(tile_off, t_max)
    if groups is not None:  # two levels: groups of tiles, then each expert's groups
        grp_off, grp_expert, grp_start, grp_stop = groups
        g_max = grp_expert.shape[0]
        g_sum = torch.empty(g_max, c, dtype=cfg.acc, device=x.device)
        g_m2 = torch.empty(g_max, dtype=cfg.acc, device=x.device)
        g_start = torch.empty(g_max, dtype=torch.int32, device=x.device)
        g_stop = torch.empty(g_max, dtype=torch.int32, device=x.device)
        _stats_group_kernel[(g_max,)](tile_sum, tile_m2, tile_start, tile_stop, grp_expert, grp_start,
                                      grp_stop, g_sum, g_m2, g_start, g_stop, c, BLOCK_C=cfg.block_c)
        tile_sum, tile_m2, tile_start, tile_stop, tile_off = g_sum, g_m2, g_start, g_stop, grp_off
    _expert_stats_kernel[(n_exp,)](tile_sum, tile_m2, tile_start, tile_stop, tile_off, mean, var, c,
                                   BLOCK_C=cfg.block_c)
    return logits, count, mean, var, perm, offsets


def routed_head_bwd(glogits, gmean, gvar, x, gate, proj, w1, b1, w2, b2, mean, perm, offsets):
    """Fused backward of the routed head; y and z are recomputed from x.

    Args: glogits ``(M,)``, gmean ``(N, c)``, gvar ``(N,)`` (the output gradients), the forward
    inputs (one float dtype, weights contiguous), the expert means ``(N, c)`` and the routing
    metadata ``perm (M,)`` / ``offsets (N+1,)`` of the forward.

    Returns ``(dx (M, c) contiguous, dgate (M,), dproj, dw1, db1, dw2, db2)``, each in the dtype of
    the matching input.
    """
    m, c = x.shape
    n_exp, hdim = w1.shape[0], w1.shape[1]
    cfg = _config(m, c, hdim, x.dtype, x.device)
    dev = x.device
    tiles, slabs = segment_maps(offsets, m, cfg.block_m, cfg.slab_m)
    tile_off, tile_expert, tile_start, tile_stop = tiles
    slab_off, slab_expert, slab_start, slab_stop = slabs
    t_max = tile_expert.shape[0]
    s_max = slab_expert.shape[0]
    lc = 2 * hdim + 1
    du = torch.empty(m, c, dtype=x.dtype, device=dev)
    dh = torch.empty(m, hdim, dtype=cfg.acc, device=dev)
    dgate = torch.empty(m, dtype=gate.dtype, device=dev)
    cls_part = torch.empty(t_max, lc, dtype=cfg.acc, device=dev)
    gmean = gmean.to(cfg.acc).contiguous()
    gvar = gvar.to(cfg.acc).contiguous()
    glogits = glogits.contiguous()
    _routed_head_bwd_dy_kernel[(t_max,)](
        x, x.stride(0), x.stride(1), perm, gate, proj, w1, b1, w2,
        glogits, gmean, gvar, mean, offsets, tile_expert, tile_start, tile_stop,
        du, dh, dgate, cls_part, c, hdim, lc,
        SLOPE=LRELU_SLOPE, SINGLE=c <= cfg.dy_n, BLOCK_H=cfg.block_h, **cfg.gemm(head="dy"),
    )
    dx = torch.empty(m, c, dtype=x.dtype, device=dev)
    _routed_head_bwd_dx_kernel[(t_max, triton.cdiv(c, cfg.block_n))](
        du, perm, proj, tile_expert, tile_start, tile_stop, dx, c, **cfg.gemm(),
    )
    proj_part = torch.empty(s_max, c * c, dtype=cfg.acc, device=dev)
    _routed_head_bwd_dproj_kernel[(s_max, triton.cdiv(c, cfg.block_n), triton.cdiv(c, cfg.block_k))](
        du, x, x.stride(0), x.stride(1), perm, slab_expert, slab_start, slab_stop, proj_part, c,
        **cfg.gemm(),
    )
    d_part = torch.empty(s_max, hdim * c, dtype=cfg.acc, device=dev)
    g = cfg.gemm()
    _routed_head_bwd_dw1_kernel[(s_max, triton.cdiv(c, cfg.block_k))](
        dh, x, x.stride(0), x.stride(1), perm, gate, slab_expert, slab_start, slab_stop, d_part, c, hdim,
        ACC=g["ACC"], PREC=g["PREC"], BLOCK_M=g["BLOCK_M"], BLOCK_K=g["BLOCK_K"], BLOCK_H=cfg.block_h,
        num_warps=g["num_warps"], num_stages=g["num_stages"],
    )
    slab_groups = segment_groups(slab_off, s_max)
    dproj = segment_sum(proj_part, slab_off, slab_groups).view(n_exp, c, c).to(proj.dtype)
    d = segment_sum(d_part, slab_off, slab_groups).view(n_exp, hdim, c)
    dw1 = torch.bmm(d, proj.to(cfg.acc).transpose(1, 2)).to(w1.dtype)  # dW1_e = D_e O_e^T
    cls = segment_sum(cls_part, tile_off)
    # Separate tensors (copy=True): the outputs of a custom op may not alias each other.
    db1 = cls[:, :hdim].to(b1.dtype, copy=True)
    dw2 = cls[:, hdim : 2 * hdim].to(w2.dtype, copy=True)
    db2 = cls[:, 2 * hdim].to(b2.dtype, copy=True)
    return dx, dgate, dproj, dw1, db1, dw2, db2
