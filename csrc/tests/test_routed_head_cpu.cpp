// The CPU kernels of the routed head against a naive loop written straight from docs/design.md §2-3
// (the textbook chain rule per row, in double), run by ctest. Exits non-zero on a mismatch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cpu/routed_head_cpu.h"
#include "cpu/tile_gemm.h"
#include "routed_head_common.h"

namespace {

using at::Tensor;
using calgan_fast::lrelu;
using calgan_fast::lrelu_grad;

int g_failures = 0;

void expect_close(const std::string& what, const Tensor& got, const std::vector<double>& want, double rtol,
                  double atol) {
  const Tensor g = got.to(at::kDouble).contiguous().view({-1});
  if (g.numel() != static_cast<int64_t>(want.size())) {
    std::printf("FAIL %s: %lld values, expected %zu\n", what.c_str(), static_cast<long long>(g.numel()), want.size());
    ++g_failures;
    return;
  }
  const double* p = g.data_ptr<double>();
  double worst = 0.0;
  int64_t at = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(p[i] - want[i]) - (atol + rtol * std::fabs(want[i]));
    if (!(err <= 0.0) && (at < 0 || err > worst)) {
      worst = err;
      at = static_cast<int64_t>(i);
    }
  }
  if (at >= 0) {
    std::printf("FAIL %s: element %lld is %.10g, expected %.10g\n", what.c_str(), static_cast<long long>(at), p[at],
                want[at]);
    ++g_failures;
  }
}

struct Naive {
  std::vector<double> logits, mean, var, dx, dgate, dproj, dw1, db1, dw2, db2, count;
};

// Inputs as contiguous double tensors; expert int64.
Naive naive(const Tensor& xt, const Tensor& et, const Tensor& gt, const Tensor& Ot, const Tensor& W1t,
            const Tensor& b1t, const Tensor& w2t, const Tensor& b2t, const Tensor& glt, const Tensor& gmt,
            const Tensor& gvt) {
  const int64_t M = xt.size(0), c = xt.size(1), N = Ot.size(0), H = W1t.size(1);
  const double *x = xt.data_ptr<double>(), *g = gt.data_ptr<double>(), *O = Ot.data_ptr<double>();
  const double *W1 = W1t.data_ptr<double>(), *b1 = b1t.data_ptr<double>(), *w2 = w2t.data_ptr<double>();
  const double *b2 = b2t.data_ptr<double>(), *gl = glt.data_ptr<double>(), *gm = gmt.data_ptr<double>();
  const double* gv = gvt.data_ptr<double>();
  const int64_t* ex = et.data_ptr<int64_t>();
  Naive r;
  r.logits.assign(M, 0);
  r.mean.assign(N * c, 0);
  r.var.assign(N, 0);
  r.count.assign(N, 0);
  r.dx.assign(M * c, 0);
  r.dgate.assign(M, 0);
  r.dproj.assign(N * c * c, 0);
  r.dw1.assign(N * H * c, 0);
  r.db1.assign(N * H, 0);
  r.dw2.assign(N * H, 0);
  r.db2.assign(N, 0);
  std::vector<double> y(M * c), u(M * c), h(M * H);
  for (int64_t p = 0; p < M; ++p) {
    const int64_t e = ex[p];
    r.count[e] += 1;
    for (int64_t i = 0; i < c; ++i) {
      double s = 0;
      for (int64_t j = 0; j < c; ++j) s += O[(e * c + i) * c + j] * x[p * c + j];
      u[p * c + i] = s;
      y[p * c + i] = g[p] * s;
    }
    double logit = b2[e];
    for (int64_t k = 0; k < H; ++k) {
      double s = b1[e * H + k];
      for (int64_t i = 0; i < c; ++i) s += W1[(e * H + k) * c + i] * y[p * c + i];
      h[p * H + k] = s;
      logit += w2[e * H + k] * lrelu(s);
    }
    r.logits[p] = logit;
  }
  for (int64_t p = 0; p < M; ++p)
    for (int64_t i = 0; i < c; ++i) r.mean[ex[p] * c + i] += y[p * c + i] / r.count[ex[p]];
  for (int64_t p = 0; p < M; ++p) {
    const int64_t e = ex[p];
    for (int64_t i = 0; i < c; ++i) {
      const double d = y[p * c + i] - r.mean[e * c + i];
      r.var[e] += d * d / (r.count[e] * c);
    }
  }
  for (int64_t p = 0; p < M; ++p) {
    const int64_t e = ex[p];
    const double n = r.count[e];
    std::vector<double> dh(H), dy(c);
    r.db2[e] += gl[p];
    for (int64_t k = 0; k < H; ++k) {
      r.dw2[e * H + k] += gl[p] * lrelu(h[p * H + k]);
      dh[k] = gl[p] * w2[e * H + k] * lrelu_grad(h[p * H + k]);
      r.db1[e * H + k] += dh[k];
      for (int64_t i = 0; i < c; ++i) r.dw1[(e * H + k) * c + i] += dh[k] * y[p * c + i];
    }
    for (int64_t i = 0; i < c; ++i) {
      double s = gm[e * c + i] / n + gv[e] * 2.0 / (n * c) * (y[p * c + i] - r.mean[e * c + i]);
      for (int64_t k = 0; k < H; ++k) s += dh[k] * W1[(e * H + k) * c + i];
      dy[i] = s;
      r.dgate[p] += s * u[p * c + i];
    }
    for (int64_t i = 0; i < c; ++i) {
      const double du = g[p] * dy[i];
      for (int64_t j = 0; j < c; ++j) {
        r.dproj[(e * c + i) * c + j] += du * x[p * c + j];
        r.dx[p * c + j] += du * O[(e * c + i) * c + j];
      }
    }
  }
  return r;
}

