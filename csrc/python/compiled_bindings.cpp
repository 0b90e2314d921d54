// Python bindings for compiled functions other than TorchScript functions:
// AOTInductor packages (run in C++), and Python-run callables (exported
// programs), each a _C.Callable that an agent registers under a name or
// loads as code shipped by value.

#include <torch/csrc/jit/frontend/function_schema_parser.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include "agent/agent.h"
#include "agent/aoti_callable.h"

namespace py = pybind11;

namespace torchrpc {
namespace {

// A Python object that may be dropped on any thread, GIL held or not.
std::shared_ptr<py::object> holdPython(py::object obj) {
  return std::shared_ptr<py::object>(new py::object(std::move(obj)), [](py::object* o) {
    if (!Py_IsInitialized()) return;  // the interpreter is gone: leak it
    py::gil_scoped_acquire gil;
    delete o;
  });
}

// The Python exception being handled as an RpcError: the callee's class by
// name, so the caller re-raises the same class where it can import it.
RpcError fromPython(py::error_already_set& e) {
  py::gil_scoped_acquire gil;
  py::handle type = e.type();
  std::string name = py::str(type.attr("__module__")).cast<std::string>() + "." +
                     py::str(type.attr("__qualname__")).cast<std::string>();
  return RpcError(ErrorKind::kRemote, py::str(e.value()).cast<std::string>(), name, e.what());
}

// `fn` run under the GIL with the stack as Python values; its result is
// converted to the schema's return type.
std::shared_ptr<Callable> pythonCallable(const std::string& schemaText, py::function fn) {
  c10::FunctionSchema schema = torch::jit::parseSchema(schemaText);
  if (schema.returns().size() != 1) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: a Python-run callable returns exactly one value: " + schemaText);
  }
  c10::TypePtr returns = schema.returns()[0].type();
  auto held = holdPython(std::move(fn));
  auto run = [held, returns](std::vector<c10::IValue>& stack) {
    py::gil_scoped_acquire gil;
    try {
      py::tuple args(stack.size());
      for (size_t i = 0; i < stack.size(); ++i) args[i] = torch::jit::toPyObject(std::move(stack[i]));
      stack.clear();
      py::object result = (*held)(*args);
      stack.push_back(torch::jit::toIValue(result, returns));
    } catch (py::error_already_set& e) {
      throw fromPython(e);
    }
  };
  return std::make_shared<Callable>(std::move(schema), std::move(run), false);
}

}  // namespace

void initCompiledBindings(py::module_& m) {
  py::class_<Callable, std::shared_ptr<Callable>>(m, "Callable", "A function a worker can serve by name.")
      .def_property_readonly("schema", [](const Callable& c) { return toString(c.schema()); });
  py::class_<AotiLoader, std::shared_ptr<AotiLoader>>(m, "AotiPackage", "A loaded AOTInductor package.")
      .def("call_spec", &AotiLoader::get_call_spec, "[input spec, output spec] as serialized pytree specs")
      .def(
          "callable",
          [](std::shared_ptr<AotiLoader> self, const std::string& schema, const std::string& plan) {
            return aotiCallable(std::move(self), torch::jit::parseSchema(schema), plan);
          },
          py::arg("schema"), py::arg("output_plan"),
          "The package as a Callable run in C++ (see agent/aoti_callable.h).");
  m.def("load_aoti_package", &loadAotiPackage, py::arg("path"), py::arg("model_name"), py::arg("num_runners"),
        py::call_guard<py::gil_scoped_release>(), "Loads an AOTInductor package (.pt2) once.");
  m.def("python_callable", &pythonCallable, py::arg("schema"), py::arg("fn"),
        "`fn` as a Callable with `schema`; each call takes the GIL.");
  m.def(
      "code_id",
      [](const at::Tensor& archive) {
        TORCH_CHECK(archive.dim() == 1 && archive.scalar_type() == at::kByte && archive.is_contiguous(),
                    "code_id takes a 1-D contiguous uint8 tensor");
        return codeId(archive.data_ptr(), archive.numel());
      },
      "\"sha256:<hex>\" of an archive's bytes: the name code shipped by value goes by.");
  m.def(
      "set_code_loader",
      [](Agent& agent, py::function loader) {
        auto held = holdPython(std::move(loader));
        agent.codeCache().setLoader(
            [held](const std::string& kind, const at::Tensor& archive, const std::string& id) {
              py::gil_scoped_acquire gil;
              try {
                return (*held)(kind, archive, id).cast<std::shared_ptr<Callable>>();
              } catch (py::error_already_set& e) {
                throw RpcError(ErrorKind::kArgument, "torchrpc: code archive " + id + " (" + kind +
                                                         ") does not load: " + py::str(e.value()).cast<std::string>());
              }
            });
      },
      "Installs loader(kind, archive, id) -> Callable for shipped code C++ cannot load itself.");
}

}  // namespace torchrpc
