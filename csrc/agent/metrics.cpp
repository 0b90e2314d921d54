#include "agent/metrics.h"

namespace torchrpc {

const std::array<int64_t, Histogram::kBuckets>& Histogram::boundsNs() {
  static const std::array<int64_t, kBuckets> bounds = [] {
    std::array<int64_t, kBuckets> b{};
    double v = 10'000.0;  // 10 µs
    for (auto& x : b) {
      x = static_cast<int64_t>(v);
      v *= 3.1622776601683795;  // sqrt(10): two buckets a decade
    }
    return b;
  }();
  return bounds;
}

void Histogram::observe(int64_t ns) {
  const auto& bounds = boundsNs();
  size_t i = 0;
  while (i < kBuckets && ns > bounds[i]) ++i;
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sumNs_.fetch_add(ns, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  for (size_t i = 0; i <= kBuckets; ++i) s.counts[i] = counts_[i].load(std::memory_order_relaxed);
  s.count = count_.load(std::memory_order_relaxed);
  s.sumNs = sumNs_.load(std::memory_order_relaxed);
  return s;
}

CallStats& Metrics::entry(Table& table, const std::string& function, int64_t peer) {
  const size_t i = peer < 0 ? 0 : static_cast<size_t>(peer) + 1;  // slot 0: no peer (local)
  std::lock_guard<std::mutex> g(mu_);
  auto it = table.find(function);
  if (it == table.end()) it = table.emplace(function, std::vector<std::unique_ptr<CallStats>>()).first;
  auto& perPeer = it->second;
  if (perPeer.size() <= i) perPeer.resize(i + 1);
  if (!perPeer[i]) perPeer[i] = std::make_unique<CallStats>();
  return *perPeer[i];
}

std::vector<Metrics::CallRow> Metrics::rows(const Table& table) {
  std::vector<CallRow> out;
  for (const auto& [function, perPeer] : table) {
    for (size_t i = 0; i < perPeer.size(); ++i) {
      if (!perPeer[i]) continue;
      const CallStats& c = *perPeer[i];
      out.push_back({function, static_cast<int64_t>(i) - 1, c.calls.load(), c.errors.load(), c.latency.snapshot()});
    }
  }
  return out;
}

Metrics::Snapshot Metrics::snapshot() {
  Snapshot s;
  {
    std::lock_guard<std::mutex> g(mu_);
    s.sent = rows(sent_);
    s.served = rows(served_);
  }
  for (size_t i = 0; i < kErrorKinds; ++i) s.errors[i] = errors_[i].load();
  s.queueWait = queueWait_.snapshot();
  s.handshakeFailures = handshakeFailures_.load();
  s.heartbeatsMissed = heartbeatsMissed_.load();
  return s;
}

}  // namespace torchrpc
