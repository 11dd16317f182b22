// The `cuda` backend of the routed head.
//
// Tensors (M rows, c channels, N experts, H = hdim; statistics fp32):
//   x (M, c) fp16/bf16/fp32, any strides;  expert (M,) int64;  gate (M,);  proj O (N, c, c);
//   w1 (N, H, c);  b1 (N, H);  w2 (N, H);  b2 (N,)  (floats all in x.dtype).
//   forward  -> logits (M,) x.dtype, count (N,), mean (N, c) fp32, var (N,) fp32, perm (M,), offsets (N+1,)
//   backward -> dx, dgate, dproj, dw1, db1, dw2, db2 in x.dtype.
//
// Forward:
//   1. Routing metadata by a stable counting sort: per-block histograms (_routing_hist_kernel),
//      one ordered scan over (expert, block) (_routing_scan_kernel), and a placement that ranks each
//      row among the earlier rows of its block with the same expert (_routing_place_kernel). Integer
//      work only, so the permutation is exact and deterministic.
//   2. _routed_head_fwd_kernel, one CTA per tile of up to kBM rows of one expert: gathers the tile's
//      rows of x through perm (the gather-GEMM: x is never permuted in memory) and multiplies by O_e^T
//      in column chunks of kBN on tensor cores (WMMA m16n16k16, fp32 accumulation) for fp16/bf16, or
//      with FMA tiles for fp32 (exact fp32, as the tests expect with TF32 off). The epilogue of each
//      chunk scales by the gate, adds the chunk's contribution to h = y W1_e^T, and reduces the
//      chunk's columns into the tile mean and M2; after the last chunk it applies the classifier
//      (classifier_logit, shared with the CPU kernel) and scatters the logits.
//   3. _routed_head_stats_merge_kernel, one CTA per expert: merges the tile statistics in tile
//      order by Chan's formula (chan_merge_delta2, shared with the CPU kernel).
//   No float atomics: bitwise identical results run to run.
//
// Backward: the algebra of csrc/cpu/routed_head_cpu.cpp (no recomputation of y; one (n, c)x(c, c)
// GEMM for dx plus the Gram matrix of the centred rows), as per-expert cuBLAS GEMMs and
// deterministic ATen reductions on the device.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "routed_head_checks.h"
#include "routed_head_common.h"

