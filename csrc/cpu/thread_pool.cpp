#include "thread_pool.h"

#include <algorithm>
#include <unistd.h>

namespace fasteer {

namespace {
pid_t g_owner_pid = 0;
}

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: joining threads during interpreter shutdown is unsafe, and a
  // pool inherited through fork() has no threads behind it, so a child builds its own.
  static ThreadPool* pool = nullptr;
  const pid_t pid = getpid();
  if (pool == nullptr || g_owner_pid != pid) {
    pool = new ThreadPool();
    g_owner_pid = pid;
  }
  return *pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ensure_workers(int count) {
  while (int(workers_.size()) < count) {
    const int index = int(workers_.size());
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

void ThreadPool::run_chunks() {
  for (;;) {
    const int64_t begin = next_.fetch_add(grain_);
    if (begin >= n_) return;
    (*fn_)(begin, std::min(n_, begin + grain_));
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || (generation_ != seen && index < wanted_); });
      if (stop_) return;
      seen = generation_;
    }
    run_chunks();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, int threads, const Range& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int helpers = int(std::min<int64_t>(std::max(threads, 1) - 1, chunks - 1));
  if (helpers <= 0) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_workers(helpers);
    fn_ = &fn;
    n_ = n;
    grain_ = grain;
    next_.store(0);
    wanted_ = helpers;
    active_ = helpers;
    ++generation_;
  }
  wake_.notify_all();
  run_chunks();
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return active_ == 0; });
  fn_ = nullptr;
}

}  // namespace fasteer
