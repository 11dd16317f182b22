// Per-row and per-tile math of the routed head shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels, so that the CPU tests exercise the code the GPU epilogues run.
//
// Notation (docs/design.md §3): row p routed to expert e with gate g;
//   y = g * O[e] x,  h = W1[e] y + b1[e],  z = lrelu(h, 0.2),  logit = w2[e] . z + b2[e];
// per expert i over its n_i rows: mean_i = mean of y (c-vector),
//   var_i = (1 / (n_i c)) * sum_rows sum_channels (y - mean_i)^2.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CALGAN_HD __host__ __device__ __forceinline__
#else
#define CALGAN_HD inline
#endif

namespace calgan_fast {

// Negative slope of every LeakyReLU of the discriminator (calgan_fast.reference.LRELU_SLOPE).
constexpr double kLReluSlope = 0.2;

template <typename T>
CALGAN_HD T lrelu(T h) {
  return h > T(0) ? h : static_cast<T>(kLReluSlope) * h;
}

// d lrelu / dh; the kink at 0 takes the slope, as torch's leaky_relu backward does.
template <typename T>
CALGAN_HD T lrelu_grad(T h) {
  return h > T(0) ? T(1) : static_cast<T>(kLReluSlope);
}

// logit of one row from its hidden layer before the bias (hdim values, `stride` apart) and b1; the
// CUDA epilogue's form (the CPU forward takes the logits of an expert as one GEMV over lrelu(h)).
template <typename T>
CALGAN_HD T classifier_logit(const T* h, int64_t stride, const T* b1, const T* w2, T b2, int64_t hdim) {
  T s = b2;
  for (int64_t j = 0; j < hdim; ++j) s += w2[j] * lrelu(h[j * stride] + b1[j]);
  return s;
}

// Gradient of the classifier of one row: dh = glogit * w2 * lrelu'(h), written over h in place
// after z = lrelu(h) has been added, times glogit, into dw2_acc and dh into db1_acc.
template <typename T>
CALGAN_HD void classifier_backward_row(T* h, const T* w2, T glogit, int64_t hdim, T* dw2_acc, T* db1_acc) {
  for (int64_t j = 0; j < hdim; ++j) {
    const T hj = h[j];
    dw2_acc[j] += glogit * lrelu(hj);
    const T dh = glogit * w2[j] * lrelu_grad(hj);
    db1_acc[j] += dh;
    h[j] = dh;
  }
}

// Running statistics of a set of rows of y: count, per-channel mean and the sum over channels of
// the squared deviations from it (M2). Two sets merge by Chan's formula, which stays accurate
// where E[y^2] - E[y]^2 in fp32 would cancel.
//
// One channel of a merge of set b into set a: moves mean_a towards mean_b by frac_b = n_b / (n_a + n_b)
// and returns the squared difference of the two means, whose sum over channels times
// n_a n_b / (n_a + n_b) is the M2 the merge adds. (The CUDA merge runs it per thread and channel.)
template <typename T>
CALGAN_HD T chan_merge_delta2(T& mean_a, T mean_b, T frac_b) {
  const T d = mean_b - mean_a;
  mean_a += d * frac_b;
  return d * d;
}

// Merges set b into set a: mean_a (c values) is updated in place; returns the new M2.
template <typename T>
CALGAN_HD T chan_merge(T n_a, T* mean_a, T m2_a, T n_b, const T* mean_b, T m2_b, int64_t c) {
  if (n_b <= T(0)) return m2_a;
  const T n = n_a + n_b;
  const T frac_b = n_b / n;
  T extra = T(0);
  for (int64_t j = 0; j < c; ++j) extra += chan_merge_delta2(mean_a[j], mean_b[j], frac_b);
  return m2_a + m2_b + extra * (n_a * n_b / n);
}

// Rows of one expert are cut into tiles of this many rows: the unit of parallel work and of the
// partial statistics, fixed so that results do not depend on the thread count.
constexpr int64_t kTileRows = 128;

}  // namespace calgan_fast