void run_case(const char* name, int64_t M, int64_t c, int64_t N, int64_t H, at::ScalarType dt, bool strided,
              Tensor expert) {
  at::manual_seed(1234);
  const auto d = at::TensorOptions().dtype(at::kDouble);
  Tensor x = at::randn({M, c}, d), gate = at::rand({M}, d) + 0.5;
  Tensor O = at::randn({N, c, c}, d) / std::sqrt(static_cast<double>(c));
  Tensor W1 = at::randn({N, H, c}, d) / std::sqrt(static_cast<double>(c)), b1 = at::randn({N, H}, d) * 0.1;
  Tensor w2 = at::randn({N, H}, d) / std::sqrt(static_cast<double>(H)), b2 = at::randn({N}, d) * 0.1;
  Tensor gl = at::randn({M}, d), gm = at::randn({N, c}, d), gv = at::randn({N}, d);
  const Naive want = naive(x, expert, gate, O, W1, b1, w2, b2, gl, gm, gv);

  Tensor xk = x.to(dt);
  if (strided) xk = xk.t().contiguous().t();  // same values, column-major rows
  auto cast = [&](const Tensor& t) { return t.to(dt); };
  const auto fwd = calgan_fast::cpu::routed_head_fwd_cpu(xk, expert, cast(gate), cast(O), cast(W1), cast(b1),
                                                         cast(w2), cast(b2));
  const auto bwd = calgan_fast::cpu::routed_head_bwd_cpu(gl.to(dt), gm.to(fwd[2].scalar_type()),
                                                         gv.to(fwd[2].scalar_type()), xk, expert, cast(gate), cast(O),
                                                         cast(W1), cast(b1), cast(w2), cast(b2), fwd[1], fwd[2],
                                                         fwd[4], fwd[5], fwd[6]);
  const double rtol = dt == at::kDouble ? 1e-9 : 2e-4, atol = dt == at::kDouble ? 1e-10 : 2e-4;
  const std::string tag = std::string(name) + (dt == at::kDouble ? " fp64 " : " fp32 ");
  expect_close(tag + "count", fwd[1], want.count, 0, 0);
  expect_close(tag + "logits", fwd[0], want.logits, rtol, atol);
  expect_close(tag + "mean", fwd[2], want.mean, rtol, atol);
  expect_close(tag + "var", fwd[3], want.var, rtol, atol);
  const char* names[] = {"dx", "dgate", "dproj", "dw1", "db1", "dw2", "db2"};
  const std::vector<double>* wants[] = {&want.dx, &want.dgate, &want.dproj, &want.dw1, &want.db1, &want.dw2,
                                        &want.db2};
  for (int i = 0; i < 7; ++i) expect_close(tag + names[i], bwd[i], *wants[i], rtol, atol);
}

