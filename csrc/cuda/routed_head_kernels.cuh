// Device kernels of the `cuda` backend of the routed head (docs/backends.md, docs/design.md §6).
//
// Included after a platform header: csrc/cuda/platform_cuda.cuh on a GPU, or csrc/tests/cuda_emu.h,
// which runs the same kernels on CPU threads in the tests. The launchers are in routed_head_launch.h.
//
// Tensors (M rows, c channels, N experts, H = hdim; T = x.dtype, fp16/bf16/fp32):
//   x (M, c) T, rows sx0 apart (unit channel stride in the backward);  gate (M,) T;  proj O (N, c, c);
//   w1 (N, H, c);  b1 (N, H);  w2 (N, H);  b2 (N,);  perm (M,), offsets (N+1,) int64 (the routing);
//   statistics mean (N, c), var (N,) fp32.
//
// Forward (_routed_head_fwd_kernel): one CTA per tile of up to kTile rows of one expert; per
// 64-column chunk, y = g x O^T and h += y W1^T, both on tensor cores (WMMA, fp16/bf16) or exact
// FMA tiles (fp32), with the tile statistics from the fp32 y; the classifier in the epilogue;
// the tiles' statistics are merged (Chan) in two levels in a fixed order: _routed_head_stats_group_kernel
// per group of kGroupTiles tiles, then _routed_head_stats_merge_kernel per expert over its groups.
//
// Backward, with u = O x, y = g u, a = gmean / n, k = 2 gvar / (n c) per expert of n rows:
//   dh = glogit * w2 * lrelu'(h)                         (fp32, an (M, H) scratch in expert order)
//   dy = dh W1 + a + k (y - mean),  dgate = dy . u,  du = g dy   (du: an (M, c) scratch in T)
//   dx = du O,  dproj = du^T x,  dW1 = D O^T with D = dh^T (g x),  db1 = sum dh,  dw2 = sum glogit z,
//   db2 = sum glogit.
// Launches, each sized by bounds known on the host (no device value is read back):
//   _segment_maps_kernel    the tile (kTile rows), group (kGroupTiles tiles) and slab maps
//   _bwd_prep_kernel        A = W1 O per expert (planes of T summing to it in fp32 accuracy), so that
//                           h = g x A^T + b1 is an H-wide GEMM
//   _bwd_dy_kernel          per tile: h, dh, the classifier partials; per 64-column chunk u = x O^T
//                           (the one c-wide GEMM of the tile), dh W1, dy, du, dgate
//   _bwd_dx_kernel          per tile and 64-column chunk: dx = du O, scattered to the rows
//   _bwd_dproj_kernel       per row slab and 64x64 block: du^T x (fp32 partials)
//   _bwd_dw1_kernel         per row slab and 64x64 block: D = dh^T (g x) (fp32 partials)
//   _group_sum_kernel       classifier partials: tiles -> groups
//   _expert_sum_kernel x 3  groups / slabs -> experts, in order (dproj straight into its output)
//   _bwd_finish_kernel      dW1 = D O^T; db1, dw2, db2 in T
// Every GEMM takes its operands from shared memory in T with fp32 accumulation (WMMA m16n16k16) for
// fp16/bf16; the products with dh (fp32) run as TF32 WMMA (m16n16k8), so dh never takes fp16's
// range; fp32 inputs use exact fp32 FMA tiles. Partials are summed in a fixed order and no float
// atomic is used: results are bitwise reproducible.
#pragma once

#if !defined(CALGAN_DEVICE_PLATFORM_CUDA) && !defined(CALGAN_DEVICE_PLATFORM_EMU)
#error "include a platform header (csrc/cuda/platform_cuda.cuh or csrc/tests/cuda_emu.h) first"
#endif

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "routed_head_common.h"

