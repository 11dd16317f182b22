// Argument checks of the raw routed-head kernels, shared by the CPU and CUDA launchers. Every
// failure names the argument. (The Python op layer checks the same things first with
// ValueError/TypeError; these guard direct calls of torch.ops.calgan_fast_C.*.)
#pragma once

#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>

namespace calgan_fast {

// Whether the raw CUDA ops also check the routing metadata handed to them (perm, offsets, count):
// those checks read device tensors on the host, a synchronisation per call, so they run only with
// CALGAN_FAST_DEBUG_CHECKS=1 in the environment. The checks of shapes, dtypes and devices always run.
inline bool debug_checks() {
  const char* v = std::getenv("CALGAN_FAST_DEBUG_CHECKS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, ": on ", t.device(), ", but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": dtype ", t.scalar_type(),
              " differs from x's ", x.scalar_type(), " (cast the weights to x.dtype)");
}

inline void check_routed_head_args(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& gate,
                                   const at::Tensor& proj, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& w2, const at::Tensor& b2, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, "x: expected a ", device, " tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, "x: expected shape (M, c), got ", x.sizes());
  TORCH_CHECK(x.size(0) > 0, "x: M = 0 rows; the routed head needs at least one pixel");
  TORCH_CHECK(x.size(1) > 0, "x: c = 0 channels");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating-point tensor, got ", x.scalar_type());
  const int64_t m = x.size(0), c = x.size(1);
  TORCH_CHECK(proj.dim() == 3 && proj.size(1) == c && proj.size(2) == c, "proj: expected shape (N, ", c, ", ",
              c, "), got ", proj.sizes());
  const int64_t n = proj.size(0);
  TORCH_CHECK(n > 0, "proj: N = 0 experts");
  TORCH_CHECK(w1.dim() == 3 && w1.size(0) == n && w1.size(2) == c, "w1: expected shape (", n, ", hdim, ", c,
              "), got ", w1.sizes());
  const int64_t hdim = w1.size(1);
  TORCH_CHECK(hdim > 0, "w1: hdim = 0");
  TORCH_CHECK(b1.dim() == 2 && b1.size(0) == n && b1.size(1) == hdim, "b1: expected shape (", n, ", ", hdim,
              "), got ", b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == n && w2.size(1) == hdim, "w2: expected shape (", n, ", ", hdim,
              "), got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == n, "b2: expected shape (", n, "), got ", b2.sizes());
  TORCH_CHECK(gate.dim() == 1 && gate.size(0) == m, "gate: expected shape (", m, "), got ", gate.sizes());
  TORCH_CHECK(expert.dim() == 1 && expert.size(0) == m, "expert: expected shape (", m, "), got ", expert.sizes());
  TORCH_CHECK(expert.scalar_type() == at::kLong, "expert: expected int64, got ", expert.scalar_type());
  TORCH_CHECK(expert.device() == x.device(), "expert: on ", expert.device(), ", but x is on ", x.device());
  check_same(gate, "gate", x);
  check_same(proj, "proj", x);
  check_same(w1, "w1", x);
  check_same(b1, "b1", x);
  check_same(w2, "w2", x);
  check_same(b2, "b2", x);
}

// The extra arguments of the backward: upstream gradients and the forward's saved metadata.
inline void check_routed_head_bwd_args(const at::Tensor& glogits, const at::Tensor& gmean, const at::Tensor& gvar,
                                       const at::Tensor& x, const at::Tensor& count, const at::Tensor& mean,
                                       const at::Tensor& perm, const at::Tensor& offsets, int64_t n) {
  const int64_t m = x.size(0), c = x.size(1);
  TORCH_CHECK(glogits.dim() == 1 && glogits.size(0) == m, "glogits: expected shape (", m, "), got ",
              glogits.sizes());
  TORCH_CHECK(gmean.dim() == 2 && gmean.size(0) == n && gmean.size(1) == c, "gmean: expected shape (", n, ", ",
              c, "), got ", gmean.sizes());
  TORCH_CHECK(gvar.dim() == 1 && gvar.size(0) == n, "gvar: expected shape (", n, "), got ", gvar.sizes());
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == n && mean.size(1) == c, "mean: expected shape (", n, ", ", c,
              "), got ", mean.sizes());
  TORCH_CHECK(count.dim() == 1 && count.size(0) == n && count.scalar_type() == at::kLong,
              "count: expected an int64 tensor of shape (", n, ")");
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == m && perm.scalar_type() == at::kLong,
              "perm: expected an int64 tensor of shape (", m, ")");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == n + 1 && offsets.scalar_type() == at::kLong,
              "offsets: expected an int64 tensor of shape (", n + 1, ")");
  for (const auto* t : {&glogits, &gmean, &gvar, &count, &mean, &perm, &offsets}) {
    TORCH_CHECK(t->device() == x.device(), "backward: every tensor must be on x's device ", x.device(),
                ", found one on ", t->device());
  }
  TORCH_CHECK(at::isFloatingType(glogits.scalar_type()), "glogits: expected a floating-point tensor");
  TORCH_CHECK(at::isFloatingType(gmean.scalar_type()), "gmean: expected a floating-point tensor");
  TORCH_CHECK(at::isFloatingType(gvar.scalar_type()), "gvar: expected a floating-point tensor");
}


// The routing metadata handed to a backward: offsets must be a non-decreasing run from 0 to M that
// agrees with count, and perm a permutation of [0, M) (range checked on every device, duplicates on
// CPU), so that a malformed direct call raises instead of writing out of bounds.
inline void check_routing_metadata(const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& count,
                                   int64_t m, int64_t n) {
  const at::Tensor off = offsets.to(at::kCPU).contiguous();
  const at::Tensor cnt = count.to(at::kCPU).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* k = cnt.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[n] == m, "offsets: must run from 0 to M = ", m, ", got ", o[0], " .. ", o[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(o[i + 1] >= o[i], "offsets: must be non-decreasing (offsets[", i + 1, "] = ", o[i + 1],
                " < offsets[", i, "] = ", o[i], ")");
    TORCH_CHECK(k[i] == o[i + 1] - o[i], "count: count[", i, "] = ", k[i], " disagrees with offsets (",
                o[i + 1] - o[i], " rows)");
  }
  if (m == 0) return;
  if (perm.is_cpu()) {
    const at::Tensor pc = perm.contiguous();
    const int64_t* p = pc.data_ptr<int64_t>();
    std::vector<char> seen(static_cast<size_t>(m), 0);
    for (int64_t i = 0; i < m; ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < m, "perm: entry ", i, " = ", p[i], " lies outside [0, ", m, ")");
      TORCH_CHECK(!seen[p[i]], "perm: row ", p[i], " appears twice; perm must be a permutation");
      seen[p[i]] = 1;
    }
  } else {
    const auto mm = at::aminmax(perm);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < m, "perm: entries must lie in [0, ", m, "), found [", lo, ", ", hi, "]");
  }
}

}  // namespace calgan_fast
