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

// Whether an expert of n rows takes the scatter-matrix route (else the textbook one). Counted in
// multiply-adds, the terms that differ cost 1.625 n c^2 (S by bands, W_c P) + 1.625 c^3 (O S, P by
// bands) against 4 n c^2 (Y, Y_c, Y_c^T W_c, Y_c O): even at n = 0.68 c; the threshold 0.8 c leaves
// room for the lower efficiency of the small c^3 products.
inline bool use_scatter(int64_t n, int64_t c) { return 5 * n >= 4 * c; }

int64_t n_tiles_of(int64_t n) { return (n + kTileRows - 1) / kTileRows; }

// How the experts run. parallel: one worker per thread; the workers take the experts, largest
// first, from a shared counter (greedy list scheduling, which also absorbs a thread that the
// machine slows down), each running its expert single-threaded (with one thread, the one worker
// runs them all so, and the GEMMs take the same single-threaded kernels). Otherwise one worker runs
// every expert in order, with threaded GEMMs and row loops. An expert's results do not depend on
// which worker runs it.
struct Schedule {
  bool parallel = false;
  int64_t workers = 1;
  std::vector<int64_t> order;  // experts in the order they are taken
  int64_t max_rows = 0;
};

Schedule make_schedule(const int64_t* off, int64_t n_exp) {
  Schedule s;
  const int64_t threads = at::get_num_threads();
  const int64_t total = off[n_exp];
  s.order.resize(n_exp);
  std::iota(s.order.begin(), s.order.end(), 0);
  for (int64_t e = 0; e < n_exp; ++e) s.max_rows = std::max(s.max_rows, off[e + 1] - off[e]);
  if (n_exp >= 2 * threads && !at::in_parallel_region()) {
    std::vector<int64_t> order = s.order;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return off[a + 1] - off[a] > off[b + 1] - off[b]; });
    // Parallel experts pay off when, dealt largest first to the least loaded worker, the busiest
    // worker carries at most 1.25x an even share of the rows.
    std::vector<int64_t> load(threads, 0);
    for (int64_t e : order) *std::min_element(load.begin(), load.end()) += off[e + 1] - off[e];
    const int64_t busiest = *std::max_element(load.begin(), load.end());
    if (4 * busiest * threads <= 5 * total) {
      s.parallel = true;
      s.workers = threads;
      s.order = std::move(order);
    }
  }
  return s;
}

// Runs f(e, w) for every expert e, on worker w (see Schedule); in the parallel schedule each worker
// then runs tail(w) once no expert is left to take (every expert has been taken by a running
// worker by then, so tail may wait for the others to finish theirs).
template <typename F, typename Tail>
void run_experts(const Schedule& s, const F& f, const Tail& tail) {
  if (!s.parallel) {
    for (int64_t e : s.order) f(e, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(s.order.size());
  at::parallel_for(0, s.workers, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep autograd out of the ATen
    // calls of the raw kernel, as the custom op's caller does on its own thread.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(s.order[i], w);
      tail(w);
    }
  });
}

template <typename F>
void run_experts(const Schedule& s, const F& f) {
  run_experts(s, f, [](int64_t) {});
}

// Shares the last experts' work between the workers of the parallel schedule. A worker that has
// reached a piece of its expert that splits into chunks (row chunks of the backward's q; bands of
// the scatter matrix and row blocks of T in the forward) publishes them in its slot and takes
// them one by one; workers left without an expert to take help with the chunks of the others'
// slots. Chunks are fixed by the expert alone and write disjoint parts of the results, so which
// worker runs one changes nothing in them. Without it, the worker that finishes first idles while
// the other runs its last expert alone (up to a tenth of a call with a dozen experts on two threads).
class ChunkPool {
 public:
  ChunkPool(int64_t workers, int64_t experts) : slots_(static_cast<size_t>(workers)), experts_(experts) {}