namespace calgan_fast {
namespace dev {

constexpr int kThreads = 128;   // threads of every tile kernel (4 warps)
constexpr int kTile = 64;       // rows per tile; side of every CTA's output block
constexpr int kCld = kTile + 4;  // row stride of a CTA's fp32 output block in shared memory
constexpr int kGroupTiles = 32;  // tiles per group in the two-level merges (statistics, classifier partials)
constexpr int kSortBlock = 256;
constexpr int kScanThreads = 1024;
constexpr int kSumThreads = 128;

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

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

// ---------------------------------------------------------------- segment maps

// One map: each expert's rows (positions offsets[e] .. offsets[e+1] of perm) cut into segments of
// `rows` rows. Sized by the bound cdiv(M, rows) + N on the number of segments, so no count travels
// to the host; entries past the last segment get e = -1 and n = 0. first[e] is the first segment
// of expert e (first[N]: the number of segments).
struct SegmentMap {
  int64_t rows, count;
  int64_t *lo, *n, *e, *first;
};

struct SegmentMaps {
  SegmentMap map[3];
};

// Block b builds maps.map[b].
__global__ void _segment_maps_kernel(const int64_t* __restrict__ offsets, int64_t n_exp, SegmentMaps maps) {
  const SegmentMap sm = maps.map[blockIdx.x];
  if (threadIdx.x == 0) {  // N steps
    int64_t run = 0;
    for (int64_t i = 0; i < n_exp; ++i) {
      sm.first[i] = run;
      run += (offsets[i + 1] - offsets[i] + sm.rows - 1) / sm.rows;
    }
    sm.first[n_exp] = run;
  }
  __syncthreads();
  for (int64_t i = 0; i < n_exp; ++i) {
    const int64_t lo = offsets[i], hi = offsets[i + 1], f = sm.first[i];
    for (int64_t j = threadIdx.x; j < sm.first[i + 1] - f; j += blockDim.x) {
      const int64_t r = lo + j * sm.rows;
      sm.lo[f + j] = r;
      sm.n[f + j] = hi - r < sm.rows ? hi - r : sm.rows;
      sm.e[f + j] = i;
    }
  }
  for (int64_t t = sm.first[n_exp] + threadIdx.x; t < sm.count; t += blockDim.x) {
    sm.lo[t] = 0;
    sm.n[t] = 0;
    sm.e[t] = -1;
  }
}

// ---------------------------------------------------------------- forward

// Forward tile shape.
constexpr int kBM = kTile;  // rows per tile (a CTA)
constexpr int kBN = 64;     // output columns per chunk: the k extent of the chunk's hidden-layer GEMM
constexpr int kBK = 32;     // reduction slice of the y GEMM
constexpr int kPad = 8;     // operand rows of kBK + 8 elements: 16-byte multiples, rows spread over banks
constexpr int kAk = kBK + kPad;  // row stride of the y GEMM's operand slabs in shared memory
static_assert(kBM == kBN, "one loop fills both operand tiles");
static_assert(kBM == 16 * (kThreads / 32), "one 16-row WMMA strip per warp");

// Shared-memory strides of the forward's epilogue, in elements. Each keeps WMMA's leading dimension
// a multiple of 16 bytes and its fragment pointers 32-byte aligned, and is padded off a multiple of
// 128 bytes so that the rows a warp reads or writes at once start in different banks.
constexpr int kYLd = kBN + 8;    // the gated y chunk in T: the A operand of h += y W1^T (144-byte rows)
constexpr int kW1Ld = kBN + 8;   // the W1 chunk in T, one row per hidden unit: the B operand (col-major)
constexpr int kHsLd = kBM + 4;   // h in fp32, column-major: hidden unit j of the tile at hs + j kHsLd,
                                 // so the classifier's threads (one row each) read consecutive words
constexpr int kW1LdF = kBN + 1;  // the W1 chunk in fp32 (fp32 path): odd, threads reading rows j, j + 1,
                                 // ... at one column hit different banks
static_assert(kBM * kYLd <= 2 * kBM * kAk, "the y chunk in T fits the operand slabs it replaces");

// fp16/bf16 run both GEMMs of the forward on tensor cores; fp32 keeps exact FMA products.
template <typename T>
constexpr bool kHasWmma = !std::is_same_v<typename WmmaType<T>::type, void>;

// Hidden units padded to whole 16-wide WMMA fragments (the padding's W1 rows are zero).
__host__ __device__ __forceinline__ int64_t fwd_hpad(int64_t hdim) { return cdiv(hdim, 16) * 16; }

// Bytes of the staged W1 chunk: hpad rows of T (tensor cores) or hdim rows of fp32.
template <typename T>
__host__ __device__ __forceinline__ int64_t fwd_w1_bytes(int64_t hdim) {
  return kHasWmma<T> ? fwd_hpad(hdim) * kW1Ld * static_cast<int64_t>(sizeof(T))
                     : hdim * kW1LdF * static_cast<int64_t>(sizeof(float));
}

// Dynamic shared memory of the forward kernel: hs (hpad x kHsLd fp32), the W1 chunk, w2 and b1.
template <typename T>
inline size_t fwd_dynamic_smem(int64_t hdim) {
  return static_cast<size_t>(fwd_hpad(hdim) * kHsLd * 4 + fwd_w1_bytes<T>(hdim) + 2 * hdim * 4);
}

// Deterministic sum over the CTA (fixed tree); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float out = red[0];
  __syncthreads();
  return out;
}

// One CTA per tile of up to kBM rows of one expert. Per kBN-column chunk of y:
//   1. Ys = x_tile O_e[chunk]^T, K-sliced through shared memory (x rows gathered through perm and
//      read in place, any strides; 16-byte loads where `vec`: c % V == 0, x with unit channel
//      stride, x rows and O 16-byte aligned), WMMA m16n16k16 with fp32
//      accumulators for fp16/bf16, 4 x 8 FMA outputs per thread for fp32;
//   2. Ys *= g (fp32), the chunk's columns of the tile statistics;
//   3. h += y W1_e[:, chunk]^T: for fp16/bf16 on tensor cores, with y rounded to T (as a GEMM in T
//      would) and the W1 chunk staged in shared memory by coalesced loads (16 bytes where `vec_w1`:
//      c % V == 0 and W1 16-byte aligned), each warp its own
//      16 rows, the fp32 accumulators kept in shared memory across chunks; for fp32 exact FMA dots.
// Epilogue: logit = w2 . lrelu(h + b1) + b2 per row, scattered to the row's own position.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _routed_head_fwd_kernel(
    const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1, const scalar_t* __restrict__ gate,
    const scalar_t* __restrict__ proj, const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
    const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ tile_lo, const int64_t* __restrict__ tile_n, const int64_t* __restrict__ tile_e,
    int64_t c, int64_t hdim, bool vec, bool vec_w1, scalar_t* __restrict__ logits, float* __restrict__ t_mean,
    float* __restrict__ t_m2) {
  using wmma_t = typename WmmaType<scalar_t>::type;
  constexpr bool kTensorCores = kHasWmma<scalar_t>;
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));  // elements per 16-byte access
  // The y GEMM's operand slabs As (x rows) | Bs (Bs[col][k] = O_e[col][k]: B = O_e^T, col-major);
  // once the chunk's GEMM is done, the gated y chunk in T (Yt) in their place.
  __shared__ __align__(128) scalar_t stage[2 * kBM * kAk];
  __shared__ __align__(32) float Ys[kBM][kBN + 4];
  __shared__ float gs[kBM];
  __shared__ int64_t rows[kBM];
  __shared__ float red[kThreads];
  CALGAN_DYNAMIC_SMEM(unsigned char, dyn);  // hs | W1 chunk | w2 | b1
  scalar_t* As = stage;
  scalar_t* Bs = stage + kBM * kAk;
  scalar_t* Yt = stage;
  const int64_t hp = fwd_hpad(hdim);
  float* hs = reinterpret_cast<float*>(dyn);
  unsigned char* w1raw = dyn + hp * kHsLd * 4;
  scalar_t* w1t = reinterpret_cast<scalar_t*>(w1raw);  // tensor cores: hp x kW1Ld in T
  float* w1s = reinterpret_cast<float*>(w1raw);        // fp32: hdim x kW1LdF
  float* w2s = reinterpret_cast<float*>(w1raw + fwd_w1_bytes<scalar_t>(hdim));
  float* b1s = w2s + hdim;

  const int64_t t = blockIdx.x;
  const int64_t e = tile_e[t];
  if (e < 0) return;  // past the last tile (the grid is sized by the bound cdiv(M, kBM) + N): CTA-uniform
  const int64_t lo = tile_lo[t], nt = tile_n[t];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const scalar_t* Oe = proj + e * c * c;
  const scalar_t* W1e = w1 + e * hdim * c;
  for (int r = tid; r < kBM; r += kThreads) {
    const int64_t p = r < nt ? perm[lo + r] : -1;
    rows[r] = p;
    gs[r] = p >= 0 ? to_f(gate[p]) : 0.f;
  }
  for (int64_t i = tid; i < hp * kHsLd; i += kThreads) hs[i] = 0.f;
  for (int64_t i = tid; i < hdim; i += kThreads) {
    w2s[i] = to_f(w2[e * hdim + i]);
    b1s[i] = to_f(b1[e * hdim + i]);
  }
  __syncthreads();

  float m2_part = 0.f;
  for (int64_t col0 = 0; col0 < c; col0 += kBN) {
    const int64_t ncol = c - col0 < kBN ? c - col0 : kBN;
    // ---- 1. Ys = X_tile O_e[col0:col0+kBN]^T
    float acc[4][8];
    if constexpr (!kTensorCores) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cfrag[4];
    if constexpr (kTensorCores) {
#pragma unroll
      for (int f = 0; f < 4; ++f) wmma::fill_fragment(cfrag[f], 0.f);
    }
    for (int64_t k0 = 0; k0 < c; k0 += kBK) {
      if (vec) {  // c % V == 0, unit channel stride, 16-byte aligned rows: a vector is all in or all out
        for (int i = tid; i < kBM * (kBK / V); i += kThreads) {
          const int r = i / (kBK / V), k = (i % (kBK / V)) * V;
          const int64_t p = rows[r];
          const int64_t col = col0 + r;  // kBN == kBM: the same loop fills Bs
          vec16 a, b;
          a.x = a.y = a.z = a.w = 0u;
          b = a;
          if (k0 + k < c) {
            if (p >= 0) a = *reinterpret_cast<const vec16*>(x + p * sx0 + k0 + k);
            if (col < c) b = *reinterpret_cast<const vec16*>(Oe + col * c + k0 + k);
          }
          *reinterpret_cast<vec16*>(As + r * kAk + k) = a;
          *reinterpret_cast<vec16*>(Bs + r * kAk + k) = b;
        }
      } else {
        for (int i = tid; i < kBM * kBK; i += kThreads) {
          const int r = i / kBK, k = i % kBK;
          const int64_t p = rows[r];
          As[r * kAk + k] = (p >= 0 && k0 + k < c) ? x[p * sx0 + (k0 + k) * sx1] : scalar_t(0.f);
          const int64_t col = col0 + r;
          Bs[r * kAk + k] = (col < c && k0 + k < c) ? Oe[col * c + k0 + k] : scalar_t(0.f);
        }
      }
      __syncthreads();
      if constexpr (kTensorCores) {  // rows [16 warp, 16 warp + 16), all kBN columns
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> afrag;
          wmma::load_matrix_sync(afrag, reinterpret_cast<const wmma_t*>(As + warp * 16 * kAk + kk), kAk);
#pragma unroll
          for (int f = 0; f < 4; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> bfrag;
            wmma::load_matrix_sync(bfrag, reinterpret_cast<const wmma_t*>(Bs + f * 16 * kAk + kk), kAk);
            wmma::mma_sync(cfrag[f], afrag, bfrag, cfrag[f]);
          }
        }
      } else {
        const int tr = tid / 8, tc = tid % 8;  // rows 4 tr.., columns 8 tc..
#pragma unroll 4
        for (int k = 0; k < kBK; ++k) {
          float a[4], b[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = to_f(As[(tr * 4 + i) * kAk + k]);
#pragma unroll
          for (int j = 0; j < 8; ++j) b[j] = to_f(Bs[(tc * 8 + j) * kAk + k]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();  // the slabs are read: the next slab (or Yt) may overwrite them
    }
    if constexpr (kTensorCores) {
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
    // ---- 2. gate (each element by one thread: no barrier between the scaling and the rounding),
    // and the W1 chunk into shared memory
    for (int i = tid; i < kBM * kBN; i += kThreads) {
      const int r = i / kBN, q = i % kBN;
      const float v = Ys[r][q] * gs[r];
      Ys[r][q] = v;
      if constexpr (kTensorCores) Yt[r * kYLd + q] = static_cast<scalar_t>(v);
    }
    if constexpr (kTensorCores) {
      // Rows past hdim and columns past c are zero: the padding adds exact zeros to h.
      for (int64_t i = tid; i < hp * (kBN / V); i += kThreads) {
        const int64_t j = i / (kBN / V);
        const int q = static_cast<int>(i % (kBN / V)) * V;
        scalar_t* dst = w1t + j * kW1Ld + q;
        const scalar_t* src = W1e + j * c + col0 + q;
        if (vec_w1 && j < hdim && q < ncol) {  // c % V == 0: the vector is whole
          *reinterpret_cast<vec16*>(dst) = *reinterpret_cast<const vec16*>(src);
        } else {
#pragma unroll
          for (int u = 0; u < V; ++u) dst[u] = (j < hdim && q + u < ncol) ? src[u] : scalar_t(0.f);
        }
      }
    } else {
      for (int64_t i = tid; i < hdim * kBN; i += kThreads) {
        const int64_t j = i / kBN, q = i % kBN;
        w1s[j * kW1LdF + q] = q < ncol ? to_f(W1e[j * c + col0 + q]) : 0.f;
      }
    }
    __syncthreads();
    // ---- 3. the chunk's tile statistics (exact fp32 y) and h += y W1_e[:, chunk]^T
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
    if constexpr (kTensorCores) {
      if (warp * 16 < nt) {  // warp-uniform, and no barrier inside: strips of padding rows only are skipped
        wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> ya[kBN / 16];
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
          wmma::load_matrix_sync(ya[kk], reinterpret_cast<const wmma_t*>(Yt + warp * 16 * kYLd + kk * 16), kYLd);
        for (int64_t f = 0; f < hp / 16; ++f) {
          float* hfp = hs + f * 16 * kHsLd + warp * 16;  // rows of this warp, hidden units 16 f..
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> hf;
          wmma::load_matrix_sync(hf, hfp, kHsLd, wmma::mem_col_major);
#pragma unroll
          for (int kk = 0; kk < kBN / 16; ++kk) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> wb;
            wmma::load_matrix_sync(wb, reinterpret_cast<const wmma_t*>(w1t + f * 16 * kW1Ld + kk * 16), kW1Ld);
            wmma::mma_sync(hf, ya[kk], wb, hf);
          }
          wmma::store_matrix_sync(hfp, hf, kHsLd, wmma::mem_col_major);
        }
      }
    } else {
      for (int64_t i = tid; i < nt * hdim; i += kThreads) {
        const int64_t r = i / hdim, j = i % hdim;
        const float* wrow = w1s + j * kW1LdF;
        float s = 0.f;
        for (int64_t q = 0; q < ncol; ++q) s += Ys[r][q] * wrow[q];
        hs[j * kHsLd + r] += s;
      }
    }
    __syncthreads();  // Ys, Yt and the W1 chunk are read, hs is complete for the chunk
  }
  // ---- classifier and logit scatter (h column-major: a row's hidden units kHsLd apart)
  if (tid < nt) {
    const float logit = classifier_logit(hs + tid, int64_t{kHsLd}, b1s, w2s, to_f(b2[e]), hdim);
    logits[rows[tid]] = static_cast<scalar_t>(logit);
  }
  const float m2 = block_sum(m2_part, red);
  if (tid == 0) t_m2[t] = m2;
}

// Chan-merges the partial statistics [lo, hi) (means of c channels, M2, row counts) in order into
// mu (c values, written) and returns (rows, M2). Every thread of the CTA calls it.
__device__ __forceinline__ void chan_merge_range(const float* __restrict__ p_mean, const float* __restrict__ p_m2,
                                                 const int64_t* __restrict__ p_n, int64_t lo, int64_t hi, int64_t c,
                                                 float* __restrict__ mu, float* red, float& n_out, float& m2_out) {
  for (int64_t j = threadIdx.x; j < c; j += kThreads) mu[j] = 0.f;
  float n_a = 0.f, m2 = 0.f;
  for (int64_t t = lo; t < hi; ++t) {
    const float n_b = static_cast<float>(p_n[t]);
    const float n = n_a + n_b;
    float extra = 0.f;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) extra += chan_merge_delta2(mu[j], p_mean[t * c + j], n_b / n);
    extra = block_sum(extra, red);
    m2 = m2 + p_m2[t] + extra * (n_a * n_b / n);
    n_a = n;
  }
  n_out = n_a;
  m2_out = m2;
}

// First level of the statistics merge: one CTA per group of up to kGroupTiles consecutive tiles of
// one expert, merged in tile order into the group's mean and M2 (its row count is the group map's).
__global__ void __launch_bounds__(kThreads) _routed_head_stats_group_kernel(
    const float* __restrict__ t_mean, const float* __restrict__ t_m2, const int64_t* __restrict__ tile_n,
    const int64_t* __restrict__ tile_first, const int64_t* __restrict__ offsets, const int64_t* __restrict__ grp_lo,
    const int64_t* __restrict__ grp_n, const int64_t* __restrict__ grp_e, int64_t c, float* __restrict__ g_mean,
    float* __restrict__ g_m2) {
  __shared__ float red[kThreads];
  const int64_t g = blockIdx.x;
  const int64_t e = grp_e[g];
  if (e < 0) return;  // an unused entry of the bound: the whole CTA leaves before any barrier
  const int64_t t0 = tile_first[e] + (grp_lo[g] - offsets[e]) / kTile, t1 = t0 + cdiv(grp_n[g], kTile);
  float n = 0.f, m2 = 0.f;
  chan_merge_range(t_mean, t_m2, tile_n, t0, t1, c, g_mean + g * c, red, n, m2);
  if (threadIdx.x == 0) g_m2[g] = m2;
}

// Second level: one CTA per expert merges its groups in order; var = M2 / (n c) (0 without rows).
__global__ void __launch_bounds__(kThreads) _routed_head_stats_merge_kernel(
    const float* __restrict__ g_mean, const float* __restrict__ g_m2, const int64_t* __restrict__ grp_n,
    const int64_t* __restrict__ grp_first, int64_t c, float* __restrict__ mean, float* __restrict__ var) {
  __shared__ float red[kThreads];
  const int64_t e = blockIdx.x;
  float n = 0.f, m2 = 0.f;
  chan_merge_range(g_mean, g_m2, grp_n, grp_first[e], grp_first[e + 1], c, mean + e * c, red, n, m2);
  if (threadIdx.x == 0) var[e] = n > 0.f ? m2 / (n * static_cast<float>(c)) : 0.f;
}

// ---------------------------------------------------------------- backward: CTA GEMM blocks

// How a CTA accumulates a kTile x kTile fp32 block from operand slabs in shared memory.
//   kWmma: fp16/bf16 operands, WMMA m16n16k16;  kTf32: fp32 operands rounded to TF32, WMMA m16n16k8;
//   kFma: fp32 operands, exact fp32 FMA (4 x 8 outputs per thread).
enum class Path { kWmma, kTf32, kFma };

template <Path P, typename T>
using op_type = std::conditional_t<P == Path::kWmma, T, float>;  // operand type in shared memory

template <Path P>
constexpr int kBKOf = P == Path::kWmma ? 32 : 16;  // k extent of one operand slab

// An operand slab in shared memory holds kTile "i" indices (rows of A, columns of B) by BK "k"
// indices, stored either i-major (kMK: [i][k], k contiguous) or k-major ([k][i], i contiguous),
// whichever the global layout fills with contiguous 16-byte accesses. Padded rows keep WMMA's
// leading dimensions multiples of 16 bytes and fragment pointers 32-byte aligned.
template <typename op_t, int BK, bool kMK>
struct Slab {
  static constexpr int kPadE = sizeof(op_t) == 2 ? 8 : 4;
  static constexpr int kLd = (kMK ? BK : kTile) + kPadE;
  static constexpr int kLines = kMK ? kTile : BK;
  static constexpr int kWidth = kMK ? BK : kTile;
  static constexpr int kElems = kLines * kLd;
};

// Operand staging of every backward kernel: two buffers (double buffering) of an A and a B slab.
constexpr int kStageBytes = 20480;
// The fp32 output block may alias the staging buffers once the GEMM is done.
static_assert(kTile * kCld * 4 <= kStageBytes, "the output block fits the staging buffers");

// A GEMM operand in global memory, as "lines" of contiguous elements: for an i-major slab line l is
// i = l (a row of A or a column of B; k runs along the line from the slab's k0), for a k-major slab
// line l is k = k0 + l (i runs along the line). Line L lies at p + row(L) * ld, where
// row(L) = idx ? idx[idx_off + L] : L; it is zero when L >= nlines or row(L) < 0. Along a line,
// elements at or past `extent` (i-major: minus the slab's k0) are zero. `gate`, where given, scales
// line L by gate[row(L)] (operands converted to fp32 only).
template <typename src_t>
struct Operand {
  const src_t* p;
  int64_t ld;
  const int64_t* idx;
  int64_t idx_off;
  int64_t nlines;
  int64_t extent;
  const src_t* gate;
  bool vec;          // p and ld allow 16-byte accesses
  int64_t kmod = 0;  // i-major only: k wraps modulo kmod (a GEMM over stacked copies of its B)
};

__device__ __forceinline__ uint32_t word_of(const vec16& v, int k) {
  return k == 0 ? v.x : (k == 1 ? v.y : (k == 2 ? v.z : v.w));
}
__device__ __forceinline__ void set_word(vec16& v, int k, uint32_t w) {
  if (k == 0) v.x = w;
  else if (k == 1) v.y = w;
  else if (k == 2) v.z = w;
  else v.w = w;
}

template <typename src_t>
__device__ __forceinline__ float elem_of(const vec16& v, int i) {
  if constexpr (sizeof(src_t) == 4) {
    return bits_to_float(word_of(v, i));
  } else {
    const uint16_t b = static_cast<uint16_t>((word_of(v, i / 2) >> (16 * (i % 2))) & 0xffffu);
    return static_cast<float>(src_t(b, src_t::from_bits()));
  }
}

template <typename src_t>
__device__ __forceinline__ uint32_t bits_of(src_t v) {
  if constexpr (sizeof(src_t) == 4) {
    return float_to_bits(v);
  } else {
    return v.x;
  }
}

// Fetches one slab of an operand into registers (16 bytes per access), then puts it into shared
// memory as op_t; fetching the next slab while the current one is multiplied hides the load latency.
template <typename src_t, typename op_t, int BK, bool kMK, bool kScaled>
struct Loader {
  using S = Slab<op_t, BK, kMK>;
  static constexpr int V = 16 / static_cast<int>(sizeof(src_t));
  static constexpr int kVecPerLine = S::kWidth / V;
  static constexpr int kPer = S::kLines * kVecPerLine / kThreads;
  static_assert(S::kWidth % V == 0 && (S::kLines * kVecPerLine) % kThreads == 0, "slab and threads agree");
  static_assert(kScaled ? std::is_same_v<op_t, float> : true, "scaled operands are converted to fp32");

  Operand<src_t> op;
  vec16 reg[kPer];
  float scl[kPer];

  __device__ __forceinline__ explicit Loader(const Operand<src_t>& o) : op(o) {}

  __device__ __forceinline__ void fetch(int64_t k0) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int v = static_cast<int>(threadIdx.x) + j * kThreads;
      const int line = v / kVecPerLine, q = (v % kVecPerLine) * V;
      const int64_t L = kMK ? line : k0 + line;
      const int64_t kk = kMK && op.kmod > 0 ? k0 % op.kmod : k0;  // k of the slab's first column
      vec16 r;
      r.x = r.y = r.z = r.w = 0u;
      scl[j] = 1.f;
      if (L < op.nlines) {
        const int64_t row = op.idx != nullptr ? op.idx[op.idx_off + L] : L;
        const int64_t win = kMK ? op.extent - kk : op.extent;
        if (row >= 0 && q < win) {
          const src_t* ptr = op.p + row * op.ld + (kMK ? kk : 0) + q;
          if (op.vec && q + V <= win) {
            r = *reinterpret_cast<const vec16*>(ptr);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) {
              if (q + i < win) {
                const uint32_t b = bits_of<src_t>(ptr[i]);
                if constexpr (sizeof(src_t) == 4) {
                  set_word(r, i, b);
                } else {
                  set_word(r, i / 2, word_of(r, i / 2) | (b << (16 * (i % 2))));
                }
              }
            }
          }
          if constexpr (kScaled) scl[j] = to_f(op.gate[row]);
        }
      }
      reg[j] = r;
    }
  }

  __device__ __forceinline__ void put(op_t* smem) const {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int v = static_cast<int>(threadIdx.x) + j * kThreads;
      const int line = v / kVecPerLine, q = (v % kVecPerLine) * V;
      op_t* dst = smem + line * S::kLd + q;
      if constexpr (std::is_same_v<op_t, src_t> && !kScaled) {
        *reinterpret_cast<vec16*>(dst) = reg[j];
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) dst[i] = elem_of<src_t>(reg[j], i) * scl[j];
      }
    }
  }
};

