// The `cuda` backend of the routed head: registration of the CUDA kernels of
// csrc/cuda/routed_head_kernels.cuh (launched by routed_head_launch.h) for the CUDA key of
// torch.ops.calgan_fast_C.{routing_metadata,routed_head_fwd,routed_head_bwd}.
//
// The backward runs on the device only (a fixed number of launches, no host synchronisation).
// CALGAN_FAST_CUDA_BWD=aten selects the earlier backward instead: a host loop over the experts of
// ATen/cuBLAS operations in fp32, which copies the offsets to the host (a synchronisation per call);
// kept as a cross-check, not for speed.

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/platform_cuda.cuh"
#include "cuda/routed_head_launch.h"
#include "routed_head_checks.h"
#include "routed_head_common.h"

namespace calgan_fast {
namespace cuda {

using at::Tensor;

namespace {

// CALGAN_FAST_CUDA_BWD=aten: the ATen backward (read per call, as the environment may change).
bool aten_backward() {
  const char* v = std::getenv("CALGAN_FAST_CUDA_BWD");
  return v != nullptr && std::strcmp(v, "aten") == 0;
}

void check_cuda_dtype(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x: the cuda backend takes fp16/bf16/fp32, got ", x.scalar_type(),
              x.scalar_type() == at::kDouble ? "; use backend='torch' for fp64" : "");
}

template <typename F>
auto dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: return f(float{});
  }
}

