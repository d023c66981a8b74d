// A small persistent thread pool for splitting rows across cores.
//
// Why our own: the extension must not link torch (one build serves any torch), and
// OpenMP would bring a second libgomp next to torch's, which can deadlock or
// oversubscribe. Threads are created once, on first use, and wait on a condition
// variable; the calling thread takes chunks too. After fork() the pool is rebuilt.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fasteer {

class ThreadPool {
 public:
  using Range = std::function<void(int64_t begin, int64_t end)>;

  static ThreadPool& instance();

  // Run fn over [0, n) in chunks of `grain`, on up to `threads` threads (caller included).
  void parallel_for(int64_t n, int64_t grain, int threads, const Range& fn);

  ~ThreadPool();

 private:
  ThreadPool() = default;
  void ensure_workers(int count);
  void worker_loop(int index);  // index: takes part when index < wanted_
  void run_chunks();

  std::mutex mutex_;
  std::mutex call_mutex_;  // one parallel_for at a time
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int wanted_ = 0;  // workers taking part in the current job

  const Range* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
};

}  // namespace fasteer
