#pragma once

// A fixed pool of threads running queued tasks in FIFO order. Requests run
// here so that a function that blocks (a nested RPC, a sleep) never stalls a
// connection's reader thread.

#include <ATen/Parallel.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace torchrpc {

class ThreadPool {
 public:
  explicit ThreadPool(size_t threads) {
    for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~ThreadPool() { stop(); }

  // False (and `task` not run) once stopping.
  bool submit(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stopping_) return false;
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
    return true;
  }

  // Runs the tasks already queued, then joins the threads. Idempotent.
  void stop() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  void loop() {
    // Take the intra-op thread count torch.set_num_threads chose: without
    // this, OpenMP gives each new thread a team as wide as the machine, and
    // a pass served here competes with every other process for the cores.
    at::init_num_threads();
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [this] { return stopping_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace torchrpc
