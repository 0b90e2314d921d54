#pragma once

// One worker's part of a distributed backward pass: runs the local autograd
// engine from some roots (the user's roots, or send functions that received
// gradients) and captures, instead of executing, the two kinds of sink:
//   leaves (AccumulateGrad)  -> gradient accumulated into the context
//   recv functions           -> gradient to send back to the sending worker
// Nodes on the way run once per pass. The graph is kept (keep_graph): a later
// pass of the same backward may reach shared nodes again (gradients for
// sends sharing a subgraph can come from different workers), and the graph
// is released with the context.

#include <torch/csrc/autograd/function.h>

#include <unordered_map>

#include "autograd/context.h"

namespace torchrpc {

// Gradients to send, per destination worker: autograd message id -> one
// gradient per tensor of that message (zeros where none flowed).
using OutgoingGrads = std::unordered_map<int64_t, c10::Dict<int64_t, c10::List<at::Tensor>>>;

OutgoingGrads runLocalPass(AutogradContext& ctx, const torch::autograd::edge_list& roots,
                           const torch::autograd::variable_list& grads);

}  // namespace torchrpc
