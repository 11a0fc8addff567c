#include "claim_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

namespace fasttl {
namespace {

struct Job {
  std::function<void(int64_t, int64_t)> body;
  int64_t n = 0, chunk = 1;
  int helpers = 0;  // helpers with a smaller id take part
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (;;) {
      const int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
      if (begin >= n) return;  // all claimed: a late helper touches nothing of the caller's
      const int64_t end = std::min(begin + chunk, n);
      body(begin, end);
      done.fetch_add(end - begin, std::memory_order_release);
    }
  }
};

// Helpers sleep until a job is posted. A helper holds the job it took (shared_ptr), so a job
// outlives its caller's return; its body, which reads the caller's data, runs only within chunks
// the caller waits for.
class Pool {
 public:
  void run(int64_t n, int64_t chunk, int threads, const std::function<void(int64_t, int64_t)>& body) {
    auto job = std::make_shared<Job>();
    job->body = body;
    job->n = n;
    job->chunk = std::max<int64_t>(chunk, 1);
    job->helpers = threads - 1;
    if (job->helpers > 0 && n > job->chunk) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        while (static_cast<int>(helpers_) < job->helpers) {
          try {
            std::thread(&Pool::serve, this, static_cast<int>(helpers_)).detach();
          } catch (const std::system_error&) {
            break;  // no more threads to be had: the caller and the helpers there are do the work
          }
          ++helpers_;
        }
        current_ = job;
        ++posted_;
      }
      wake_.notify_all();
    }
    job->work();
    // Only chunks a running helper claimed are left: spin briefly, then yield the core to it.
    for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins > 64) std::this_thread::yield();
    }
  }

 private:
  void serve(int id) {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return posted_ != seen; });
        seen = posted_;
        job = current_;  // a helper woken late takes the latest job (finished ones hand out nothing)
      }
      if (job && id < job->helpers) job->work();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  uint64_t posted_ = 0;
  size_t helpers_ = 0;
  std::shared_ptr<Job> current_;
};

// Never destroyed: its helpers wait on its condition variable when the process exits. A forked
// child has no helpers (only the forking thread survives a fork), so it starts a pool of its own.
Pool* pool = nullptr;
std::once_flag pool_once;

Pool& the_pool() {
  std::call_once(pool_once, [] {
    pool = new Pool();
#if !defined(_WIN32)
    pthread_atfork(nullptr, nullptr, [] { pool = new Pool(); });
#endif
  });
  return *pool;
}

}  // namespace

void claim_parallel(int64_t n, int64_t chunk, int threads, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  the_pool().run(n, chunk, threads, body);
}

}  // namespace fasttl
