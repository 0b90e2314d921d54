#pragma once

// Calls of registered TorchScript functions and builtin operators.

#include <optional>

#include "messages/message.h"

namespace torchrpc {

// SCRIPT_CALL: run `qualifiedName` (a registered TorchScript function, or an
// operator such as "aten::add.Tensor") on the complete positional stack.
class ScriptCall : public RpcCommand {
 public:
  ScriptCall(std::string qualifiedName, std::vector<c10::IValue> stack, bool isAsync = false)
      : qualifiedName_(std::move(qualifiedName)), stack_(std::move(stack)), isAsync_(isAsync) {}
  MessageType type() const override { return MessageType::kScriptCall; }
  std::vector<c10::IValue> fields() && override;
  static std::unique_ptr<ScriptCall> fromMessage(const Message& m, const ObjectCodec* objects = nullptr);
  static std::unique_ptr<ScriptCall> fromFields(std::vector<c10::IValue>&& f);
  // The function a SCRIPT_CALL (or SCRIPT_REMOTE_CALL) message names, read without decoding the rest
  // (the receiving thread decides from it where to run the call); nullopt if
  // it is not a well-formed SCRIPT_CALL.
  static std::optional<std::string> peekName(const Message& m);

  const std::string& qualifiedName() const { return qualifiedName_; }
  std::vector<c10::IValue>& stack() { return stack_; }
  bool isAsync() const { return isAsync_; }

 protected:
  std::string qualifiedName_;
  std::vector<c10::IValue> stack_;
  bool isAsync_;
};

// SCRIPT_RET: the one value a ScriptCall returned.
class ScriptRet : public RpcCommand {
 public:
  explicit ScriptRet(c10::IValue value) : value_(std::move(value)) {}
  MessageType type() const override { return MessageType::kScriptRet; }
  std::vector<c10::IValue> fields() && override { return {std::move(value_)}; }
  static std::unique_ptr<ScriptRet> fromMessage(const Message& m, const ObjectCodec* objects = nullptr);
  static std::unique_ptr<ScriptRet> fromFields(std::vector<c10::IValue>&& f);
  c10::IValue& value() { return value_; }

 private:
  c10::IValue value_;
};

// SCRIPT_REMOTE_CALL: a ScriptCall whose result the callee keeps as the
// owner of RRef `rrefId`; `forkId` names the caller's user reference.
class ScriptRemoteCall : public ScriptCall {
 public:
  ScriptRemoteCall(std::string qualifiedName, std::vector<c10::IValue> stack, bool isAsync,
                   RRefId rrefId, ForkId forkId)
      : ScriptCall(std::move(qualifiedName), std::move(stack), isAsync),
        rrefId_(rrefId),
        forkId_(forkId) {}
  MessageType type() const override { return MessageType::kScriptRemoteCall; }
  std::vector<c10::IValue> fields() && override;
  static std::unique_ptr<ScriptRemoteCall> fromMessage(const Message& m, const ObjectCodec* objects = nullptr);
  static std::unique_ptr<ScriptRemoteCall> fromFields(std::vector<c10::IValue>&& f);
  const RRefId& rrefId() const { return rrefId_; }
  const ForkId& forkId() const { return forkId_; }

 private:
  RRefId rrefId_;
  ForkId forkId_;
};

}  // namespace torchrpc