// The tile GEMMs against double loops, on widths with row tails, several reduction blocks and a
// padded row stride. The kernels sum in fp32 in order over k: |error| <= K eps sum |a b|.
void check_tile_gemm() {
  namespace tg = calgan_fast::cpu::tile_gemm;
  if (!tg::available()) {
    std::printf("tile GEMMs: not run (the CPU lacks AVX2 or FMA)\n");
    return;
  }
  auto close = [](const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                  const std::vector<double>& scale, int64_t k) {
    for (size_t i = 0; i < want.size(); ++i) {
      if (std::isnan(want[i])) continue;  // not asked for
      if (!(std::fabs(got[i] - want[i]) <= 2.0 * k * 6e-8 * scale[i] + 1e-30)) {
        std::printf("FAIL %s: element %zu is %.9g, expected %.9g\n", what.c_str(), i, got[i], want[i]);
        ++g_failures;
        return;
      }
    }
  };
  at::manual_seed(7);
  for (const int64_t m : {1, 5, 6, 101}) {
    for (const int64_t n : {16, 48}) {
      const int64_t k = 77, lda = tg::padded_ld(k + 3);
      const Tensor a = at::randn({m, lda}), b = at::randn({k, n + 5});
      std::vector<float> bp(static_cast<size_t>(tg::packed_size(k, n))), c(static_cast<size_t>(m * n), -1.f);
      tg::pack_b(b.data_ptr<float>(), n + 5, k, n, bp.data());
      tg::nn(m, n, k, a.data_ptr<float>(), lda, bp.data(), c.data(), n);
      std::vector<double> want(c.size()), scale(c.size());
      const float *ap = a.data_ptr<float>(), *bq = b.data_ptr<float>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < k; ++r) {
            want[i * n + j] += double(ap[i * lda + r]) * bq[r * (n + 5) + j];
            scale[i * n + j] += std::fabs(double(ap[i * lda + r]) * bq[r * (n + 5) + j]);
          }
      close("tile nn m=" + std::to_string(m) + " n=" + std::to_string(n), c, want, scale, k);
    }
  }
  for (const int64_t k : {1, 128, 300}) {
    for (const bool upper : {false, true}) {
      const int64_t m = 48, n = 48, ld = tg::padded_ld(m);  // A and B: columns of one block, as for W^T W
      const Tensor w = at::randn({k, ld});
      std::vector<float> c(static_cast<size_t>(m * n), -1.f);
      const float* wp = w.data_ptr<float>();
      auto row_end = [upper](int64_t jt) { return upper ? (jt + 1) * tg::kNR : int64_t(1) << 40; };
      tg::tn(m, k, wp, ld, wp, ld, c.data(), n, 0, n / tg::kNR, row_end);
      std::vector<double> want(c.size()), scale(c.size());
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          if (upper && i >= (j / tg::kNR + 1) * tg::kNR) {
            want[i * n + j] = std::nan("");
            if (c[i * n + j] != -1.f) {
              std::printf("FAIL tile tn upper k=%lld: element (%lld, %lld) below the tiles was written\n",
                          static_cast<long long>(k), static_cast<long long>(i), static_cast<long long>(j));
              ++g_failures;
            }
            continue;
          }
          for (int64_t r = 0; r < k; ++r) {
            want[i * n + j] += double(wp[r * ld + i]) * wp[r * ld + j];
            scale[i * n + j] += std::fabs(double(wp[r * ld + i]) * wp[r * ld + j]);
          }
        }
      close(std::string("tile tn") + (upper ? " upper" : "") + " k=" + std::to_string(k), c, want, scale, k);
    }
  }
}

Tensor experts(std::vector<int64_t> v) { return at::tensor(v, at::TensorOptions().dtype(at::kLong)); }

}  // namespace

int main() {
  at::manual_seed(0);
  // Empty expert 0, single-row expert 1, the rest random; M and c off every block size.
  std::vector<int64_t> ids(53);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = 2 + static_cast<int64_t>((i * 7) % 3);
  ids[17] = 1;
  for (auto dt : {at::kDouble, at::kFloat}) {
    run_case("small", 53, 12, 5, 3, dt, false, experts(ids));
    run_case("strided", 53, 12, 5, 3, dt, true, experts(ids));
    run_case("one-expert", 40, 9, 3, 2, dt, false, at::full({40}, 2, at::TensorOptions().dtype(at::kLong)));
    run_case("blocked-gram", 700, 130, 2, 5, dt, false, at::randint(0, 2, {700}, at::TensorOptions().dtype(at::kLong)));
    run_case("few-rows", 300, 130, 3, 5, dt, false, at::randint(0, 3, {300}, at::TensorOptions().dtype(at::kLong)));
    run_case("multi-tile", 700, 16, 2, 4, dt, false, at::randint(0, 2, {700}, at::TensorOptions().dtype(at::kLong)));
  }
  check_tile_gemm();
  // Two threads and four experts of about 250 rows: the experts run on workers, and for fp32 with c
  // and hdim multiples of 16 their GEMMs on the rows run on the tile kernels.
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  const auto ids_of = [](int64_t m, int64_t n) { return at::randint(0, n, {m}, at::TensorOptions().dtype(at::kLong)); };
  for (auto dt : {at::kDouble, at::kFloat}) {
    run_case("workers", 1000, 48, 4, 16, dt, false, ids_of(1000, 4));
    run_case("workers-c16", 400, 16, 4, 16, dt, false, ids_of(400, 4));  // one column tile, one chunk of S
    // c = 256: forward rows padded to 272 floats; c + hdim = 256: backward rows padded to 272.
    run_case("workers-c256", 1100, 256, 4, 32, dt, false, ids_of(1100, 4));
    run_case("workers-c224", 1000, 224, 4, 32, dt, false, ids_of(1000, 4));
  }
  at::set_num_threads(threads);
  if (g_failures == 0) std::printf("routed_head_cpu: all checks passed\n");
  return g_failures == 0 ? 0 : 1;
}
