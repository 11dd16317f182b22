// The raw CPU kernels of the routed head (no autograd), callable from C++ (csrc/tests) and
// registered for the CPU key of torch.ops.calgan_fast_C.{routing_metadata,routed_head_fwd,routed_head_bwd}.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace calgan_fast {
namespace cpu {

// (count (N,), offsets (N+1,), perm (M,)) int64: a stable counting sort of the rows by expert.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_metadata_cpu(const at::Tensor& expert, int64_t num_experts);

// (logits (M,) x.dtype, count, mean (N, c), var (N,), perm, offsets, xcov (N, c, c)); statistics fp32
// (fp64 for fp64 x). xcov holds each expert's cross-covariance sum_p (y_p - mean)(g_p x_p - x̄)^T of
// its output and gated input, for the backward (zero for experts the kernel handles without it).
std::vector<at::Tensor> routed_head_fwd_cpu(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& gate,
                                            const at::Tensor& proj, const at::Tensor& w1, const at::Tensor& b1,
                                            const at::Tensor& w2, const at::Tensor& b2);

// (dx, dgate, dproj, dw1, db1, dw2, db2) in the dtypes of the inputs; count, mean, perm, offsets and
// xcov are the forward's outputs.
std::vector<at::Tensor> routed_head_bwd_cpu(const at::Tensor& glogits, const at::Tensor& gmean,
                                            const at::Tensor& gvar, const at::Tensor& x, const at::Tensor& expert,
                                            const at::Tensor& gate, const at::Tensor& proj, const at::Tensor& w1,
                                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                            const at::Tensor& count, const at::Tensor& mean, const at::Tensor& perm,
                                            const at::Tensor& offsets, const at::Tensor& xcov);

}  // namespace cpu
}  // namespace calgan_fast
