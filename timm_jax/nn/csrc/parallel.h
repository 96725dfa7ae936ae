// Shared by the CPU kernels: a parallel loop on XLA's intra-op thread pool.
#ifndef TIMM_JAX_CSRC_PARALLEL_H_
#define TIMM_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace timm_jax {

// Parallel loop over chunks [0, n) on the XLA thread pool. The calling thread works too and
// waits only for chunks already started, so it cannot deadlock when the pool's other threads
// are busy; tasks that start after the last chunk was taken return without touching `f`.
struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& f) {
  auto state = std::make_shared<LoopState>();
  auto run = [state, n, &f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, n, run]() {
      if (state->next.load() < n) run();
    });
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace timm_jax

#endif  // TIMM_JAX_CSRC_PARALLEL_H_
