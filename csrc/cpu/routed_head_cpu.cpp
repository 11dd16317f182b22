// The `cpu` backend of the routed head: forward and backward as fused C++ kernels.
//
// Tensors (M rows, c channels, N experts, H = hdim; "acc" = fp32, or fp64 for fp64 inputs):
//   x (M, c) fp32/bf16/fp16/fp64, any strides;  expert (M,) int64;  gate (M,) x.dtype;
//   proj O (N, c, c);  w1 (N, H, c);  b1 (N, H);  w2 (N, H);  b2 (N,)   all x.dtype.
//   forward  -> logits (M,) x.dtype, count (N,) int64, mean (N, c) acc, var (N,) acc,
//               perm (M,) int64, offsets (N+1,) int64.
//   backward -> dx, dgate, dproj, dw1, db1, dw2, db2 in the dtypes of the inputs.
//
// Algorithm. A stable counting sort groups the rows by expert (perm, offsets). The rows are
// gathered once into a contiguous acc buffer (which also makes strided x and bf16 cheap), and
// every GEMM runs on one expert's contiguous block through ATen (MKL/oneDNN, faster than anything
// hand-written here). With enough experts of balanced size one parallel region (at::parallel_for,
// OpenMP) hands whole experts to threads and their GEMMs run single-threaded; otherwise experts run
// in order and ATen threads each GEMM. The cheap per-row and per-tile work around the GEMMs runs
// over fixed tiles of kTileRows rows, each writing only its own outputs; every reduction is then
// summed per expert in a fixed order, so results are bitwise reproducible for a fixed thread count.
//
// Forward, per expert e (rows w_p = g_p x_p):  Y = W O^T (one GEMM), H = Y W1^T + b1; then per
// tile: logits (classifier_logit), tile mean and M2 of Y; the tiles merge by Chan's formula.
//
// Backward, without recomputing Y. With x̄ = mean of the w rows, W_c = W - x̄, A = W1 O,
// P = O^T O, S = W_c^T W_c, a = gmean/n, k = 2 gvar/(n c) and dh the classifier gradient:
//   h       = W_c A^T + (A x̄ + b1)                      (hdim-wide, cheap)
//   q_p     = O^T dy_p = A^T dh_p + O^T a + k P (w_p - x̄)
//   dx_p    = g_p q_p,   dgate_p = q_p . x_p
//   dW1     = (dh^T W) O^T,   dproj = W1^T (dh^T W) + n a x̄^T + k O S
// so the backward costs one (n, c) x (c, c) GEMM for q plus the Gram matrix S (three quarters of
// a GEMM, by symmetry) and two c^3 products, instead of the three GEMMs of the textbook chain
// (recompute Y, dproj, dx). Experts with n < 1.6 c rows, where the c^3 terms dominate, take the
// textbook route for the k terms. Terms with k = 0 (no gradient into var) are skipped.

#include "routed_head_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "routed_head_checks.h"
#include "routed_head_common.h"

namespace calgan_fast {
namespace cpu {

using at::Tensor;

namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Fixed tiles over the sorted rows: tile t covers rows [lo[t], lo[t] + n[t]) of expert e[t];
// tiles of expert i are first[i] .. first[i+1]-1. Depends only on the routing.
struct Tiles {
  std::vector<int64_t> lo, n, e, first;
};

Tiles make_tiles(const int64_t* off, int64_t n_exp) {
  Tiles t;
  t.first.resize(n_exp + 1);
  for (int64_t i = 0; i < n_exp; ++i) {
    t.first[i] = static_cast<int64_t>(t.lo.size());
    for (int64_t r = off[i]; r < off[i + 1]; r += kTileRows) {
      t.lo.push_back(r);
      t.n.push_back(std::min(kTileRows, off[i + 1] - r));
      t.e.push_back(i);
    }
  }
  t.first[n_exp] = static_cast<int64_t>(t.lo.size());
  return t;
}

// Items per parallel chunk so that a chunk holds at least kGrainElems elements of work (ATen's
// own grain): small problems run inline instead of paying for a parallel region (and, on a loaded
// machine, for waiting on a descheduled thread).
constexpr int64_t kGrainElems = 32768;
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, work_per_item));
}

