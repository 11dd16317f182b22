// The device platform of csrc/cuda/routed_head_kernels.cuh on a real GPU: CUDA's own definitions
// plus the few helpers the kernels and their launchers use (kernel launch, stream, device guard,
// bit casts). csrc/tests/cuda_emu.h defines the same names for a host emulation that runs the same
// kernel code on CPU threads in the C++ and Python tests.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <cstdint>

#define CALGAN_DEVICE_PLATFORM_CUDA 1
// Dynamic shared memory of a kernel as an array of `type` named `name`, aligned for WMMA fragment
// pointers (32 bytes) and 16-byte vector accesses.
#define CALGAN_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]

namespace calgan_fast {
namespace dev {

namespace wmma = nvcuda::wmma;

using vec16 = uint4;  // 16 bytes: one vectorised global or shared memory access
using Stream = cudaStream_t;

// The element type WMMA takes for a scalar type of the extension (void: no tensor-core path).
template <typename T>
struct WmmaType {
  using type = void;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float bits_to_float(uint32_t w) { return __uint_as_float(w); }
__device__ __forceinline__ uint32_t float_to_bits(float f) { return __float_as_uint(f); }

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Multiprocessors of the current device (an attribute query: no synchronisation).
inline int sm_count() {
  int device = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Stream stream, Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... KArgs>
void allow_dynamic_smem(void (*kernel)(KArgs...), size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Dynamic shared memory one CTA of `kernel` may use on the current device: the per-block opt-in
// limit less the kernel's static shared memory. Queried once per kernel and device, then cached.
template <typename... KArgs>
size_t max_dynamic_smem(void (*kernel)(KArgs...)) {
  constexpr int kMaxDevices = 64;
  static std::atomic<size_t> cached[kMaxDevices] = {};  // 0: not queried yet
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices) {
    const size_t v = cached[device].load(std::memory_order_relaxed);
    if (v != 0) return v - 1;
  }
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)));
  const size_t limit = static_cast<size_t>(optin);
  const size_t avail = limit > attr.sharedSizeBytes ? limit - attr.sharedSizeBytes : 0;
  if (device < kMaxDevices) cached[device].store(avail + 1, std::memory_order_relaxed);
  return avail;
}

struct DeviceGuard {
  explicit DeviceGuard(const at::Device& d) : guard(d) {}
  c10::cuda::CUDAGuard guard;
};

}  // namespace dev
}  // namespace calgan_fast