  // On worker w: runs chunks 0..chunks-1 of fn (a function of (chunk, worker)) with any helpers,
  // and returns when all of them are done and no helper is still looking at the slot.
  void run(int64_t w, int64_t chunks, std::function<void(int64_t, int64_t)> fn) {
    Slot& s = slots_[static_cast<size_t>(w)];
    s.fn = std::move(fn);
    s.chunks = chunks;
    s.next.store(0);
    s.done.store(0);
    s.active.store(true);
    try {
      while (take(s, w)) {
      }
    } catch (...) {
      // The chunks' data dies with the caller's frame: no helper may start or still run one.
      failed_.store(true);
      close(s);
      throw;
    }
    while (s.done.load() < chunks && !failed_.load()) std::this_thread::yield();
    close(s);
  }

  // An expert is finished (with or without chunks), or has failed (which ends every wait).
  void finished() { finished_.fetch_add(1); }
  void fail() { failed_.store(true); }

  // On worker w with no expert left to take: helps with the others' chunks until every expert is
  // finished.
  void help(int64_t w) {
    while (finished_.load() < experts_ && !failed_.load()) {
      bool any = false;
      for (Slot& s : slots_) {
        s.users.fetch_add(1);
        const Leave leave{s.users};
        if (s.active.load()) any = take(s, w) || any;
      }
      if (!any) std::this_thread::yield();
    }
  }

 private:
  struct alignas(64) Slot {  // a cache line each: helpers touch every slot's counters
    std::atomic<bool> active{false};
    std::atomic<int64_t> next{0}, done{0}, users{0};
    int64_t chunks = 0;
    std::function<void(int64_t, int64_t)> fn;
  };
  struct Leave {
    std::atomic<int64_t>& users;
    ~Leave() { users.fetch_sub(1); }
  };

  // Stops helpers from entering s, and waits for those inside (a helper that saw the slot active
  // may still be in take()); the slot is rewritten only after. The atomics are sequentially
  // consistent: the store of active and the load of users here, and the increment of users and the
  // load of active in help(), must not be reordered.
  void close(Slot& s) {
    s.active.store(false);
    while (s.users.load() > 0) std::this_thread::yield();
  }

  // Runs one chunk of s on worker w if one is left and nothing has failed. A chunk that throws
  // still counts as done and marks the pool failed, which ends every wait.
  bool take(Slot& s, int64_t w) {
    if (failed_.load()) return false;
    const int64_t k = s.next.fetch_add(1);
    if (k >= s.chunks) return false;
    try {
      s.fn(k, w);
    } catch (...) {
      failed_.store(true);
      s.done.fetch_add(1);
      throw;
    }
    s.done.fetch_add(1);
    return true;
  }

  std::vector<Slot> slots_;
  const int64_t experts_;
  std::atomic<int64_t> finished_{0};
  std::atomic<bool> failed_{false};
};

// Runs expert(e, w) for every expert e through run_experts, with the workers left without an
// expert helping through pool with the chunks of the others.
template <typename F>
void run_experts_pooled(const Schedule& s, ChunkPool& pool, const F& expert) {
  run_experts(
      s,
      [&](int64_t e, int64_t w) {
        try {
          expert(e, w);
        } catch (...) {
          pool.fail();
          throw;
        }
        pool.finished();
      },
      [&](int64_t w) { pool.help(w); });
}

// Runs f(t, r0, r1) for the row tiles of an n-row block, in parallel unless already inside a
// parallel region (then inline, in order).
template <typename F>
void for_each_tile(int64_t n, const F& f) {
  at::parallel_for(0, n_tiles_of(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kTileRows;
      f(t, r0, std::min(n, r0 + kTileRows));
    }
  });
}

// The row loops below are memory-bound passes over one tile; they are compiled for AVX-512 and AVX2
// as well as the baseline ISA, and the loader picks the widest the CPU has (the build itself uses
// no -march flag, so that one binary runs on every x86-64 machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CALGAN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CALGAN_CPU_CLONES
#endif

// Rows ahead of the current one whose x row the gather asks the cache for: the rows of an expert
// lie scattered over x, which the hardware prefetcher cannot guess.
constexpr int64_t kPrefetchRows = 4;

