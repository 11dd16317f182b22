// Single-threaded fp32 GEMMs on the row blocks of the `cpu` kernel, for x86-64 CPUs with AVX2 and FMA.
//
// The kernel's big products have two shapes, both on an expert's gathered rows (an (n, K) block whose
// rows lie ld floats apart):
//   nn: C (m, n) = A (m, K) B (K, n), A the rows, B a small matrix packed once (q = [W_s | dh] [k P; A]);
//   tn: C (m, n) = A^T B, A (K, m) and B (K, n) both rows of the block (the scatter matrix W_s^T W_s,
//       and D = dh^T W_s), summed over its K rows.
// A library GEMM packs both operands into its own layout on every call, which costs the kernel about
// as much as a sixth of its run. Here neither shape needs to repack the rows: nn reads each row of A
// where it lies and broadcasts its values, tn reads a row of A and of B at a time (the rows are the
// reduction axis), and only nn's small B is packed, once per expert, into column panels of kNR.
// A 6 x 16 tile of C stays in twelve AVX registers through its whole sum; the row blocks of nn and the
// reduction blocks of tn are sized to keep their operands in a core's L1 and L2. Callers keep the
// block's rows apart by a stride that is not a multiple of 1 KiB (see padded_ld): at such a stride
// the rows that tn reads together would fall into a handful of L1 cache sets.
//
// Sums run over k in order within a tile, and the blocking depends on the shapes only, so results
// are bitwise reproducible; they differ from a library GEMM's by rounding. Where the CPU lacks AVX2
// or FMA (available() is false), or a width is not a multiple of kNR, callers use ATen's GEMMs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CALGAN_TILE_GEMM 1
#include <immintrin.h>
#define CALGAN_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define CALGAN_TILE_GEMM 0
#endif