// out[r, :] = gate[perm[r]] * x[perm[r], :] in acc_t; x with contiguous rows.
template <typename scalar_t, typename acc_t>
void gather_rows_gated(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate, acc_t* out, int64_t m) {
  at::parallel_for(0, m, grain(c), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = perm[r];
      const acc_t g = gate[p];
      const scalar_t* src = xp + p * c;
      acc_t* dst = out + r * c;
      for (int64_t j = 0; j < c; ++j) dst[j] = g * static_cast<acc_t>(src[j]);
    }
  });
}

// Runs f(e) for every expert. With enough experts of balanced size, one parallel region hands
// whole experts to threads and every GEMM of an expert runs single-threaded inside it (ATen and MKL
// do not nest): one fork/join per call instead of one per GEMM, which matters on a loaded machine.
// Otherwise the experts run in order with ATen's own GEMM threading. Either way each expert's
// results come from a fixed sequence of operations, so they are reproducible for a fixed thread count.
template <typename F>
void for_each_expert(int64_t n_exp, const int64_t* off, const F& f) {
  const int64_t threads = at::get_num_threads();
  int64_t max_n = 0;
  for (int64_t e = 0; e < n_exp; ++e) max_n = std::max(max_n, off[e + 1] - off[e]);
  if (threads > 1 && n_exp >= 2 * threads && 4 * max_n * threads <= 3 * off[n_exp]) {
    at::parallel_for(0, n_exp, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: keep autograd out of the ATen
      // calls of the raw kernel, as the custom op's caller does on its own thread.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t e = begin; e < end; ++e) f(e);
    });
  } else {
    for (int64_t e = 0; e < n_exp; ++e) f(e);
  }
}

// Symmetric W^T W of an (n, c) block, computing three of its four quadrants.
Tensor gram(const Tensor& w) {
  const int64_t c = w.size(1);
  if (c < 128) return at::mm(w.t(), w);
  const int64_t c1 = c / 2;
  const Tensor lo = w.narrow(1, 0, c1), hi = w.narrow(1, c1, c - c1);
  const Tensor s11 = at::mm(lo.t(), lo), s12 = at::mm(lo.t(), hi), s22 = at::mm(hi.t(), hi);
  return at::cat({at::cat({s11, s12}, 1), at::cat({s12.t(), s22}, 1)}, 0);
}

// Rows of x as a contiguous (M, c) tensor in x's dtype (a transposed NCHW view gets one copy).
Tensor rows_contiguous(const Tensor& x) { return x.stride(1) == 1 && x.stride(0) == x.size(1) ? x : x.contiguous(); }

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

  Tensor ws = at::empty({m, c}, opts);
  gather_rows_gated<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), c, perm_p, G.data_ptr<acc_t>(), ws.data_ptr<acc_t>(), m);
  Tensor y = at::empty({m, c}, opts);
  Tensor hid = at::empty({m, hdim}, opts);
  for_each_expert(n_exp, off, [&](int64_t e) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) return;
    Tensor ye = y.narrow(0, lo, n);
    at::mm_out(ye, ws.narrow(0, lo, n), O[e].t());
    Tensor he = hid.narrow(0, lo, n);
    at::addmm_out(he, B1[e], ye, W1[e].t());
  });

  const Tiles tiles = make_tiles(off, n_exp);
  const int64_t n_tiles = static_cast<int64_t>(tiles.lo.size());
  std::vector<acc_t> t_mean(static_cast<size_t>(n_tiles * c)), t_m2(n_tiles);
  // Scatter targets start as NaN: a row that no tile writes shows up in every test.
  Tensor logits_acc = at::full({m}, std::numeric_limits<acc_t>::quiet_NaN(), opts);
  acc_t* lg = logits_acc.data_ptr<acc_t>();
  const acc_t *yp = y.data_ptr<acc_t>(), *hp = hid.data_ptr<acc_t>();
  const acc_t *w2p = W2.data_ptr<acc_t>(), *b2p = B2.data_ptr<acc_t>();
  at::parallel_for(0, n_tiles, grain(c * ((m + n_tiles - 1) / n_tiles)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = tiles.lo[t], nt = tiles.n[t], e = tiles.e[t];
      acc_t* mu = t_mean.data() + t * c;
      std::fill(mu, mu + c, acc_t(0));
      for (int64_t r = lo; r < lo + nt; ++r) {
        const acc_t* yr = yp + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) mu[j] += yr[j];
        lg[perm_p[r]] = classifier_logit(hp + r * hdim, w2p + e * hdim, b2p[e], hdim);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(nt);
      for (int64_t j = 0; j < c; ++j) mu[j] *= inv;
      // Per-channel sums of squares (vectorisable), added up at the end in channel order.
      std::vector<acc_t> m2v(c, acc_t(0));
      for (int64_t r = lo; r < lo + nt; ++r) {
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
    }
  });

  Tensor mean = at::zeros({n_exp, c}, opts);
  Tensor var = at::zeros({n_exp}, opts);
  acc_t *mp = mean.data_ptr<acc_t>(), *vp = var.data_ptr<acc_t>();
  at::parallel_for(0, n_exp, grain(c * ((n_tiles + n_exp - 1) / n_exp)), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t n_a = 0, m2 = 0;
      for (int64_t t = tiles.first[e]; t < tiles.first[e + 1]; ++t) {
        const acc_t n_b = static_cast<acc_t>(tiles.n[t]);
        m2 = chan_merge(n_a, mp + e * c, m2, n_b, t_mean.data() + t * c, t_m2[t], c);
        n_a += n_b;
      }
      vp[e] = n_a > 0 ? m2 / (n_a * static_cast<acc_t>(c)) : acc_t(0);
    }
  });
  return {logits_acc.to(x.scalar_type()), count, mean, var, perm, offsets};
}