namespace calgan_fast {
namespace cuda {

using at::Tensor;

namespace {

constexpr int kBM = 64;   // rows per tile (a CTA)
constexpr int kBN = 64;   // output columns per chunk
constexpr int kBK = 32;   // reduction slice
constexpr int kPad = 8;   // keeps WMMA leading dimensions multiples of 8 and spreads banks
constexpr int kThreads = 128;
constexpr int kSortBlock = 256;
static_assert(kBM == kBN, "one loop fills both operand tiles");
static_assert(kBM == 16 * (kThreads / 32), "one 16-row WMMA strip per warp");

// ---------------------------------------------------------------- routing metadata

// An expert id out of range is clamped into [0, N): it never indexes memory, and its row counts for
// expert 0 (id < 0) or N - 1 (id >= N), as with expert.clamp(0, N - 1).
__device__ __forceinline__ int64_t clamp_id(int64_t id, int64_t n_exp) {
  return id < 0 ? 0 : (id >= n_exp ? n_exp - 1 : id);
}

__global__ void _routing_hist_kernel(const int64_t* __restrict__ expert, int64_t m, int64_t n_exp,
                                     int64_t* __restrict__ hist) {
  __shared__ int64_t ids[kSortBlock];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSortBlock + threadIdx.x;
  const int64_t id = row < m ? clamp_id(expert[row], n_exp) : -1;
  ids[threadIdx.x] = id;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n_exp; e += kSortBlock) {
    int64_t cnt = 0;
    for (int i = 0; i < kSortBlock; ++i) cnt += ids[i] == e;
    hist[static_cast<int64_t>(blockIdx.x) * n_exp + e] = cnt;
  }
}

// base[b * N + e] = rows of experts < e (all blocks) + rows of expert e in blocks < b: an exclusive
// scan of hist in (expert, block) order. One CTA: each thread scans a contiguous run of that order,
// a tree scan over the CTA combines the runs (integers: exact, any order gives the same result).
constexpr int kScanThreads = 1024;

__global__ void __launch_bounds__(kScanThreads) _routing_scan_kernel(
    const int64_t* __restrict__ hist, int64_t n_blocks, int64_t n_exp, int64_t* __restrict__ base,
    int64_t* __restrict__ count, int64_t* __restrict__ offsets) {
  __shared__ int64_t part[kScanThreads];
  const int tid = threadIdx.x;
  const int64_t len = n_blocks * n_exp;
  const int64_t per = (len + kScanThreads - 1) / kScanThreads;
  const int64_t i0 = tid * per < len ? tid * per : len;
  const int64_t i1 = i0 + per < len ? i0 + per : len;
  // Element i of the order is (e, b) = (i / n_blocks, i % n_blocks): stepped, not divided, per element.
  const int64_t e0 = n_blocks > 0 ? i0 / n_blocks : 0, b0 = n_blocks > 0 ? i0 % n_blocks : 0;
  int64_t own = 0;
  for (int64_t i = i0, e = e0, b = b0; i < i1; ++i) {
    own += hist[b * n_exp + e];
    if (++b == n_blocks) b = 0, ++e;
  }
  part[tid] = own;
  __syncthreads();
  for (int d = 1; d < kScanThreads; d <<= 1) {  // inclusive Hillis-Steele scan of the runs
    const int64_t v = tid >= d ? part[tid - d] : 0;
    __syncthreads();
    part[tid] += v;
    __syncthreads();
  }
  int64_t run = part[tid] - own;
  for (int64_t i = i0, e = e0, b = b0; i < i1; ++i) {
    if (b == 0) offsets[e] = run;
    base[b * n_exp + e] = run;
    run += hist[b * n_exp + e];
    if (++b == n_blocks) b = 0, ++e;
  }
  const int64_t total = part[kScanThreads - 1];
  if (n_blocks == 0) {
    for (int64_t e = tid; e < n_exp; e += kScanThreads) offsets[e] = 0;
  }
  __syncthreads();  // offsets[e] of other threads are visible from here
  for (int64_t e = tid; e < n_exp; e += kScanThreads) count[e] = (e + 1 < n_exp ? offsets[e + 1] : total) - offsets[e];
  if (tid == 0) offsets[n_exp] = total;
}

__global__ void _routing_place_kernel(const int64_t* __restrict__ expert, int64_t m, int64_t n_exp,
                                      const int64_t* __restrict__ base, int64_t* __restrict__ perm) {
  __shared__ int64_t ids[kSortBlock];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSortBlock + threadIdx.x;
  const int64_t id = row < m ? clamp_id(expert[row], n_exp) : -1;
  ids[threadIdx.x] = id;
  __syncthreads();
  if (row >= m) return;
  int64_t rank = 0;
  for (int i = 0; i < static_cast<int>(threadIdx.x); ++i) rank += ids[i] == id;
  perm[base[static_cast<int64_t>(blockIdx.x) * n_exp + id] + rank] = row;
}

// ---------------------------------------------------------------- forward

template <typename T>
struct WmmaType {
  using type = void;  // no tensor-core path
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// Row stride of the staged W1 chunk in shared memory: odd, so that threads reading rows j, j + 1, ...
// at one column hit different banks.
constexpr int64_t kW1Ld = kBN + 1;

// Row stride of the tile's hidden activations in shared memory: odd, so that the threads of a warp,
// one row each, read 32 different banks in the classifier epilogue.
__host__ __device__ __forceinline__ int64_t hs_stride(int64_t hdim) { return hdim | 1; }

// Deterministic sum over the CTA (fixed tree); every thread gets the result.
__device__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float out = red[0];
  __syncthreads();
  return out;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _routed_head_fwd_kernel(
    const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1, const scalar_t* __restrict__ gate,
    const scalar_t* __restrict__ proj, const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
    const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ tile_lo, const int64_t* __restrict__ tile_n, const int64_t* __restrict__ tile_e,
    int64_t c, int64_t hdim, scalar_t* __restrict__ logits, float* __restrict__ t_mean,
    float* __restrict__ t_m2) {
  using wmma_t = typename WmmaType<scalar_t>::type;
  constexpr bool kTensorCores = !std::is_same<wmma_t, void>::value;
  __shared__ __align__(32) scalar_t As[kBM][kBK + kPad];
  __shared__ __align__(32) scalar_t Bs[kBN][kBK + kPad];  // Bs[col][k] = O_e[col][k]: B = O_e^T, col-major
  __shared__ __align__(32) float Ys[kBM][kBN + 4];
  __shared__ float gs[kBM];
  __shared__ int64_t rows[kBM];
  __shared__ float red[kThreads];
  extern __shared__ float dyn[];  // hs[kBM * hs_ld], w2s[hdim], w1s[hdim * kW1Ld]
  const int64_t hs_ld = hs_stride(hdim);
  float* hs = dyn;
  float* w2s = dyn + kBM * hs_ld;
  float* w1s = w2s + hdim;  // the chunk's columns of W1_e, staged by coalesced loads

  const int64_t t = blockIdx.x;
  const int64_t e = tile_e[t];
  if (e < 0) return;  // past the last tile (the grid is sized by the bound cdiv(M, kBM) + N)
  const int64_t lo = tile_lo[t], nt = tile_n[t];
  const int tid = threadIdx.x;
  const scalar_t* Oe = proj + e * c * c;
  const scalar_t* W1e = w1 + e * hdim * c;
  for (int r = tid; r < kBM; r += kThreads) {
    const int64_t p = r < nt ? perm[lo + r] : -1;
    rows[r] = p;
    gs[r] = p >= 0 ? to_f(gate[p]) : 0.f;
  }
  for (int64_t i = tid; i < kBM * hs_ld; i += kThreads) hs[i] = 0.f;
  for (int64_t i = tid; i < hdim; i += kThreads) w2s[i] = to_f(w2[e * hdim + i]);
  __syncthreads();

  float m2_part = 0.f;
  for (int64_t col0 = 0; col0 < c; col0 += kBN) {
    // ---- Y chunk = X_tile O_e[col0:col0+kBN]^T
    float acc[4][8];
    if constexpr (!kTensorCores) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cfrag[4];
    if constexpr (kTensorCores) {
#pragma unroll
      for (int f = 0; f < 4; ++f) wmma::fill_fragment(cfrag[f], 0.f);
    }
    for (int64_t k0 = 0; k0 < c; k0 += kBK) {
      for (int i = tid; i < kBM * kBK; i += kThreads) {
        const int r = i / kBK, k = i % kBK;
        const int64_t p = rows[r];
        As[r][k] = (p >= 0 && k0 + k < c) ? x[p * sx0 + (k0 + k) * sx1] : scalar_t(0.f);
        const int64_t col = col0 + r;  // kBN == kBM: the same loop fills Bs
        Bs[r][k] = (col < c && k0 + k < c) ? Oe[col * c + k0 + k] : scalar_t(0.f);
      }
      __syncthreads();
      if constexpr (kTensorCores) {
        const int warp = tid / 32;  // rows [16 warp, 16 warp + 16), all kBN columns
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> afrag;
          wmma::load_matrix_sync(afrag, reinterpret_cast<const wmma_t*>(&As[warp * 16][kk]), kBK + kPad);
#pragma unroll
          for (int f = 0; f < 4; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> bfrag;
            wmma::load_matrix_sync(bfrag, reinterpret_cast<const wmma_t*>(&Bs[f * 16][kk]), kBK + kPad);
            wmma::mma_sync(cfrag[f], afrag, bfrag, cfrag[f]);
          }
        }
      } else {
        const int tr = tid / 8, tc = tid % 8;  // rows 4 tr.., columns 8 tc..
#pragma unroll 4
        for (int k = 0; k < kBK; ++k) {
          float a[4], b[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = to_f(As[tr * 4 + i][k]);
#pragma unroll
          for (int j = 0; j < 8; ++j) b[j] = to_f(Bs[tc * 8 + j][k]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
    if constexpr (kTensorCores) {
      const int warp = tid / 32;
#pragma unroll
      for (int f = 0; f < 4; ++f)
        wmma::store_matrix_sync(&Ys[warp * 16][f * 16], cfrag[f], kBN + 4, wmma::mem_row_major);
    } else {
      const int tr = tid / 8, tc = tid % 8;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) Ys[tr * 4 + i][tc * 8 + j] = acc[i][j];
    }
    __syncthreads();
    // ---- epilogue of the chunk: gate, tile statistics, contribution to h
    const int64_t ncol = c - col0 < kBN ? c - col0 : kBN;
    for (int i = tid; i < kBM * kBN; i += kThreads) Ys[i / kBN][i % kBN] *= gs[i / kBN];
    for (int64_t i = tid; i < hdim * kBN; i += kThreads) {
      const int64_t j = i / kBN, q = i % kBN;
      w1s[j * kW1Ld + q] = q < ncol ? to_f(W1e[j * c + col0 + q]) : 0.f;
    }
    __syncthreads();
    if (tid < ncol) {
      float s = 0.f;
      for (int r = 0; r < nt; ++r) s += Ys[r][tid];
      const float mu = s / static_cast<float>(nt);
      float m2 = 0.f;
      for (int r = 0; r < nt; ++r) {
        const float d = Ys[r][tid] - mu;
        m2 += d * d;
      }
      t_mean[t * c + col0 + tid] = mu;
      m2_part += m2;
    }
    for (int64_t i = tid; i < nt * hdim; i += kThreads) {
      const int64_t r = i / hdim, j = i % hdim;
      const float* wrow = w1s + j * kW1Ld;
      float s = 0.f;
      for (int64_t q = 0; q < ncol; ++q) s += Ys[r][q] * wrow[q];
      hs[r * hs_ld + j] += s;
    }
    __syncthreads();
  }
  // ---- classifier and logit scatter
  for (int64_t i = tid; i < nt * hdim; i += kThreads) hs[(i / hdim) * hs_ld + i % hdim] += to_f(b1[e * hdim + i % hdim]);
  __syncthreads();
  if (tid < nt) {
    logits[rows[tid]] = static_cast<scalar_t>(classifier_logit(hs + tid * hs_ld, w2s, to_f(b2[e]), hdim));
  }
  const float m2 = block_sum(m2_part, red);
  if (tid == 0) t_m2[t] = m2;
}

__global__ void _routed_head_stats_merge_kernel(const float* __restrict__ t_mean, const float* __restrict__ t_m2,
                                                const int64_t* __restrict__ tile_n,
                                                const int64_t* __restrict__ tile_first, int64_t c,
                                                float* __restrict__ mean, float* __restrict__ var) {
  __shared__ float red[kThreads];
  const int64_t e = blockIdx.x;
  float* mu = mean + e * c;
  for (int64_t j = threadIdx.x; j < c; j += kThreads) mu[j] = 0.f;
  float n_a = 0.f, m2 = 0.f;
  for (int64_t t = tile_first[e]; t < tile_first[e + 1]; ++t) {
    const float n_b = static_cast<float>(tile_n[t]);
    const float n = n_a + n_b;
    float extra = 0.f;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) extra += chan_merge_delta2(mu[j], t_mean[t * c + j], n_b / n);
    extra = block_sum(extra, red);
    m2 = m2 + t_m2[t] + extra * (n_a * n_b / n);
    n_a = n;
  }
  if (threadIdx.x == 0) var[e] = n_a > 0.f ? m2 / (n_a * static_cast<float>(c)) : 0.f;
}

// The tile map: each expert's rows cut into tiles of kBM rows, built on the device from the offsets.
// Its size is the bound cdiv(M, kBM) + N on the number of tiles, so no count travels to the host;
// entries past the last tile get e = -1 and n = 0.
struct DeviceTiles {
  Tensor lo, n, e, first;
  int64_t count;  // the bound, the grid of the tile kernels
};

__global__ void _tile_map_kernel(const int64_t* __restrict__ offsets, int64_t n_exp, int64_t t_max,
                                 int64_t* __restrict__ tile_lo, int64_t* __restrict__ tile_n,
                                 int64_t* __restrict__ tile_e, int64_t* __restrict__ first) {
  if (threadIdx.x == 0) {  // N steps
    int64_t run = 0;
    for (int64_t i = 0; i < n_exp; ++i) {
      first[i] = run;
      run += (offsets[i + 1] - offsets[i] + kBM - 1) / kBM;
    }
    first[n_exp] = run;
  }
  __syncthreads();
  for (int64_t i = 0; i < n_exp; ++i) {
    const int64_t lo = offsets[i], hi = offsets[i + 1], f = first[i];
    for (int64_t j = threadIdx.x; j < first[i + 1] - f; j += blockDim.x) {
      const int64_t r = lo + j * kBM;
      tile_lo[f + j] = r;
      tile_n[f + j] = hi - r < kBM ? hi - r : kBM;
      tile_e[f + j] = i;
    }
  }
  for (int64_t t = first[n_exp] + threadIdx.x; t < t_max; t += blockDim.x) {
    tile_lo[t] = 0;
    tile_n[t] = 0;
    tile_e[t] = -1;
  }
}

DeviceTiles make_tiles(const Tensor& offsets, int64_t m, cudaStream_t stream) {
  const int64_t n_exp = offsets.size(0) - 1;
  const int64_t t_max = (m + kBM - 1) / kBM + n_exp;
  const auto lopts = offsets.options();
  DeviceTiles t{at::empty({t_max}, lopts), at::empty({t_max}, lopts), at::empty({t_max}, lopts),
                at::empty({n_exp + 1}, lopts), t_max};
  _tile_map_kernel<<<1, 1024, 0, stream>>>(offsets.data_ptr<int64_t>(), n_exp, t_max, t.lo.data_ptr<int64_t>(),
                                           t.n.data_ptr<int64_t>(), t.e.data_ptr<int64_t>(),
                                           t.first.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return t;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> routing_metadata_cuda(const Tensor& expert, int64_t num_experts) {
  TORCH_CHECK(expert.is_cuda(), "expert: expected a CUDA tensor, got one on ", expert.device());
  TORCH_CHECK(expert.dim() == 1, "expert: expected shape (M,), got ", expert.sizes());
  TORCH_CHECK(expert.scalar_type() == at::kLong, "expert: expected int64, got ", expert.scalar_type());
  TORCH_CHECK(num_experts > 0, "num_experts: must be positive, got ", num_experts);
  const c10::cuda::CUDAGuard guard(expert.device());
  const Tensor ex = expert.contiguous();
  const int64_t m = ex.size(0);
  const auto lopts = ex.options();
  const int64_t n_blocks = (m + kSortBlock - 1) / kSortBlock;
  Tensor hist = at::empty({n_blocks > 0 ? n_blocks * num_experts : 1}, lopts);
  Tensor base = at::empty_like(hist);
  Tensor count = at::empty({num_experts}, lopts), offsets = at::empty({num_experts + 1}, lopts);
  Tensor perm = at::empty({m}, lopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n_blocks > 0) {
    _routing_hist_kernel<<<static_cast<unsigned>(n_blocks), kSortBlock, 0, stream>>>(ex.data_ptr<int64_t>(), m, num_experts,
                                                              hist.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  _routing_scan_kernel<<<1, kScanThreads, 0, stream>>>(hist.data_ptr<int64_t>(), n_blocks, num_experts, base.data_ptr<int64_t>(),
                                            count.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (n_blocks > 0) {
    _routing_place_kernel<<<static_cast<unsigned>(n_blocks), kSortBlock, 0, stream>>>(ex.data_ptr<int64_t>(), m, num_experts,
                                                               base.data_ptr<int64_t>(), perm.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {count, offsets, perm};
}

std::vector<Tensor> routed_head_fwd_cuda(const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                         const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  check_routed_head_args(x, expert, gate, proj, w1, b1, w2, b2, c10::DeviceType::CUDA);
  // The kernel picks its own precisions: an enclosing autocast region must not recast its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "x: the cuda backend takes fp16/bf16/fp32; use backend='torch' for fp64");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  auto [count, offsets, perm] = routing_metadata_cuda(expert, n_exp);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const DeviceTiles tiles = make_tiles(offsets, m, stream);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor logits = at::empty({m}, x.options());
  Tensor t_mean = at::empty({tiles.count > 0 ? tiles.count * c : 1}, fopts);
  Tensor t_m2 = at::empty({tiles.count > 0 ? tiles.count : 1}, fopts);
  Tensor mean = at::empty({n_exp, c}, fopts), var = at::empty({n_exp}, fopts);
  const Tensor G = gate.contiguous(), O = proj.contiguous(), W1 = w1.contiguous(), B1 = b1.contiguous();
  const Tensor W2 = w2.contiguous(), B2 = b2.contiguous();
  const size_t dyn = sizeof(float) * static_cast<size_t>(kBM * hs_stride(hdim) + hdim + hdim * kW1Ld);
  auto launch = [&](auto tag) {
    {
      using scalar_t = decltype(tag);
      auto kernel = _routed_head_fwd_kernel<scalar_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)));
      if (tiles.count > 0) {
        kernel<<<static_cast<unsigned>(tiles.count), kThreads, dyn, stream>>>(
            x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), G.data_ptr<scalar_t>(), O.data_ptr<scalar_t>(),
            W1.data_ptr<scalar_t>(), B1.data_ptr<scalar_t>(), W2.data_ptr<scalar_t>(), B2.data_ptr<scalar_t>(),
            perm.data_ptr<int64_t>(), tiles.lo.data_ptr<int64_t>(), tiles.n.data_ptr<int64_t>(),
            tiles.e.data_ptr<int64_t>(), c, hdim, logits.data_ptr<scalar_t>(), t_mean.data_ptr<float>(),
            t_m2.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(at::Half{}); break;
    case at::kBFloat16: launch(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "x: the cuda backend takes fp16/bf16/fp32, got ", x.scalar_type());
  }
  _routed_head_stats_merge_kernel<<<static_cast<unsigned>(n_exp), kThreads, 0, stream>>>(
      t_mean.data_ptr<float>(), t_m2.data_ptr<float>(), tiles.n.data_ptr<int64_t>(), tiles.first.data_ptr<int64_t>(),
      c, mean.data_ptr<float>(), var.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, count, mean, var, perm, offsets};
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
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "x: the cuda backend takes fp16/bf16/fp32; use backend='torch' for fp64");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  const auto f32 = at::kFloat;
  const Tensor O = proj.to(f32), W1 = w1.to(f32), B1 = b1.to(f32), W2 = w2.to(f32);
  const Tensor GL = glogits.to(f32), GM = gmean.to(f32), GV = gvar.to(f32);
  const Tensor off_cpu = offsets.cpu();  // the per-expert loop below runs on the host
  if (debug_checks()) check_routing_metadata(perm, off_cpu, count, m, n_exp);
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