// The accumulators of one CTA block and the multiplication of one pair of slabs.
template <Path P, typename T, bool kAMK, bool kBMK>
struct Mma;

template <Path P, typename T, bool kAMK, bool kBMK>
struct Mma {  // kWmma and kTf32: 2 x 2 warps of 32 x 32 outputs, 2 x 2 fragments each
  static constexpr bool kTf = P == Path::kTf32;
  static constexpr int KK = kTf ? 8 : 16;
  using op_t = op_type<P, T>;
  using frag_t = std::conditional_t<kTf, wmma::precision::tf32, typename WmmaType<T>::type>;
  using mem_t = std::conditional_t<kTf, float, typename WmmaType<T>::type>;
  using LA = std::conditional_t<kAMK, wmma::row_major, wmma::col_major>;
  using LB = std::conditional_t<kBMK, wmma::col_major, wmma::row_major>;
  using SA = Slab<op_t, kBKOf<P>, kAMK>;
  using SB = Slab<op_t, kBKOf<P>, kBMK>;
  wmma::fragment<wmma::accumulator, 16, 16, KK, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ void step(const op_t* As, const op_t* Bs) {
    const int warp = static_cast<int>(threadIdx.x) / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < kBKOf<P>; kk += KK) {
      wmma::fragment<wmma::matrix_a, 16, 16, KK, frag_t, LA> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, KK, frag_t, LB> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm * 32 + i * 16;
        const op_t* pa = kAMK ? As + m * SA::kLd + kk : As + kk * SA::kLd + m;
        wmma::load_matrix_sync(a[i], reinterpret_cast<const mem_t*>(pa), SA::kLd);
        if constexpr (kTf) {
#pragma unroll
          for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        const op_t* pb = kBMK ? Bs + n * SB::kLd + kk : Bs + kk * SB::kLd + n;
        wmma::load_matrix_sync(b[j], reinterpret_cast<const mem_t*>(pb), SB::kLd);
        if constexpr (kTf) {
#pragma unroll
          for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) const {
    const int warp = static_cast<int>(threadIdx.x) / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kCld + wn * 32 + j * 16, acc[i][j], kCld,
                                wmma::mem_row_major);
  }
};

template <typename T, bool kAMK, bool kBMK>
struct Mma<Path::kFma, T, kAMK, kBMK> {  // thread (tr, tc): rows tr + 16 i, columns tc + 8 j
  using SA = Slab<float, kBKOf<Path::kFma>, kAMK>;
  using SB = Slab<float, kBKOf<Path::kFma>, kBMK>;
  float acc[4][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void step(const float* As, const float* Bs) {
    const int tr = static_cast<int>(threadIdx.x) / 8, tc = static_cast<int>(threadIdx.x) % 8;
#pragma unroll 4
    for (int k = 0; k < kBKOf<Path::kFma>; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = tr + 16 * i;
        a[i] = kAMK ? As[m * SA::kLd + k] : As[k * SA::kLd + m];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = tc + 8 * j;
        b[j] = kBMK ? Bs[n * SB::kLd + k] : Bs[k * SB::kLd + n];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) const {
    const int tr = static_cast<int>(threadIdx.x) / 8, tc = static_cast<int>(threadIdx.x) % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Cs[(tr + 16 * i) * kCld + tc + 8 * j] = acc[i][j];
  }
};

// Cs (kTile x kTile, row stride kCld, fp32) = A B over k in [0, K): A from la (i = output row),
// B from lb (i = output column). Starts and ends with a barrier, so Cs may alias `stage` and the
// caller's earlier reads of Cs or `stage` are complete before the first slab is written.
template <Path P, typename T, typename LA, typename LB>
__device__ __forceinline__ void gemm_block(LA& la, LB& lb, int64_t K, unsigned char* stage, float* Cs) {
  using op_t = op_type<P, T>;
  constexpr int BK = kBKOf<P>;
  constexpr bool kAMK = std::is_same_v<typename LA::S, Slab<op_t, BK, true>>;
  constexpr bool kBMK = std::is_same_v<typename LB::S, Slab<op_t, BK, true>>;
  using SA = Slab<op_t, BK, kAMK>;
  using SB = Slab<op_t, BK, kBMK>;
  static_assert(std::is_same_v<typename LA::S, SA> && std::is_same_v<typename LB::S, SB>, "loader slabs");
  static_assert(2 * (SA::kElems + SB::kElems) * static_cast<int>(sizeof(op_t)) <= kStageBytes, "staging");
  op_t* A0 = reinterpret_cast<op_t*>(stage);
  op_t* B0 = A0 + 2 * SA::kElems;
  Mma<P, T, kAMK, kBMK> mma;
  mma.zero();
  const int64_t nk = cdiv(K, BK);
  __syncthreads();
  if (nk > 0) {
    la.fetch(0);
    lb.fetch(0);
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    const int b = static_cast<int>(kt & 1);
    la.put(A0 + b * SA::kElems);
    lb.put(B0 + b * SB::kElems);
    __syncthreads();  // the slab is in place; buffer b ^ 1 is no longer read (one slab of slack)
    if (kt + 1 < nk) {
      la.fetch((kt + 1) * BK);
      lb.fetch((kt + 1) * BK);
    }
    mma.step(A0 + b * SA::kElems, B0 + b * SB::kElems);
  }
  __syncthreads();
  mma.store(Cs);
  __syncthreads();
}

// The paths of one input dtype: the c-wide GEMMs and the products with dh (fp32).
template <typename T>
struct Paths {
  static constexpr Path kMain = std::is_same_v<T, float> ? Path::kFma : Path::kWmma;
  static constexpr Path kDh = std::is_same_v<T, float> ? Path::kFma : Path::kTf32;
};

// ---------------------------------------------------------------- backward kernels

// The recomputed hidden layer must match the forward's to fp32 accuracy: where h is near 0 its
// sign picks the LeakyReLU slope of dh, and A rounded once to fp16/bf16 would flip it for many
// rows. A_e is therefore stored as kAParts<T> planes of T whose sum is A_e to about fp32 accuracy
// (bf16: 3 x 8 significant bits; fp16: the same split, its third plane mostly below fp16's range),
// each plane kpad(c) wide (zero past c), and x is multiplied by all of them in one GEMM over
// kAParts * kpad(c) (x's k wraps at kpad(c)). The products of fp16/bf16 values are exact and the
// sums fp32, so h = g x A_e^T + b1 keeps fp32 accuracy at kAParts hdim-wide GEMMs.
template <typename T>
constexpr int kAParts = std::is_same_v<T, float> ? 1 : 3;

__host__ __device__ __forceinline__ int64_t kpad(int64_t c) { return cdiv(c, 32) * 32; }

// A_e = W1_e O_e (hdim x c) as kAParts<T> planes (above). Grid (cdiv(H, 64), cdiv(c, 64), N);
// fp32 products.
template <typename T>
__global__ void __launch_bounds__(kThreads) _bwd_prep_kernel(const T* __restrict__ proj, const T* __restrict__ w1,
                                                            int64_t c, int64_t hdim, bool vec, T* __restrict__ aexp) {
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  constexpr int BK = kBKOf<Path::kFma>;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile, col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t e = blockIdx.z;
  Loader<T, float, BK, true, false> la(Operand<T>{w1 + (e * hdim + j0) * c, c, nullptr, 0, hdim - j0, c, nullptr, vec});
  Loader<T, float, BK, false, false> lb(Operand<T>{proj + e * c * c + col0, c, nullptr, 0, c, c - col0, nullptr, vec});
  float* Cs = reinterpret_cast<float*>(stage);
  gemm_block<Path::kFma, T>(la, lb, c, stage, Cs);
  const int64_t kp = kpad(c), ld = kAParts<T> * kp;
  const int64_t nh = imin(kTile, hdim - j0), ncol = imin(kTile, kp - col0);  // zeros in [c, kp)
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, q = i % kTile;
    if (r < nh && q < ncol) {
      float rest = col0 + q < c ? Cs[r * kCld + q] : 0.f;
      T* dst = aexp + (e * hdim + j0 + r) * ld + col0 + q;
#pragma unroll
      for (int part = 0; part < kAParts<T>; ++part) {
        const T v = static_cast<T>(rest);
        dst[part * kp] = v;
        rest -= static_cast<float>(v);
      }
    }
  }
}

// Per tile of kTile rows of one expert (grid: the tile bound). Writes dh (rows lo.. of the (M, ldh)
// fp32 scratch), du (rows lo.. of the (M, c) scratch in T), dgate at the rows' own positions and the
// tile's classifier partials cls_part[t] = [sum dh (H) | sum glogit z (H) | sum glogit].
template <typename T>
__global__ void __launch_bounds__(kThreads, 3) _bwd_dy_kernel(
    const T* __restrict__ x, int64_t sx0, const T* __restrict__ gate, const T* __restrict__ proj,
    const T* __restrict__ w1, const T* __restrict__ b1, const T* __restrict__ w2, const T* __restrict__ aexp,
    const T* __restrict__ glogits, const float* __restrict__ gmean, const float* __restrict__ gvar,
    const float* __restrict__ mean, const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
    const int64_t* __restrict__ tile_lo, const int64_t* __restrict__ tile_n, const int64_t* __restrict__ tile_e,
    int64_t c, int64_t hdim, int64_t ldh, bool vec, T* __restrict__ du, float* dh, T* __restrict__ dgate,
    float* __restrict__ cls_part) {
  // dh is written and read back by the CTA: no __restrict__ (no read-only cache path) on it.
  constexpr Path PM = Paths<T>::kMain, PD = Paths<T>::kDh;
  using opm_t = op_type<PM, T>;
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  __shared__ __align__(128) float Cs[kTile * kCld];
  __shared__ int64_t rows[kTile];
  __shared__ float gs[kTile], gls[kTile], ga[kTile], mu[kTile];
  __shared__ float red[kThreads];
  const int64_t t = blockIdx.x;
  const int64_t e = tile_e[t];
  if (e < 0) return;  // past the last tile
  const int64_t lo = tile_lo[t], nt = tile_n[t];
  const int tid = threadIdx.x;
  for (int r = tid; r < kTile; r += kThreads) {
    const int64_t p = r < nt ? perm[lo + r] : -1;
    rows[r] = p;
    gs[r] = p >= 0 ? to_f(gate[p]) : 0.f;
    gls[r] = p >= 0 ? to_f(glogits[p]) : 0.f;  // 0 on padding rows: their dh, z and dgate vanish
  }
  const float n_e = static_cast<float>(offsets[e + 1] - offsets[e]);
  const float inv_n = 1.f / n_e;
  const float kv = 2.f * gvar[e] / (n_e * static_cast<float>(c));
  const int64_t L = 2 * hdim + 1;
  const Operand<T> xo{x, sx0, rows, 0, kTile, c, nullptr, vec};  // the tile's rows, gathered
  const int64_t kp = kpad(c), lda = kAParts<T> * kp;
  float* Zs = reinterpret_cast<float*>(stage);                   // after a GEMM: free for fp32 blocks

  // ---- h = g x A_e^T + b1, dh and the classifier partials, by 64 hidden units
  for (int64_t j0 = 0; j0 < hdim; j0 += kTile) {
    Operand<T> xw = xo;
    xw.kmod = kp;  // x against every plane of A_e
    Loader<T, opm_t, kBKOf<PM>, true, false> la(xw);
    Loader<T, opm_t, kBKOf<PM>, true, false> lb(
        Operand<T>{aexp + (e * hdim + j0) * lda, lda, nullptr, 0, hdim - j0, lda, nullptr, vec});
    gemm_block<PM, T>(la, lb, lda, stage, Cs);
    const int64_t nh = imin(kTile, hdim - j0);
    for (int i = tid; i < kTile * kTile; i += kThreads) {
      const int r = i / kTile, q = i % kTile;
      if (q < nh) {
        const float h = gs[r] * Cs[r * kCld + q] + to_f(b1[e * hdim + j0 + q]);
        const float d = gls[r] * to_f(w2[e * hdim + j0 + q]) * lrelu_grad(h);
        Cs[r * kCld + q] = d;
        Zs[r * kCld + q] = gls[r] * lrelu(h);
        if (r < nt) dh[(lo + r) * ldh + j0 + q] = d;
      }
    }
    __syncthreads();
    if (tid < nh) {  // column sums in row order
      float sd = 0.f, sz = 0.f;
      for (int r = 0; r < nt; ++r) {
        sd += Cs[r * kCld + tid];
        sz += Zs[r * kCld + tid];
      }
      cls_part[t * L + j0 + tid] = sd;
      cls_part[t * L + hdim + j0 + tid] = sz;
    }
  }
  if (tid == 0) {
    float s = 0.f;
    for (int r = 0; r < nt; ++r) s += gls[r];
    cls_part[t * L + 2 * hdim] = s;
  }

  // ---- per 64-column chunk: u = x O_e^T, dh W1_e, dy, du = g dy, dgate += dy . u
  const int r_own = tid / 2, c_own = (tid % 2) * (kTile / 2);  // thread: half a row of the chunk
  float dg = 0.f;
  for (int64_t col0 = 0; col0 < c; col0 += kTile) {
    const int64_t ncol = imin(kTile, c - col0);
    {
      Loader<T, opm_t, kBKOf<PM>, true, false> la(xo);
      Loader<T, opm_t, kBKOf<PM>, true, false> lb(
          Operand<T>{proj + e * c * c + col0 * c, c, nullptr, 0, c - col0, c, nullptr, vec});
      gemm_block<PM, T>(la, lb, c, stage, Cs);
    }
    {
      Loader<float, float, kBKOf<PD>, true, false> la(Operand<float>{dh + lo * ldh, ldh, nullptr, 0, nt, hdim, nullptr, true});
      Loader<T, float, kBKOf<PD>, false, false> lb(
          Operand<T>{w1 + e * hdim * c + col0, c, nullptr, 0, hdim, c - col0, nullptr, vec});
      gemm_block<PD, T>(la, lb, hdim, stage, Zs);  // Zs = dh W1_e[:, chunk]
    }
    if (tid < kTile) {
      ga[tid] = tid < ncol ? gmean[e * c + col0 + tid] * inv_n : 0.f;
      mu[tid] = tid < ncol ? mean[e * c + col0 + tid] : 0.f;
    }
    __syncthreads();
    const float g = gs[r_own];
    T* dst = du + (lo + r_own) * c + col0;
    for (int q = c_own; q < c_own + kTile / 2; ++q) {
      if (q < ncol) {
        const float u = Cs[r_own * kCld + q];
        const float dy = Zs[r_own * kCld + q] + ga[q] + kv * (g * u - mu[q]);
        dg += dy * u;
        if (r_own < nt) dst[q] = static_cast<T>(g * dy);
      }
    }
  }
  red[tid] = dg;
  __syncthreads();
  if (tid < nt) dgate[rows[tid]] = static_cast<T>(red[2 * tid] + red[2 * tid + 1]);
}

// dx = du O_e per tile and 64-column chunk (grid: tile bound x cdiv(c, 64)), written at the rows'
// own positions of the (M, c) output.
template <typename T>
__global__ void __launch_bounds__(kThreads) _bwd_dx_kernel(
    const T* __restrict__ du, const T* __restrict__ proj, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ tile_lo, const int64_t* __restrict__ tile_n, const int64_t* __restrict__ tile_e,
    int64_t c, bool vec, T* __restrict__ dx) {
  constexpr Path PM = Paths<T>::kMain;
  using opm_t = op_type<PM, T>;
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  __shared__ int64_t rows[kTile];
  const int64_t t = blockIdx.x;
  const int64_t e = tile_e[t];
  if (e < 0) return;
  const int64_t lo = tile_lo[t], nt = tile_n[t], col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int r = threadIdx.x; r < kTile; r += kThreads) rows[r] = r < nt ? perm[lo + r] : -1;
  Loader<T, opm_t, kBKOf<PM>, true, false> la(Operand<T>{du + lo * c, c, nullptr, 0, nt, c, nullptr, vec});
  Loader<T, opm_t, kBKOf<PM>, false, false> lb(Operand<T>{proj + e * c * c + col0, c, nullptr, 0, c, c - col0, nullptr, vec});
  float* Cs = reinterpret_cast<float*>(stage);
  gemm_block<PM, T>(la, lb, c, stage, Cs);
  const int64_t ncol = imin(kTile, c - col0);
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, q = i % kTile;
    if (r < nt && q < ncol) dx[rows[r] * c + col0 + q] = static_cast<T>(Cs[r * kCld + q]);
  }
}

