// The catalog: each message type's field spec, and the dispatch from a
// MessageType to its class. Adding a message type means adding it here, to
// message_type.h, and to the round-trip strategies (a test checks all three).

#include "messages/message.h"

#include "messages/control.h"
#include "messages/python_call.h"
#include "messages/script_call.h"
#include "messages/with_code.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {

c10::IValue GloballyUniqueId::toIValue() const {
  return c10::IValue(c10::ivalue::Tuple::create(c10::IValue(createdOn), c10::IValue(localId)));
}

GloballyUniqueId GloballyUniqueId::fromIValue(const c10::IValue& v) {
  const auto& e = v.toTupleRef().elements();
  return {e.at(0).toInt(), e.at(1).toInt()};
}

std::string GloballyUniqueId::str() const {
  return "(" + std::to_string(createdOn) + ", " + std::to_string(localId) + ")";
}

Message RpcCommand::toMessage(const ObjectCodec* objects) && {
  Message m;
  m.type = type();
  std::vector<c10::IValue> f = std::move(*this).fields();
  Writer w(m.payload);
  w.u32(Writer::checkedLength(f.size()));
  for (const auto& v : f) encodeIValue(v, w, m.tensors, objects);
  return m;
}

namespace {

void checkFields(const std::vector<c10::IValue>& f, const MessageSpec& spec) {
  if (f.size() != spec.fields.size()) {
    throwDecode(spec.className + " has " + std::to_string(f.size()) + " fields, expected " +
                std::to_string(spec.fields.size()));
  }
  for (size_t i = 0; i < f.size(); ++i) {
    const FieldSpec& fs = spec.fields[i];
    if (fs.isWrappedCommand) {
      bool ok = f[i].isTuple() && f[i].toTupleRef().elements().size() == 2 &&
                f[i].toTupleRef().elements()[0].isInt() && f[i].toTupleRef().elements()[1].isTuple();
      if (!ok) throwDecode(spec.className + "." + fs.name + " is not a wrapped message");
    } else if (!valueMatchesType(f[i], fs.type)) {
      throwDecode(spec.className + "." + fs.name + " holds " + f[i].type()->annotation_str() +
                  ", expected " + fs.type->annotation_str());
    }
  }
  if ((spec.type == MessageType::kScriptCall || spec.type == MessageType::kScriptRemoteCall) &&
      !f[1].isTuple()) {
    throwDecode(spec.className + ".args is not a tuple");
  }
}

std::vector<MessageSpec> buildSpecs() {
  auto str = c10::StringType::get();
  auto any = c10::AnyType::get();
  auto boolean = c10::BoolType::get();
  auto integer = c10::IntType::get();
  auto tensor = c10::TensorType::get();
  auto tensors = c10::ListType::ofTensors();
  auto id = c10::TupleType::create({integer, integer});
  auto devices = c10::DictType::create(str, str);
  FieldSpec wrapped{"wrapped", any, true};
  using T = MessageType;
  std::vector<MessageSpec> s = {
      {T::kScriptCall, "ScriptCall", {{"qualified_name", str}, {"args", any}, {"is_async", boolean}}},
      {T::kScriptRet, "ScriptRet", {{"value", any}}},
      {T::kPythonCall, "PythonCall", {{"pickled", tensor}, {"tensors", tensors}, {"is_async", boolean}}},
      {T::kPythonRet, "PythonRet", {{"pickled", tensor}, {"tensors", tensors}}},
      {T::kScriptRemoteCall, "ScriptRemoteCall",
       {{"qualified_name", str}, {"args", any}, {"is_async", boolean}, {"rref_id", id}, {"fork_id", id}}},
      {T::kPythonRemoteCall, "PythonRemoteCall",
       {{"pickled", tensor}, {"tensors", tensors}, {"is_async", boolean}, {"rref_id", id}, {"fork_id", id}}},
      {T::kRemoteRet, "RemoteRet", {{"rref_id", id}, {"fork_id", id}}},
      {T::kScriptRRefFetchCall, "ScriptRRefFetchCall", {{"rref_id", id}, {"from_worker_id", integer}}},
      {T::kPythonRRefFetchCall, "PythonRRefFetchCall", {{"rref_id", id}, {"from_worker_id", integer}}},
      {T::kScriptRRefFetchRet, "ScriptRRefFetchRet", {{"value", any}}},
      {T::kPythonRRefFetchRet, "PythonRRefFetchRet", {{"pickled", tensor}, {"tensors", tensors}}},
      {T::kRRefUserDelete, "RRefUserDelete", {{"rref_id", id}, {"fork_id", id}}},
      {T::kRRefForkRequest, "RRefForkRequest", {{"rref_id", id}, {"fork_id", id}}},
      {T::kRRefChildAccept, "RRefChildAccept", {{"fork_id", id}}},
      {T::kRRefAck, "RRefAck", {}},
      {T::kForwardAutogradReq, "ForwardAutogradReq",
       {{"from_worker_id", integer}, {"context_id", integer}, {"message_id", integer},
        {"device_map", devices}, wrapped}},
      {T::kForwardAutogradResp, "ForwardAutogradResp",
       {{"from_worker_id", integer}, {"context_id", integer}, {"message_id", integer},
        {"device_map", devices}, wrapped}},
      {T::kBackwardAutogradReq, "BackwardAutogradReq",
       {{"context_id", integer}, {"from_worker_id", integer},
        {"grads", c10::DictType::create(integer, tensors)}}},
      {T::kBackwardAutogradResp, "BackwardAutogradResp", {}},
      {T::kCleanupAutogradContextReq, "CleanupAutogradContextReq", {{"context_id", integer}}},
      {T::kCleanupAutogradContextResp, "CleanupAutogradContextResp", {}},
      {T::kRunWithProfilingReq, "RunWithProfilingReq",
       {{"profiler_config", str}, {"profiling_key", id}, wrapped}},
      {T::kRunWithProfilingResp, "RunWithProfilingResp",
       {{"profiled_events", str}, {"profiling_key", id}, wrapped}},
      {T::kRRefBackwardReq, "RRefBackwardReq",
       {{"rref_id", id}, {"context_id", integer}, {"retain_graph", boolean}}},
      {T::kRRefBackwardResp, "RRefBackwardResp", {}},
      {T::kException, "RemoteException", {{"error_type", str}, {"message", str}, {"traceback", str}}},
      {T::kHandshake, "Handshake", {{"worker_name", str}, {"worker_id", integer}, {"protocol_version", integer}}},
      {T::kHeartbeat, "Heartbeat", {}},
      {T::kCancel, "Cancel", {{"message_id", integer}}},
      {T::kSchemaQuery, "SchemaQuery", {{"qualified_name", str}}},
      {T::kSchemaRet, "SchemaRet", {{"schema", str}}},
      {T::kShutdownNotice, "ShutdownNotice", {{"worker_id", integer}}},
      {T::kCancelRet, "CancelRet", {{"never_ran", boolean}}},
      {T::kWithCode, "WithCode", {{"code_id", str}, {"kind", str}, {"archive", tensor}, wrapped}},
  };
  TORCH_INTERNAL_ASSERT(s.size() == kMaxMessageType, "a MessageType has no spec");
  for (size_t i = 0; i < s.size(); ++i) {
    TORCH_INTERNAL_ASSERT(static_cast<size_t>(s[i].type) == i + 1, "specs out of order");
  }
  return s;
}

}  // namespace

