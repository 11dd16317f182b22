// The backward of the `cpu` backend of the routed head (the algorithm and its algebra are in
// routed_head_fwd_cpu.cpp and docs/design.md).

#include "routed_head_cpu.h"

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
#include "row_loops.h"
#include "schedule.h"

namespace calgan_fast {
namespace cpu {

using at::Tensor;

namespace {

template <typename scalar_t>
std::vector<Tensor> bwd_typed(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar, const Tensor& x,
                              const Tensor& gate, const Tensor& proj, const Tensor& w1, const Tensor& b1,
                              const Tensor& w2, const Tensor& b2, const Tensor& perm, const Tensor& offsets,
                              const Tensor& xcov) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  const auto opts = x.options().dtype(acc);
  const Tensor O = proj.to(acc).contiguous(), W1 = w1.to(acc).contiguous(), B1 = b1.to(acc).contiguous();
  const Tensor W2 = w2.to(acc).contiguous(), G = gate.to(acc).contiguous();
  const Tensor GL = glogits.to(acc).contiguous(), GM = gmean.to(acc).contiguous(), GV = gvar.to(acc).contiguous();
  const Tensor T = xcov.to(acc).contiguous();
  const Tensor xc = rows_contiguous(x);
  const Tensor perm_c = perm.contiguous(), off_c = offsets.contiguous();
  const int64_t* perm_p = perm_c.data_ptr<int64_t>();
  const int64_t* off = off_c.data_ptr<int64_t>();  // checked by check_routing_metadata
  const scalar_t* xp = xc.data_ptr<scalar_t>();
  const acc_t* gp = G.data_ptr<acc_t>();

