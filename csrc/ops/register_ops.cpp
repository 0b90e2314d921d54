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
#include "messages/script_call.h"

namespace torchrpc {
namespace {

int64_t workerIdOf(Agent& agent, const std::string& to) {
  for (const auto& w : agent.workers()) {
    if (w.name == to) return w.id;
  }
  throw RpcError(ErrorKind::kArgument, "torchrpc: unknown worker '" + to + "'");
}

// rpc_async(str to, str qualified_name, Any[] args, float timeout) -> Future(Any)
FuturePtr startCall(torch::jit::Stack& stack, int64_t* callee = nullptr) {
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
  const int64_t id = workerIdOf(*agent, to);
  if (callee) *callee = id;
  return agent->scriptCall(id, std::move(name), std::move(argv), timeout);
}

void rpcAsyncKernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  torch::jit::push(*stack, startCall(*stack));
}

void rpcSyncKernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  int64_t callee = -1;
  FuturePtr fut = startCall(*stack, &callee);
  currentAgent()->waitForReply(fut, callee);
  if (fut->hasError()) std::rethrow_exception(fut->exception_ptr());
  torch::jit::push(*stack, fut->value());
}

// remote(str to, str qualified_name, Any[] args, float timeout) -> RRef
void remoteKernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  double timeout = stack->back().toDouble();
  c10::List<c10::IValue> args = (*stack)[stack->size() - 2].toList();
  std::string name = (*stack)[stack->size() - 3].toStringRef();
  std::string to = (*stack)[stack->size() - 4].toStringRef();
  torch::jit::drop(*stack, 4);
  auto agent = currentAgent();
  std::vector<c10::IValue> argv(args.begin(), args.end());
  if (auto callable = agent->registry().find(name)) checkArguments(name, callable->schema(), argv);
  RRefPtr rref = agent->rrefs().remote(
      workerIdOf(*agent, to),
      [&](const RRefId& id, const ForkId& fork) {
        return ScriptRemoteCall(name, argv, false, id, fork).toMessage(agent->rrefs().objectCodec());
      },
      false, timeout, name);
  torch::jit::push(*stack, c10::IValue(std::move(rref)));
}

// A fork as flat integers, the form def_pickle can type:
// [owner, rref id (2), fork id (2), parent, is_python].
std::vector<int64_t> forkState(const c10::IValue& info) {
  const auto& e = info.toTupleRef().elements();
  auto rref = GloballyUniqueId::fromIValue(e[1]);
  auto fork = GloballyUniqueId::fromIValue(e[2]);
  return {e[0].toInt(), rref.createdOn, rref.localId, fork.createdOn, fork.localId, e[3].toInt(),
          e[4].toBool() ? 1 : 0};
}

c10::IValue forkInfo(const std::vector<int64_t>& s) {
  if (s.size() != 7) throw RpcError(ErrorKind::kDecode, "torchrpc: malformed saved RRef");
  return c10::IValue(c10::ivalue::Tuple::create(
      {c10::IValue(s[0]), GloballyUniqueId{s[1], s[2]}.toIValue(), GloballyUniqueId{s[3], s[4]}.toIValue(),
       c10::IValue(s[5]), c10::IValue(s[6] != 0)}));
}

// Waits for a reply from worker `from` (-1: a local future).
c10::IValue waitFor(const FuturePtr& fut, int64_t from = -1) {
  if (from >= 0) currentAgent()->waitForReply(fut, from);
  else fut->wait();
  if (fut->hasError()) std::rethrow_exception(fut->exception_ptr());
  return fut->value();
}

c10::IValue rrefToHere(const RRefPtr& self, double timeout) {
  if (self->isPython()) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: this RRef holds a Python object; fetch it from Python");
  }
  return waitFor(currentAgent()->rrefs().fetch(self, timeout), self->ownerId());
}

c10::IValue rrefLocalValue(const RRefPtr& self) {
  if (!self->isOwner()) {
    auto agent = currentAgent();
    throw RpcError(ErrorKind::kRpc, "torchrpc: local_value() needs the owner; this RRef is owned by '" +
                                        agent->worker(self->ownerId()).name + "'");
  }
  return waitFor(self->valueFuture());
}

void sleepMs(int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

std::string workerName() { return currentAgent()->self().name; }

}  // namespace

// Every op here has effects the JIT cannot see (network, worker state,
// time), so all use conservative alias analysis: with the default
// (FROM_SCHEMA) a call whose result is unused would be removed as dead code.
TORCH_LIBRARY(torchrpc, m) {
  auto effectful = [](const char* schema) { return torch::schema(schema, c10::AliasAnalysisKind::CONSERVATIVE); };
  m.class_<RRef>("RRef")
      .def("to_here", &rrefToHere, "Fetches the value (blocks).", {torch::arg("timeout") = -1.0})
      .def("local_value", &rrefLocalValue)
      .def("is_owner", [](const RRefPtr& self) { return self->isOwner(); })
      .def("owner_name", [](const RRefPtr& self) { return currentAgent()->worker(self->ownerId()).name; })
      .def("confirmed_by_owner", [](const RRefPtr& self) { return self->confirmed(); })
      // torch.jit.save writes a fork (the saver keeps the value alive for it,
      // as for a fork in a message); torch.jit.load registers that fork.
      .def_pickle([](const RRefPtr& self) { return forkState(currentAgent()->rrefs().fork(self)); },
                  [](std::vector<int64_t> state) { return currentAgent()->rrefs().unfork(forkInfo(state)); });
  m.def(effectful("remote(str to, str qualified_name, Any[] args, float timeout=-1.0) -> "
                  "__torch__.torch.classes.torchrpc.RRef"),
        torch::CppFunction::makeFromBoxedFunction<&remoteKernel>());
  m.def(effectful("rpc_async(str to, str qualified_name, Any[] args, float timeout=-1.0) -> Future(Any)"),
        torch::CppFunction::makeFromBoxedFunction<&rpcAsyncKernel>());
  m.def(effectful("rpc_sync(str to, str qualified_name, Any[] args, float timeout=-1.0) -> Any"),
        torch::CppFunction::makeFromBoxedFunction<&rpcSyncKernel>());
  // The context's gradients, for optimizer steps written in TorchScript.
  m.def(effectful("get_gradients(int context_id) -> Dict(Tensor, Tensor)"), [](int64_t contextId) {
    return currentAgent()->autograd().contexts().get(contextId)->gradients();
  });
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
