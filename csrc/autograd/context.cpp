#include "autograd/context.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include "autograd/recv_backward.h"
#include "errors.h"

namespace torchrpc {
namespace {
thread_local int64_t tlsCurrentContext = -1;
}  // namespace

bool anyRequiresGrad(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

void AutogradContext::addSend(int64_t messageId, const std::vector<at::Tensor>& tensors) {
  torch::autograd::edge_list edges;
  for (const auto& t : tensors) {
    if (t.defined() && t.requires_grad()) edges.push_back(torch::autograd::impl::gradient_edge(t));
  }
  std::lock_guard<std::mutex> g(mu_);
  sends_.emplace(messageId, std::move(edges));
}

void AutogradContext::addRecv(const AutogradHeader& header, std::vector<at::Tensor>& tensors) {
  c10::intrusive_ptr<torch::autograd::Node> recv =
      c10::make_intrusive<RecvBackward>(header.fromWorkerId, header.messageId);
  for (auto& t : tensors) {
    // The frame keeps requires_grad, so these are exactly the sender's
    // send-function tensors, in the same order.
    if (t.defined() && t.requires_grad()) torch::autograd::set_history(t, recv);
  }
  addKnownWorker(header.fromWorkerId);
}

torch::autograd::edge_list AutogradContext::sendEdges(int64_t messageId) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = sends_.find(messageId);
  if (it == sends_.end()) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: autograd context " + std::to_string(id_) +
                                        " has no send function " + std::to_string(messageId));
  }
  return it->second;
}

void AutogradContext::addKnownWorker(int64_t worker) {
  std::lock_guard<std::mutex> g(mu_);
  knownWorkers_.insert(worker);
}

std::vector<int64_t> AutogradContext::knownWorkers() {
  std::lock_guard<std::mutex> g(mu_);
  return {knownWorkers_.begin(), knownWorkers_.end()};
}

void AutogradContext::accumulateGrad(const at::Tensor& leaf, const at::Tensor& grad) {
  if (!grad.defined()) return;
  std::lock_guard<std::mutex> g(mu_);
  auto it = grads_.find(leaf.unsafeGetTensorImpl());
  if (it == grads_.end()) {
    // A copy-free first gradient would alias a buffer of the graph; detach
    // keeps it out of any later graph.
    grads_.emplace(leaf.unsafeGetTensorImpl(), std::make_pair(leaf, grad.detach()));
  } else {
    it->second.second = it->second.second + grad.detach();
  }
}

c10::Dict<at::Tensor, at::Tensor> AutogradContext::gradients() {
  std::lock_guard<std::mutex> g(mu_);
  c10::Dict<at::Tensor, at::Tensor> out;
  for (const auto& [impl, pair] : grads_) out.insert(pair.first, pair.second);
  return out;
}

AutogradContextPtr AutogradContexts::create() {
  if (tlsCurrentContext != -1) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: this thread is already in autograd context " +
                                        std::to_string(tlsCurrentContext) + " (contexts do not nest)");
  }
  const int64_t id = (workerId_ << 48) | nextContextId_.fetch_add(1);
  auto ctx = std::make_shared<AutogradContext>(id);
  {
    std::lock_guard<std::mutex> g(mu_);
    contexts_.emplace(id, ctx);
  }
  tlsCurrentContext = id;
  return ctx;
}

AutogradContextPtr AutogradContexts::find(int64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = contexts_.find(id);
  return it == contexts_.end() ? nullptr : it->second;
}

AutogradContextPtr AutogradContexts::get(int64_t id) {
  auto ctx = find(id);
  if (!ctx) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: no autograd context " + std::to_string(id) +
                                        " on this worker (never created here, or already released)");
  }
  return ctx;
}

AutogradContextPtr AutogradContexts::getOrCreate(int64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  if (released_.count(id)) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: autograd context " + std::to_string(id) +
                                        " was already released on this worker: the request came too late");
  }
  auto& slot = contexts_[id];
  if (!slot) slot = std::make_shared<AutogradContext>(id);
  return slot;
}

AutogradContextPtr AutogradContexts::erase(int64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  // Remembered even if it never existed here: the cleanup may overtake a
  // request of the same context on its way to this worker.
  if (released_.insert(id).second) {
    releasedOrder_.push_back(id);
    if (releasedOrder_.size() > kRememberedReleases) {
      released_.erase(releasedOrder_.front());
      releasedOrder_.pop_front();
    }
  }
  auto it = contexts_.find(id);
  if (it == contexts_.end()) return nullptr;
  auto ctx = std::move(it->second);
  contexts_.erase(it);
  return ctx;
}

size_t AutogradContexts::size() {
  std::lock_guard<std::mutex> g(mu_);
  return contexts_.size();
}

std::vector<std::pair<int64_t, std::vector<int64_t>>> AutogradContexts::list() {
  std::vector<AutogradContextPtr> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [id, c] : contexts_) all.push_back(c);
  }
  std::vector<std::pair<int64_t, std::vector<int64_t>>> out;
  for (const auto& c : all) out.emplace_back(c->id(), c->knownWorkers());
  return out;
}

void AutogradContexts::clear() {
  std::unordered_map<int64_t, AutogradContextPtr> dropped;
  {
    std::lock_guard<std::mutex> g(mu_);
    dropped.swap(contexts_);
  }
}

int64_t AutogradContexts::current() { return tlsCurrentContext; }
void AutogradContexts::setCurrent(int64_t id) { tlsCurrentContext = id; }

}  // namespace torchrpc