  Tensor dx = at::empty({m, c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(dx);
  Tensor dgate = at::full({m}, std::numeric_limits<acc_t>::quiet_NaN(), opts);
  // dproj and dw1 are written whole by each expert with rows (zeroed here for the others only).
  Tensor dproj = at::empty_like(O), dw1 = at::empty_like(W1), db1 = at::zeros({n_exp, hdim}, opts);
  advise_huge_pages(dproj);
  for (int64_t e = 0; e < n_exp; ++e) {
    if (off[e + 1] == off[e]) {
      dproj[e].zero_();
      dw1[e].zero_();
    }
  }
  Tensor dw2 = at::zeros({n_exp, hdim}, opts), db2 = at::zeros({n_exp}, opts);
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  acc_t* dgp = dgate.data_ptr<acc_t>();
  const acc_t *glp = GL.data_ptr<acc_t>(), *gvp = GV.data_ptr<acc_t>();
  const acc_t* w2p = W2.data_ptr<acc_t>();
  acc_t *dw2p = dw2.data_ptr<acc_t>(), *db1p = db1.data_ptr<acc_t>(), *db2p = db2.data_ptr<acc_t>();

  const Schedule sched = make_schedule(off, n_exp);
  // Per worker: [W_s | H], an expert's gated rows (shifted, as in the forward) and their hidden
  // rows side by side (rows ld >= c + hdim apart), so that q = [W_s | dh] [k P; A] is one GEMM; q; and
  // the expert's rows of x.
  // On the tile GEMMs, the rows of the block are padded apart for them.
  const bool tiled = use_tile_gemms<acc_t>(sched, c);
  const bool tiled_h = tiled && hdim % tile_gemm::kNR == 0;
  const int64_t kw = c + hdim, ld = tiled ? tile_gemm::padded_ld(kw) : kw;  // [W_s | dh]: width, row stride
  const int64_t workers = sched.workers;
  std::vector<Tensor> wh_buf, q_buf, xr_buf, kpa_packed;
  for (int64_t i = 0; i < workers; ++i) {
    wh_buf.push_back(at::empty({sched.max_rows, ld}, opts));
    q_buf.push_back(at::empty({sched.max_rows, c}, opts));
    xr_buf.push_back(at::empty({sched.max_rows, c}, opts));  // the expert's rows of x, for dgate
    if (tiled) kpa_packed.push_back(at::empty({tile_gemm::packed_size(kw, c)}, opts));
  }
  ChunkPool pool(workers, n_exp);
  auto expert_backward = [&](int64_t e, int64_t wk) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) return;
    const int64_t* pe = perm_p + lo;
    const Tensor WH = wh_buf[wk].narrow(0, 0, n).narrow(1, 0, kw);
    Tensor W = WH.narrow(1, 0, c), H = WH.narrow(1, c, hdim), Q = q_buf[wk].narrow(0, 0, n);
    // W holds w - shift; x̄ = shift + dbar, dbar the mean of the shifted rows.
    Tensor shift = at::empty({c}, opts), dbar = at::empty({c}, opts), xb = at::empty({c}, opts);
    acc_t* wp = W.data_ptr<acc_t>();
    acc_t* xrp = xr_buf[wk].data_ptr<acc_t>();
    expert_shift(xp, c, pe, gp, n, shift.data_ptr<acc_t>());
    gather_expert<scalar_t, acc_t>(xp, c, pe, gp, n, shift.data_ptr<acc_t>(), wp, ld, dbar.data_ptr<acc_t>(),
                                   xb.data_ptr<acc_t>(), xrp);
    const Tensor Oe = O[e], W1e = W1[e];
    const Tensor A = at::mm(W1e, Oe);  // (H, c)
    hidden_rows<acc_t>(tiled_h, W, ld, A, at::addmv(B1[e], A, shift), H, ld);
    // Classifier backward: hdim-wide and cheap, run in row order so the sums are reproducible.
    acc_t* hep = H.data_ptr<acc_t>();
    acc_t db2_sum = 0;
    for (int64_t r = 0; r < n; ++r) {
      const acc_t gl = glp[pe[r]];
      db2_sum += gl;
      classifier_backward_row(hep + r * ld, w2p + e * hdim, gl, hdim, dw2p + e * hdim, db1p + e * hdim);
    }
    db2p[e] = db2_sum;
    // D = dh^T W = dh^T W_s + (sum dh) shift^T; dW1 = D O^T.
    Tensor D;
    if (tiled) {
      D = at::empty({hdim, c}, opts);
      if constexpr (std::is_same_v<acc_t, float>)
        tile_gemm::tn(hdim, n, hep, ld, wp, ld, D.data_ptr<float>(), c, 0, c / tile_gemm::kNR,
                      [](int64_t) { return std::numeric_limits<int64_t>::max(); });
    } else {
      D = at::mm(H.t(), W);
    }
    D.addr_(db1[e], shift);
    Tensor dw1e = dw1[e];
    at::mm_out(dw1e, D, Oe.t());
    const acc_t nf = static_cast<acc_t>(n);
    const Tensor a = GM[e] / nf;
    const acc_t k = acc_t(2) * gvp[e] / (nf * static_cast<acc_t>(c));
    Tensor dpe = dproj[e];
    at::mm_out(dpe, W1e.t(), D);
    dpe.addr_(a, xb, 1, nf);
    // O^T a, and -k P dbar where q is formed from the shifted rows: the same for every row, added as
    // the input gradients are scattered.
    Tensor ota = at::mv(Oe.t(), a);
    const acc_t* qp = Q.data_ptr<acc_t>();
    auto input_grads = [&](int64_t r_lo, int64_t r_hi) {
      const acc_t* otap = ota.data_ptr<acc_t>();
      for_each_tile(r_hi - r_lo, [&](int64_t, int64_t r0, int64_t r1) {
        input_grad_tile<scalar_t, acc_t>(qp, r_lo, otap, xrp, pe, gp, c, r_lo + r0, r_lo + r1, dxp, dgp);
      });
    };
    if (k != acc_t(0) && use_scatter(n, c)) {
      // k O S = k T (T from the forward); q = dh A + k W_c P = [W_s | dh] [k P; A] - k P dbar.
      dpe.add_(T[e], k);
      Tensor KPA = at::empty({kw, c}, opts);
      Tensor KP = KPA.narrow(0, 0, c);
      scatter_matrix(Oe, KP);  // O^T O, symmetric
      KP.mul_(k);
      KPA.narrow(0, c, hdim).copy_(A);
      ota.sub_(at::mv(KP, dbar));
      if (!sched.parallel) {  // threaded GEMMs: q in one piece
        at::mm_out(Q, WH, KPA);
        input_grads(0, n);
        return;
      }
      // On a worker (single-threaded GEMMs), q by chunks of rows whose input gradients are written
      // while the chunk is still in cache, shared with workers that have run out of experts.
      const acc_t* otap = ota.data_ptr<acc_t>();
      // On the tile GEMM, [k P; A] is packed once for all chunks; the rows of [W_s | dh] are read in place.
      const float* bp = nullptr;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (tiled) {
          tile_gemm::pack_b(KPA.data_ptr<float>(), c, kw, c, kpa_packed[wk].data_ptr<float>());
          bp = kpa_packed[wk].data_ptr<float>();
        }
      }
      const acc_t* whp = WH.data_ptr<acc_t>();
      pool.run(wk, (n + kQChunkRows - 1) / kQChunkRows, [&, WH, KPA, whp, bp, otap, xrp, pe, n](int64_t kc, int64_t w) {
        const int64_t r = kc * kQChunkRows, len = std::min(kQChunkRows, n - r);
        acc_t* qc = q_buf[w].data_ptr<acc_t>();
        bool done = false;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (bp != nullptr) {
            tile_gemm::nn(len, c, kw, whp + r * ld, ld, bp, qc, c);
            done = true;
          }
        }
        if (!done) {
          Tensor Qc = q_buf[w].narrow(0, 0, len);
          at::mm_out(Qc, WH.narrow(0, r, len), KPA);
        }
        input_grad_tile<scalar_t, acc_t>(qc, r, otap, xrp, pe, gp, c, r, r + len, dxp, dgp);
      });
      return;
    }
    at::mm_out(Q, H, A);
    if (k != acc_t(0)) {
      // Few rows: the same terms through W_c and Y_c = W_c O^T: O S = Y_c^T W_c and W_c P = Y_c O.
      const Tensor wc = W - dbar;
      const Tensor yc = at::mm(wc, Oe.t());
      dpe.addmm_(yc.t(), wc, 1, k);
      Q.addmm_(yc, Oe, 1, k);
    }
    input_grads(0, n);
  };
  run_experts_pooled(sched, pool, expert_backward);
  const auto st = x.scalar_type();
  return {dx, dgate.to(gate.scalar_type()), dproj.to(st), dw1.to(st), db1.to(st), dw2.to(st), db2.to(st)};
}

}  // namespace

