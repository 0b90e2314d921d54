#pragma once

// The commands a Message (wire/envelope.h) carries. Each message type is a
// class derived from RpcCommand that turns itself into a Message with
// `toMessage() &&` and back with a static `fromMessage(const Message&)`.
// Both take the sending or receiving agent's ObjectCodec (its RRefs); null,
// the default, means the message may hold no objects.

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "wire/envelope.h"

namespace torchrpc {

struct ObjectCodec;  // wire/ivalue_codec.h

// Globally unique: the creating worker's id plus that worker's counter.
struct GloballyUniqueId {
  int64_t createdOn = 0;
  int64_t localId = 0;

  bool operator==(const GloballyUniqueId& o) const {
    return createdOn == o.createdOn && localId == o.localId;
  }
  c10::IValue toIValue() const;
  static GloballyUniqueId fromIValue(const c10::IValue& v);
  std::string str() const;
};

struct GloballyUniqueIdHash {
  size_t operator()(const GloballyUniqueId& id) const {
    return std::hash<int64_t>()(id.createdOn * 1000003 ^ id.localId);
  }
};

using RRefId = GloballyUniqueId;
using ForkId = GloballyUniqueId;

class RpcCommand {
 public:
  virtual ~RpcCommand() = default;
  virtual MessageType type() const = 0;
  // The fields in the order and with the types the catalog's spec lists.
  virtual std::vector<c10::IValue> fields() && = 0;
  // Encodes fields() as the payload. Moves out of *this.
  Message toMessage(const ObjectCodec* objects = nullptr) &&;
};

// Decodes a message's payload into its fields, checking count and types
// against the catalog's spec for `expected`. Used by each fromMessage.
std::vector<c10::IValue> decodeFields(const Message& message, MessageType expected,
                                      const ObjectCodec* objects = nullptr);

// Builds the command a message holds, whatever its type.
std::unique_ptr<RpcCommand> commandFromMessage(const Message& message, const ObjectCodec* objects = nullptr);

// Builds a command from fields already checked against its spec.
std::unique_ptr<RpcCommand> commandFromFields(MessageType type, std::vector<c10::IValue>&& fields);

// For wrappers that splice an encoded message into their payload (autograd,
// profiling, shipped code): the message wrapped in `outer`, of type `type`,
// whose payload starts at `offset` of outer's. It keeps outer's id and all
// of outer's tensors (their indices are absolute within a message).
Message wrappedMessage(Message&& outer, MessageType type, size_t offset);

// A wrapped command (autograd, profiling) travels as the tuple (type, fields).
c10::IValue wrapCommand(std::unique_ptr<RpcCommand> command);
std::unique_ptr<RpcCommand> unwrapCommand(const c10::IValue& wrapped);

// The shape of a message type's fields, for validation and for Python.
struct FieldSpec {
  std::string name;
  c10::TypePtr type;
  bool isWrappedCommand = false;  // the field holds wrapCommand(...)
};
struct MessageSpec {
  MessageType type;
  std::string className;
  std::vector<FieldSpec> fields;
};
const MessageSpec& specFor(MessageType type);
const std::vector<MessageSpec>& allSpecs();

}  // namespace torchrpc
