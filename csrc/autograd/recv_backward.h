#pragma once

// The recv function: the grad_fn given to tensors that arrived with
// requires_grad inside an autograd context. It marks where the local graph
// continues on another worker. The local pass never runs it: it captures the
// gradient flowing into it and sends that back to the sender's matching send
// (see dist_engine.h).

#include <torch/csrc/autograd/function.h>

namespace torchrpc {

class RecvBackward : public torch::autograd::Node {
 public:
  RecvBackward(int64_t fromWorkerId, int64_t messageId) : fromWorkerId_(fromWorkerId), messageId_(messageId) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&&) override {
    TORCH_CHECK(false,
                "torchrpc: a tensor received over RPC reached local backward(); use "
                "torchrpc.autograd.backward(context_id, roots) inside its autograd context");
  }
  std::string name() const override { return "torchrpc::RecvBackward"; }

  int64_t fromWorkerId() const { return fromWorkerId_; }
  int64_t messageId() const { return messageId_; }

 private:
  int64_t fromWorkerId_;
  int64_t messageId_;
};

}  // namespace torchrpc
