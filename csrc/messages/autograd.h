#pragma once

// Distributed autograd and profiling messages. The wrapping ones carry a whole
// other command (as wrapCommand's (type, fields) tuple), so any request can
// be sent with autograd metadata or under the profiler.

#include "messages/rref_proto.h"

namespace torchrpc {

// FORWARD_AUTOGRAD_REQ / FORWARD_AUTOGRAD_RESP: `wrapped` sent from worker
// `fromWorkerId` within autograd context `contextId`; `messageId` names the
// send/recv pair in that context, `deviceMap` maps the sender's devices to
// the receiver's.
template <MessageType kType>
class RpcWithAutograd : public RpcCommand {
 public:
  RpcWithAutograd(int64_t fromWorkerId, int64_t contextId, int64_t messageId,
                  c10::Dict<std::string, std::string> deviceMap,
                  std::unique_ptr<RpcCommand> wrapped)
      : fromWorkerId_(fromWorkerId),
        contextId_(contextId),
        messageId_(messageId),
        deviceMap_(std::move(deviceMap)),
        wrapped_(std::move(wrapped)) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override {
    return {c10::IValue(fromWorkerId_), c10::IValue(contextId_), c10::IValue(messageId_),
            c10::IValue(deviceMap_), wrapCommand(std::move(wrapped_))};
  }
  static std::unique_ptr<RpcWithAutograd> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<RpcWithAutograd> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RpcWithAutograd>(
        f[0].toInt(), f[1].toInt(), f[2].toInt(),
        c10::impl::toTypedDict<std::string, std::string>(f[3].toGenericDict()),
        unwrapCommand(f[4]));
  }
  int64_t fromWorkerId() const { return fromWorkerId_; }
  int64_t contextId() const { return contextId_; }
  int64_t messageId() const { return messageId_; }
  std::unique_ptr<RpcCommand>& wrapped() { return wrapped_; }

 private:
  int64_t fromWorkerId_;
  int64_t contextId_;
  int64_t messageId_;
  c10::Dict<std::string, std::string> deviceMap_;
  std::unique_ptr<RpcCommand> wrapped_;
};

using ForwardAutogradReq = RpcWithAutograd<MessageType::kForwardAutogradReq>;
using ForwardAutogradResp = RpcWithAutograd<MessageType::kForwardAutogradResp>;

// BACKWARD_AUTOGRAD_REQ: gradients flowing back from worker `fromWorkerId`
// within context `contextId`, for the receiver's send functions: autograd
// message id -> one gradient per tensor that message sent with
// requires_grad. One request carries everything one backward pass of the
// sender produced for the receiver, so the receiver runs its part of the
// graph once for all of them.
class BackwardAutogradReq : public RpcCommand {
 public:
  using Grads = c10::Dict<int64_t, c10::List<at::Tensor>>;
  BackwardAutogradReq(int64_t contextId, int64_t fromWorkerId, Grads grads)
      : contextId_(contextId), fromWorkerId_(fromWorkerId), grads_(std::move(grads)) {}
  MessageType type() const override { return MessageType::kBackwardAutogradReq; }
  std::vector<c10::IValue> fields() && override {
    return {c10::IValue(contextId_), c10::IValue(fromWorkerId_), c10::IValue(std::move(grads_))};
  }
  static std::unique_ptr<BackwardAutogradReq> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kBackwardAutogradReq, objects));
  }
  static std::unique_ptr<BackwardAutogradReq> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<BackwardAutogradReq>(
        f[0].toInt(), f[1].toInt(), c10::impl::toTypedDict<int64_t, c10::List<at::Tensor>>(f[2].toGenericDict()));
  }
  int64_t contextId() const { return contextId_; }
  int64_t fromWorkerId() const { return fromWorkerId_; }
  const Grads& grads() const { return grads_; }

 private:
  int64_t contextId_;
  int64_t fromWorkerId_;
  Grads grads_;
};

using BackwardAutogradResp = EmptyCommand<MessageType::kBackwardAutogradResp>;

// Messages that carry one integer: an autograd context id (cleanup), the id
// of a request the caller gave up on (CANCEL), a worker id (SHUTDOWN_NOTICE).
template <MessageType kType>
class IntCommand : public RpcCommand {
 public:
  explicit IntCommand(int64_t value) : value_(value) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override { return {c10::IValue(value_)}; }
  static std::unique_ptr<IntCommand> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<IntCommand> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<IntCommand>(f[0].toInt());
  }
  int64_t value() const { return value_; }

 private:
  int64_t value_;
};

using CleanupAutogradContextReq = IntCommand<MessageType::kCleanupAutogradContextReq>;
using CleanupAutogradContextResp = EmptyCommand<MessageType::kCleanupAutogradContextResp>;

// RUN_WITH_PROFILING_REQ / _RESP: `wrapped` run under the profiler; the
// request carries the profiler config, the response the recorded events,
// both serialized as strings, and `profilingKey` pairs them.
template <MessageType kType>
class RunWithProfiling : public RpcCommand {
 public:
  RunWithProfiling(std::string profilerData, GloballyUniqueId profilingKey,
                   std::unique_ptr<RpcCommand> wrapped)
      : profilerData_(std::move(profilerData)), profilingKey_(profilingKey), wrapped_(std::move(wrapped)) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override {
    return {c10::IValue(std::move(profilerData_)), profilingKey_.toIValue(),
            wrapCommand(std::move(wrapped_))};
  }
  static std::unique_ptr<RunWithProfiling> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<RunWithProfiling> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RunWithProfiling>(f[0].toStringRef(), GloballyUniqueId::fromIValue(f[1]),
                                              unwrapCommand(f[2]));
  }
  const std::string& profilerData() const { return profilerData_; }
  std::unique_ptr<RpcCommand>& wrapped() { return wrapped_; }

 private:
  std::string profilerData_;
  GloballyUniqueId profilingKey_;
  std::unique_ptr<RpcCommand> wrapped_;
};

using RunWithProfilingReq = RunWithProfiling<MessageType::kRunWithProfilingReq>;
using RunWithProfilingResp = RunWithProfiling<MessageType::kRunWithProfilingResp>;

// RREF_BACKWARD_REQ: run backward from the value of `rrefId` on its owner.
class RRefBackwardReq : public RpcCommand {
 public:
  RRefBackwardReq(RRefId rrefId, int64_t contextId, bool retainGraph)
      : rrefId_(rrefId), contextId_(contextId), retainGraph_(retainGraph) {}
  MessageType type() const override { return MessageType::kRRefBackwardReq; }
  std::vector<c10::IValue> fields() && override {
    return {rrefId_.toIValue(), c10::IValue(contextId_), c10::IValue(retainGraph_)};
  }
  static std::unique_ptr<RRefBackwardReq> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kRRefBackwardReq, objects));
  }
  static std::unique_ptr<RRefBackwardReq> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RRefBackwardReq>(GloballyUniqueId::fromIValue(f[0]), f[1].toInt(),
                                             f[2].toBool());
  }
  const RRefId& rrefId() const { return rrefId_; }
  int64_t contextId() const { return contextId_; }
  bool retainGraph() const { return retainGraph_; }

 private:
  RRefId rrefId_;
  int64_t contextId_;
  bool retainGraph_;
};

using RRefBackwardResp = EmptyCommand<MessageType::kRRefBackwardResp>;

}  // namespace torchrpc