const std::vector<MessageSpec>& allSpecs() {
  static const std::vector<MessageSpec> specs = buildSpecs();
  return specs;
}

const MessageSpec& specFor(MessageType type) {
  return allSpecs().at(static_cast<size_t>(type) - 1);
}

std::vector<c10::IValue> decodeFields(const Message& message, MessageType expected, const ObjectCodec* objects) {
  if (message.type != expected) {
    throwDecode("expected a " + messageTypeName(expected) + " message, got " +
                std::to_string(static_cast<int>(message.type)));
  }
  Reader r(message.payload.data(), message.payload.size());
  uint32_t n = r.count(1, "fields");
  std::vector<c10::IValue> f;
  f.reserve(n);
  try {
    for (uint32_t i = 0; i < n; ++i) f.push_back(decodeIValue(r, message.tensors, objects));
  } catch (const RpcError&) {
    throw;
  } catch (const std::exception& e) {
    throwDecode(std::string("payload: ") + e.what());
  }
  if (r.remaining() != 0) throwDecode("trailing bytes after the payload's fields");
  checkFields(f, specFor(expected));
  return f;
}

Message wrappedMessage(Message&& outer, MessageType type, size_t offset) {
  Message inner;
  inner.type = type;
  inner.id = outer.id;
  inner.payload = outer.payload.substr(offset);
  inner.tensors = std::move(outer.tensors);
  return inner;
}

