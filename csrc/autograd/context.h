#pragma once

// Distributed autograd state on one worker, owned by its Agent.
//
// A context (id: creating worker in the high 16 bits, a counter below) is
// created by `torchrpc.autograd.context()` and follows every call made
// inside it: the callee runs the request with the same context current on
// its thread, so nested calls carry it further.
//
// Tables, per context:
//   sends_         autograd message id -> gradient edges of the tensors that
//                  message carried with requires_grad (the send function:
//                  where gradients coming back enter the local graph).
//   knownWorkers_  workers this context exchanged messages with; cleanup
//                  goes to them, and from them on to theirs.
//   grads_         leaf -> gradient accumulated over this context's backward
//                  passes (never written to .grad).
// The matching recv functions are RecvBackward nodes in the graph itself.

#include <torch/csrc/autograd/function.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <deque>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "messages/autograd_wrap.h"

namespace torchrpc {

class AutogradContext {
 public:
  explicit AutogradContext(int64_t id) : id_(id) {}
  int64_t id() const { return id_; }

  // Records the send function for the requires_grad tensors among `tensors`.
  void addSend(int64_t messageId, const std::vector<at::Tensor>& tensors);
  // Attaches a recv function to the requires_grad tensors among `tensors`.
  void addRecv(const AutogradHeader& header, std::vector<at::Tensor>& tensors);
  // The edges gradients for send `messageId` enter; throws if unknown.
  torch::autograd::edge_list sendEdges(int64_t messageId);

  void addKnownWorker(int64_t worker);
  std::vector<int64_t> knownWorkers();

  void accumulateGrad(const at::Tensor& leaf, const at::Tensor& grad);
  c10::Dict<at::Tensor, at::Tensor> gradients();

  // Local backward passes of one context run one at a time: two passes that
  // reach shared nodes must not run them concurrently.
  std::mutex& passMutex() { return passMu_; }

 private:
  const int64_t id_;
  std::mutex mu_;
  std::mutex passMu_;
  std::unordered_map<int64_t, torch::autograd::edge_list> sends_;
  std::unordered_set<int64_t> knownWorkers_;
  std::unordered_map<c10::TensorImpl*, std::pair<at::Tensor, at::Tensor>> grads_;  // leaf -> (leaf, grad)
};

using AutogradContextPtr = std::shared_ptr<AutogradContext>;

// True if any tensor needs a send/recv function.
bool anyRequiresGrad(const std::vector<at::Tensor>& tensors);

// The contexts of one worker.
class AutogradContexts {
 public:
  explicit AutogradContexts(int64_t workerId) : workerId_(workerId) {}

  // A new context, made current on this thread; throws if one already is.
  AutogradContextPtr create();
  AutogradContextPtr find(int64_t id);
  // Throws RpcError naming the context if it does not exist here.
  AutogradContextPtr get(int64_t id);
  // Throws RpcError if `id` was released here already.
  AutogradContextPtr getOrCreate(int64_t id);
  // Removes and returns the context (null if it was not here).
  AutogradContextPtr erase(int64_t id);
  size_t size();
  // Each context's id and the workers it exchanged messages with.
  std::vector<std::pair<int64_t, std::vector<int64_t>>> list();
  void clear();
  // A new autograd message id, unique across workers.
  int64_t newMessageId() { return (workerId_ << 48) | nextMessageId_.fetch_add(1); }

  // The context current on this thread, -1 if none.
  static int64_t current();
  static void setCurrent(int64_t id);

 private:
  const int64_t workerId_;
  std::atomic<int64_t> nextContextId_{1};
  std::atomic<int64_t> nextMessageId_{1};
  std::mutex mu_;
  std::unordered_map<int64_t, AutogradContextPtr> contexts_;
  // Contexts released here, remembered (the newest kRememberedReleases) so
  // that a request arriving late for one does not create it again, which
  // nothing would ever release.
  static constexpr size_t kRememberedReleases = 4096;
  std::unordered_set<int64_t> released_;
  std::deque<int64_t> releasedOrder_;
};

// Makes `id` current on this thread for a scope (a request served within a
// context); -1 leaves the thread as it is.
class CurrentContextGuard {
 public:
  explicit CurrentContextGuard(int64_t id) : previous_(AutogradContexts::current()), active_(id >= 0) {
    if (active_) AutogradContexts::setCurrent(id);
  }
  ~CurrentContextGuard() {
    if (active_) AutogradContexts::setCurrent(previous_);
  }
  CurrentContextGuard(const CurrentContextGuard&) = delete;
  CurrentContextGuard& operator=(const CurrentContextGuard&) = delete;

 private:
  int64_t previous_;
  bool active_;
};

}  // namespace torchrpc
