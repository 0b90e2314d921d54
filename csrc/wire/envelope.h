#pragma once

// A Message is what the transport moves: a type, an id that pairs a response
// with its request, a payload of bytes, and tensors that travel beside the
// payload (referenced from it by index). The frame layer sends it without
// knowing what its payload means; messages/ gives each type its fields.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "wire/message_type.h"

namespace torchrpc {

struct Message {
  MessageType type = MessageType::kScriptCall;
  int64_t id = 0;
  std::string payload;
  std::vector<at::Tensor> tensors;
};

}  // namespace torchrpc