std::vector<Tensor> routed_head_bwd_cpu(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar,
                                        const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                        const Tensor& count, const Tensor& mean, const Tensor& perm,
                                        const Tensor& offsets, const Tensor& xcov) {
  check_routed_head_args(x, expert, gate, proj, w1, b1, w2, b2, c10::DeviceType::CPU);
  // The kernel picks its own precisions: an enclosing autocast region must not recast its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_routed_head_bwd_args(glogits, gmean, gvar, x, count, mean, perm, offsets, proj.size(0));
  const int64_t n = proj.size(0), c = x.size(1);
  TORCH_CHECK(xcov.dim() == 3 && xcov.size(0) == n && xcov.size(1) == c && xcov.size(2) == c,
              "xcov: expected the forward's per-expert cross-covariances of shape (", n, ", ", c, ", ", c,
              "), got ", xcov.sizes());
  TORCH_CHECK(xcov.device() == x.device(), "xcov: expected a tensor on ", x.device(), ", got one on ",
              xcov.device());
  TORCH_CHECK(at::isFloatingType(xcov.scalar_type()), "xcov: expected a floating-point tensor");
  check_routing_metadata(perm, offsets, count, x.size(0), n);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_head_bwd_cpu", [&] {
    out = bwd_typed<scalar_t>(glogits, gmean, gvar, x, gate, proj, w1, b1, w2, b2, perm, offsets, xcov);
  });
  return out;
}

}  // namespace cpu
}  // namespace calgan_fast