// Per row slab and 64 x 64 block of dproj (grid: slab bound x cdiv(c, 64)^2):
// part[s] = du[slab]^T x[slab rows], fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads) _bwd_dproj_kernel(
    const T* __restrict__ du, const T* __restrict__ x, int64_t sx0, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ slab_lo, const int64_t* __restrict__ slab_n, const int64_t* __restrict__ slab_e,
    int64_t c, bool vec, float* __restrict__ part) {
  constexpr Path PM = Paths<T>::kMain;
  using opm_t = op_type<PM, T>;
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  const int64_t s = blockIdx.x;
  if (slab_e[s] < 0) return;
  const int64_t lo = slab_lo[s], ns = slab_n[s];
  const int64_t nb = cdiv(c, kTile);
  const int64_t i0 = (blockIdx.y / nb) * kTile, j0 = (blockIdx.y % nb) * kTile;
  Loader<T, opm_t, kBKOf<PM>, false, false> la(Operand<T>{du + lo * c + i0, c, nullptr, 0, ns, c - i0, nullptr, vec});
  Loader<T, opm_t, kBKOf<PM>, false, false> lb(Operand<T>{x + j0, sx0, perm, lo, ns, c - j0, nullptr, vec});
  float* Cs = reinterpret_cast<float*>(stage);
  gemm_block<PM, T>(la, lb, ns, stage, Cs);
  const int64_t ni = imin(kTile, c - i0), nj = imin(kTile, c - j0);
  float* out = part + s * c * c;
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, q = i % kTile;
    if (r < ni && q < nj) out[(i0 + r) * c + j0 + q] = Cs[r * kCld + q];
  }
}

