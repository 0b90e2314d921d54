#include "messages/script_call.h"

#include "wire/byte_io.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {

std::optional<std::string> ScriptCall::peekName(const Message& m) {
  if (m.type != MessageType::kScriptCall && m.type != MessageType::kScriptRemoteCall) return std::nullopt;
  try {
    Reader r(m.payload.data(), m.payload.size());
    if (r.u32() < 1) return std::nullopt;
    c10::IValue name = decodeIValue(r, m.tensors, nullptr);  // a name holds no objects
    if (name.isString()) return name.toStringRef();
  } catch (const std::exception&) {
  }
  return std::nullopt;  // the full decode, on a worker thread, reports what is wrong
}

std::vector<c10::IValue> ScriptCall::fields() && {
  return {c10::IValue(std::move(qualifiedName_)),
          c10::IValue(c10::ivalue::Tuple::create(std::move(stack_))), c10::IValue(isAsync_)};
}

std::unique_ptr<ScriptCall> ScriptCall::fromMessage(const Message& m, const ObjectCodec* objects) {
  return fromFields(decodeFields(m, MessageType::kScriptCall, objects));
}

std::unique_ptr<ScriptCall> ScriptCall::fromFields(std::vector<c10::IValue>&& f) {
  return std::make_unique<ScriptCall>(f[0].toStringRef(), f[1].toTupleRef().elements().vec(),
                                      f[2].toBool());
}

std::unique_ptr<ScriptRet> ScriptRet::fromMessage(const Message& m, const ObjectCodec* objects) {
  return fromFields(decodeFields(m, MessageType::kScriptRet, objects));
}

std::unique_ptr<ScriptRet> ScriptRet::fromFields(std::vector<c10::IValue>&& f) {
  return std::make_unique<ScriptRet>(std::move(f[0]));
}

std::vector<c10::IValue> ScriptRemoteCall::fields() && {
  auto f = std::move(static_cast<ScriptCall&>(*this)).ScriptCall::fields();
  f.push_back(rrefId_.toIValue());
  f.push_back(forkId_.toIValue());
  return f;
}

std::unique_ptr<ScriptRemoteCall> ScriptRemoteCall::fromMessage(const Message& m, const ObjectCodec* objects) {
  return fromFields(decodeFields(m, MessageType::kScriptRemoteCall, objects));
}

std::unique_ptr<ScriptRemoteCall> ScriptRemoteCall::fromFields(std::vector<c10::IValue>&& f) {
  return std::make_unique<ScriptRemoteCall>(
      f[0].toStringRef(), f[1].toTupleRef().elements().vec(), f[2].toBool(),
      GloballyUniqueId::fromIValue(f[3]), GloballyUniqueId::fromIValue(f[4]));
}

}  // namespace torchrpc
