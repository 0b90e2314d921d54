#include "messages/profiling_wrap.h"

#include "wire/byte_io.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {
namespace {
constexpr uint32_t kFields = 3;  // data, key, wrapped

bool isProfiling(int64_t t) {
  return t == static_cast<int64_t>(MessageType::kRunWithProfilingReq) ||
         t == static_cast<int64_t>(MessageType::kRunWithProfilingResp);
}
}  // namespace

Message wrapForProfiling(MessageType outerType, const std::string& data, const GloballyUniqueId& key,
                         Message&& inner) {
  TORCH_INTERNAL_ASSERT(isProfiling(static_cast<int64_t>(outerType)) &&
                        !isProfiling(static_cast<int64_t>(inner.type)));
  Message m;
  m.type = outerType;
  m.id = inner.id;
  m.tensors = std::move(inner.tensors);  // indices are absolute: the inner payload's stay valid
  m.payload.reserve(inner.payload.size() + data.size() + 48);
  Writer w(m.payload);
  w.u32(kFields);
  encodeIValue(c10::IValue(data), w, m.tensors, nullptr);
  encodeIValue(key.toIValue(), w, m.tensors, nullptr);
  encodeWrappedHead(w, static_cast<int64_t>(inner.type));
  w.raw(inner.payload.data(), inner.payload.size());
  return m;
}

Message unwrapProfiling(Message&& outer, std::string& data, GloballyUniqueId& key) {
  if (!isProfiling(static_cast<int64_t>(outer.type))) throwDecode("expected a profiling-wrapped message");
  Reader r(outer.payload.data(), outer.payload.size());
  if (r.u32() != kFields) throwDecode(messageTypeName(outer.type) + " has a wrong field count");
  c10::IValue d = decodeIValue(r, outer.tensors, nullptr);
  c10::IValue k = decodeIValue(r, outer.tensors, nullptr);
  if (!d.isString()) throwDecode(messageTypeName(outer.type) + ".profiler data is not a string");
  const bool keyOk = k.isTuple() && k.toTupleRef().elements().size() == 2 && k.toTupleRef().elements()[0].isInt() &&
                     k.toTupleRef().elements()[1].isInt();
  if (!keyOk) throwDecode(messageTypeName(outer.type) + ".profiling_key is not (int, int)");
  int64_t type = decodeWrappedHead(r);
  if (type < 1 || type > UINT16_MAX || !isKnownMessageType(static_cast<uint16_t>(type)) || isProfiling(type)) {
    throwDecode(messageTypeName(outer.type) + " wraps type " + std::to_string(type));
  }
  data = d.toStringRef();
  key = GloballyUniqueId::fromIValue(k);
  return wrappedMessage(std::move(outer), static_cast<MessageType>(type), r.offset());
}

}  // namespace torchrpc
