#pragma once

// The RRef protocol's control messages. An RRef is owned by the worker that
// holds its value; every other holder is a user, named by a fork id. The
// owner frees the value when no user and no pending fork remains.

#include "messages/message.h"

namespace torchrpc {

// REMOTE_RET: the owner created RRef `rrefId` for the user fork `forkId`.
// RREF_USER_DELETE: user fork `forkId` of `rrefId` was dropped.
// RREF_FORK_REQUEST: a child fork `forkId` of `rrefId` asks the owner to record it.
template <MessageType kType>
class RRefForkMessage : public RpcCommand {
 public:
  RRefForkMessage(RRefId rrefId, ForkId forkId) : rrefId_(rrefId), forkId_(forkId) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override { return {rrefId_.toIValue(), forkId_.toIValue()}; }
  static std::unique_ptr<RRefForkMessage> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<RRefForkMessage> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RRefForkMessage>(GloballyUniqueId::fromIValue(f[0]),
                                             GloballyUniqueId::fromIValue(f[1]));
  }
  const RRefId& rrefId() const { return rrefId_; }
  const ForkId& forkId() const { return forkId_; }

 private:
  RRefId rrefId_;
  ForkId forkId_;
};

using RemoteRet = RRefForkMessage<MessageType::kRemoteRet>;
using RRefUserDelete = RRefForkMessage<MessageType::kRRefUserDelete>;
using RRefForkRequest = RRefForkMessage<MessageType::kRRefForkRequest>;

// SCRIPT_RREF_FETCH_CALL / PYTHON_RREF_FETCH_CALL: worker `fromWorkerId`
// asks the owner for the value of `rrefId`.
template <MessageType kType>
class RRefFetchCall : public RpcCommand {
 public:
  RRefFetchCall(RRefId rrefId, int64_t fromWorkerId) : rrefId_(rrefId), fromWorkerId_(fromWorkerId) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override { return {rrefId_.toIValue(), c10::IValue(fromWorkerId_)}; }
  static std::unique_ptr<RRefFetchCall> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<RRefFetchCall> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RRefFetchCall>(GloballyUniqueId::fromIValue(f[0]), f[1].toInt());
  }
  const RRefId& rrefId() const { return rrefId_; }
  int64_t fromWorkerId() const { return fromWorkerId_; }

 private:
  RRefId rrefId_;
  int64_t fromWorkerId_;
};

using ScriptRRefFetchCall = RRefFetchCall<MessageType::kScriptRRefFetchCall>;
using PythonRRefFetchCall = RRefFetchCall<MessageType::kPythonRRefFetchCall>;

// SCRIPT_RREF_FETCH_RET: the TorchScript value an RRef names.
class ScriptRRefFetchRet : public RpcCommand {
 public:
  explicit ScriptRRefFetchRet(c10::IValue value) : value_(std::move(value)) {}
  MessageType type() const override { return MessageType::kScriptRRefFetchRet; }
  std::vector<c10::IValue> fields() && override { return {std::move(value_)}; }
  static std::unique_ptr<ScriptRRefFetchRet> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kScriptRRefFetchRet, objects));
  }
  static std::unique_ptr<ScriptRRefFetchRet> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<ScriptRRefFetchRet>(std::move(f[0]));
  }
  c10::IValue& value() { return value_; }

 private:
  c10::IValue value_;
};

// RREF_CHILD_ACCEPT: the owner recorded child fork `forkId`; its parent may
// now drop the reference it kept alive for the child.
class RRefChildAccept : public RpcCommand {
 public:
  explicit RRefChildAccept(ForkId forkId) : forkId_(forkId) {}
  MessageType type() const override { return MessageType::kRRefChildAccept; }
  std::vector<c10::IValue> fields() && override { return {forkId_.toIValue()}; }
  static std::unique_ptr<RRefChildAccept> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kRRefChildAccept, objects));
  }
  static std::unique_ptr<RRefChildAccept> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RRefChildAccept>(GloballyUniqueId::fromIValue(f[0]));
  }
  const ForkId& forkId() const { return forkId_; }

 private:
  ForkId forkId_;
};

// Messages with no fields: acknowledgements and probes.
template <MessageType kType>
class EmptyCommand : public RpcCommand {
 public:
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override { return {}; }
  static std::unique_ptr<EmptyCommand> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<EmptyCommand> fromFields(std::vector<c10::IValue>&&) {
    return std::make_unique<EmptyCommand>();
  }
};

// RREF_ACK: acknowledges an RRef control message.
using RRefAck = EmptyCommand<MessageType::kRRefAck>;

}  // namespace torchrpc