// Per row slab and 64 x 64 block of D = dh^T (g x) (grid: slab bound x cdiv(c, 64) x cdiv(H, 64)):
// part[s] (H x c), fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads) _bwd_dw1_kernel(
    const float* __restrict__ dh, int64_t ldh, const T* __restrict__ x, int64_t sx0, const T* __restrict__ gate,
    const int64_t* __restrict__ perm, const int64_t* __restrict__ slab_lo, const int64_t* __restrict__ slab_n,
    const int64_t* __restrict__ slab_e, int64_t c, int64_t hdim, bool vec, float* __restrict__ part) {
  constexpr Path PD = Paths<T>::kDh;
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  const int64_t s = blockIdx.x;
  if (slab_e[s] < 0) return;
  const int64_t lo = slab_lo[s], ns = slab_n[s];
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.z) * kTile;
  Loader<float, float, kBKOf<PD>, false, false> la(
      Operand<float>{dh + lo * ldh + j0, ldh, nullptr, 0, ns, hdim - j0, nullptr, true});
  Loader<T, float, kBKOf<PD>, false, true> lb(Operand<T>{x + col0, sx0, perm, lo, ns, c - col0, gate, vec});
  float* Cs = reinterpret_cast<float*>(stage);
  gemm_block<PD, T>(la, lb, ns, stage, Cs);
  const int64_t nh = imin(kTile, hdim - j0), ncol = imin(kTile, c - col0);
  float* out = part + s * hdim * c;
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, q = i % kTile;
    if (r < nh && q < ncol) out[(j0 + r) * c + col0 + q] = Cs[r * kCld + q];
  }
}

