// Work split between torch's threads as they get to it. Each kernel's items (tiles of output
// columns, rows, chunks of a segment) are handed out in runs from one counter instead
// of a fixed share per thread: on a shared machine a core is often slower for a while (another
// process, the server's own loader or event loop), and with fixed shares the other threads
// would wait for it at the end of every call.

namespace LS_NAMESPACE {

class WorkQueue {
 public:
  WorkQueue(int64_t items, int64_t threads) : items_(items), threads_(threads) {}

  // fn(i) for every item i this thread takes, until none are left. Each take is a run of
  // consecutive items, a 1 / (2 * threads) share of those left: long runs first (neighbouring
  // items share cache lines and prefetches), single items at the end, so the threads finish
  // together.
  template <class Fn>
  void each(Fn fn) {
    int64_t begin = taken_.load(std::memory_order_relaxed);
    for (;;) {
      int64_t end;
      do {
        if (begin >= items_) return;
        end = begin + std::max<int64_t>(1, (items_ - begin) / (2 * threads_));
      } while (!taken_.compare_exchange_weak(begin, end, std::memory_order_relaxed));
      for (int64_t i = begin; i < end; ++i) fn(i);
      begin = taken_.load(std::memory_order_relaxed);
    }
  }

 private:
  const int64_t items_, threads_;
  std::atomic<int64_t> taken_{0};
};

// The threads a call over `items` work items runs on: torch's, at most one per item.
inline int64_t team_size(int64_t items) {
  return std::clamp<int64_t>(at::get_num_threads(), 1, items);
}

// The calls of parallel_items that ran on a team, and how long their calling thread waited, once
// its own share was done, for the rest of the team to finish (a team thread that another
// process keeps off its core holds up every call until the scheduler runs it). Counted since
// the library loaded; readers take differences.
struct TeamWaits {
  std::atomic<int64_t> calls{0};
  std::atomic<int64_t> waited_ns{0};
};

inline TeamWaits& team_waits() {
  static TeamWaits waits;
  return waits;
}

inline int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// body(queue) once on each of torch's threads (once in all on a single-threaded thread, or
// inside a parallel region): body sets up its thread's scratch, then calls queue.each.
template <class Body>
inline void parallel_items(int64_t items, Body body) {
  if (items <= 0) return;
  const int64_t threads = team_size(items);
  WorkQueue queue(items, threads);
  if (threads == 1 || at::in_parallel_region()) {
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(queue); });
    return;
  }
  int64_t caller_done = 0;  // written by the calling thread (number 0 of the team) alone
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    body(queue);
    if (at::get_thread_num() == 0) caller_done = steady_ns();
  });
  TeamWaits& waits = team_waits();
  waits.calls.fetch_add(1, std::memory_order_relaxed);
  if (caller_done != 0)
    waits.waited_ns.fetch_add(steady_ns() - caller_done, std::memory_order_relaxed);
}

// at::parallel_for's grain for rows of `floats_per_row` floats each: a call over fewer than
// 2^16 floats (a decode step's rows) stays on the calling thread, since waking the others
// would cost more than it shares.
inline int64_t rows_grain(int64_t floats_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / floats_per_row);
}

}  // namespace LS_NAMESPACE