// Rows of q a worker forms at a time in the backward: (96, c) fp32 stays in a core's L2 (and is one
// row block of the tile GEMM).
constexpr int64_t kQChunkRows = 96;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t c) {
  const int64_t per_line = std::max<int64_t>(1, 64 / static_cast<int64_t>(sizeof(scalar_t)));
  for (int64_t j = 0; j < c; j += per_line) __builtin_prefetch(row + j);
}

// The same for a row about to be written (fetched for ownership, so the store does not wait).
template <typename scalar_t>
inline void prefetch_row_for_write(scalar_t* row, int64_t c) {
  const int64_t per_line = std::max<int64_t>(1, 64 / static_cast<int64_t>(sizeof(scalar_t)));
  for (int64_t j = 0; j < c; j += per_line) __builtin_prefetch(row + j, 1);
}

// Rows r0..r1 of one expert: v_r = gate[perm[r]] * x[perm[r], :] in acc_t, written to w (rows ld
// apart) minus shift; s (c values) = the column sums of v_r - shift. The shift is the mean of a
// sample of the expert's rows (see expert_shift), so the sums, the shifted rows and the scatter
// matrix built from them hold deviations of the size of the expert's spread, however large its mean is
// next to that spread. With raw, the rows of x themselves (ungated, in acc_t) are kept there too
// (c apart), for the backward's dgate.
template <typename scalar_t, typename acc_t>
CALGAN_CPU_CLONES void gather_tile(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate,
                                   int64_t r0, int64_t r1, const acc_t* shift, acc_t* w, int64_t ld, acc_t* s,
                                   acc_t* raw) {
  for (int64_t j = 0; j < c; ++j) s[j] = acc_t(0);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kPrefetchRows < r1) prefetch_row(xp + perm[r + kPrefetchRows] * c, c);
    const int64_t p = perm[r];
    const acc_t g = gate[p];
    const scalar_t* src = xp + p * c;
    acc_t* dst = w + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const acc_t d = g * static_cast<acc_t>(src[j]) - shift[j];
      dst[j] = d;
      s[j] += d;
    }
    if (raw != nullptr) {
      acc_t* out = raw + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) out[j] = static_cast<acc_t>(src[j]);
    }
  }
}

// The shift of an expert's rows: the mean of kTileRows of its gated rows spread evenly over the
// expert (all of them if it has fewer), or zero where one of those is not finite (a NaN or
// infinity there would otherwise spread to every row of the expert, not just its own logit).
// Spread, not the first ones: rows in pixel order may drift (one image after another), and the
// closer the shift to the mean, the fewer digits the shifted rows lose.
template <typename scalar_t, typename acc_t>
void expert_shift(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate, int64_t n, acc_t* shift) {
  const int64_t rows = std::min(n, kTileRows);
  std::vector<double> sum(static_cast<size_t>(c), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = perm[i * n / rows];
    const double g = static_cast<double>(gate[p]);
    for (int64_t j = 0; j < c; ++j) sum[j] += g * static_cast<double>(xp[p * c + j]);
  }
  bool finite = true;
  for (int64_t j = 0; j < c; ++j) {
    shift[j] = static_cast<acc_t>(sum[j] / static_cast<double>(rows));
    finite = finite && std::isfinite(static_cast<double>(shift[j]));
  }
  if (!finite) std::fill(shift, shift + c, acc_t(0));
}

// Gathers the n gated rows of one expert, minus shift, into w (n, c; rows ld apart) and returns
// in dbar (c values) their mean and in xbar the mean of the gated rows (shift + dbar, rounded once):
// the tile sums are added up in double in tile order, so both are independent of the thread count.
// With raw, keeps the rows of x there (see gather_tile).
template <typename scalar_t, typename acc_t>
void gather_expert(const scalar_t* xp, int64_t c, const int64_t* perm, const acc_t* gate, int64_t n,
                   const acc_t* shift, acc_t* w, int64_t ld, acc_t* dbar, acc_t* xbar, acc_t* raw = nullptr) {
  const int64_t nt = n_tiles_of(n);
  std::vector<acc_t> ts(static_cast<size_t>(nt * c));
  for_each_tile(n, [&](int64_t t, int64_t r0, int64_t r1) {
    gather_tile<scalar_t, acc_t>(xp, c, perm, gate, r0, r1, shift, w, ld, ts.data() + t * c, raw);
  });
  for (int64_t j = 0; j < c; ++j) {
    double s = 0.0;
    for (int64_t t = 0; t < nt; ++t) s += static_cast<double>(ts[t * c + j]);
    const double d = s / static_cast<double>(n);
    dbar[j] = static_cast<acc_t>(d);
    xbar[j] = static_cast<acc_t>(static_cast<double>(shift[j]) + d);
  }
}

