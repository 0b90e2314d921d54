#pragma once

// A bounded binary codec for TorchScript values (IValues) and their types.
//
// Why not torch::jit::pickle: unpickling corrupt input was seen reserving
// ~20 GB from a 367-byte payload and throwing assorted std::exceptions. This
// codec reads through Reader, so every length is checked against the bytes
// actually left before anything is allocated, nesting depth is capped, and
// every decoded container element is checked against the container's declared
// type (a List[int] that holds a string would break TorchScript invariants).
//
// Tensors are not inlined: they are appended to a side table and referenced
// by index, so the frame layer can send their bytes beside the payload.

#include <ATen/core/ivalue.h>
#include <ATen/core/jit_type.h>

#include <functional>
#include <vector>

#include "wire/byte_io.h"

namespace torchrpc {

// Deepest nesting of containers (or types) the decoder accepts.
constexpr int kMaxNesting = 64;

// Objects of one custom class (torchrpc's RRef) cross the wire as a value
// the class's owner produces (`encode`, e.g. registering a fork) and turns
// back into an object (`decode`). Each agent has its own (its RRefContext's),
// so the codec is passed to every call that may meet such an object; null
// means none may be sent or received (RpcError naming the value's type).
struct ObjectCodec {
  std::string className;  // qualified, "__torch__.torch.classes.torchrpc.RRef"
  std::function<c10::IValue(const c10::IValue& object)> encode;
  std::function<c10::IValue(const c10::IValue& encoded)> decode;
};

void encodeIValue(const c10::IValue& value, Writer& out, std::vector<at::Tensor>& tensors,
                  const ObjectCodec* objects);
c10::IValue decodeIValue(Reader& in, const std::vector<at::Tensor>& tensors, const ObjectCodec* objects);

void encodeType(const c10::TypePtr& type, Writer& out, const ObjectCodec* objects);
c10::TypePtr decodeType(Reader& in, const ObjectCodec* objects);

// A wrapped message (autograd, profiling) is the tuple (type, fields), and
// a message payload (u32 count + fields) is exactly the body of a tuple. So
// a wrapper writes this head and appends the inner payload unchanged, and
// the receiver reads the head and takes the rest as the inner payload: no
// decode and re-encode of the inner message, whose RRefs would otherwise be
// forked a second time.
void encodeWrappedHead(Writer& out, int64_t type);
// Reads the head and returns the inner type (not yet validated).
int64_t decodeWrappedHead(Reader& in);

// True if `value` may stand where `type` is expected (TorchScript subtyping).
// Cheap for the common scalar and tensor cases, which is why it exists.
bool valueMatchesType(const c10::IValue& value, const c10::TypePtr& type);

}  // namespace torchrpc
