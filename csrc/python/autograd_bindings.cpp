// Python bindings of distributed autograd (torchrpc/autograd.py wraps them).
// Every wait releases the GIL: the passes they wait for may need it on this
// worker (Python functions in the graph, Python calls served meanwhile).

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include "agent/agent.h"
#include "messages/autograd.h"
#include "python/py_rref.h"

namespace py = pybind11;

namespace torchrpc {
namespace {

// Runs `start` and waits for the future it returns, all without the GIL: the
// autograd engine refuses to run while it is held.
void runAndWait(const std::function<FuturePtr()>& start) {
  FuturePtr fut;
  {
    py::gil_scoped_release release;
    fut = start();
    fut->wait();
  }
  if (fut->hasError()) std::rethrow_exception(fut->exception_ptr());
}

}  // namespace

void initAutogradBindings(py::module_& m) {
  m.def("autograd_new_context", [](Agent& a) { return a.autograd().contexts().create()->id(); },
        "A new autograd context, current on this thread.");
  m.def("autograd_current_context", [] { return AutogradContexts::current(); });
  m.def(
      "autograd_release_context",
      [](Agent& a, int64_t id) {
        // Not waited for, as in torch: the context is gone here at once, and
        // the other workers release it a round trip later (a graceful
        // shutdown waits for those requests like any other).
        a.autograd().release(id, -1);
      },
      py::arg("agent"), py::arg("context_id"));
  m.def(
      "autograd_backward",
      [](Agent& a, int64_t id, const std::vector<at::Tensor>& roots, bool retainGraph) {
        runAndWait([&] { return a.autograd().backward(id, roots, retainGraph); });
      },
      py::arg("agent"), py::arg("context_id"), py::arg("roots"), py::arg("retain_graph"));
  m.def("autograd_gradients", [](Agent& a, int64_t id) {
    return torch::jit::toPyObject(c10::IValue(a.autograd().contexts().get(id)->gradients()));
  });
  m.def(
      "rref_backward",
      [](Agent& a, const py::object& obj, int64_t contextId, bool retainGraph) {
        RRefPtr rref = toRRef(obj);
        if (rref->isOwner()) {
          runAndWait([&] { return a.rrefBackward(rref, contextId, retainGraph); });
          return;
        }
        if (contextId < 0) {
          throw RpcError(ErrorKind::kRpc,
                         "torchrpc: RRef.backward() without an autograd context runs only on the owner ('" +
                             a.worker(rref->ownerId()).name + "'); pass dist_autograd_ctx_id");
        }
        runAndWait([&] {
          return a.send(rref->ownerId(), RRefBackwardReq(rref->id(), contextId, retainGraph).toMessage(), -1,
                        "RRef.backward");
        });
      },
      py::arg("agent"), py::arg("rref"), py::arg("context_id"), py::arg("retain_graph"));
}

}  // namespace torchrpc