template <typename scalar_t>
std::vector<Tensor> bwd_typed(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar, const Tensor& x,
                              const Tensor& gate, const Tensor& proj, const Tensor& w1, const Tensor& b1,
                              const Tensor& w2, const Tensor& b2, const Tensor& perm, const Tensor& offsets) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t m = x.size(0), c = x.size(1), n_exp = proj.size(0), hdim = w1.size(1);
  const auto opts = x.options().dtype(acc);
  const Tensor O = proj.to(acc).contiguous(), W1 = w1.to(acc).contiguous(), B1 = b1.to(acc).contiguous();
  const Tensor W2 = w2.to(acc).contiguous(), G = gate.to(acc).contiguous();
  const Tensor GL = glogits.to(acc).contiguous(), GM = gmean.to(acc).contiguous(), GV = gvar.to(acc).contiguous();
  const Tensor xc = rows_contiguous(x);
  const Tensor perm_c = perm.contiguous(), off_c = offsets.contiguous();
  const int64_t* perm_p = perm_c.data_ptr<int64_t>();
  const int64_t* off = off_c.data_ptr<int64_t>();  // checked by check_routing_metadata

  // wc: the rows of x in expert order, gate-scaled, then centred per expert. The gather is fused
  // with per-tile sums in double of the expert means, summed per expert in tile order below, so
  // the means are exact enough to centre with and independent of the thread count.
  Tensor wc = at::empty({m, c}, opts);
  const acc_t* gp = G.data_ptr<acc_t>();
  acc_t* wcp = wc.data_ptr<acc_t>();
  const scalar_t* xp = xc.data_ptr<scalar_t>();
  const Tiles tiles = make_tiles(off, n_exp);
  const int64_t n_tiles = static_cast<int64_t>(tiles.lo.size());
  std::vector<double> t_sum(static_cast<size_t>(n_tiles * c));
  at::parallel_for(0, n_tiles, grain(c * ((m + n_tiles - 1) / n_tiles)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      double* s = t_sum.data() + t * c;
      std::fill(s, s + c, 0.0);
      for (int64_t r = tiles.lo[t]; r < tiles.lo[t] + tiles.n[t]; ++r) {
        const int64_t p = perm_p[r];
        const acc_t g = gp[p];
        const scalar_t* src = xp + p * c;
        acc_t* wr = wcp + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          wr[j] = g * static_cast<acc_t>(src[j]);
          s[j] += static_cast<double>(wr[j]);
        }
      }
    }
  });
  Tensor xbar = at::zeros({n_exp, c}, opts);
  acc_t* xbp = xbar.data_ptr<acc_t>();
  at::parallel_for(0, n_exp, grain(c * ((n_tiles + n_exp - 1) / n_exp)), [&](int64_t begin, int64_t end) {
    std::vector<double> s(c);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n == 0) continue;
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t t = tiles.first[e]; t < tiles.first[e + 1]; ++t) {
        const double* ts = t_sum.data() + t * c;
        for (int64_t j = 0; j < c; ++j) s[j] += ts[j];
      }
      for (int64_t j = 0; j < c; ++j) xbp[e * c + j] = static_cast<acc_t>(s[j] / static_cast<double>(n));
    }
  });
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n > 0) wc.narrow(0, lo, n).sub_(xbar[e]);
  }

  Tensor dx = at::empty({m, c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dgate = at::full({m}, std::numeric_limits<acc_t>::quiet_NaN(), opts);
  Tensor dproj = at::zeros_like(O), dw1 = at::zeros_like(W1), db1 = at::zeros({n_exp, hdim}, opts);
  Tensor dw2 = at::zeros({n_exp, hdim}, opts), db2 = at::zeros({n_exp}, opts);
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  acc_t* dgp = dgate.data_ptr<acc_t>();
  const acc_t *glp = GL.data_ptr<acc_t>(), *gvp = GV.data_ptr<acc_t>();
  const acc_t* w2p = W2.data_ptr<acc_t>();
  acc_t *dw2p = dw2.data_ptr<acc_t>(), *db1p = db1.data_ptr<acc_t>(), *db2p = db2.data_ptr<acc_t>();
  for_each_expert(n_exp, off, [&](int64_t e) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) return;
    const Tensor Oe = O[e], W1e = W1[e], xb = xbar[e], wce = wc.narrow(0, lo, n);
    const Tensor A = at::mm(W1e, Oe);  // (H, c)
    Tensor he = at::addmm(at::addmv(B1[e], A, xb), wce, A.t());
    // Classifier backward: H-wide and cheap, run in row order so the sums are reproducible.
    acc_t* hep = he.data_ptr<acc_t>();
    acc_t db2_sum = 0;
    for (int64_t r = 0; r < n; ++r) {
      const acc_t gl = glp[perm_p[lo + r]];
      db2_sum += gl;
      classifier_backward_row(hep + r * hdim, w2p + e * hdim, gl, hdim, dw2p + e * hdim, db1p + e * hdim);
    }
    db2p[e] = db2_sum;
    // D = dh^T W = dh^T W_c + (sum dh) x̄^T; dW1 = D O^T.
    Tensor D = at::mm(he.t(), wce);
    D.addr_(db1[e], xb);
    dw1[e].copy_(at::mm(D, Oe.t()));
    const acc_t nf = static_cast<acc_t>(n);
    const Tensor a = GM[e] / nf;
    const acc_t k = acc_t(2) * gvp[e] / (nf * static_cast<acc_t>(c));
    Tensor dpe = dproj[e];
    dpe.copy_(at::mm(W1e.t(), D));
    dpe.addr_(a, xb, 1, nf);
    Tensor qe = at::mm(he, A);
    const Tensor ota = at::mv(Oe.t(), a);  // O^T a, the same for every row: added in the scatter
    if (k != acc_t(0) && 5 * n >= 8 * c) {
      // k O S and k W_c P: 7/4 n c^2 + 2 c^3 multiply-adds.
      dpe.add_(at::mm(Oe, gram(wce)), k);
      qe.addmm_(wce, at::mm(Oe.t(), Oe), 1, k);
    } else if (k != acc_t(0)) {
      // Few rows (n < 1.6 c): the same terms through Y_c = W_c O^T, 3 n c^2 multiply-adds:
      // O S = Y_c^T W_c and W_c P = Y_c O.
      const Tensor yc = at::mm(wce, Oe.t());
      dpe.addmm_(yc.t(), wce, 1, k);
      qe.addmm_(yc, Oe, 1, k);
    }
    const acc_t* qp = qe.data_ptr<acc_t>();
    const acc_t* otap = ota.data_ptr<acc_t>();
    at::parallel_for(0, n, grain(c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t p = perm_p[lo + r];
        const acc_t g = gp[p];
        const acc_t* qr = qp + r * c;
        const scalar_t* xr = xp + p * c;
        scalar_t* dst = dxp + p * c;
        // Eight running partial sums (a fixed order) let the compiler vectorise the dot product.
        acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= c; j += 8) {
          for (int l = 0; l < 8; ++l) {
            const acc_t q = qr[j + l] + otap[j + l];
            dst[j + l] = static_cast<scalar_t>(g * q);
            part[l] += q * static_cast<acc_t>(xr[j + l]);
          }
        }
        for (; j < c; ++j) {
          const acc_t q = qr[j] + otap[j];
          dst[j] = static_cast<scalar_t>(g * q);
          part[0] += q * static_cast<acc_t>(xr[j]);
        }
        dgp[p] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      }
    });
  });
  const auto st = x.scalar_type();
  return {dx, dgate.to(gate.scalar_type()), dproj.to(st), dw1.to(st), db1.to(st), dw2.to(st), db2.to(st)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> routing_metadata_cpu(const Tensor& expert, int64_t num_experts) {
  TORCH_CHECK(expert.device().is_cpu(), "expert: expected a CPU tensor, got one on ", expert.device());
  TORCH_CHECK(expert.dim() == 1, "expert: expected shape (M,), got ", expert.sizes());
  TORCH_CHECK(expert.scalar_type() == at::kLong, "expert: expected int64, got ", expert.scalar_type());
  TORCH_CHECK(num_experts > 0, "num_experts: must be positive, got ", num_experts);
  const Tensor ex = expert.contiguous();
  const int64_t m = ex.size(0);
  const auto lopts = ex.options();
  Tensor count = at::zeros({num_experts}, lopts), offsets = at::empty({num_experts + 1}, lopts);
  Tensor perm = at::empty({m}, lopts);
  const int64_t* ep = ex.data_ptr<int64_t>();
  int64_t *cp = count.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>(), *pp = perm.data_ptr<int64_t>();
  for (int64_t p = 0; p < m; ++p) {
    const int64_t id = ep[p];
    TORCH_CHECK(id >= 0 && id < num_experts, "expert: id ", id, " at row ", p, " lies outside [0, ", num_experts,
                ")");
    ++cp[id];
  }
  op[0] = 0;
  for (int64_t i = 0; i < num_experts; ++i) op[i + 1] = op[i] + cp[i];
  std::vector<int64_t> next(op, op + num_experts);
  for (int64_t p = 0; p < m; ++p) pp[next[ep[p]]++] = p;
  return {count, offsets, perm};
}

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

std::vector<Tensor> routed_head_bwd_cpu(const Tensor& glogits, const Tensor& gmean, const Tensor& gvar,
                                        const Tensor& x, const Tensor& expert, const Tensor& gate, const Tensor& proj,
                                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                        const Tensor& count, const Tensor& mean, const Tensor& perm,
                                        const Tensor& offsets) {
  check_routed_head_args(x, expert, gate, proj, w1, b1, w2, b2, c10::DeviceType::CPU);
  // The kernel picks its own precisions: an enclosing autocast region must not recast its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_routed_head_bwd_args(glogits, gmean, gvar, x, count, mean, perm, offsets, proj.size(0));
  check_routing_metadata(perm, offsets, count, x.size(0), proj.size(0));
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_head_bwd_cpu", [&] {
    out = bwd_typed<scalar_t>(glogits, gmean, gvar, x, gate, proj, w1, b1, w2, b2, perm, offsets);
  });
  return out;
}

}  // namespace cpu
}  // namespace calgan_fast

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_op(
    const at::Tensor& x, const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  auto o = calgan_fast::cpu::routed_head_fwd_cpu(x, expert, gate, proj, w1, b1, w2, b2);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& glogits, const at::Tensor& gmean, const at::Tensor& gvar, const at::Tensor& x,
    const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& count, const at::Tensor& mean,
    const at::Tensor& perm, const at::Tensor& offsets) {
  auto o = calgan_fast::cpu::routed_head_bwd_cpu(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count,
                                                 mean, perm, offsets);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(calgan_fast_C, CPU, m) {
  m.impl("routing_metadata", &calgan_fast::cpu::routing_metadata_cpu);
  m.impl("routed_head_fwd_cpu", &fwd_op);
  m.impl("routed_head_bwd_cpu", &bwd_op);
}
