#include "messages/autograd_wrap.h"

#include "wire/ivalue_codec.h"

namespace torchrpc {
namespace {
constexpr uint32_t kForwardFields = 5;  // from, context, message id, device map, wrapped

bool isForward(MessageType t) {
  return t == MessageType::kForwardAutogradReq || t == MessageType::kForwardAutogradResp;
}
}  // namespace

Message wrapWithAutograd(MessageType outerType, const AutogradHeader& header, Message&& inner) {
  TORCH_INTERNAL_ASSERT(isForward(outerType) && !isForward(inner.type));
  Message m;
  m.type = outerType;
  m.id = inner.id;
  m.payload.reserve(inner.payload.size() + 64);
  Writer w(m.payload);
  w.u32(kForwardFields);
  // The header fields hold no tensors and no objects; the inner payload,
  // which may, is spliced in as its sender encoded it.
  std::vector<at::Tensor> none;
  encodeIValue(c10::IValue(header.fromWorkerId), w, none, nullptr);
  encodeIValue(c10::IValue(header.contextId), w, none, nullptr);
  encodeIValue(c10::IValue(header.messageId), w, none, nullptr);
  encodeIValue(c10::IValue(c10::Dict<std::string, std::string>()), w, none, nullptr);
  encodeWrappedHead(w, static_cast<int64_t>(inner.type));
  w.raw(inner.payload.data(), inner.payload.size());
  m.tensors = std::move(inner.tensors);
  return m;
}

Message unwrapAutograd(Message&& outer, AutogradHeader& header) {
  if (!isForward(outer.type)) throwDecode("expected an autograd-wrapped message");
  Reader r(outer.payload.data(), outer.payload.size());
  if (r.u32() != kForwardFields) throwDecode(messageTypeName(outer.type) + " has a wrong field count");
  c10::IValue f[3];
  for (auto& v : f) {
    v = decodeIValue(r, outer.tensors, nullptr);
    if (!v.isInt()) throwDecode(messageTypeName(outer.type) + " header field is not an int");
  }
  if (!decodeIValue(r, outer.tensors, nullptr).isGenericDict()) throwDecode("device map is not a dict");
  int64_t type = decodeWrappedHead(r);
  if (type < 1 || type > UINT16_MAX || !isKnownMessageType(static_cast<uint16_t>(type)) ||
      isForward(static_cast<MessageType>(type))) {
    throwDecode("autograd message wraps type " + std::to_string(type));
  }
  header = {f[0].toInt(), f[1].toInt(), f[2].toInt()};
  return wrappedMessage(std::move(outer), static_cast<MessageType>(type), r.offset());
}

}  // namespace torchrpc