// First level of the classifier partials' merge: out[g] = sum of part over the tiles of group g,
// in tile order. Grid (group bound, cdiv(len, kSumThreads)).
__global__ void __launch_bounds__(kSumThreads) _group_sum_kernel(
    const float* __restrict__ part, int64_t len, const int64_t* __restrict__ grp_lo,
    const int64_t* __restrict__ grp_n, const int64_t* __restrict__ grp_e, const int64_t* __restrict__ offsets,
    const int64_t* __restrict__ tile_first, float* __restrict__ out) {
  const int64_t g = blockIdx.x;
  const int64_t e = grp_e[g];
  if (e < 0) return;
  const int64_t t0 = tile_first[e] + (grp_lo[g] - offsets[e]) / kTile, t1 = t0 + cdiv(grp_n[g], kTile);
  for (int64_t l = static_cast<int64_t>(blockIdx.y) * kSumThreads + threadIdx.x; l < len;
       l += static_cast<int64_t>(gridDim.y) * kSumThreads) {
    float s = 0.f;
    for (int64_t t = t0; t < t1; ++t) s += part[t * len + l];
    out[g * len + l] = s;
  }
}

// Per expert: out[e] = sum of part[first[e] .. first[e+1]) in order (0 for an expert without rows).
// Grid (N, min(cdiv(len, kSumThreads), 65535)).
template <typename out_t>
__global__ void __launch_bounds__(kSumThreads) _expert_sum_kernel(const float* __restrict__ part, int64_t len,
                                                                  const int64_t* __restrict__ first,
                                                                  out_t* __restrict__ out) {
  const int64_t e = blockIdx.x;
  const int64_t s0 = first[e], s1 = first[e + 1];
  for (int64_t l = static_cast<int64_t>(blockIdx.y) * kSumThreads + threadIdx.x; l < len;
       l += static_cast<int64_t>(gridDim.y) * kSumThreads) {
    float s = 0.f;
    for (int64_t i = s0; i < s1; ++i) s += part[i * len + l];
    out[e * len + l] = static_cast<out_t>(s);
  }
}

