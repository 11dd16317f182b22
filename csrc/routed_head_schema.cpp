// Schemas of the raw routed-head kernels in the torch.library namespace `calgan_fast_C`: one schema
// per op for every compiled backend. Implementations register per dispatch key: csrc/cpu (CPU) and
// csrc/cuda (CUDA). Autograd and the public custom ops `calgan_fast::routed_head_{fwd,bwd}_<backend>`
// are in calgan_fast/ops/routed_head.py; the algebra is in docs/design.md.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(calgan_fast_C, m) {
  // (count (N,), offsets (N+1,), perm (M,)) int64: stable grouping of the rows by expert.
  m.def("routing_metadata(Tensor expert, int num_experts) -> (Tensor, Tensor, Tensor)");
  // -> (logits (M,), count (N,), mean (N, c), var (N,), perm (M,), offsets (N+1,), xcov): xcov is
  //    what the backward reuses, the (N, c, c) per-expert cross-covariance of y and the gated rows on
  //    CPU, empty (0,) on CUDA.
  m.def(
      "routed_head_fwd(Tensor x, Tensor expert, Tensor gate, Tensor proj, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (dx, dgate, dproj, dw1, db1, dw2, db2)
  m.def(
      "routed_head_bwd(Tensor glogits, Tensor gmean, Tensor gvar, Tensor x, Tensor expert, Tensor gate, "
      "Tensor proj, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor count, Tensor mean, Tensor perm, "
      "Tensor offsets, Tensor xcov) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