c10::IValue wrapCommand(std::unique_ptr<RpcCommand> command) {
  auto type = static_cast<int64_t>(command->type());
  auto fields = std::move(*command).fields();
  return c10::IValue(c10::ivalue::Tuple::create(
      c10::IValue(type), c10::IValue(c10::ivalue::Tuple::create(std::move(fields)))));
}

std::unique_ptr<RpcCommand> unwrapCommand(const c10::IValue& wrapped) {
  const auto& e = wrapped.toTupleRef().elements();
  int64_t type = e.at(0).toInt();
  if (type < 0 || type > UINT16_MAX || !isKnownMessageType(static_cast<uint16_t>(type))) {
    throwDecode("wrapped message has unknown type " + std::to_string(type));
  }
  auto fields = e.at(1).toTupleRef().elements().vec();
  checkFields(fields, specFor(static_cast<MessageType>(type)));
  return commandFromFields(static_cast<MessageType>(type), std::move(fields));
}

std::unique_ptr<RpcCommand> commandFromFields(MessageType type, std::vector<c10::IValue>&& f) {
  using T = MessageType;
  switch (type) {
    case T::kScriptCall: return ScriptCall::fromFields(std::move(f));
    case T::kScriptRet: return ScriptRet::fromFields(std::move(f));
    case T::kPythonCall: return PythonCall::fromFields(std::move(f));
    case T::kPythonRet: return PythonRet::fromFields(std::move(f));
    case T::kScriptRemoteCall: return ScriptRemoteCall::fromFields(std::move(f));
    case T::kPythonRemoteCall: return PythonRemoteCall::fromFields(std::move(f));
    case T::kRemoteRet: return RemoteRet::fromFields(std::move(f));
    case T::kScriptRRefFetchCall: return ScriptRRefFetchCall::fromFields(std::move(f));
    case T::kPythonRRefFetchCall: return PythonRRefFetchCall::fromFields(std::move(f));
    case T::kScriptRRefFetchRet: return ScriptRRefFetchRet::fromFields(std::move(f));
    case T::kPythonRRefFetchRet: return PythonRRefFetchRet::fromFields(std::move(f));
    case T::kRRefUserDelete: return RRefUserDelete::fromFields(std::move(f));
    case T::kRRefForkRequest: return RRefForkRequest::fromFields(std::move(f));
    case T::kRRefChildAccept: return RRefChildAccept::fromFields(std::move(f));
    case T::kRRefAck: return RRefAck::fromFields(std::move(f));
    case T::kForwardAutogradReq: return ForwardAutogradReq::fromFields(std::move(f));
    case T::kForwardAutogradResp: return ForwardAutogradResp::fromFields(std::move(f));
    case T::kBackwardAutogradReq: return BackwardAutogradReq::fromFields(std::move(f));
    case T::kBackwardAutogradResp: return BackwardAutogradResp::fromFields(std::move(f));
    case T::kCleanupAutogradContextReq: return CleanupAutogradContextReq::fromFields(std::move(f));
    case T::kCleanupAutogradContextResp: return CleanupAutogradContextResp::fromFields(std::move(f));
    case T::kRunWithProfilingReq: return RunWithProfilingReq::fromFields(std::move(f));
    case T::kRunWithProfilingResp: return RunWithProfilingResp::fromFields(std::move(f));
    case T::kRRefBackwardReq: return RRefBackwardReq::fromFields(std::move(f));
    case T::kRRefBackwardResp: return RRefBackwardResp::fromFields(std::move(f));
    case T::kException: return RemoteException::fromFields(std::move(f));
    case T::kHandshake: return Handshake::fromFields(std::move(f));
    case T::kHeartbeat: return Heartbeat::fromFields(std::move(f));
    case T::kCancel: return Cancel::fromFields(std::move(f));
    case T::kSchemaQuery: return SchemaQuery::fromFields(std::move(f));
    case T::kSchemaRet: return SchemaRet::fromFields(std::move(f));
    case T::kShutdownNotice: return ShutdownNotice::fromFields(std::move(f));
    case T::kCancelRet: return CancelRet::fromFields(std::move(f));
    case T::kWithCode: return WithCode::fromFields(std::move(f));
  }
  throwDecode("unknown message type " + std::to_string(static_cast<int>(type)));
}

std::unique_ptr<RpcCommand> commandFromMessage(const Message& message, const ObjectCodec* objects) {
  try {
    return commandFromFields(message.type, decodeFields(message, message.type, objects));
  } catch (const RpcError&) {
    throw;
  } catch (const std::exception& e) {
    throwDecode(messageTypeName(message.type) + ": " + e.what());
  }
}

}  // namespace torchrpc
