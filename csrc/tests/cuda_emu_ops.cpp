// The CUDA kernels of csrc/cuda run by the host emulation of cuda_emu.h on CPU tensors, registered as
// torch.ops.calgan_fast_emu.{routing_metadata,routed_head_fwd,routed_head_bwd,launches,...}: the tests
// (tests/test_cuda_emulation.py) compare them with the `torch` backend on machines without a GPU.
// Built by the test with torch.utils.cpp_extension.load; not part of the package.
#include "cuda_emu.h"  // the platform first: it defines what the kernels take from CUDA

#include <torch/extension.h>
#include <torch/library.h>

#include "cuda/routed_head_launch.h"

namespace {

using at::Tensor;

template <typename F>
auto dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kFloat: return f(float{});
    default: TORCH_CHECK(false, "x: fp16/bf16/fp32 only, got ", st);
  }
}

std::tuple<Tensor, Tensor, Tensor> routing_metadata(const Tensor& expert, int64_t n) {
  return calgan_fast::dev::routing_metadata(expert, n);
}

std::vector<Tensor> fwd(const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj, const Tensor& w1,
                        const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  return dispatch_float(x.scalar_type(), [&](auto tag) {
    return calgan_fast::dev::routed_head_fwd<decltype(tag)>(x, expert, gate, proj, w1, b1, w2, b2);
  });
}

std::vector<Tensor> bwd(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar, const Tensor& x,
                        const Tensor& gate, const Tensor& proj, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                        const Tensor& mean, const Tensor& perm, const Tensor& offsets) {
  const Tensor xr = x.stride(1) == 1 ? x : x.contiguous();
  return dispatch_float(x.scalar_type(), [&](auto tag) {
    return calgan_fast::dev::routed_head_bwd<decltype(tag)>(glogits, gmean, gvar, xr, gate, proj, w1, b1, w2, mean,
                                                            perm, offsets);
  });
}

int64_t launches() { return calgan_fast::emu::launch_count(); }

int64_t bwd_launches() { return calgan_fast::dev::kBwdLaunches; }

void set_reverse_thread_order(bool reverse) { calgan_fast::emu::set_reverse_thread_order(reverse); }

}  // namespace

TORCH_LIBRARY(calgan_fast_emu, m) {
  m.def("routing_metadata(Tensor expert, int num_experts) -> (Tensor, Tensor, Tensor)", &routing_metadata);
  m.def("routed_head_fwd(Tensor x, Tensor expert, Tensor gate, Tensor proj, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2) -> Tensor[]",
        &fwd);
  m.def("routed_head_bwd(Tensor glogits, Tensor gmean, Tensor gvar, Tensor x, Tensor gate, Tensor proj, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor mean, Tensor perm, Tensor offsets) -> Tensor[]",
        &bwd);
  m.def("launches() -> int", &launches);
  m.def("bwd_launches() -> int", &bwd_launches);
  m.def("set_reverse_thread_order(bool reverse) -> ()", &set_reverse_thread_order);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
