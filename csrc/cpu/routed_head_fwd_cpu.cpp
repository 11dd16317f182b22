// The `cpu` backend of the routed head: forward and backward as fused C++ kernels.
//
// Tensors (M rows, c channels, N experts, H = hdim; "acc" = fp32, or fp64 for fp64 inputs):
//   x (M, c) fp32/bf16/fp16/fp64, any strides;  expert (M,) int64;  gate (M,) x.dtype;
//   proj O (N, c, c);  w1 (N, H, c);  b1 (N, H);  w2 (N, H);  b2 (N,)   all x.dtype.
//   forward  -> logits (M,) x.dtype, count (N,) int64, mean (N, c) acc, var (N,) acc,
//               perm (M,) int64, offsets (N+1,) int64, xcov (N, c, c) acc.
//   backward -> dx, dgate, dproj, dw1, db1, dw2, db2 in the dtypes of the inputs.
//
// Algorithm. A stable counting sort groups the rows by expert (perm, offsets). Each expert is then
// one task: its rows are gathered, gate-scaled, into a contiguous acc block of a per-worker scratch
// buffer (in fp32 for bf16/fp16 input, and kept in cache for every step that follows; x with
// non-contiguous rows is first copied once to contiguous rows), and every GEMM runs on that block.
// In fp32 on the experts' workers (below), with c a multiple of 16 and an x86-64 CPU with AVX2 and
// FMA, the products with the rows (the scatter matrix, D, q, and h where hdim is a multiple of 16
// too) run on the tile GEMMs of tile_gemm.h, which read the rows where they lie instead of packing
// them on every call; the rest, and every product elsewhere, run through ATen (MKL/oneDNN). With
// enough experts to balance, the threads take the experts, largest first, from a shared counter and
// run each single-threaded, one parallel region per call, and a thread left without an expert helps
// with the chunks of the others' (ChunkPool); otherwise they run in order and ATen threads each GEMM
// and row loop. Row loops run over fixed tiles of kTileRows rows and every reduction is
// summed per tile in a fixed order, so results are bitwise reproducible for a fixed thread count.
//
// The head is linear up to the classifier's LeakyReLU, and that is what the kernel exploits. With
// the gated rows W (w_p = g_p x_p) of an expert of n rows, their mean x̄, W_c = W - x̄,
// A = W1 O (hdim x c), P = O^T O and the scatter matrix S = W_c^T W_c:
//   h     = W A^T + b1                       hdim-wide: y = O w is never formed
//   mean  = O x̄,   var = <O, O S> / (n c)    (sum_p |y_p - mean|^2 = trace(O S O^T))
// and in the backward, with a = gmean / n, k = 2 gvar / (n c) and dh the classifier gradient:
//   q_p   = O^T dy_p = A^T dh_p + O^T a + k P (w_p - x̄),   dx_p = g_p q_p,   dgate_p = q_p . x_p
//   D     = dh^T W,   dW1 = D O^T,   dproj = W1^T D + n a x̄^T + k O S.
// The forward computes S (about 0.6 of a GEMM, by symmetry) and T = O S, the per-expert
// cross-covariance sum_p (y_p - mean)(w_p - x̄)^T of the output and the gated input, which gives
// the variance (sum_p |y_p - mean|^2 = <O, T>) and is exactly the k O S the backward needs; T is
// handed to the backward as the `xcov` output (a per-expert statistic, no activation). One
// forward+backward then costs about 2.5 (M, c) x (c, c) GEMMs (forward: S, the hdim-wide h and one
// c^3 product per expert; backward: the dx GEMM, the hdim-wide products and P, symmetric) instead
// of the 4.5 of the textbook chain. Experts with few rows (n < 4c/5), where the c^3 terms
// would dominate, take the textbook route instead: the forward forms Y = W O^T and its statistics
// by Chan's merge of tile statistics, and the backward the k terms through Y_c = W_c O^T.
//
// The rows are gathered minus a shift, the mean of up to kTileRows of the expert's rows: the block
// W_s = W - shift then holds deviations of the size of the expert's spread, so neither the scatter
// matrix (S = W_s^T W_s - n d d^T with d = x̄ - shift) nor the dx GEMM (on [W_s | dh], with
// -k P d added per row) loses digits to a mean that is large next to that spread, and no separate
// centring pass is needed; the classifier takes the shift through its bias (h = W_s A^T + b1 +
// A shift). The backward keeps the expert's rows of x beside the block for dgate. A NaN in a row
// of x stays in that row's logit and its expert's statistics, as the reference's does (where one
// of the sampled rows is not finite, the shift is zero instead).

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
std::vector<Tensor> fwd_typed(const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                              const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  auto [count, offsets, perm] = routing_metadata_cpu(expert, n_exp);
  const auto opts = x.options().dtype(acc);
  const Tensor O = proj.to(acc).contiguous(), W1 = w1.to(acc).contiguous(), B1 = b1.to(acc).contiguous();
  const Tensor W2 = w2.to(acc).contiguous(), B2 = b2.to(acc).contiguous(), G = gate.to(acc).contiguous();
  const Tensor xc = rows_contiguous(x);
  const int64_t* perm_p = perm.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const scalar_t* xp = xc.data_ptr<scalar_t>();
  const acc_t* gp = G.data_ptr<acc_t>();

  // Scatter targets start as NaN: a row that no tile writes shows up in every test.
  Tensor logits_acc = at::full({m}, std::numeric_limits<acc_t>::quiet_NaN(), opts);
  Tensor mean = at::zeros({n_exp, c}, opts), var = at::zeros({n_exp}, opts);
  // Only the experts of the scatter route fill their slot; the others are zeroed below.
  Tensor xcov = at::empty({n_exp, c, c}, opts);
  acc_t *lg = logits_acc.data_ptr<acc_t>(), *mp = mean.data_ptr<acc_t>(), *vp = var.data_ptr<acc_t>();
  const acc_t* b2p = B2.data_ptr<acc_t>();

  const Schedule sched = make_schedule(off, n_exp);
  bool any_textbook = false;
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n > 0 && !use_scatter(n, c)) any_textbook = true;
    if (n == 0 || !use_scatter(n, c)) xcov[e].zero_();
  }
  // On the tile GEMMs, the rows of the block are padded apart for them.
  const bool tiled = use_tile_gemms<acc_t>(sched, c);
  const int64_t ldw = tiled ? tile_gemm::padded_ld(c) : c;
  const bool tiled_h = tiled && hdim % tile_gemm::kNR == 0;
  Scratch scr(sched.workers, sched.max_rows, c, ldw, hdim, opts, any_textbook);
  ChunkPool pool(sched.workers, n_exp);
  auto expert_forward = [&](int64_t e, int64_t wk) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) return;
    const int64_t* pe = perm_p + lo;
    Tensor W = scr.w[wk].narrow(0, 0, n).narrow(1, 0, c), H = scr.h[wk].narrow(0, 0, n);
    // The rows are gathered minus a shift (the mean of a sample of the expert's rows), which centres
    // them well enough for the scatter matrix and Chan's merge to keep their digits; the mean is
    // the shift plus the mean of the shifted rows.
    Tensor shift = at::empty({c}, opts), dbar = at::empty({c}, opts), xbar = at::empty({c}, opts);
    acc_t* wp = W.data_ptr<acc_t>();
    expert_shift(xp, c, pe, gp, n, shift.data_ptr<acc_t>());
    gather_expert<scalar_t, acc_t>(xp, c, pe, gp, n, shift.data_ptr<acc_t>(), wp, ldw, dbar.data_ptr<acc_t>(),
                                   xbar.data_ptr<acc_t>());
    const Tensor Oe = O[e];
    // Classifier: h = W (W1 O)^T + b1 = W_s A^T + (b1 + A shift), W_s the shifted rows.
    const Tensor A = at::mm(W1[e], Oe);
    acc_t* hp = H.data_ptr<acc_t>();
    hidden_rows<acc_t>(tiled_h, W, ldw, A, at::addmv(B1[e], A, shift), H, hdim);
    // logits = lrelu(h) w2 + b2: the activation in place, one GEMV, scattered to pixel order.
    for_each_tile(n, [&](int64_t, int64_t r0, int64_t r1) { lrelu_tile(hp, hdim, r0, r1); });
    const Tensor le = at::mv(H, W2[e]);
    const acc_t* lep = le.data_ptr<acc_t>();
    const acc_t b2e = b2p[e];
    for (int64_t r = 0; r < n; ++r) lg[pe[r]] = lep[r] + b2e;
    Tensor me = mean[e];
    if (use_scatter(n, c)) {
      // S = W_c^T W_c = W_s^T W_s - n d d^T (d = dbar, the mean of the shifted rows);
      // T = O S (the cross-covariance of y and the gated rows); sum |y - mean|^2 = <O, T>.
      Tensor S = at::empty({c, c}, opts), T = xcov[e];
      if (tiled) {
        // The upper triangle of W_s^T W_s by pairs of column tiles (the widest first), shared with
        // workers out of experts; then S = that - n d d^T, mirrored below the diagonal.
        if constexpr (std::is_same_v<acc_t, float>) {
          const int64_t nt = c / tile_gemm::kNR;
          const float* wsp = wp;
          float* sp = S.data_ptr<float>();
          pool.run(wk, (nt + 1) / 2, [wsp, sp, n, c, ldw, nt](int64_t b, int64_t) {
            const int64_t jt1 = nt - 2 * b, jt0 = std::max<int64_t>(0, jt1 - 2);
            tile_gemm::tn(c, n, wsp, ldw, wsp, ldw, sp, c, jt0, jt1,
                          [](int64_t jt) { return (jt + 1) * tile_gemm::kNR; });
          });
          const float* d = dbar.data_ptr<float>();
          const float nf = static_cast<float>(n);
          for (int64_t i = 0; i < c; ++i) {
            const float ndi = nf * d[i];
            for (int64_t j = i; j < c; ++j) {
              const float v = sp[i * c + j] - ndi * d[j];
              sp[i * c + j] = v;
              sp[j * c + i] = v;
            }
          }
        }
      } else if (sched.parallel) {
        // The bands of S, shared with workers out of experts.
        pool.run(wk, scatter_bands(c), [&W, &S](int64_t b, int64_t) { scatter_band(W, S, b); });
        S.addr_(dbar, dbar, 1, -static_cast<double>(n));
      }
      if (sched.parallel) {
        // T by blocks of its rows, shared with workers out of experts.
        pool.run(wk, (c + kGramBlock - 1) / kGramBlock, [&T, &S, &Oe, c](int64_t b, int64_t) {
          const int64_t i0 = b * kGramBlock, ci = std::min(kGramBlock, c - i0);
          Tensor Tb = T.narrow(0, i0, ci);
          at::mm_out(Tb, Oe.narrow(0, i0, ci), S);
        });
      } else {
        scatter_matrix(W, S);
        S.addr_(dbar, dbar, 1, -static_cast<double>(n));
        at::mm_out(T, Oe, S);
      }
      vp[e] = frobenius_dot<acc_t>(Oe, T) / (static_cast<acc_t>(n) * static_cast<acc_t>(c));
      at::mv_out(me, Oe, xbar);
      return;
    }
    // Textbook route: Y = W_s O^T, statistics per tile merged by Chan's formula in tile order.
    Tensor Y = scr.q[wk].narrow(0, 0, n);
    at::mm_out(Y, W, Oe.t());
    const acc_t* yp = Y.data_ptr<acc_t>();
    const int64_t nt = n_tiles_of(n);
    std::vector<acc_t> t_mean(static_cast<size_t>(nt * c)), t_m2(nt);
    for_each_tile(n, [&](int64_t t, int64_t r0, int64_t r1) {
      acc_t* mu = t_mean.data() + t * c;
      std::fill(mu, mu + c, acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* yr = yp + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) mu[j] += yr[j];
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(r1 - r0);
      for (int64_t j = 0; j < c; ++j) mu[j] *= inv;
      // Per-channel sums of squares (vectorisable), added up at the end in channel order.
      std::vector<acc_t> m2v(c, acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* yr = yp + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const acc_t d = yr[j] - mu[j];
          m2v[j] += d * d;
        }
      }
      acc_t m2 = 0;
      for (int64_t j = 0; j < c; ++j) m2 += m2v[j];
      t_m2[t] = m2;
    });
    acc_t n_a = 0, m2 = 0;
    for (int64_t t = 0; t < nt; ++t) {
      const acc_t n_b = static_cast<acc_t>(std::min(n, (t + 1) * kTileRows) - t * kTileRows);
      m2 = chan_merge(n_a, mp + e * c, m2, n_b, t_mean.data() + t * c, t_m2[t], c);
      n_a += n_b;
    }
    vp[e] = m2 / (n_a * static_cast<acc_t>(c));
    me.addmv_(Oe, shift);  // Y holds y - O shift
  };
  run_experts_pooled(sched, pool, expert_forward);
  return {logits_acc.to(x.scalar_type()), count, mean, var, perm, offsets, xcov};
}

}  // namespace

std::vector<Tensor> routed_head_fwd_cpu(const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  check_routed_head_args(x, expert, gate, proj, w1, b1, w2, b2, c10::DeviceType::CPU);
  // The kernel picks its own precisions: an enclosing autocast region must not recast its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_head_fwd_cpu", [&] {
    out = fwd_typed<scalar_t>(x, expert, gate, proj, w1, b1, w2, b2);
  });
  return out;
}

}  // namespace cpu
}  // namespace calgan_fast