namespace calgan_fast {
namespace cpu {
namespace tile_gemm {

constexpr int64_t kMR = 6;   // rows of a register tile of C
constexpr int64_t kNR = 16;  // columns of a register tile (two AVX registers), and of a packed panel
constexpr int64_t kNNRows = 96;     // nn: rows of A per block (with the panel of B, within L1 and L2)
constexpr int64_t kTNRows = 128;    // tn: reduction rows per block (the block of rows within L2)

// Whether the kernels can run here: AVX2 and FMA, asked of the CPU once.
inline bool available() {
#if CALGAN_TILE_GEMM
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// A row stride of at least `width` floats, a multiple of kNR, that is not a multiple of 256 floats
// (1 KiB): c = 256 gives 272.
inline int64_t padded_ld(int64_t width) {
  int64_t ld = (width + kNR - 1) / kNR * kNR;
  if (ld % 256 == 0) ld += kNR;
  return ld;
}

// Floats of a packed (K, n) B.
inline int64_t packed_size(int64_t k, int64_t n) { return k * n; }

// Packs B (K, n; rows ldb apart; n a multiple of kNR) into panels of kNR columns, each (K, kNR) and
// contiguous: out[(jt K + k) kNR + l] = B[k, jt kNR + l].
inline void pack_b(const float* b, int64_t ldb, int64_t k, int64_t n, float* out) {
  for (int64_t jt = 0; jt < n / kNR; ++jt)
    for (int64_t r = 0; r < k; ++r) std::copy(b + r * ldb + jt * kNR, b + r * ldb + (jt + 1) * kNR, out + (jt * k + r) * kNR);
}

#if CALGAN_TILE_GEMM

// One MR x 16 tile of C: C = sum_k a(i, k) b(k, :) (plus C where accumulate), a(i, k) = a[i a_rs + k a_ks],
// b(k, :) the 16 floats at b + k b_ks.
template <int MR, bool kAccumulate>
CALGAN_AVX2_FMA inline void tile(int64_t k_len, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks,
                                 float* c, int64_t ldc) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * b_ks), b1 = _mm256_loadu_ps(b + k * b_ks + 8);
    const float* ak = a + k * a_ks;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(ak + i * a_rs);
      lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
      hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (kAccumulate) {
      lo[i] = _mm256_add_ps(lo[i], _mm256_loadu_ps(ci));
      hi[i] = _mm256_add_ps(hi[i], _mm256_loadu_ps(ci + 8));
    }
    _mm256_storeu_ps(ci, lo[i]);
    _mm256_storeu_ps(ci + 8, hi[i]);
  }
}

// The tiles of rows i0..i1 of one column tile, in steps of kMR and a shorter last step.
template <bool kAccumulate>
CALGAN_AVX2_FMA inline void tile_rows(int64_t i0, int64_t i1, int64_t k_len, const float* a, int64_t a_rs, int64_t a_ks,
                                      const float* b, int64_t b_ks, float* c, int64_t ldc) {
  int64_t i = i0;
  for (; i + kMR <= i1; i += kMR) tile<kMR, kAccumulate>(k_len, a + i * a_rs, a_rs, a_ks, b, b_ks, c + i * ldc, ldc);
  switch (i1 - i) {
    case 5: tile<5, kAccumulate>(k_len, a + i * a_rs, a_rs, a_ks, b, b_ks, c + i * ldc, ldc); break;
    case 4: tile<4, kAccumulate>(k_len, a + i * a_rs, a_rs, a_ks, b, b_ks, c + i * ldc, ldc); break;
    case 3: tile<3, kAccumulate>(k_len, a + i * a_rs, a_rs, a_ks, b, b_ks, c + i * ldc, ldc); break;
    case 2: tile<2, kAccumulate>(k_len, a + i * a_rs, a_rs, a_ks, b, b_ks, c + i * ldc, ldc); break;
    case 1: tile<1, kAccumulate>(k_len, a + i * a_rs, a_rs, a_ks, b, b_ks, c + i * ldc, ldc); break;
    default: break;
  }
}

// C (m, n; rows ldc apart) = A (m, K; rows lda apart) B, with B packed by pack_b; n a multiple of kNR.
CALGAN_AVX2_FMA inline void nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* bp, float* c,
                               int64_t ldc) {
  for (int64_t r0 = 0; r0 < m; r0 += kNNRows) {
    const int64_t r1 = std::min(m, r0 + kNNRows);
    for (int64_t jt = 0; jt < n / kNR; ++jt)
      tile_rows<false>(r0, r1, k, a, lda, 1, bp + jt * k * kNR, kNR, c + jt * kNR, ldc);
  }
}

// C (m, n; rows ldc apart) = A^T B over K rows: A (K, m; rows lda apart), B (K, n; rows ldb apart),
// n a multiple of kNR, K > 0 (C is not written for K = 0). Only the column tiles jt0..jt1 of C are
// formed, and of those only the rows below row_end(jt) (for the upper triangle of a symmetric C:
// row_end(jt) = (jt + 1) kNR).
template <typename RowEnd>
CALGAN_AVX2_FMA inline void tn(int64_t m, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                               int64_t ldc, int64_t jt0, int64_t jt1, const RowEnd& row_end) {
  for (int64_t k0 = 0; k0 < k; k0 += kTNRows) {
    const int64_t kl = std::min(kTNRows, k - k0);
    for (int64_t jt = jt0; jt < jt1; ++jt) {
      const int64_t i1 = std::min<int64_t>(m, row_end(jt));
      const float* bk = b + k0 * ldb + jt * kNR;
      if (k0 == 0)
        tile_rows<false>(0, i1, kl, a + k0 * lda, 1, lda, bk, ldb, c + jt * kNR, ldc);
      else
        tile_rows<true>(0, i1, kl, a + k0 * lda, 1, lda, bk, ldb, c + jt * kNR, ldc);
    }
  }
}

#else  // never called: available() is false here

inline void nn(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t) {
  throw std::logic_error("tile_gemm::nn needs an x86-64 CPU with AVX2 and FMA");
}
template <typename RowEnd>
void tn(int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t, const RowEnd&) {
  throw std::logic_error("tile_gemm::tn needs an x86-64 CPU with AVX2 and FMA");
}

#endif  // CALGAN_TILE_GEMM

}  // namespace tile_gemm
}  // namespace cpu
}  // namespace calgan_fast
