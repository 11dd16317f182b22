"""Triton kernels for the routing metadata of the routed head, and their launchers.

Algorithm (a stable counting sort of the M rows by their top-1 expert, no host synchronisation):

1. ``_routing_hist_kernel``, one program per block of ``BLOCK`` rows: per-block expert histogram
   ``blk_count[b, e]`` from a one-hot ``(BLOCK, NP)`` compare.
2. ``_routing_scan_kernel``, one program: walks the blocks in order keeping a running count per
   expert; writes ``blk_base[b, e]`` (rows of expert e in blocks before b), ``count[e]`` and the
   exclusive prefix sum ``offsets``.
3. ``_routing_scatter_kernel``, one program per block: the rank of each row among the earlier rows
   of its block with the same expert (exclusive cumsum of the one-hot), so row r of expert e lands
   at ``offsets[e] + blk_base[b, e] + rank``. Rows of one expert keep their order: stable,
   deterministic, every slot of ``perm`` written exactly once.
4. ``_segment_map_kernel``: cuts every expert's range of ``perm`` into segments of ``SEG_M``
   rows (compute tiles, or the row slabs of a weight gradient; ``SEG_M`` is a runtime argument,
   like every size that depends on M: one compiled kernel serves all M) and writes, per segment
   id, its expert (``-1`` past the last segment), its first and one-past-last position in ``perm``, and
   the per-expert segment offsets. Grids are sized by the bound ``cdiv(M, SEG_M) + N`` on the
   number of segments, so no count ever travels to the host.
5. ``_segment_sum_kernel``: sums per-segment partials of one expert in segment order (a fixed
   order, hence deterministic) -- the reduction of every weight gradient.

Tensors (M rows, N experts, NP = next power of two >= N, NB = cdiv(M, BLOCK)):
    expert    (M,)        int64   top-1 expert id of each row, in [0, N)
    blk_count (NB, NP)    int32   per-block histogram
    blk_base  (NB, NP)    int32   rows of each expert in earlier blocks
    count     (N,)        int64   rows per expert
    offsets   (N + 1,)    int64   exclusive prefix sum of count; offsets[N] = M
    perm      (M,)        int64   rows grouped by expert, original order inside a group
    seg_off   (N + 1,)    int64   segments of experts < e come before seg_off[e]
    seg_expert(S_max,)    int32   expert of each segment, -1 for unused ids
    seg_start, seg_stop (S_max,) int32  positions [start, stop) in perm of each segment
    part      (S_max, L)  float   per-segment partials;  out (N, L): their per-expert sums
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import HIST_BLOCK, INTERPRET, ROWS_WARPS, next_pow2


@triton.jit
def _clamped_ids(expert_ptr, rows, ok, N):
    """Expert ids of ``rows`` clamped into ``[0, N)`` (-1 where not ``ok``): an id out of range
    never indexes memory; its row counts for expert 0 (id < 0) or N - 1 (id >= N)."""
    e = tl.load(expert_ptr + rows, mask=ok, other=0)
    e = tl.minimum(tl.maximum(e, 0), N - 1)
    return tl.where(ok, e, -1)


@triton.jit
def _routing_hist_kernel(expert_ptr, blk_count_ptr, M, N, BLOCK: tl.constexpr, NP: tl.constexpr):
    b = tl.program_id(0)
    rows = b * BLOCK + tl.arange(0, BLOCK)
    e = _clamped_ids(expert_ptr, rows, rows < M, N)
    ex = tl.arange(0, NP)
    onehot = (e[:, None] == ex[None, :]).to(tl.int32)
    tl.store(blk_count_ptr + b * NP + ex, tl.sum(onehot, axis=0))


@triton.jit
def _write_segments(lo, hi, ex, N, s0, seg_off_ptr, seg_expert_ptr, seg_start_ptr, seg_stop_ptr, S_MAX,
                    SEG_M, BLOCK: tl.constexpr):
    """Map entries of segment ids ``s0 .. s0 + BLOCK`` from expert row ranges ``[lo, hi)`` (NP,)."""
    nseg = (hi - lo + SEG_M - 1) // SEG_M
    seg_end = tl.cumsum(nseg, axis=0)  # inclusive; padded experts own no segment
    seg_beg = seg_end - nseg
    total = tl.sum(nseg, axis=0)
    if s0 == 0:
        tl.store(seg_off_ptr + ex + 1, seg_end, mask=ex < N)
        tl.store(seg_off_ptr, total * 0)
    s = s0 + tl.arange(0, BLOCK)
    # Expert of segment s: the number of experts whose segments all end at or before s.
    e = tl.sum((seg_end[None, :] <= s[:, None]).to(tl.int32), axis=1)
    sel = ex[None, :] == e[:, None]
    beg = tl.sum(tl.where(sel, seg_beg[None, :], 0), axis=1)
    row_lo = tl.sum(tl.where(sel, lo[None, :], 0), axis=1)
    row_hi = tl.sum(tl.where(sel, hi[None, :], 0), axis=1)
    start = row_lo + (s - beg) * SEG_M
    stop = tl.minimum(start + SEG_M, row_hi)
    valid = s < total
    ok = s < S_MAX
    tl.store(seg_expert_ptr + s, tl.where(valid, e, -1).to(tl.int32), mask=ok)
    tl.store(seg_start_ptr + s, tl.where(valid, start, 0).to(tl.int32), mask=ok)
    tl.store(seg_stop_ptr + s, tl.where(valid, stop, 0).to(tl.int32), mask=ok)


@triton.jit
def _routing_scan_kernel(blk_count_ptr, blk_base_ptr, count_ptr, offsets_ptr, NB, N,
                         seg_off_ptr, seg_expert_ptr, seg_start_ptr, seg_stop_ptr, S_MAX, SEG_M,
                         SEG_BLOCK: tl.constexpr, CHUNK: tl.constexpr, NP: tl.constexpr):
    ex = tl.arange(0, NP)
    running = tl.zeros([NP], dtype=tl.int32)
    for b0 in range(0, NB, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        ok = (bs < NB)[:, None]
        ptrs = bs[:, None] * NP + ex[None, :]
        cnt = tl.load(blk_count_ptr + ptrs, mask=ok, other=0)
        before = tl.cumsum(cnt, axis=0) - cnt
        tl.store(blk_base_ptr + ptrs, before + running[None, :], mask=ok)
        running += tl.sum(cnt, axis=0)
    total = tl.sum(running, axis=0)
    excl = tl.cumsum(running, axis=0) - running
    tl.store(count_ptr + ex, running.to(tl.int64), mask=ex < N)
    tl.store(offsets_ptr + ex, excl.to(tl.int64), mask=ex < N)
    tl.store(offsets_ptr + N, total.to(tl.int64))
    # The tile map of the compute kernels, from the same registers (saves a launch).
    lo = excl.to(tl.int64)
    hi = lo + running.to(tl.int64)
    for s0 in range(0, S_MAX, SEG_BLOCK):
        _write_segments(lo, hi, ex, N, s0, seg_off_ptr, seg_expert_ptr, seg_start_ptr, seg_stop_ptr,
                        S_MAX, SEG_M, SEG_BLOCK)


@triton.jit
def _routing_scatter_kernel(expert_ptr, blk_base_ptr, offsets_ptr, perm_ptr, M, N,
                            BLOCK: tl.constexpr, NP: tl.constexpr):
    b = tl.program_id(0)
    rows = b * BLOCK + tl.arange(0, BLOCK)
    ok = rows < M
    e = _clamped_ids(expert_ptr, rows, ok, N)
    ex = tl.arange(0, NP)
    onehot = (e[:, None] == ex[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    ec = tl.where(ok, e, 0)
    base = tl.load(blk_base_ptr + b * NP + ec, mask=ok, other=0).to(tl.int64)
    base += tl.load(offsets_ptr + ec, mask=ok, other=0)
    tl.store(perm_ptr + base + rank, rows.to(tl.int64), mask=ok)


@triton.jit
def _segment_map_kernel(offsets_ptr, N,
                        off_a_ptr, exp_a_ptr, start_a_ptr, stop_a_ptr, S_MAX_A, PROGS_A,
                        off_b_ptr, exp_b_ptr, start_b_ptr, stop_b_ptr, S_MAX_B, SEG_A, SEG_B,
                        BLOCK: tl.constexpr, NP: tl.constexpr):
    # Programs [0, PROGS_A) write map A, the others map B: two maps in one launch.
    pid = tl.program_id(0)
    ex = tl.arange(0, NP)
    lo = tl.load(offsets_ptr + ex, mask=ex < N, other=0)
    hi = tl.load(offsets_ptr + ex + 1, mask=ex < N, other=0)
    if pid < PROGS_A:
        _write_segments(lo, hi, ex, N, pid * BLOCK, off_a_ptr, exp_a_ptr, start_a_ptr, stop_a_ptr,
                        S_MAX_A, SEG_A, BLOCK)
    else:
        _write_segments(lo, hi, ex, N, (pid - PROGS_A) * BLOCK, off_b_ptr, exp_b_ptr, start_b_ptr,
                        stop_b_ptr, S_MAX_B, SEG_B, BLOCK)


@triton.jit
def _group_sum_kernel(part_ptr, grp_expert_ptr, grp_start_ptr, grp_stop_ptr, out_ptr, L, BLOCK: tl.constexpr):
    # First level of a two-level segment sum: group g sums its (at most GROUP) segments in order.
    gi = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    if tl.load(grp_expert_ptr + gi) >= 0:
        s0 = tl.load(grp_start_ptr + gi)
        s1 = tl.load(grp_stop_ptr + gi)
        acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
        for s in range(s0, s1):
            acc += tl.load(part_ptr + s * L + offs, mask=ok, other=0.0)
        tl.store(out_ptr + gi.to(tl.int64) * L + offs, acc, mask=ok)


@triton.jit
def _segment_sum_kernel(part_ptr, seg_off_ptr, out_ptr, L, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    s0 = tl.load(seg_off_ptr + e)
    s1 = tl.load(seg_off_ptr + e + 1)
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for s in range(s0, s1):
        acc += tl.load(part_ptr + s * L + offs, mask=ok, other=0.0)
    tl.store(out_ptr + e.to(tl.int64) * L + offs, acc, mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _new_map(m: int, n: int, seg_m: int, dev):
    s_max = triton.cdiv(m, seg_m) + n
    return (torch.empty(n + 1, dtype=torch.int64, device=dev),
            torch.empty(s_max, dtype=torch.int32, device=dev),
            torch.empty(s_max, dtype=torch.int32, device=dev),
            torch.empty(s_max, dtype=torch.int32, device=dev))


_SEG_BLOCK = 256


def _scan_chunk() -> int:
    """Blocks per step of the routing scan: fixed (not a function of M), so one compiled kernel
    serves every M; small under the interpreter so that tests take several steps."""
    return 16 if INTERPRET else 128



def routing_metadata(expert: torch.Tensor, num_experts: int, seg_m: int | None = None):
    """``(count (N,), offsets (N+1,), perm (M,))``, all int64, by a stable counting sort on device.

    ``expert``: ``(M,)`` integer ids, expected in ``[0, N)`` (the op boundary checks that when asked
    to); an id out of range is clamped into it on the device, never used as an index.
    With ``seg_m``, also returns the segment map of :func:`segment_map` for segments of ``seg_m``
    rows, computed in the same launches.
    """
    m = expert.shape[0]
    dev = expert.device
    expert = expert.contiguous()
    if expert.dtype != torch.int64:
        expert = expert.long()
    np_ = max(16, next_pow2(num_experts))  # no degenerate (size-1) block dimensions
    block = HIST_BLOCK()
    nb = triton.cdiv(m, block)
    blk_count = torch.empty(nb, np_, dtype=torch.int32, device=dev)
    blk_base = torch.empty(nb, np_, dtype=torch.int32, device=dev)
    count = torch.empty(num_experts, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    perm = torch.empty(m, dtype=torch.int64, device=dev)
    smap = _new_map(m, num_experts, seg_m or m, dev)
    _routing_hist_kernel[(nb,)](expert, blk_count, m, num_experts, BLOCK=block, NP=np_,
                                num_warps=ROWS_WARPS)
    _routing_scan_kernel[(1,)](blk_count, blk_base, count, offsets, nb, num_experts,
                               *smap, smap[1].shape[0] if seg_m else 0, seg_m or m,
                               SEG_BLOCK=_SEG_BLOCK, CHUNK=_scan_chunk(), NP=np_)
    _routing_scatter_kernel[(nb,)](expert, blk_base, offsets, perm, m, num_experts, BLOCK=block, NP=np_,
                                   num_warps=ROWS_WARPS)
    if seg_m:
        return count, offsets, perm, smap
    return count, offsets, perm


def segment_maps(offsets: torch.Tensor, m: int, seg_a: int, seg_b: int | None = None):
    """Cut each expert's rows into segments of ``seg_a`` (and ``seg_b``) rows, in one launch.

    ``offsets``: ``(N+1,)`` int64. Each map is ``(seg_off, seg_expert, seg_start, seg_stop)``:
    ``seg_off`` ``(N+1,)`` int64, the others ``(S_max,)`` int32 with ``S_max = cdiv(m, seg) + N``
    (ids past the last segment get expert -1). Returns one map, or a pair of maps.
    """
    n = offsets.shape[0] - 1
    dev = offsets.device
    map_a = _new_map(m, n, seg_a, dev)
    map_b = _new_map(m, n, seg_b, dev) if seg_b else map_a
    progs_a = triton.cdiv(map_a[1].shape[0], _SEG_BLOCK)
    progs_b = triton.cdiv(map_b[1].shape[0], _SEG_BLOCK) if seg_b else 0
    _segment_map_kernel[(progs_a + progs_b,)](
        offsets, n, *map_a, map_a[1].shape[0], progs_a, *map_b, map_b[1].shape[0], seg_a, seg_b or seg_a,
        BLOCK=_SEG_BLOCK, NP=max(16, next_pow2(n)),
    )
    return (map_a, map_b) if seg_b else map_a


def segment_map(offsets: torch.Tensor, m: int, seg_m: int):
    """One segment map ``(seg_off, seg_expert, seg_start, seg_stop)``; see :func:`segment_maps`."""
    return segment_maps(offsets, m, seg_m)


def merge_group() -> int:
    """Segments per group of the two-level merges (small under the interpreter, to exercise it)."""
    return 4 if INTERPRET else 32


def segment_groups(seg_off: torch.Tensor, s_max: int):
    """Groups of :func:`merge_group` consecutive segments of one expert, or None where ``s_max``
    (a function of the shapes only) is small enough for a one-level merge."""
    g = merge_group()
    if s_max <= 2 * g:
        return None
    return segment_map(seg_off, s_max, g)


def segment_sum(part: torch.Tensor, seg_off: torch.Tensor, groups=None) -> torch.Tensor:
    """Per-expert sums ``(N, L)`` of per-segment partials ``part (S_max, L)``.

    Two levels when there are many segments (``groups`` from :func:`segment_groups`, computed here
    when not given): groups of consecutive segments of one expert first, then each expert's groups;
    programs of either level walk at most ``sqrt``-many partials of a collapsed routing, and the
    order of every sum is fixed by the shapes: deterministic.
    """
    n = seg_off.shape[0] - 1
    length = part.shape[1]
    out = torch.empty(n, length, dtype=part.dtype, device=part.device)
    block = min(1024, max(16, next_pow2(length)))
    if groups is None:
        groups = segment_groups(seg_off, part.shape[0])
    if groups is not None:
        grp_off, grp_expert, grp_start, grp_stop = groups
        gpart = torch.empty(grp_expert.shape[0], length, dtype=part.dtype, device=part.device)
        _group_sum_kernel[(grp_expert.shape[0], triton.cdiv(length, block))](
            part, grp_expert, grp_start, grp_stop, gpart, length, BLOCK=block)
        part, seg_off = gpart, grp_off
    _segment_sum_kernel[(n, triton.cdiv(length, block))](part, seg_off, out, length, BLOCK=block)
    return out