// z = lrelu(h) in place over rows r0..r1 of an (n, hdim) block.
template <typename acc_t>
CALGAN_CPU_CLONES void lrelu_tile(acc_t* h, int64_t hdim, int64_t r0, int64_t r1) {
  acc_t* p = h + r0 * hdim;
  const int64_t len = (r1 - r0) * hdim;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) p[i] = lrelu(p[i]);
}

// The input gradients of rows r0..r1 of one expert, scattered to pixel order: with
// v_r = q_r + ota = O^T dy_r, dx = g v_r and dgate = v_r . x, with x from xr, the expert's rows of x
// as gathered (not rebuilt from the shifted rows as (w_s + shift) / g, which would lose digits
// wherever g x is small next to the shift). q holds rows q_row0 onwards (the backward forms q by
// chunks of rows).
template <typename scalar_t, typename acc_t>
CALGAN_CPU_CLONES void input_grad_tile(const acc_t* q, int64_t q_row0, const acc_t* ota, const acc_t* xr_rows,
                                       const int64_t* perm, const acc_t* gate, int64_t c, int64_t r0, int64_t r1,
                                       scalar_t* dx, acc_t* dgate) {
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kPrefetchRows < r1) prefetch_row_for_write(dx + perm[r + kPrefetchRows] * c, c);
    const int64_t p = perm[r];
    const acc_t g = gate[p];
    const acc_t* qr = q + (r - q_row0) * c;
    const acc_t* xr = xr_rows + r * c;
    scalar_t* dst = dx + p * c;
    // Eight running partial sums (a fixed order) let the compiler vectorise the dot product.
    acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= c; j += 8) {
      for (int l = 0; l < 8; ++l) {
        const acc_t v = qr[j + l] + ota[j + l];
        dst[j + l] = static_cast<scalar_t>(g * v);
        part[l] += v * xr[j + l];
      }
    }
    for (; j < c; ++j) {
      const acc_t v = qr[j] + ota[j];
      dst[j] = static_cast<scalar_t>(g * v);
      part[0] += v * xr[j];
    }
    dgate[p] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
}

// S = W^T W of an (n, c) block into out (c, c), a symmetric rank-n update (which ATen does not
// offer): one GEMM per band of kGramBlock rows of S, from the diagonal rightwards, mirrored below
// it. Counted in multiply-adds that is c^2 n (c + kGramBlock) / (2 c) instead of c^2 n, and a
// band's GEMM is wide enough to keep MKL's packing cheap. The bands write disjoint parts of out.
constexpr int64_t kGramBlock = 64;
int64_t scatter_bands(int64_t c) { return c < 2 * kGramBlock ? 1 : (c + kGramBlock - 1) / kGramBlock; }

void scatter_band(const Tensor& w, Tensor& out, int64_t b) {
  const int64_t c = w.size(1);
  if (c < 2 * kGramBlock) {
    at::mm_out(out, w.t(), w);
    return;
  }
  const int64_t i0 = b * kGramBlock, ci = std::min(kGramBlock, c - i0);
  const Tensor band = at::mm(w.narrow(1, i0, ci).t(), w.narrow(1, i0, c - i0));  // (ci, c - i0)
  out.narrow(0, i0, ci).narrow(1, i0, c - i0).copy_(band);
  if (c - i0 > ci) out.narrow(0, i0 + ci, c - i0 - ci).narrow(1, i0, ci).copy_(band.narrow(1, ci, c - i0 - ci).t());
}

