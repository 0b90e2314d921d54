#pragma once

// The agent's counters and latency histograms (torchrpc.metrics(), and the
// Prometheus text torchrpc.metrics_text() renders from them). Always on, so
// each update is a few relaxed atomic adds; per-function entries are found
// under one mutex, held only for the hash-map probe.

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "errors.h"

namespace torchrpc {

// Cumulative buckets at fixed bounds from 10 µs to 100 s (each about 3.16x
// the one before), plus +Inf; the sum in nanoseconds.
class Histogram {
 public:
  static constexpr size_t kBuckets = 16;
  static const std::array<int64_t, kBuckets>& boundsNs();

  void observe(int64_t ns);
  struct Snapshot {
    std::array<uint64_t, kBuckets + 1> counts{};  // per bucket, not cumulative; last is +Inf
    uint64_t count = 0;
    int64_t sumNs = 0;
  };
  Snapshot snapshot() const;

 private:
  std::array<std::atomic<uint64_t>, kBuckets + 1> counts_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<int64_t> sumNs_{0};
};

// One function with one peer, as caller or callee.
struct CallStats {
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> errors{0};
  Histogram latency;  // caller: send to reply; callee: run time
};

class Metrics {
 public:
  static constexpr size_t kErrorKinds = 12;  // ErrorKind values

  CallStats& sent(const std::string& function, int64_t peer) { return entry(sent_, function, peer); }
  CallStats& served(const std::string& function, int64_t peer) { return entry(served_, function, peer); }
  void error(ErrorKind kind) { errors_[static_cast<size_t>(kind) % kErrorKinds].fetch_add(1, std::memory_order_relaxed); }
  void queueWait(int64_t ns) { queueWait_.observe(ns); }
  void handshakeFailed() { handshakeFailures_.fetch_add(1, std::memory_order_relaxed); }
  void peerSilent() { heartbeatsMissed_.fetch_add(1, std::memory_order_relaxed); }

  struct CallRow {
    std::string function;
    int64_t peer;
    uint64_t calls, errors;
    Histogram::Snapshot latency;
  };
  struct Snapshot {
    std::vector<CallRow> sent, served;
    std::array<uint64_t, kErrorKinds> errors{};
    Histogram::Snapshot queueWait;
    uint64_t handshakeFailures = 0, heartbeatsMissed = 0;
  };
  Snapshot snapshot();

 private:
  // function -> per peer id (no allocation on the look-up of a known pair)
  using Table = std::unordered_map<std::string, std::vector<std::unique_ptr<CallStats>>>;
  CallStats& entry(Table& table, const std::string& function, int64_t peer);
  static std::vector<CallRow> rows(const Table& table);

  std::mutex mu_;  // guards the tables' maps, not the stats in them
  Table sent_, served_;
  std::array<std::atomic<uint64_t>, kErrorKinds> errors_{};
  Histogram queueWait_;
  std::atomic<uint64_t> handshakeFailures_{0}, heartbeatsMissed_{0};
};

}  // namespace torchrpc
