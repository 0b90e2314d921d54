#pragma once

// The distributed autograd protocol of one worker, owned by its Agent.
//
// Forward: inside a context, every user call (script/Python call, remote(),
// RRef fetch) travels as FORWARD_AUTOGRAD_REQ, and its response as
// FORWARD_AUTOGRAD_RESP, so the callee learns the context and runs the call
// within it. Each side records a send function for the tensors it sends with
// requires_grad, and the other side attaches the matching recv function to
// them. Outside a context nothing is wrapped.
//
// Backward (FAST mode): backward(context, roots) runs the local pass from the
// roots; the gradients its recv functions captured go, batched per worker,
// as BACKWARD_AUTOGRAD_REQ to the workers that sent those tensors, which run
// their own pass from the matching send functions, and so on. A request is
// answered once the receiver's pass and every request that pass sent are
// answered, so backward() returns when the whole graph has run. No worker
// waits for gradients that may never come: a part of the graph runs when
// gradients reach it, and passes of one backward that reach shared nodes
// each add their share (the engine is linear), so a second forward and
// backward in one context can never hang. Nothing blocks a thread while
// waiting for a peer.
//
// Cleanup: leaving the context releases it here and sends
// CLEANUP_AUTOGRAD_CONTEXT_REQ to every worker it talked to, which releases
// it and passes the request on; each answers after the ones it passed on.
// The worker leaving the context does not wait for the answers.

#include <ATen/core/ivalue.h>

#include <functional>

#include "autograd/context.h"
#include "futures.h"
#include "messages/autograd.h"

namespace torchrpc {

class DistAutograd {
 public:
  // `send` sends a request (default timeout) and returns its future.
  using Send = std::function<FuturePtr(int64_t to, Message&& request, const std::string& what)>;
  DistAutograd(int64_t selfId, Send send) : selfId_(selfId), contexts_(selfId), send_(std::move(send)) {}

  AutogradContexts& contexts() { return contexts_; }

  // True for requests that run user code and so carry the context.
  static bool carriesContext(MessageType type);
  // A request to `to` sent within context `contextId`.
  Message wrapRequest(int64_t contextId, int64_t to, Message&& request);
  // The response to a request that came wrapped with `request`.
  Message wrapResponse(const AutogradHeader& request, Message&& response);
  // Unwraps a FORWARD_AUTOGRAD_REQ/RESP and attaches recv functions. A
  // request creates the context here if it is new; a response whose context
  // was released meanwhile is passed on without autograd.
  Message unwrap(Message&& message, AutogradHeader& header);

  // Runs the distributed backward pass from `roots`; completes when done.
  FuturePtr backward(int64_t contextId, const std::vector<at::Tensor>& roots, bool retainGraph);
  // Serves BACKWARD_AUTOGRAD_REQ.
  FuturePtr onBackwardRequest(const BackwardAutogradReq& request);
  // Releases the context here and on every worker it reached, except
  // `fromWorker` (who asked). Completes when they all answered or failed.
  FuturePtr release(int64_t contextId, int64_t fromWorker);

 private:
  // Runs one local pass and sends what it produced; completes when all
  // requests it sent are answered.
  FuturePtr runPass(const AutogradContextPtr& ctx, const torch::autograd::edge_list& roots,
                    const torch::autograd::variable_list& grads);

  const int64_t selfId_;
  AutogradContexts contexts_;
  Send send_;
};

}  // namespace torchrpc