void scatter_matrix(const Tensor& w, Tensor out) {
  for (int64_t b = 0; b < scatter_bands(w.size(1)); ++b) scatter_band(w, out, b);
}

// <P, S> of two (c, c) matrices, summed in double in a fixed order.
template <typename acc_t>
acc_t frobenius_dot(const Tensor& p, const Tensor& s) {
  const acc_t* a = p.data_ptr<acc_t>();
  const acc_t* b = s.data_ptr<acc_t>();
  const int64_t len = p.numel();
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<double>(a[i + l]) * static_cast<double>(b[i + l]);
  for (; i < len; ++i) part[0] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return static_cast<acc_t>(((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])));
}

// Whether the products with an expert's rows run on the tile GEMMs: fp32 compute, experts on
// workers (single-threaded GEMMs), c a multiple of the tile width, and a CPU that has the kernels.
template <typename acc_t>
bool use_tile_gemms(const Schedule& sched, int64_t c) {
  return std::is_same_v<acc_t, float> && sched.parallel && c % tile_gemm::kNR == 0 && tile_gemm::available();
}

// The hidden pre-activations of an expert's rows, h = W A^T + bias, into H (rows ldh apart): W its
// (n, c) shifted rows (ldw apart), A = W1 O (hdim, c). On the tile GEMM where tiled (fp32 only).
template <typename acc_t>
void hidden_rows(bool tiled, const Tensor& W, int64_t ldw, const Tensor& A, const Tensor& bias, Tensor& H, int64_t ldh) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (tiled) {
      const int64_t n = W.size(0), c = W.size(1), hdim = A.size(0);
      const Tensor At = A.t().contiguous();  // (c, hdim)
      std::vector<float> packed(static_cast<size_t>(tile_gemm::packed_size(c, hdim)));
      tile_gemm::pack_b(At.data_ptr<float>(), hdim, c, hdim, packed.data());
      float* hp = H.data_ptr<float>();
      tile_gemm::nn(n, hdim, c, W.data_ptr<float>(), ldw, packed.data(), hp, ldh);
      const float* bp = bias.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r) {
        float* hr = hp + r * ldh;
#pragma omp simd
        for (int64_t j = 0; j < hdim; ++j) hr[j] += bp[j];
      }
      return;
    }
  }
  (void)ldw;
  (void)ldh;
  at::addmm_out(H, bias, W, A.t());
}

// Per-worker scratch: one expert's gated rows (w), a second (n, c) block (q), and its hidden rows.
struct Scratch {
  std::vector<Tensor> w, q, h;
  Scratch(int64_t workers, int64_t rows, int64_t c, int64_t ldw, int64_t hdim, const at::TensorOptions& opts,
          bool need_q) {
    for (int64_t i = 0; i < workers; ++i) {
      w.push_back(at::empty({rows, ldw}, opts));
      q.push_back(need_q ? at::empty({rows, c}, opts) : Tensor());
      h.push_back(at::empty({rows, hdim}, opts));
    }
  }
};

// Asks the kernel to back the 2 MiB-aligned interior of a large, fresh tensor with huge pages
// (where transparent huge pages are on for regions that ask): the first writes to it (scattered,
// for dx) then take a few faults instead of one per 4 KiB page. A hint only; memory already mapped is kept.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
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

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_op(
    const at::Tensor& x, const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  auto o = calgan_fast::cpu::routed_head_fwd_cpu(x, expert, gate, proj, w1, b1, w2, b2);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& glogits, const at::Tensor& gmean, const at::Tensor& gvar, const at::Tensor& x,
    const at::Tensor& expert, const at::Tensor& gate, const at::Tensor& proj, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& count, const at::Tensor& mean,
    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& xcov) {
  auto o = calgan_fast::cpu::routed_head_bwd_cpu(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count,
                                                 mean, perm, offsets, xcov);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(calgan_fast_C, CPU, m) {
  m.impl("routing_metadata", &calgan_fast::cpu::routing_metadata_cpu);
  m.impl("routed_head_fwd_cpu", &fwd_op);
  m.impl("routed_head_bwd_cpu", &bwd_op);
}
