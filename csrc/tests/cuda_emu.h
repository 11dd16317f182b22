// A host emulation of the CUDA features that csrc/cuda/routed_head_kernels.cuh uses, so that the
// kernels themselves (not a re-implementation) run on CPU tensors in tests on machines without a GPU.
//
// Every CTA runs alone, its threads as cooperative fibers (ucontext) on the calling thread: a fiber
// runs until __syncthreads(), then the next one runs, so the threads of a CTA meet at every barrier
// as on a GPU and no two run at once (__shared__ becomes `static`). WMMA fragments hold whole
// tiles; lane 0 of each warp loads, multiplies and stores them for the warp (the kernels read a
// stored tile only after a __syncthreads, as CUDA requires). Products accumulate in fp32 in k order;
// TF32 operands are rounded as cvt.rna.tf32 does. Between two barriers the threads run in index
// order, or in reverse order after set_reverse_thread_order(true): a phase that reads shared memory
// another thread writes without a barrier in between then sees different data in the two orders,
// so comparing them finds such a race. What this cannot show: timing, warp-divergence hazards, races
// between CTAs (they run one after another), and the exact order of a tensor core's internal sums.
#pragma once

#include <ATen/ATen.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <vector>

#define CALGAN_DEVICE_PLATFORM_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define CALGAN_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::calgan_fast::emu::dynamic_smem())

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace calgan_fast {
namespace emu {

struct State {
  dim3 thread, block, block_dim, grid_dim;
  std::vector<ucontext_t> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> dyn_smem;
  int64_t launches = 0;
  bool reverse = false;  // threads of a CTA run in reverse index order between barriers
  std::mutex mutex;
};

inline State& state() {
  static State s;
  return s;
}

inline unsigned char* dynamic_smem() { return state().dyn_smem.data(); }

inline void syncthreads() {
  State& s = state();
  swapcontext(&s.fibers[s.current], &s.scheduler);
}

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  s.done[s.current] = 1;
  swapcontext(&s.fibers[s.current], &s.scheduler);
}

inline dim3 tid_of(int i, const dim3& b) {
  return dim3(i % b.x, (i / b.x) % b.y, i / (b.x * b.y));
}

// Runs body once per thread of every CTA of the grid; CTAs in order, threads as fibers.
inline void run_grid(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body) {
  State& s = state();
  const int n = static_cast<int>(block.x * block.y * block.z);
  constexpr size_t kStack = 512 * 1024;
  if (static_cast<int>(s.fibers.size()) < n) {
    s.fibers.resize(n);
    s.stacks.resize(n);
    for (auto& st : s.stacks) st.resize(kStack);
  }
  s.done.assign(n, 0);
  s.dyn_smem.assign(std::max<size_t>(dyn_smem, 16), 0);
  s.body = &body;
  s.block_dim = block;
  s.grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block = dim3(bx, by, bz);
        std::fill(s.done.begin(), s.done.end(), 0);
        for (int i = 0; i < n; ++i) {
          getcontext(&s.fibers[i]);
          s.fibers[i].uc_stack.ss_sp = s.stacks[i].data();
          s.fibers[i].uc_stack.ss_size = kStack;
          s.fibers[i].uc_link = nullptr;
          makecontext(&s.fibers[i], fiber_entry, 0);
        }
        int alive = n;
        while (alive > 0) {  // one round: every live thread runs to its next barrier or its end
          for (int k = 0; k < n; ++k) {
            const int i = s.reverse ? n - 1 - k : k;
            if (s.done[i]) continue;
            s.current = i;
            s.thread = tid_of(i, block);
            swapcontext(&s.scheduler, &s.fibers[i]);
          }
          alive = static_cast<int>(std::count(s.done.begin(), s.done.end(), 0));
        }
      }
}

inline int64_t launch_count() { return state().launches; }

inline void set_reverse_thread_order(bool reverse) { state().reverse = reverse; }

}  // namespace emu
}  // namespace calgan_fast

#define threadIdx (::calgan_fast::emu::state().thread)
#define blockIdx (::calgan_fast::emu::state().block)
#define blockDim (::calgan_fast::emu::state().block_dim)
#define gridDim (::calgan_fast::emu::state().grid_dim)
inline void __syncthreads() { ::calgan_fast::emu::syncthreads(); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

inline float __float_to_tf32(float f) {  // round to nearest, ties away from zero (cvt.rna.tf32.f32)
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & ~0x1fffu;
  std::memcpy(&f, &b, 4);
  return f;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  using elem_t = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  static constexpr int num_elements = kRows * kCols;
  elem_t x[num_elements] = {};
};

inline bool lane0() { return threadIdx.x % 32 == 0; }

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  if (!lane0()) return;
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < F::kRows; ++i)
    for (int j = 0; j < F::kCols; ++j)
      f.x[i * F::kCols + j] = std::is_same_v<Layout, row_major> ? p[i * ldm + j] : p[j * ldm + i];
}

// An accumulator tile from memory (row- or column-major), as the CUDA overload with a layout_t.
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  if (!lane0()) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.x[i * N + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

template <int M, int N, int K, typename TA, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!lane0()) return;
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (!lane0()) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      const size_t at = layout == mem_row_major ? i * ldm + j : j * ldm + i;
      p[at] = f.x[i * N + j];
    }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::elem_t>(v);
}

}  // namespace wmma
}  // namespace nvcuda

namespace calgan_fast {
namespace dev {

namespace wmma = nvcuda::wmma;

using vec16 = uint4;
using Stream = int;

template <typename T>
struct WmmaType {
  using type = void;
};
template <>
struct WmmaType<at::Half> {
  using type = at::Half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = at::BFloat16;
};

inline float bits_to_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  return w;
}

inline Stream current_stream() { return 0; }

// As many "multiprocessors" as the tests need for experts to span several row slabs.
inline int sm_count() {
  const char* v = std::getenv("CALGAN_FAST_EMU_SMS");
  return v != nullptr ? std::max(1, std::atoi(v)) : 64;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Stream, Args... args) {
  auto& s = emu::state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  ++s.launches;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("emulated launch with an empty grid");
  if (block.x * block.y * block.z > 1024) throw std::runtime_error("emulated launch with more than 1024 threads");
  const std::function<void()> body = [&] { kernel(args...); };
  emu::run_grid(grid, block, smem, body);
}

template <typename... KArgs>
void allow_dynamic_smem(void (*)(KArgs...), size_t) {}

// The emulation has no shared-memory limit unless CALGAN_FAST_EMU_MAX_DYN_SMEM (bytes) sets one.
template <typename... KArgs>
size_t max_dynamic_smem(void (*)(KArgs...)) {
  const char* v = std::getenv("CALGAN_FAST_EMU_MAX_DYN_SMEM");
  return v != nullptr ? static_cast<size_t>(std::atoll(v)) : SIZE_MAX;
}

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

}  // namespace dev
}  // namespace calgan_fast
