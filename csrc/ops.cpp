// Python module of calgan_fast._C: build information, and the registration of the raw
// kernels of the `cpu` and `cuda` backends as the torch.library namespace `calgan_fast_C`.
// The autograd wiring and the public custom ops live in calgan_fast/ops/routed_head.py.

#include <torch/extension.h>
#include <torch/library.h>

#include <string>

namespace calgan_fast {

static std::string build_info() {
  std::string s = "torch " TORCH_VERSION;
#ifdef WITH_CUDA
  s += "; CUDA kernels built";
#else
  s += "; CPU only";
#endif
#ifdef _OPENMP
  s += "; OpenMP";
#endif
  return s;
}

}  // namespace calgan_fast

// The namespace of the raw kernels; their schemas are in routed_head_schema.cpp and their
// implementations register per dispatch key in cpu/ and cuda/.
TORCH_LIBRARY(calgan_fast_C, m) {
  m.def("build_info() -> str", [] { return calgan_fast::build_info(); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "calgan_fast compiled kernels";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.attr("CUDA_ARCH_LIST") = CALGAN_CUDA_ARCH_LIST;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("build_info", &calgan_fast::build_info);
}
