#include "messages/script_call.h"

namespace torchrpc {

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
