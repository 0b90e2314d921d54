#include "autograd/local_pass.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>

#include <unordered_set>

#include "autograd/recv_backward.h"

namespace torchrpc {
namespace {

using torch::autograd::AccumulateGrad;
using torch::autograd::Edge;
using torch::autograd::Node;

// Where captured gradients go.
struct Sinks {
  std::unordered_map<RecvBackward*, std::vector<at::Tensor>> recvGrads;
  std::vector<c10::intrusive_ptr<Node>> keepAlive;

  void toRecv(const c10::intrusive_ptr<Node>& node, RecvBackward* recv, size_t slot, const at::Tensor& g) {
    auto& v = recvGrads[recv];
    if (v.empty()) {
      v.resize(recv->num_inputs());
      keepAlive.push_back(node);
    }
    if (!g.defined()) return;
    v[slot] = v[slot].defined() ? v[slot] + g : g;
  }
};

}  // namespace

OutgoingGrads runLocalPass(AutogradContext& ctx, const torch::autograd::edge_list& roots,
                           const torch::autograd::variable_list& grads) {
  Sinks sinks;
  torch::autograd::edge_list engineRoots;
  torch::autograd::variable_list engineGrads;
  // Roots that are sinks themselves are captured directly: the engine would
  // run a lone root node instead of capturing it.
  for (size_t i = 0; i < roots.size(); ++i) {
    Node* fn = roots[i].function.get();
    if (!fn) continue;
    if (auto* acc = dynamic_cast<AccumulateGrad*>(fn)) {
      ctx.accumulateGrad(acc->variable, grads[i]);
    } else if (auto* recv = dynamic_cast<RecvBackward*>(fn)) {
      sinks.toRecv(roots[i].function, recv, roots[i].input_nr, grads[i]);
    } else {
      engineRoots.push_back(roots[i]);
      engineGrads.push_back(grads[i]);
    }
  }

  // Find the sinks reachable from the remaining roots.
  torch::autograd::edge_list outputs;
  std::vector<c10::intrusive_ptr<Node>> outputNodes;
  std::unordered_set<Node*> seen;
  std::vector<c10::intrusive_ptr<Node>> stack;
  for (const auto& e : engineRoots) {
    if (seen.insert(e.function.get()).second) stack.push_back(e.function);
  }
  while (!stack.empty()) {
    c10::intrusive_ptr<Node> node = std::move(stack.back());
    stack.pop_back();
    if (dynamic_cast<AccumulateGrad*>(node.get())) {
      outputs.emplace_back(node, 0);
      outputNodes.push_back(node);
      continue;
    }
    if (dynamic_cast<RecvBackward*>(node.get())) {
      for (uint32_t i = 0; i < node->num_inputs(); ++i) {
        outputs.emplace_back(node, i);
        outputNodes.push_back(node);
      }
      continue;
    }
    for (const auto& next : node->next_edges()) {
      if (next.is_valid() && seen.insert(next.function.get()).second) stack.push_back(next.function);
    }
  }

  if (!outputs.empty()) {
    auto captured = torch::autograd::Engine::get_default_engine().execute(
        engineRoots, engineGrads, /*keep_graph=*/true, /*create_graph=*/false, /*accumulate_grad=*/false, outputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      Node* fn = outputNodes[i].get();
      if (auto* acc = dynamic_cast<AccumulateGrad*>(fn)) {
        ctx.accumulateGrad(acc->variable, captured[i]);
      } else {
        sinks.toRecv(outputNodes[i], static_cast<RecvBackward*>(fn), outputs[i].input_nr, captured[i]);
      }
    }
  }

  OutgoingGrads out;
  for (auto& [recv, gs] : sinks.recvGrads) {
    bool any = false;
    for (const auto& g : gs) any = any || g.defined();
    if (!any) continue;  // nothing flowed: the sender's part is not needed
    c10::List<at::Tensor> list;
    for (size_t i = 0; i < gs.size(); ++i) {
      list.push_back(gs[i].defined() ? gs[i] : recv->input_metadata(i).zeros_like());
    }
    out[recv->fromWorkerId()].insert(recv->messageId(), std::move(list));
  }
  return out;
}

}  // namespace torchrpc
