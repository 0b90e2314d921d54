// Every torch.ops.torchrpc operator, declared once, here. TorchScript
// programs (and modules loaded with torch.jit.load) see these as soon as the
// torchrpc._C library is loaded, with no Python in the call path.
//
// Future-returning ops use boxed kernels: a typed kernel returning
// intrusive_ptr<ivalue::Future> aborts when the library loads.

#include <torch/library.h>

#include <chrono>
#include <thread>

#include "agent/current_agent.h"
#include "ops/param_store.h"

namespace torchrpc {
namespace {

int64_t workerIdOf(Agent& agent, const std::string& to) {
  for (const auto& w : agent.workers()) {
    if (w.name == to) return w.id;
  }
  throw RpcError(ErrorKind::kArgument, "torchrpc: unknown worker '" + to + "'");
}

// rpc_async(str to, str qualified_name, Any[] args, float timeout) -> Future(Any)
FuturePtr startCall(torch::jit::Stack& stack) {
  double timeout = stack.back().toDouble();
  c10::List<c10::IValue> args = stack[stack.size() - 2].toList();
  std::string name = stack[stack.size() - 3].toStringRef();
  std::string to = stack[stack.size() - 4].toStringRef();
  torch::jit::drop(stack, 4);
  auto agent = currentAgent();
  std::vector<c10::IValue> argv(args.begin(), args.end());
  // Check here when the schema is known locally, so the error names this call
  // site before anything is sent; the callee always checks again.
  if (auto callable = agent->registry().find(name)) checkArguments(name, callable->schema(), argv);
  return agent->scriptCall(workerIdOf(*agent, to), std::move(name), std::move(argv), timeout);
}

void rpcAsyncKernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  torch::jit::push(*stack, startCall(*stack));
}

void rpcSyncKernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  FuturePtr fut = startCall(*stack);
  fut->wait();
  if (fut->hasError()) std::rethrow_exception(fut->exception_ptr());
  torch::jit::push(*stack, fut->value());
}

void sleepMs(int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

std::string workerName() { return currentAgent()->self().name; }

}  // namespace

// Every op here has effects the JIT cannot see (network, worker state,
// time), so all use conservative alias analysis: with the default
// (FROM_SCHEMA) a call whose result is unused would be removed as dead code.
TORCH_LIBRARY(torchrpc, m) {
  auto effectful = [](const char* schema) { return torch::schema(schema, c10::AliasAnalysisKind::CONSERVATIVE); };
  m.def(effectful("rpc_async(str to, str qualified_name, Any[] args, float timeout=-1.0) -> Future(Any)"),
        torch::CppFunction::makeFromBoxedFunction<&rpcAsyncKernel>());
  m.def(effectful("rpc_sync(str to, str qualified_name, Any[] args, float timeout=-1.0) -> Any"),
        torch::CppFunction::makeFromBoxedFunction<&rpcSyncKernel>());
  m.def(effectful("sleep_ms(int ms) -> ()"), &sleepMs);
  m.def(effectful("worker_name() -> str"), &workerName);
  m.def(effectful("param_put(str name, Tensor value) -> ()"), [](const std::string& n, const at::Tensor& v) {
    currentAgent()->params().put(n, v);
  });
  m.def(effectful("param_get(str name) -> Tensor"),
        [](const std::string& n) { return currentAgent()->params().get(n); });
  m.def(effectful("param_add_(str name, Tensor delta) -> Tensor"), [](const std::string& n, const at::Tensor& d) {
    return currentAgent()->params().addTo(n, d);
  });
}

}  // namespace torchrpc
