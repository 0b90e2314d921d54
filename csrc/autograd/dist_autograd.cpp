#include "autograd/dist_autograd.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>

#include "autograd/local_pass.h"

namespace torchrpc {

bool DistAutograd::carriesContext(MessageType type) {
  switch (type) {
    case MessageType::kScriptCall:
    case MessageType::kPythonCall:
    case MessageType::kScriptRemoteCall:
    case MessageType::kPythonRemoteCall:
    case MessageType::kScriptRRefFetchCall:
    case MessageType::kPythonRRefFetchCall:
    case MessageType::kWithCode:  // a call carrying its code
      return true;
    default:
      return false;
  }
}

Message DistAutograd::wrapRequest(int64_t contextId, int64_t to, Message&& request) {
  auto ctx = contexts_.getOrCreate(contextId);
  ctx->addKnownWorker(to);
  const int64_t messageId = contexts_.newMessageId();
  if (anyRequiresGrad(request.tensors)) ctx->addSend(messageId, request.tensors);
  return wrapWithAutograd(MessageType::kForwardAutogradReq, {selfId_, contextId, messageId}, std::move(request));
}

Message DistAutograd::wrapResponse(const AutogradHeader& request, Message&& response) {
  if (response.type == MessageType::kException) return std::move(response);
  auto ctx = contexts_.find(request.contextId);
  if (!ctx) return std::move(response);  // released while the call ran
  const int64_t messageId = contexts_.newMessageId();
  if (anyRequiresGrad(response.tensors)) ctx->addSend(messageId, response.tensors);
  return wrapWithAutograd(MessageType::kForwardAutogradResp, {selfId_, request.contextId, messageId},
                         std::move(response));
}

Message DistAutograd::unwrap(Message&& message, AutogradHeader& header) {
  const bool isRequest = message.type == MessageType::kForwardAutogradReq;
  Message inner = unwrapAutograd(std::move(message), header);
  auto ctx = isRequest ? contexts_.getOrCreate(header.contextId) : contexts_.find(header.contextId);
  if (ctx) {
    ctx->addKnownWorker(header.fromWorkerId);
    if (anyRequiresGrad(inner.tensors)) ctx->addRecv(header, inner.tensors);
  }
  return inner;
}

FuturePtr DistAutograd::runPass(const AutogradContextPtr& ctx, const torch::autograd::edge_list& roots,
                                const torch::autograd::variable_list& grads) {
  OutgoingGrads outgoing;
  {
    std::lock_guard<std::mutex> g(ctx->passMutex());
    outgoing = runLocalPass(*ctx, roots, grads);
  }
  std::vector<FuturePtr> sent;
  for (auto& [worker, perMessage] : outgoing) {
    sent.push_back(send_(worker, BackwardAutogradReq(ctx->id(), selfId_, std::move(perMessage)).toMessage(),
                         "distributed backward"));
  }
  return whenAll(sent, true);
}

FuturePtr DistAutograd::backward(int64_t contextId, const std::vector<at::Tensor>& roots, bool retainGraph) {
  auto ctx = contexts_.get(contextId);
  torch::autograd::edge_list edges;
  torch::autograd::variable_list grads;
  for (size_t i = 0; i < roots.size(); ++i) {
    const auto& r = roots[i];
    if (!r.defined() || !r.requires_grad()) {
      throw RpcError(ErrorKind::kArgument, "torchrpc: backward root " + std::to_string(i) +
                                               " does not require grad and has no grad_fn");
    }
    edges.push_back(torch::autograd::impl::gradient_edge(r));
    grads.push_back(at::ones_like(r));
  }
  return runPass(ctx, edges, grads);
}

FuturePtr DistAutograd::onBackwardRequest(const BackwardAutogradReq& request) {
  auto ctx = contexts_.get(request.contextId());
  torch::autograd::edge_list edges;
  torch::autograd::variable_list grads;
  for (const auto& entry : request.grads()) {
    auto sendEdges = ctx->sendEdges(entry.key());
    const auto& gs = entry.value();
    if (gs.size() != sendEdges.size()) {
      throw RpcError(ErrorKind::kDecode, "torchrpc: " + std::to_string(gs.size()) + " gradients for send " +
                                             std::to_string(entry.key()) + ", which sent " +
                                             std::to_string(sendEdges.size()) + " tensors");
    }
    for (size_t i = 0; i < gs.size(); ++i) {
      edges.push_back(sendEdges[i]);
      grads.push_back(gs.get(i));
    }
  }
  return runPass(ctx, edges, grads);
}

FuturePtr DistAutograd::release(int64_t contextId, int64_t fromWorker) {
  if (AutogradContexts::current() == contextId) AutogradContexts::setCurrent(-1);
  auto ctx = contexts_.erase(contextId);
  if (!ctx) return whenAll({}, false);
  std::vector<FuturePtr> sent;
  for (int64_t w : ctx->knownWorkers()) {
    if (w == fromWorker || w == selfId_) continue;
    try {
      sent.push_back(send_(w, CleanupAutogradContextReq(contextId).toMessage(), "autograd context cleanup"));
    } catch (const std::exception&) {
      // A peer we cannot reach holds nothing we could release anyway.
    }
  }
  return whenAll(sent, false);
}

}  // namespace torchrpc
