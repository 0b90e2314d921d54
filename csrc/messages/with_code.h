#pragma once

// WITH_CODE: a call of compiled code shipped by value, with the code's
// archive attached (see agent/code_cache.h for what a callee does with it).
// Like the autograd wrapper, the agent wraps and unwraps at the Message
// level: the inner call's payload is spliced in unchanged, and the archive
// travels as one more tensor (zero-copy on shared memory).

#include "messages/message.h"

namespace torchrpc {

// Code shipped by value: "sha256:<hex of the archive>", how to load it
// ("script": a TorchScript archive; "export": a torch.export.save archive),
// and the archive's bytes as a 1-D uint8 tensor.
struct ShippedCode {
  std::string id;
  std::string kind;
  at::Tensor archive;
};

// The command form, for the message catalog (Python, fuzzing).
class WithCode : public RpcCommand {
 public:
  WithCode(ShippedCode code, std::unique_ptr<RpcCommand> wrapped)
      : code_(std::move(code)), wrapped_(std::move(wrapped)) {}
  MessageType type() const override { return MessageType::kWithCode; }
  std::vector<c10::IValue> fields() && override;
  static std::unique_ptr<WithCode> fromFields(std::vector<c10::IValue>&& f);

 private:
  ShippedCode code_;
  std::unique_ptr<RpcCommand> wrapped_;
};

// `inner` (a SCRIPT_CALL or SCRIPT_REMOTE_CALL) with `code` attached.
Message wrapWithCode(const ShippedCode& code, Message&& inner);

// The code id a WITH_CODE message names, read without decoding the rest;
// empty if malformed.
std::string shippedCodeId(const Message& m);

// The inverse: fills `code` and returns the inner call. Throws
// RpcError(kDecode) if `outer` is malformed or wraps anything but a call.
// Reads the archive's bytes no further than taking its tensor.
Message unwrapCode(Message&& outer, ShippedCode& code);

}  // namespace torchrpc
