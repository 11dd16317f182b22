// Row loops and per-expert products of the cpu kernel: gathering an expert's gated rows, the
// LeakyReLU and input-gradient passes, the scatter matrix, the hidden rows and the scratch
// buffers. Shared by the forward (routed_head_fwd_cpu.cpp) and the backward (routed_head_bwd_cpu.cpp).
#pragma once

#include "schedule.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "routed_head_checks.h"
#include "routed_head_common.h"
#include "tile_gemm.h"

namespace calgan_fast {
namespace cpu {

using at::Tensor;

namespace {

// The row loops below are memory-bound passes over one tile; they are compiled for AVX-512 and AVX2
// as well as the baseline ISA, and the loader picks the widest the CPU has (the build itself uses
// no -march flag, so that one binary runs on every x86-64 machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CALGAN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CALGAN_CPU_CLONES
#endif

// Rows ahead of the current one whose x row the gather asks the cache for: the rows of an expert
// lie scattered over x, which the hardware prefetcher cannot guess.
constexpr int64_t kPrefetchRows = 4;

// Rows of q a worker forms at a time in the backward: (96, c) fp32 stays in a core's L2 (and is one
// row block of the tile GEMM).
constexpr int64_t kQChunkRows = 96;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t c) {
  const int64_t per_line = std::max<int64_t>(1, 64 / static_cast<int64_t>(sizeof(scalar_t)));
  for (int64_t j = 0; j < c; j += per_line) __builtin_prefetch(row + j);
}

// The same for a row about to be written (fetched for ownership, so the store does not wait).
template <typename scalar_t>
inline void prefetch_row_for_write(scalar_t* row, int64_t c) {
  const int64_t per_line = std::max<int64_t>(1, 64 / static_cast<int64_t>(sizeof(scalar_t)));
  for (int64_t j = 0; j < c; j += per_line) __builtin_prefetch(row + j, 1);
}

// Rows r0..r1 of one expert: v_r = gate[perm[r]] * x[perm[r], :] in acc_t, written to w (rows ld
// apart) minus shift; s (c values) = the column sums of v_r - shift. The shift is the mean of a
// sample of the expert's rows (see expert_shift), so the sums, the shifted rows and the scatter
// matrix built from them hold deviations of the size of the expert's spread, however large its mean is
// next to that spread. With raw, the rows of x themselves (ungated, in acc_t) are kept there too
// (c apart), for the backward's dgate.
template <typename scalar_t, typename acc_t>
CALGAN_CPU_CLONES void gather_tile(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate,
                                   int64_t r0, int64_t r1, const acc_t* shift, acc_t* w, int64_t ld, acc_t* s,
                                   acc_t* raw) {
  for (int64_t j = 0; j < c; ++j) s[j] = acc_t(0);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kPrefetchRows < r1) prefetch_row(xp + perm[r + kPrefetchRows] * c, c);
    const int64_t p = perm[r];
    const acc_t g = gate[p];
    const scalar_t* src = xp + p * c;
    acc_t* dst = w + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const acc_t d = g * static_cast<acc_t>(src[j]) - shift[j];
      dst[j] = d;
      s[j] += d;
    }
    if (raw != nullptr) {
      acc_t* out = raw + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) out[j] = static_cast<acc_t>(src[j]);
    }
  }
}

// The shift of an expert's rows: the mean of kTileRows of its gated rows spread evenly over the
// expert (all of them if it has fewer), or zero where one of those is not finite (a NaN or
// infinity there would otherwise spread to every row of the expert, not just its own logit).
// Spread, not the first ones: rows in pixel order may drift (one image after another), and the
// closer the shift to the mean, the fewer digits the shifted rows lose.
template <typename scalar_t, typename acc_t>
inline void expert_shift(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate, int64_t n, acc_t* shift) {
  const int64_t rows = std::min(n, kTileRows);
  std::vector<double> sum(static_cast<size_t>(c), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = perm[i * n / rows];
    const double g = static_cast<double>(gate[p]);
    for (int64_t j = 0; j < c; ++j) sum[j] += g * static_cast<double>(xp[p * c + j]);
  }
  bool finite = true;
  for (int64_t j = 0; j < c; ++j) {
    shift[j] = static_cast<acc_t>(sum[j] / static_cast<double>(rows));
    finite = finite && std::isfinite(static_cast<double>(shift[j]));
  }
  if (!finite) std::fill(shift, shift + c, acc_t(0));
}

