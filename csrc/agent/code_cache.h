#pragma once

// Compiled code shipped by value (rpc_sync(to, script_fn) to a worker that
// never imported it). Content-addressed: code is named "sha256:<hex>" after
// its archive's bytes.
//
// - The callee's CodeCache holds loaded code by that name, least recently
//   used first out, so a caller's later calls carry the name alone. It loads
//   TorchScript archives in C++ (torch::jit::load: no Python, no pickle);
//   other kinds (torch.export archives) through a loader the Python layer
//   installs.
// - The caller's CodeLedger remembers which peer confirmed holding which
//   code, so only calls until the first confirmation carry the archive.

#include <ATen/core/Tensor.h>

#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "agent/function_registry.h"

namespace torchrpc {

// "sha256:<64 hex digits>" of `size` bytes at `data` (OpenSSL).
std::string codeId(const void* data, size_t size);
inline bool isCodeId(const std::string& name) { return name.rfind("sha256:", 0) == 0; }

class CodeCache {
 public:
  // Loads an archive of a kind other than "script"; named `id`.
  using Loader = std::function<std::shared_ptr<Callable>(const std::string& kind, const at::Tensor& archive,
                                                         const std::string& id)>;

  explicit CodeCache(size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}
  void setLoader(Loader loader);

  // The code named `id`, marked most recently used; null if not held.
  std::shared_ptr<Callable> find(const std::string& id);
  // Checks that `archive` hashes to `id`, loads it and keeps it. Throws
  // RpcError(kArgument) for a hash mismatch, an unknown kind, or an archive
  // that does not load (truncated, corrupted, not code).
  std::shared_ptr<Callable> install(const std::string& id, const std::string& kind, const at::Tensor& archive);

  size_t size();
  uint64_t loads() const { return loads_; }

 private:
  std::shared_ptr<Callable> load(const std::string& id, const std::string& kind, const at::Tensor& archive);

  const size_t capacity_;
  std::mutex mu_;
  Loader loader_;
  std::list<std::pair<std::string, std::shared_ptr<Callable>>> lru_;  // front: most recent
  std::unordered_map<std::string, decltype(lru_)::iterator> byId_;
  std::atomic<uint64_t> loads_{0};
};

class CodeLedger {
 public:
  bool holds(int64_t peer, const std::string& id) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = held_.find(peer);
    return it != held_.end() && it->second.count(id) > 0;
  }
  void confirm(int64_t peer, const std::string& id) {
    std::lock_guard<std::mutex> g(mu_);
    held_[peer].insert(id);
  }
  void forget(int64_t peer, const std::string& id) {
    std::lock_guard<std::mutex> g(mu_);
    held_[peer].erase(id);
  }

 private:
  std::mutex mu_;
  std::unordered_map<int64_t, std::unordered_set<std::string>> held_;
};

}  // namespace torchrpc