// The earlier backward (CALGAN_FAST_CUDA_BWD=aten): the algebra of csrc/cpu/routed_head_bwd_cpu.cpp as
// per-expert ATen operations in fp32 on the device, driven by a host loop over the experts.
std::vector<Tensor> routed_head_bwd_aten(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar,
                                         const Tensor& x, const Tensor& gate, const Tensor& proj, const Tensor& w1,
                                         const Tensor& b1, const Tensor& w2, const Tensor& perm,
                                         const Tensor& offsets) {
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  const auto f32 = at::kFloat;
  const Tensor O = proj.to(f32), W1 = w1.to(f32), B1 = b1.to(f32), W2 = w2.to(f32);
  const Tensor GL = glogits.to(f32), GM = gmean.to(f32), GV = gvar.to(f32);
  const Tensor off_cpu = offsets.cpu();  // the per-expert loop below runs on the host: a synchronisation
  const int64_t* off = off_cpu.data_ptr<int64_t>();
  const Tensor xs = x.index_select(0, perm).to(f32);
  const Tensor gs = gate.index_select(0, perm).to(f32);
  Tensor wc = xs * gs.unsqueeze(1);
  Tensor dx = at::empty({m, c}, x.options()), dgate = at::empty({m}, x.options().dtype(f32));
  Tensor dproj = at::zeros_like(O), dw1 = at::zeros_like(W1), db1 = at::zeros({n_exp, hdim}, O.options());
  Tensor dw2 = at::zeros({n_exp, hdim}, O.options()), db2 = at::zeros({n_exp}, O.options());
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) continue;
    const Tensor Oe = O[e], W1e = W1[e];
    Tensor wce = wc.narrow(0, lo, n);
    const Tensor xb = (wce.sum(0, false, at::kDouble) / static_cast<double>(n)).to(f32);
    wce.sub_(xb);
    const Tensor A = at::mm(W1e, Oe);
    const Tensor he = at::addmm(at::addmv(B1[e], A, xb), wce, A.t());
    const Tensor pe = perm.narrow(0, lo, n);
    const Tensor gl = GL.index_select(0, pe);
    const Tensor z = at::leaky_relu(he, kLReluSlope);
    dw2[e].copy_(at::mv(z.t(), gl));
    db2[e].copy_(gl.sum());
    const Tensor dh = gl.unsqueeze(1) * W2[e].unsqueeze(0) * at::where(he > 0, 1.0, kLReluSlope).to(f32);
    db1[e].copy_(dh.sum(0));
    Tensor D = at::mm(dh.t(), wce);
    D.addr_(db1[e], xb);
    dw1[e].copy_(at::mm(D, Oe.t()));
    const float nf = static_cast<float>(n);
    const Tensor a = GM[e] / nf;
    const Tensor k = GV[e] * (2.f / (nf * static_cast<float>(c)));  // stays on the device
    Tensor dpe = dproj[e];
    dpe.copy_(at::mm(W1e.t(), D));
    dpe.addr_(a, xb, 1, nf);
    Tensor qe = at::mm(dh, A);
    qe.add_(at::mv(Oe.t(), a));
    dpe.add_(at::mm(Oe, at::mm(wce.t(), wce)) * k);
    qe.add_(at::mm(wce, at::mm(Oe.t(), Oe)) * k);
    dx.index_copy_(0, pe, (qe * gs.narrow(0, lo, n).unsqueeze(1)).to(x.scalar_type()));
    dgate.index_copy_(0, pe, (qe * xs.narrow(0, lo, n)).sum(1));
  }
  const auto st = x.scalar_type();
  return {dx, dgate.to(gate.scalar_type()), dproj.to(st), dw1.to(st), db1.to(st), dw2.to(st), db2.to(st)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> routing_metadata_cuda(const Tensor& expert, int64_t num_experts) {
  TORCH_CHECK(expert.is_cuda(), "expert: expected a CUDA tensor, got one on ", expert.device());
  TORCH_CHECK(expert.dim() == 1, "expert: expected shape (M,), got ", expert.sizes());
  TORCH_CHECK(expert.scalar_type() == at::kLong, "expert: expected int64, got ", expert.scalar_type());
  TORCH_CHECK(num_experts > 0, "num_experts: must be positive, got ", num_experts);
  const dev::DeviceGuard guard(expert.device());
  return dev::routing_metadata(expert, num_experts);
}

std::vector<Tensor> routed_head_fwd_cuda(const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                         const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  check_routed_head_args(x, expert, gate, proj, w1, b1, w2, b2, c10::DeviceType::CUDA);
  // The kernel picks its own precisions: an enclosing autocast region must not recast its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_cuda_dtype(x);
  const dev::DeviceGuard guard(x.device());
  return dispatch_float(x.scalar_type(), [&](auto tag) {
    return dev::routed_head_fwd<decltype(tag)>(x, expert, gate, proj, w1, b1, w2, b2);
  });
}

std::vector<Tensor> routed_head_bwd_cuda(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar,
                                         const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                         const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                         const Tensor& count, const Tensor& mean, const Tensor& perm,
                                         const Tensor& offsets) {
  check_routed_head_args(x, expert, gate, proj, w1, b1, w2, b2, c10::DeviceType::CUDA);
  // The kernel picks its own precisions: an enclosing autocast region must not recast its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_routed_head_bwd_args(glogits, gmean, gvar, x, count, mean, perm, offsets, proj.size(0));
  check_cuda_dtype(x);
  const dev::DeviceGuard guard(x.device());
  if (debug_checks()) check_routing_metadata(perm, offsets, count, x.size(0), proj.size(0));
  if (aten_backward()) return routed_head_bwd_aten(glogits, gmean, gvar, x, gate, proj, w1, b1, w2, perm, offsets);
  // Rows with unit channel stride (a strided view, such as an NCHW map read as rows, is copied once
  // in its own dtype); contiguous x is used as it is.
  const Tensor xr = x.stride(1) == 1 ? x : x.contiguous();
  return dispatch_float(x.scalar_type(), [&](auto tag) {
    return dev::routed_head_bwd<decltype(tag)>(glogits, gmean, gvar, xr, gate, proj, w1, b1, w2, mean, perm,
                                               offsets);
  });
}

}  // namespace cuda
}  // namespace calgan_fast

namespace {

// The schema of the cpu backend: the cuda kernels keep no per-expert statistic for the backward,
// so their xcov output is empty and the backward ignores it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_op(
    const at::Tensor& x, const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  auto o = calgan_fast::cuda::routed_head_fwd_cuda(x, expert, gate, proj, w1, b1, w2, b2);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[2].new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& glogits, const at::Tensor& gmean, const at::Tensor& gvar, const at::Tensor& x,
    const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& count, const at::Tensor& mean,
    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& /*xcov*/) {
  auto o = calgan_fast::cuda::routed_head_bwd_cuda(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count,
                                                   mean, perm, offsets);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(calgan_fast_C, CUDA, m) {
  m.impl("routing_metadata", &calgan_fast::cuda::routing_metadata_cuda);
  m.impl("routed_head_fwd", &fwd_op);
  m.impl("routed_head_bwd", &bwd_op);
}
