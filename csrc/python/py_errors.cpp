#include "python/py_errors.h"

#include <pybind11/pybind11.h>

#include "errors.h"

namespace py = pybind11;

namespace torchrpc {
namespace {

const char* className(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kDecode: return "DecodeError";
    case ErrorKind::kTimeout: return "RpcTimeoutError";
    case ErrorKind::kRemote: return "RemoteError";
    case ErrorKind::kPeerLost: return "PeerLostError";
    case ErrorKind::kShutdown: return "RpcShutdownError";
    case ErrorKind::kArgument: return "ArgumentError";
    case ErrorKind::kNotFound: return "FunctionNotFoundError";
    case ErrorKind::kForbidden: return "PythonCallDisabledError";
    case ErrorKind::kAuth: return "AuthenticationError";
    case ErrorKind::kCancelled: return "RpcCancelledError";
    case ErrorKind::kCodeRefused: return "CodeRefusedError";
    case ErrorKind::kRpc: break;
  }
  return "RpcError";
}

void raise(const RpcError& e) {
  // torchrpc.errors.make_error builds the exception (including the
  // remote-class lookup), which keeps that policy in Python, in one place.
  try {
    auto errors = py::module_::import("torchrpc.errors");
    py::object exc = errors.attr("make_error")(className(e.kind()), e.what(), e.remoteType(),
                                                e.remoteTraceback());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  } catch (py::error_already_set& err) {
    err.restore();
  }
}

}  // namespace

void registerErrorTranslator() {
  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    try {
      std::rethrow_exception(p);
    } catch (const RpcError& e) {
      raise(e);
    }
  });
}

}  // namespace torchrpc
