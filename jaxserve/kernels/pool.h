// Work split over XLA's intra-op thread pool, shared by jaxserve's kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// The least work a task should carry: bytes of weights streamed (times the rows of x dotted with them).
// Handing a task to a pool thread (waking it) costs time, so a small weight runs on fewer threads; but
// SmolLM2's attention projections (69-207 KB a layer in Q4_1) ran on one thread alone at 256 KB, and at
// 64 KB the 1-row pass over its layers is faster (scripts/bench_bandwidth.py --quantize gguf, AMD EPYC 2
// cores, fastest of 60: 5.80/4.82 -> 4.43/4.23 ms).
constexpr int64_t TASK_BYTES = int64_t{64} << 10;

// Runs tile(0..tiles) on the calling thread and up to all but one of the pool's threads, returning when all are
// done: tiles grouped into tasks of consecutive tiles that stream at least TASK_BYTES each (`bytes`: what
// all the tiles stream), so that every kernel and the plain read it is measured against split alike. Tasks
// that start after the last was taken find nothing to do; the state they share is theirs.
template <typename F>
void parallel(xla::ffi::ThreadPool& pool, int64_t tiles, int64_t bytes, F tile) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  const int64_t tasks = std::clamp<int64_t>(bytes / TASK_BYTES, 1, std::max<int64_t>(tiles, 1));
  auto state = std::make_shared<State>();
  auto work = [state, tiles, tasks, tile]() {  // task k: tiles [k * tiles / tasks, (k + 1) * tiles / tasks)
    for (int64_t k; (k = state->next.fetch_add(1)) < tasks;) {
      for (int64_t t = k * tiles / tasks; t < (k + 1) * tiles / tasks; ++t) tile(t);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // The calling thread is one of the workers: as many threads as the pool has (one per core) in all, so
  // that none waits for a core another of them holds.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  // The last tasks are in flight on other threads: a few microseconds. Spin, then yield, so that a host
  // with more threads than cores does not lose the core that would finish them.
  for (int spins = 0; state->done.load(std::memory_order_acquire) < tasks; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace jaxserve
