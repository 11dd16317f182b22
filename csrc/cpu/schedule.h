// Scheduling of the cpu kernel: the accumulation type, the route an expert takes, and how the
// experts and their row tiles are spread over the threads (Schedule, run_experts, ChunkPool).
// Shared by the forward (routed_head_fwd_cpu.cpp) and the backward (routed_head_bwd_cpu.cpp).
#pragma once

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

inline int64_t n_tiles_of(int64_t n) { return (n + kTileRows - 1) / kTileRows; }

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

inline Schedule make_schedule(const int64_t* off, int64_t n_exp) {
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
inline void run_experts(const Schedule& s, const F& f, const Tail& tail) {
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
inline void run_experts(const Schedule& s, const F& f) {
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
inline void run_experts_pooled(const Schedule& s, ChunkPool& pool, const F& expert) {
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
inline void for_each_tile(int64_t n, const F& f) {
  at::parallel_for(0, n_tiles_of(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kTileRows;
      f(t, r0, std::min(n, r0 + kTileRows));
    }
  });
}

}  // namespace

}  // namespace cpu
}  // namespace calgan_fast
