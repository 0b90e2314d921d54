#pragma once

// The Python fallback. The pickle stream travels as a uint8 tensor, so its
// bytes go to the socket without a copy, and the tensors it references by
// index travel beside it. A worker unpickles only if it opted in.

#include "messages/message.h"

namespace torchrpc {

// The pickled bytes plus the tensors the pickle refers to, shared by all
// Python-carrying messages.
struct PickledValue {
  at::Tensor bytes;  // uint8, 1-D
  std::vector<at::Tensor> tensors;
};

// PYTHON_CALL (and PYTHON_RET, PYTHON_RREF_FETCH_RET, which carry no flag):
template <MessageType kType>
class PythonPayload : public RpcCommand {
 public:
  explicit PythonPayload(PickledValue value, bool isAsync = false)
      : value_(std::move(value)), isAsync_(isAsync) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override;
  static std::unique_ptr<PythonPayload> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<PythonPayload> fromFields(std::vector<c10::IValue>&& f);
  PickledValue& value() { return value_; }
  bool isAsync() const { return isAsync_; }

 private:
  PickledValue value_;
  bool isAsync_;
};

using PythonCall = PythonPayload<MessageType::kPythonCall>;
using PythonRet = PythonPayload<MessageType::kPythonRet>;
using PythonRRefFetchRet = PythonPayload<MessageType::kPythonRRefFetchRet>;

// PYTHON_REMOTE_CALL: a PythonCall whose result the callee owns as `rrefId`.
class PythonRemoteCall : public RpcCommand {
 public:
  PythonRemoteCall(PickledValue value, bool isAsync, RRefId rrefId, ForkId forkId)
      : value_(std::move(value)), isAsync_(isAsync), rrefId_(rrefId), forkId_(forkId) {}
  MessageType type() const override { return MessageType::kPythonRemoteCall; }
  std::vector<c10::IValue> fields() && override;
  static std::unique_ptr<PythonRemoteCall> fromMessage(const Message& m, const ObjectCodec* objects = nullptr);
  static std::unique_ptr<PythonRemoteCall> fromFields(std::vector<c10::IValue>&& f);
  PickledValue& value() { return value_; }
  bool isAsync() const { return isAsync_; }
  const RRefId& rrefId() const { return rrefId_; }
  const ForkId& forkId() const { return forkId_; }

 private:
  PickledValue value_;
  bool isAsync_;
  RRefId rrefId_;
  ForkId forkId_;
};

}  // namespace torchrpc