// dW1_e = D_e O_e^T (fp32 products) and the classifier gradients in T. Grid (cdiv(H, 64),
// cdiv(c, 64), N); cls (N, 2H + 1) = [db1 | dw2 | db2] in fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads) _bwd_finish_kernel(
    const float* __restrict__ d, const T* __restrict__ proj, const float* __restrict__ cls, int64_t c, int64_t hdim,
    bool vec, bool vec_f, T* __restrict__ dw1, T* __restrict__ db1, T* __restrict__ dw2, T* __restrict__ db2) {
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  constexpr int BK = kBKOf<Path::kFma>;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile, col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t e = blockIdx.z;
  Loader<float, float, BK, true, false> la(Operand<float>{d + (e * hdim + j0) * c, c, nullptr, 0, hdim - j0, c, nullptr, vec_f});
  Loader<T, float, BK, true, false> lb(Operand<T>{proj + (e * c + col0) * c, c, nullptr, 0, c - col0, c, nullptr, vec});
  float* Cs = reinterpret_cast<float*>(stage);
  gemm_block<Path::kFma, T>(la, lb, c, stage, Cs);
  const int64_t nh = imin(kTile, hdim - j0), ncol = imin(kTile, c - col0);
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, q = i % kTile;
    if (r < nh && q < ncol) dw1[(e * hdim + j0 + r) * c + col0 + q] = static_cast<T>(Cs[r * kCld + q]);
  }
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    const float* ce = cls + e * (2 * hdim + 1);
    for (int64_t j = threadIdx.x; j < hdim; j += kThreads) {
      db1[e * hdim + j] = static_cast<T>(ce[j]);
      dw2[e * hdim + j] = static_cast<T>(ce[hdim + j]);
    }
    if (threadIdx.x == 0) db2[e] = static_cast<T>(ce[2 * hdim]);
  }
}

}  // namespace dev
}  // namespace calgan_fast
