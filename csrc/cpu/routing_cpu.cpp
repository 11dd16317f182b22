// The routing of the `cpu` backend (a stable counting sort of the rows by expert) and the
// registration of the cpu kernels for the CPU dispatch key of the `calgan_fast_C` ops.

#include "routed_head_cpu.h"

#include <torch/library.h>

#include <vector>

namespace calgan_fast {
namespace cpu {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> routing_metadata_cpu(const Tensor& expert, int64_t num_experts) {
  TORCH_CHECK(expert.device().is_cpu(), "expert: expected a CPU tensor, got one on ", expert.device());
  TORCH_CHECK(expert.dim() == 1, "expert: expected shape (M,), got ", expert.sizes());
  TORCH_CHECK(expert.scalar_type() == at::kLong, "expert: expected int64, got ", expert.scalar_type());
  TORCH_CHECK(num_experts > 0, "num_experts: must be positive, got ", num_experts);
  const Tensor ex = expert.contiguous();
  const int64_t m = ex.size(0);
  const auto lopts = ex.options();
  Tensor count = at::zeros({num_experts}, lopts), offsets = at::empty({num_experts + 1}, lopts);
  Tensor perm = at::empty({m}, lopts);
  const int64_t* ep = ex.data_ptr<int64_t>();
  int64_t *cp = count.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>(), *pp = perm.data_ptr<int64_t>();
  for (int64_t p = 0; p < m; ++p) {
    const int64_t id = ep[p];
    TORCH_CHECK(id >= 0 && id < num_experts, "expert: id ", id, " at row ", p, " lies outside [0, ", num_experts,
                ")");
    ++cp[id];
  }
  op[0] = 0;
  for (int64_t i = 0; i < num_experts; ++i) op[i + 1] = op[i] + cp[i];
  std::vector<int64_t> next(op, op + num_experts);
  for (int64_t p = 0; p < m; ++p) pp[next[ep[p]]++] = p;
  return {count, offsets, perm};
}

}  // namespace cpu
}  // namespace calgan_fast

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_op(
    const at::Tensor& x, const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  auto o = calgan_fast::cpu::routed_head_fwd_cpu(x, expert, gate, proj, w1, b1, w2, b2);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& glogits, const at::Tensor& gmean, const at::Tensor& gvar, const at::Tensor& x,
    const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& count, const at::Tensor& mean,
    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& xcov) {
  auto o = calgan_fast::cpu::routed_head_bwd_cpu(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count,
                                                 mean, perm, offsets, xcov);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(calgan_fast_C, CPU, m) {
  m.impl("routing_metadata", &calgan_fast::cpu::routing_metadata_cpu);
  m.impl("routed_head_fwd", &fwd_op);
  m.impl("routed_head_bwd", &bwd_op);
}
