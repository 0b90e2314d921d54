#pragma once

// The agent's own messages: errors, connection set-up, liveness, cancel,
// schema look-up, shutdown.

#include "messages/autograd.h"

namespace torchrpc {

// EXCEPTION: a request failed. `errorType` is the Python class name
// ("builtins.ValueError") or a torchrpc error kind; the caller rebuilds it.
class RemoteException : public RpcCommand {
 public:
  RemoteException(std::string errorType, std::string message, std::string traceback)
      : errorType_(std::move(errorType)), message_(std::move(message)), traceback_(std::move(traceback)) {}
  MessageType type() const override { return MessageType::kException; }
  std::vector<c10::IValue> fields() && override {
    return {c10::IValue(std::move(errorType_)), c10::IValue(std::move(message_)),
            c10::IValue(std::move(traceback_))};
  }
  static std::unique_ptr<RemoteException> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kException, objects));
  }
  static std::unique_ptr<RemoteException> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<RemoteException>(f[0].toStringRef(), f[1].toStringRef(), f[2].toStringRef());
  }
  const std::string& errorType() const { return errorType_; }
  const std::string& message() const { return message_; }
  const std::string& traceback() const { return traceback_; }

 private:
  std::string errorType_;
  std::string message_;
  std::string traceback_;
};

// HANDSHAKE: unused since protocol 2 (see message_type.h); kept so old
// frames still decode.
class Handshake : public RpcCommand {
 public:
  Handshake(std::string workerName, int64_t workerId, int64_t protocolVersion)
      : workerName_(std::move(workerName)), workerId_(workerId), protocolVersion_(protocolVersion) {}
  MessageType type() const override { return MessageType::kHandshake; }
  std::vector<c10::IValue> fields() && override {
    return {c10::IValue(std::move(workerName_)), c10::IValue(workerId_), c10::IValue(protocolVersion_)};
  }
  static std::unique_ptr<Handshake> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kHandshake, objects));
  }
  static std::unique_ptr<Handshake> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<Handshake>(f[0].toStringRef(), f[1].toInt(), f[2].toInt());
  }
  const std::string& workerName() const { return workerName_; }
  int64_t workerId() const { return workerId_; }
  int64_t protocolVersion() const { return protocolVersion_; }

 private:
  std::string workerName_;
  int64_t workerId_;
  int64_t protocolVersion_;
};

// HEARTBEAT: liveness; the transport sends and consumes it.
using Heartbeat = EmptyCommand<MessageType::kHeartbeat>;

// CANCEL_RET: whether the cancelled request never ran.
class CancelRet : public RpcCommand {
 public:
  explicit CancelRet(bool neverRan) : neverRan_(neverRan) {}
  MessageType type() const override { return MessageType::kCancelRet; }
  std::vector<c10::IValue> fields() && override { return {c10::IValue(neverRan_)}; }
  static std::unique_ptr<CancelRet> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, MessageType::kCancelRet, objects));
  }
  static std::unique_ptr<CancelRet> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<CancelRet>(f[0].toBool());
  }
  bool neverRan() const { return neverRan_; }

 private:
  bool neverRan_;
};
// CANCEL: the caller gave up on request `value()`.
using Cancel = IntCommand<MessageType::kCancel>;
// SHUTDOWN_NOTICE: worker `value()` will send no more requests.
using ShutdownNotice = IntCommand<MessageType::kShutdownNotice>;

// SCHEMA_QUERY / SCHEMA_RET: a function's qualified name, and its schema
// string (empty if the callee does not know the name).
template <MessageType kType>
class StringCommand : public RpcCommand {
 public:
  explicit StringCommand(std::string value) : value_(std::move(value)) {}
  MessageType type() const override { return kType; }
  std::vector<c10::IValue> fields() && override { return {c10::IValue(std::move(value_))}; }
  static std::unique_ptr<StringCommand> fromMessage(const Message& m, const ObjectCodec* objects = nullptr) {
    return fromFields(decodeFields(m, kType, objects));
  }
  static std::unique_ptr<StringCommand> fromFields(std::vector<c10::IValue>&& f) {
    return std::make_unique<StringCommand>(f[0].toStringRef());
  }
  const std::string& value() const { return value_; }

 private:
  std::string value_;
};

using SchemaQuery = StringCommand<MessageType::kSchemaQuery>;
using SchemaRet = StringCommand<MessageType::kSchemaRet>;

}  // namespace torchrpc