// Gathers the n gated rows of one expert, minus shift, into w (n, c; rows ld apart) and returns
// in dbar (c values) their mean and in xbar the mean of the gated rows (shift + dbar, rounded once):
// the tile sums are added up in double in tile order, so both are independent of the thread count.
// With raw, keeps the rows of x there (see gather_tile).
template <typename scalar_t, typename acc_t>
inline void gather_expert(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate, int64_t n,
                   const acc_t* shift, acc_t* w, int64_t ld, acc_t* dbar, acc_t* xbar, acc_t* raw = nullptr) {
  const int64_t nt = n_tiles_of(n);
  std::vector<acc_t> ts(static_cast<size_t>(nt * c));
  for_each_tile(n, [&](int64_t t, int64_t r0, int64_t r1) {
    gather_tile<scalar_t, acc_t>(xp, c, perm, gate, r0, r1, shift, w, ld, ts.data() + t * c, raw);
  });
  for (int64_t j = 0; j < c; ++j) {
    double s = 0.0;
    for (int64_t t = 0; t < nt; ++t) s += static_cast<double>(ts[t * c + j]);
    const double d = s / static_cast<double>(n);
    dbar[j] = static_cast<acc_t>(d);
    xbar[j] = static_cast<acc_t>(static_cast<double>(shift[j]) + d);
  }
}

// z = lrelu(h) in place over rows r0..r1 of an (n, hdim) block.
template <typename acc_t>
CALGAN_CPU_CLONES void lrelu_tile(acc_t* h, int64_t hdim, int64_t r0, int64_t r1) {
  acc_t* p = h + r0 * hdim;
  const int64_t len = (r1 - r0) * hdim;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) p[i] = lrelu(p[i]);
}

// The input gradients of rows r0..r1 of one expert, scattered to pixel order: with
// v_r = q_r + ota = O^T dy_r, dx = g v_r and dgate = v_r . x, with x from xr, the expert's rows of x
// as gathered (not rebuilt from the shifted rows as (w_s + shift) / g, which would lose digits
// wherever g x is small next to the shift). q holds rows q_row0 onwards (the backward forms q by
// chunks of rows).
template <typename scalar_t, typename acc_t>
CALGAN_CPU_CLONES void input_grad_tile(const acc_t* q, int64_t q_row0, const acc_t* ota, const acc_t* xr_rows,
                                       const int64_t* perm, const acc_t* gate, int64_t c, int64_t r0, int64_t r1,
                                       scalar_t* dx, acc_t* dgate) {
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kPrefetchRows < r1) prefetch_row_for_write(dx + perm[r + kPrefetchRows] * c, c);
    const int64_t p = perm[r];
    const acc_t g = gate[p];
    const acc_t* qr = q + (r - q_row0) * c;
    const acc_t* xr = xr_rows + r * c;
    scalar_t* dst = dx + p * c;
    // Eight running partial sums (a fixed order) let the compiler vectorise the dot product.
    acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= c; j += 8) {
      for (int l = 0; l < 8; ++l) {
        const acc_t v = qr[j + l] + ota[j + l];
        dst[j + l] = static_cast<scalar_t>(g * v);
        part[l] += v * xr[j + l];
      }
    }
    for (; j < c; ++j) {
      const acc_t v = qr[j] + ota[j];
      dst[j] = static_cast<scalar_t>(g * v);
      part[0] += v * xr[j];
    }
    dgate[p] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
}

// S = W^T W of an (n, c) block into out (c, c), a symmetric rank-n update (which ATen does not
// offer): one GEMM per band of kGramBlock rows of S, from the diagonal rightwards, mirrored below
// it. Counted in multiply-adds that is c^2 n (c + kGramBlock) / (2 c) instead of c^2 n, and a
// band's GEMM is wide enough to keep MKL's packing cheap. The bands write disjoint parts of out.
constexpr int64_t kGramBlock = 64;
inline int64_t scatter_bands(int64_t c) { return c < 2 * kGramBlock ? 1 : (c + kGramBlock - 1) / kGramBlock; }

