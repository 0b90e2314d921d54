// The Python face of torchrpc._C: message encode/decode for tests and tools,
// the agent (agent_bindings), and the translation of RpcError into the
// Python exception classes defined in torchrpc/errors.py.

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include "messages/message.h"
#include "python/py_errors.h"
#include "wire/frame.h"

namespace py = pybind11;

namespace torchrpc {
namespace {

c10::IValue fieldToIValue(const FieldSpec& spec, py::handle value, py::handle typeOverride);

// A wrapped command is given from Python as (type, [(value, type_or_None), ...]).
c10::IValue wrappedToIValue(py::handle obj) {
  auto pair = obj.cast<py::tuple>();
  auto type = static_cast<MessageType>(pair[0].cast<int>());
  auto items = pair[1].cast<py::list>();
  const MessageSpec& spec = specFor(type);
  if (items.size() != spec.fields.size()) {
    throw RpcError(ErrorKind::kArgument, spec.className + " takes " +
                                             std::to_string(spec.fields.size()) + " fields");
  }
  std::vector<c10::IValue> fields;
  for (size_t i = 0; i < items.size(); ++i) {
    auto item = items[i].cast<py::tuple>();
    fields.push_back(fieldToIValue(spec.fields[i], item[0], item[1]));
  }
  // Round through the class (checking the fields first) so its constructor sees them.
  c10::IValue wrapped(c10::ivalue::Tuple::create(
      c10::IValue(static_cast<int64_t>(type)), c10::IValue(c10::ivalue::Tuple::create(std::move(fields)))));
  try {
    return wrapCommand(unwrapCommand(wrapped));
  } catch (const RpcError& e) {
    throw RpcError(ErrorKind::kArgument, e.what());
  }
}

c10::IValue fieldToIValue(const FieldSpec& spec, py::handle value, py::handle typeOverride) {
  if (spec.isWrappedCommand) return wrappedToIValue(value);
  c10::TypePtr type = spec.type;
  if (!typeOverride.is_none()) type = typeOverride.cast<c10::TypePtr>();
  try {
    return torch::jit::toIValue(value, type);
  } catch (const std::exception& e) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: field '" + spec.name + "' cannot be sent as " +
                                             type->annotation_str() + ": " + e.what());
  }
}

py::object fieldsToPython(const MessageSpec& spec, std::vector<c10::IValue>&& fields);

py::object wrappedToPython(const c10::IValue& wrapped) {
  auto command = unwrapCommand(wrapped);
  const MessageSpec& spec = specFor(command->type());
  return py::make_tuple(static_cast<int>(command->type()),
                        fieldsToPython(spec, std::move(*command).fields()));
}

// [(value, annotation of the value's type), ...]; wrapped commands nest.
py::object fieldsToPython(const MessageSpec& spec, std::vector<c10::IValue>&& fields) {
  py::list out;
  for (size_t i = 0; i < fields.size(); ++i) {
    if (spec.fields[i].isWrappedCommand) {
      out.append(py::make_tuple(wrappedToPython(fields[i]), py::none()));
    } else {
      out.append(py::make_tuple(torch::jit::toPyObject(fields[i]),
                                fields[i].type()->annotation_str()));
    }
  }
  return out;
}

py::bytes encodeMessage(int type, int64_t id, const py::list& items) {
  if (type < 1 || type > kMaxMessageType) {
    throw RpcError(ErrorKind::kArgument, "unknown message type " + std::to_string(type));
  }
  auto wrapped = wrappedToIValue(py::make_tuple(type, items));
  auto command = unwrapCommand(wrapped);
  Message m = std::move(*command).toMessage();
  m.id = id;
  // One copy: tensor bytes go straight from the tensors into the bytes object.
  EncodedFrame frame = encodeFrame(m);
  auto out = py::reinterpret_steal<py::bytes>(
      PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(frame.totalBytes)));
  if (!out) throw py::error_already_set();
  char* dst = PyBytes_AS_STRING(out.ptr());
  {
    py::gil_scoped_release release;  // nobody else can see `out` yet
    for (const auto& chunk : frame.chunks) {
      std::memcpy(dst, chunk.data, chunk.size);
      dst += chunk.size;
    }
  }
  return out;
}

py::tuple decodeMessage(const py::buffer& data) {
  py::buffer_info info = data.request();
  std::unique_ptr<RpcCommand> command;
  Message m;
  {
    py::gil_scoped_release release;
    m = frameFromBytes(static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize));
    command = commandFromMessage(m);
  }
  const MessageSpec& spec = specFor(m.type);
  return py::make_tuple(static_cast<int>(m.type), m.id, fieldsToPython(spec, std::move(*command).fields()));
}

py::list messageSpecs() {
  py::list out;
  for (const MessageSpec& spec : allSpecs()) {
    py::list fields;
    for (const FieldSpec& f : spec.fields) {
      fields.append(py::make_tuple(f.name, f.isWrappedCommand ? "Message" : f.type->annotation_str()));
    }
    out.append(py::make_tuple(static_cast<int>(spec.type), messageTypeName(spec.type), spec.className, fields));
  }
  return out;
}

}  // namespace

void initAgentBindings(py::module_& m);
void initCompiledBindings(py::module_& m);

}  // namespace torchrpc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace torchrpc;
  registerErrorTranslator();
  m.def("message_specs", &messageSpecs,
        "[(type value, TYPE_NAME, ClassName, [(field, TorchScript type), ...]), ...]");
  m.def("encode_message", &encodeMessage, py::arg("type"), py::arg("id"), py::arg("fields"),
        "Encodes one frame; fields are [(value, type override or None), ...].");
  m.def("decode_message", &decodeMessage, py::arg("data"),
        "Decodes one frame into (type, id, [(value, type annotation), ...]).");
  m.def("frame_header_bytes", [] { return kFrameHeaderBytes; });
  initCompiledBindings(m);
  initAgentBindings(m);
}
