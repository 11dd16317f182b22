// Host launchers of the `cuda` backend's kernels (csrc/cuda/routed_head_kernels.cuh): allocation,
// grids and launch order, through the platform's launch() so that the same code drives a GPU and
// the host emulation of the tests. Nothing here reads device memory: every grid is sized by a bound
// known on the host, and no call synchronises with the device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/routed_head_kernels.cuh"

namespace calgan_fast {
namespace dev {

using at::Tensor;

// Launches of one backward call (a fixed number, whatever N and M): maps, prep, dy, dx, dproj, dw1,
// group sums, three expert sums, finish.
constexpr int kBwdLaunches = 11;

// A segment map with `rows` rows per segment, allocated for its bound cdiv(M, rows) + N.
struct MapBuffers {
  Tensor lo, n, e, first;
  int64_t rows, count;
  SegmentMap view() { return {rows, count, lo.data_ptr<int64_t>(), n.data_ptr<int64_t>(), e.data_ptr<int64_t>(), first.data_ptr<int64_t>()}; }
};

inline MapBuffers alloc_map(const Tensor& offsets, int64_t m, int64_t rows) {
  const int64_t n_exp = offsets.size(0) - 1;
  const int64_t count = cdiv(m, rows) + n_exp;
  const auto lopts = offsets.options();
  return {at::empty({count}, lopts), at::empty({count}, lopts), at::empty({count}, lopts),
          at::empty({n_exp + 1}, lopts), rows, count};
}

inline std::tuple<Tensor, Tensor, Tensor> routing_metadata(const Tensor& expert, int64_t num_experts) {
  const Tensor ex = expert.contiguous();
  const int64_t m = ex.size(0);
  const auto lopts = ex.options();
  const int64_t n_blocks = (m + kSortBlock - 1) / kSortBlock;
  Tensor hist = at::empty({n_blocks > 0 ? n_blocks * num_experts : 1}, lopts);
  Tensor base = at::empty_like(hist);
  Tensor count = at::empty({num_experts}, lopts), offsets = at::empty({num_experts + 1}, lopts);
  Tensor perm = at::empty({m}, lopts);
  const Stream stream = current_stream();
  if (n_blocks > 0) {
    launch(_routing_hist_kernel, dim3(static_cast<unsigned>(n_blocks)), dim3(kSortBlock), 0, stream,
           ex.data_ptr<int64_t>(), m, num_experts, hist.data_ptr<int64_t>());
  }
  launch(_routing_scan_kernel, dim3(1), dim3(kScanThreads), 0, stream, static_cast<const int64_t*>(hist.data_ptr<int64_t>()),
         n_blocks, num_experts, base.data_ptr<int64_t>(), count.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  if (n_blocks > 0) {
    launch(_routing_place_kernel, dim3(static_cast<unsigned>(n_blocks)), dim3(kSortBlock), 0, stream,
           static_cast<const int64_t*>(ex.data_ptr<int64_t>()), m, num_experts,
           static_cast<const int64_t*>(base.data_ptr<int64_t>()), perm.data_ptr<int64_t>());
  }
  return {count, offsets, perm};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// (logits, count, mean, var, perm, offsets) of the forward; inputs checked by the caller.
template <typename T>
std::vector<Tensor> routed_head_fwd(const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                    const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  auto [count, offsets, perm] = routing_metadata(expert, n_exp);
  const Stream stream = current_stream();
  MapBuffers tiles = alloc_map(offsets, m, kTile), groups = alloc_map(offsets, m, kTile * kGroupTiles);
  SegmentMaps maps{};
  maps.map[0] = tiles.view();
  maps.map[1] = groups.view();
  launch(_segment_maps_kernel, dim3(2), dim3(1024), 0, stream, static_cast<const int64_t*>(offsets.data_ptr<int64_t>()),
         n_exp, maps);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor logits = at::empty({m}, x.options());
  Tensor t_mean = at::empty({tiles.count * c}, fopts);
  Tensor t_m2 = at::empty({tiles.count}, fopts);
  Tensor mean = at::empty({n_exp, c}, fopts), var = at::empty({n_exp}, fopts);
  const Tensor G = gate.contiguous(), O = proj.contiguous(), W1 = w1.contiguous(), B1 = b1.contiguous();
  const Tensor W2 = w2.contiguous(), B2 = b2.contiguous();
  // 16-byte loads of the operand slabs (x rows, O rows) and of the W1 chunks where alignment allows.
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  const bool vec_w1 = c % V == 0 && aligned16(W1.data_ptr());
  const bool vec = c % V == 0 && x.stride(1) == 1 && x.stride(0) % V == 0 && aligned16(x.data_ptr()) &&
                   aligned16(O.data_ptr());
  const size_t dyn = fwd_dynamic_smem<T>(hdim);
  const size_t dyn_max = max_dynamic_smem(_routed_head_fwd_kernel<T>);
  TORCH_CHECK(dyn <= dyn_max, "routed_head (cuda backend): hidden width ", hdim, " needs ", dyn,
              " bytes of dynamic shared memory per block, this GPU gives ", dyn_max,
              "; use a smaller hidden width or the torch backend");
  allow_dynamic_smem(_routed_head_fwd_kernel<T>, dyn);
  launch(_routed_head_fwd_kernel<T>, dim3(static_cast<unsigned>(tiles.count)), dim3(kThreads), dyn, stream,
         static_cast<const T*>(x.data_ptr<T>()), x.stride(0), x.stride(1), static_cast<const T*>(G.data_ptr<T>()),
         static_cast<const T*>(O.data_ptr<T>()), static_cast<const T*>(W1.data_ptr<T>()),
         static_cast<const T*>(B1.data_ptr<T>()), static_cast<const T*>(W2.data_ptr<T>()),
         static_cast<const T*>(B2.data_ptr<T>()), static_cast<const int64_t*>(perm.data_ptr<int64_t>()),
         static_cast<const int64_t*>(tiles.lo.data_ptr<int64_t>()), static_cast<const int64_t*>(tiles.n.data_ptr<int64_t>()),
         static_cast<const int64_t*>(tiles.e.data_ptr<int64_t>()), c, hdim, vec, vec_w1, logits.data_ptr<T>(),
         t_mean.data_ptr<float>(), t_m2.data_ptr<float>());
  // Statistics: tiles -> groups of kGroupTiles tiles -> experts, each level in a fixed order.
  Tensor g_mean = at::empty({groups.count * c}, fopts), g_m2 = at::empty({groups.count}, fopts);
  launch(_routed_head_stats_group_kernel, dim3(static_cast<unsigned>(groups.count)), dim3(kThreads), 0, stream,
         static_cast<const float*>(t_mean.data_ptr<float>()), static_cast<const float*>(t_m2.data_ptr<float>()),
         static_cast<const int64_t*>(tiles.n.data_ptr<int64_t>()),
         static_cast<const int64_t*>(tiles.first.data_ptr<int64_t>()),
         static_cast<const int64_t*>(offsets.data_ptr<int64_t>()), static_cast<const int64_t*>(groups.lo.data_ptr<int64_t>()),
         static_cast<const int64_t*>(groups.n.data_ptr<int64_t>()), static_cast<const int64_t*>(groups.e.data_ptr<int64_t>()),
         c, g_mean.data_ptr<float>(), g_m2.data_ptr<float>());
  launch(_routed_head_stats_merge_kernel, dim3(static_cast<unsigned>(n_exp)), dim3(kThreads), 0, stream,
         static_cast<const float*>(g_mean.data_ptr<float>()), static_cast<const float*>(g_m2.data_ptr<float>()),
         static_cast<const int64_t*>(groups.n.data_ptr<int64_t>()),
         static_cast<const int64_t*>(groups.first.data_ptr<int64_t>()), c, mean.data_ptr<float>(), var.data_ptr<float>());
  return {logits, count, mean, var, perm, offsets};
}

// Rows per slab of the weight-gradient reductions: enough (slab, block) CTAs to fill the device a
// few times over, in multiples of a tile. Depends on M, c and the device only, never on the routing.
inline int64_t slab_rows(int64_t m, int64_t c) {
  const int64_t blocks = cdiv(c, kTile) * cdiv(c, kTile);
  const int64_t target = std::max<int64_t>(1, 4 * static_cast<int64_t>(sm_count()) / blocks);
  return std::max<int64_t>(kTile, cdiv(cdiv(m, target), kTile) * kTile);
}

// (dx, dgate, dproj, dw1, db1, dw2, db2) in T; inputs checked by the caller. x must have unit
// channel stride.
template <typename T>
std::vector<Tensor> routed_head_bwd(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar, const Tensor& x,
                                    const Tensor& gate, const Tensor& proj, const Tensor& w1, const Tensor& b1,
                                    const Tensor& w2, const Tensor& mean, const Tensor& perm_in,
                                    const Tensor& offsets_in) {
  TORCH_CHECK(x.stride(1) == 1, "x: the backward expects unit channel stride");
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  const auto st = x.scalar_type();
  const auto fopts = x.options().dtype(at::kFloat);
  const Stream stream = current_stream();
  // Operands as the kernels read them; each is the tensor itself when it already is.
  const Tensor G = gate.contiguous(), O = proj.contiguous(), W1 = w1.contiguous(), B1 = b1.contiguous();
  const Tensor W2 = w2.contiguous();
  const Tensor GL = glogits.scalar_type() == st ? glogits.contiguous() : glogits.to(st).contiguous();
  const Tensor GM = gmean.to(at::kFloat).contiguous(), GV = gvar.to(at::kFloat).contiguous();
  const Tensor MU = mean.to(at::kFloat).contiguous();
  const Tensor perm = perm_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t* permp = perm.data_ptr<int64_t>();
  const int64_t* offp = offsets.data_ptr<int64_t>();

  // 16-byte accesses: every row start of a T operand on a 16-byte boundary.
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  const bool vec = c % V == 0 && x.stride(0) % V == 0 && aligned16(x.data_ptr()) && aligned16(O.data_ptr()) &&
                   aligned16(W1.data_ptr());
  const bool vec_f = c % 4 == 0;
  const int64_t ldh = cdiv(hdim, 4) * 4;  // dh rows: 16-byte aligned
  const int64_t L = 2 * hdim + 1;         // classifier partials: [db1 | dw2 | db2]

  MapBuffers tiles = alloc_map(offsets, m, kTile);
  MapBuffers groups = alloc_map(offsets, m, kTile * kGroupTiles);
  MapBuffers slabs = alloc_map(offsets, m, slab_rows(m, c));
  SegmentMaps maps{};
  maps.map[0] = tiles.view();
  maps.map[1] = groups.view();
  maps.map[2] = slabs.view();
  launch(_segment_maps_kernel, dim3(3), dim3(1024), 0, stream, offp, n_exp, maps);

  Tensor aexp = at::empty({n_exp, hdim, kAParts<T> * kpad(c)}, x.options());
  const dim3 wgrid(static_cast<unsigned>(cdiv(hdim, kTile)), static_cast<unsigned>(cdiv(c, kTile)),
                   static_cast<unsigned>(n_exp));
  launch(_bwd_prep_kernel<T>, wgrid, dim3(kThreads), 0, stream, static_cast<const T*>(O.data_ptr<T>()),
         static_cast<const T*>(W1.data_ptr<T>()), c, hdim, vec, aexp.data_ptr<T>());

  Tensor du = at::empty({m, c}, x.options());
  Tensor dh = at::empty({m, ldh}, fopts);
  Tensor dgate = at::empty({m}, x.options());
  Tensor cls_part = at::empty({tiles.count, L}, fopts);
  launch(_bwd_dy_kernel<T>, dim3(static_cast<unsigned>(tiles.count)), dim3(kThreads), 0, stream,
         static_cast<const T*>(x.data_ptr<T>()), x.stride(0), static_cast<const T*>(G.data_ptr<T>()),
         static_cast<const T*>(O.data_ptr<T>()), static_cast<const T*>(W1.data_ptr<T>()),
         static_cast<const T*>(B1.data_ptr<T>()), static_cast<const T*>(W2.data_ptr<T>()),
         static_cast<const T*>(aexp.data_ptr<T>()), static_cast<const T*>(GL.data_ptr<T>()),
         static_cast<const float*>(GM.data_ptr<float>()), static_cast<const float*>(GV.data_ptr<float>()),
         static_cast<const float*>(MU.data_ptr<float>()), permp, offp,
         static_cast<const int64_t*>(tiles.lo.data_ptr<int64_t>()), static_cast<const int64_t*>(tiles.n.data_ptr<int64_t>()),
         static_cast<const int64_t*>(tiles.e.data_ptr<int64_t>()), c, hdim, ldh, vec, du.data_ptr<T>(),
         dh.data_ptr<float>(), dgate.data_ptr<T>(), cls_part.data_ptr<float>());

  Tensor dx = at::empty({m, c}, x.options());
  launch(_bwd_dx_kernel<T>, dim3(static_cast<unsigned>(tiles.count), static_cast<unsigned>(cdiv(c, kTile))),
         dim3(kThreads), 0, stream, static_cast<const T*>(du.data_ptr<T>()), static_cast<const T*>(O.data_ptr<T>()),
         permp, static_cast<const int64_t*>(tiles.lo.data_ptr<int64_t>()),
         static_cast<const int64_t*>(tiles.n.data_ptr<int64_t>()), static_cast<const int64_t*>(tiles.e.data_ptr<int64_t>()),
         c, vec, dx.data_ptr<T>());

  Tensor proj_part = at::empty({slabs.count, c * c}, fopts);
  launch(_bwd_dproj_kernel<T>, dim3(static_cast<unsigned>(slabs.count), static_cast<unsigned>(cdiv(c, kTile) * cdiv(c, kTile))),
         dim3(kThreads), 0, stream, static_cast<const T*>(du.data_ptr<T>()), static_cast<const T*>(x.data_ptr<T>()),
         x.stride(0), permp, static_cast<const int64_t*>(slabs.lo.data_ptr<int64_t>()),
         static_cast<const int64_t*>(slabs.n.data_ptr<int64_t>()), static_cast<const int64_t*>(slabs.e.data_ptr<int64_t>()),
         c, vec, proj_part.data_ptr<float>());

  Tensor d_part = at::empty({slabs.count, hdim * c}, fopts);
  launch(_bwd_dw1_kernel<T>,
         dim3(static_cast<unsigned>(slabs.count), static_cast<unsigned>(cdiv(c, kTile)), static_cast<unsigned>(cdiv(hdim, kTile))),
         dim3(kThreads), 0, stream, static_cast<const float*>(dh.data_ptr<float>()), ldh,
         static_cast<const T*>(x.data_ptr<T>()), x.stride(0), static_cast<const T*>(G.data_ptr<T>()), permp,
         static_cast<const int64_t*>(slabs.lo.data_ptr<int64_t>()), static_cast<const int64_t*>(slabs.n.data_ptr<int64_t>()),
         static_cast<const int64_t*>(slabs.e.data_ptr<int64_t>()), c, hdim, vec, d_part.data_ptr<float>());

  // Fixed-order merges: tiles -> groups -> experts (classifier), slabs -> experts (dproj, D).
  auto sum_grid = [](int64_t rows, int64_t len) {
    return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(std::min<int64_t>(cdiv(len, kSumThreads), 65535)));
  };
  Tensor grp_part = at::empty({groups.count, L}, fopts);
  launch(_group_sum_kernel, sum_grid(groups.count, L), dim3(kSumThreads), 0, stream,
         static_cast<const float*>(cls_part.data_ptr<float>()), L,
         static_cast<const int64_t*>(groups.lo.data_ptr<int64_t>()), static_cast<const int64_t*>(groups.n.data_ptr<int64_t>()),
         static_cast<const int64_t*>(groups.e.data_ptr<int64_t>()), offp,
         static_cast<const int64_t*>(tiles.first.data_ptr<int64_t>()), grp_part.data_ptr<float>());
  Tensor cls = at::empty({n_exp, L}, fopts);
  launch(_expert_sum_kernel<float>, sum_grid(n_exp, L), dim3(kSumThreads), 0, stream,
         static_cast<const float*>(grp_part.data_ptr<float>()), L,
         static_cast<const int64_t*>(groups.first.data_ptr<int64_t>()), cls.data_ptr<float>());
  Tensor dproj = at::empty({n_exp, c, c}, x.options());
  launch(_expert_sum_kernel<T>, sum_grid(n_exp, c * c), dim3(kSumThreads), 0, stream,
         static_cast<const float*>(proj_part.data_ptr<float>()), c * c,
         static_cast<const int64_t*>(slabs.first.data_ptr<int64_t>()), dproj.data_ptr<T>());
  Tensor d = at::empty({n_exp, hdim, c}, fopts);
  launch(_expert_sum_kernel<float>, sum_grid(n_exp, hdim * c), dim3(kSumThreads), 0, stream,
         static_cast<const float*>(d_part.data_ptr<float>()), hdim * c,
         static_cast<const int64_t*>(slabs.first.data_ptr<int64_t>()), d.data_ptr<float>());

  Tensor dw1 = at::empty({n_exp, hdim, c}, x.options());
  Tensor db1 = at::empty({n_exp, hdim}, x.options()), dw2 = at::empty({n_exp, hdim}, x.options());
  Tensor db2 = at::empty({n_exp}, x.options());
  launch(_bwd_finish_kernel<T>, wgrid, dim3(kThreads), 0, stream, static_cast<const float*>(d.data_ptr<float>()),
         static_cast<const T*>(O.data_ptr<T>()), static_cast<const float*>(cls.data_ptr<float>()), c, hdim, vec, vec_f,
         dw1.data_ptr<T>(), db1.data_ptr<T>(), dw2.data_ptr<T>(), db2.data_ptr<T>());
  return {dx, dgate, dproj, dw1, db1, dw2, db2};
}

}  // namespace dev
}  // namespace calgan_fast