inline void scatter_band(const Tensor& w, Tensor& out, int64_t b) {
  const int64_t c = w.size(1);
  if (c < 2 * kGramBlock) {
    at::mm_out(out, w.t(), w);
    return;
  }
  const int64_t i0 = b * kGramBlock, ci = std::min(kGramBlock, c - i0);
  const Tensor band = at::mm(w.narrow(1, i0, ci).t(), w.narrow(1, i0, c - i0));  // (ci, c - i0)
  out.narrow(0, i0, ci).narrow(1, i0, c - i0).copy_(band);
  if (c - i0 > ci) out.narrow(0, i0 + ci, c - i0 - ci).narrow(1, i0, ci).copy_(band.narrow(1, ci, c - i0 - ci).t());
}

inline void scatter_matrix(const Tensor& w, Tensor out) {
  for (int64_t b = 0; b < scatter_bands(w.size(1)); ++b) scatter_band(w, out, b);
}

// <P, S> of two (c, c) matrices, summed in double in a fixed order.
template <typename acc_t>
acc_t frobenius_dot(const Tensor& p, const Tensor& s) {
  const acc_t* a = p.data_ptr<acc_t>();
  const acc_t* b = s.data_ptr<acc_t>();
  const int64_t len = p.numel();
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<double>(a[i + l]) * static_cast<double>(b[i + l]);
  for (; i < len; ++i) part[0] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return static_cast<acc_t>(((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])));
}

// Whether the products with an expert's rows run on the tile GEMMs: fp32 compute, experts on
// workers (single-threaded GEMMs), c a multiple of the tile width, and a CPU that has the kernels.
template <typename acc_t>
inline bool use_tile_gemms(const Schedule& sched, int64_t c) {
  return std::is_same_v<acc_t, float> && sched.parallel && c % tile_gemm::kNR == 0 && tile_gemm::available();
}

// The hidden pre-activations of an expert's rows, h = W A^T + bias, into H (rows ldh apart): W its
// (n, c) shifted rows (ldw apart), A = W1 O (hdim, c). On the tile GEMM where tiled (fp32 only).
template <typename acc_t>
inline void hidden_rows(bool tiled, const Tensor& W, int64_t ldw, const Tensor& A, const Tensor& bias, Tensor& H, int64_t ldh) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (tiled) {
      const int64_t n = W.size(0), c = W.size(1), hdim = A.size(0);
      const Tensor At = A.t().contiguous();  // (c, hdim)
      std::vector<float> packed(static_cast<size_t>(tile_gemm::packed_size(c, hdim)));
      tile_gemm::pack_b(At.data_ptr<float>(), hdim, c, hdim, packed.data());
      float* hp = H.data_ptr<float>();
      tile_gemm::nn(n, hdim, c, W.data_ptr<float>(), ldw, packed.data(), hp, ldh);
      const float* bp = bias.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r) {
        float* hr = hp + r * ldh;
#pragma omp simd
        for (int64_t j = 0; j < hdim; ++j) hr[j] += bp[j];
      }
      return;
    }
  }
  (void)ldw;
  (void)ldh;
  at::addmm_out(H, bias, W, A.t());
}

// Per-worker scratch: one expert's gated rows (w), a second (n, c) block (q), and its hidden rows.
struct Scratch {
  std::vector<Tensor> w, q, h;
  Scratch(int64_t workers, int64_t rows, int64_t c, int64_t ldw, int64_t hdim, const at::TensorOptions& opts,
          bool need_q) {
    for (int64_t i = 0; i < workers; ++i) {
      w.push_back(at::empty({rows, ldw}, opts));
      q.push_back(need_q ? at::empty({rows, c}, opts) : Tensor());
      h.push_back(at::empty({rows, hdim}, opts));
    }
  }
};

// Asks the kernel to back the 2 MiB-aligned interior of a large, fresh tensor with huge pages
// (where transparent huge pages are on for regions that ask): the first writes to it (scattered,
// for dx) then take a few faults instead of one per 4 KiB page. A hint only; memory already mapped is kept.
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Rows of x as a contiguous (M, c) tensor in x's dtype (a transposed NCHW view gets one copy).
inline Tensor rows_contiguous(const Tensor& x) { return x.stride(1) == 1 && x.stride(0) == x.size(1) ? x : x.contiguous(); }

}  // namespace

}  // namespace cpu
}  // namespace calgan_fast
