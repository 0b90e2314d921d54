#include "messages/with_code.h"

#include "wire/byte_io.h"
#include "wire/ivalue_codec.h"

namespace torchrpc {
namespace {
constexpr uint32_t kFields = 4;  // id, kind, archive, wrapped

bool isCall(int64_t type) {
  return type == static_cast<int64_t>(MessageType::kScriptCall) ||
         type == static_cast<int64_t>(MessageType::kScriptRemoteCall);
}
}  // namespace

std::vector<c10::IValue> WithCode::fields() && {
  return {c10::IValue(std::move(code_.id)), c10::IValue(std::move(code_.kind)), c10::IValue(std::move(code_.archive)),
          wrapCommand(std::move(wrapped_))};
}

std::unique_ptr<WithCode> WithCode::fromFields(std::vector<c10::IValue>&& f) {
  return std::make_unique<WithCode>(ShippedCode{f[0].toStringRef(), f[1].toStringRef(), f[2].toTensor()},
                                    unwrapCommand(f[3]));
}

Message wrapWithCode(const ShippedCode& code, Message&& inner) {
  TORCH_INTERNAL_ASSERT(isCall(static_cast<int64_t>(inner.type)));
  Message m;
  m.type = MessageType::kWithCode;
  m.id = inner.id;
  m.payload.reserve(inner.payload.size() + code.id.size() + 64);
  // Tensor indices are absolute within a message: the inner call keeps its
  // tensors' positions, and the archive goes after them.
  m.tensors = std::move(inner.tensors);
  Writer w(m.payload);
  w.u32(kFields);
  encodeIValue(c10::IValue(code.id), w, m.tensors, nullptr);
  encodeIValue(c10::IValue(code.kind), w, m.tensors, nullptr);
  encodeIValue(c10::IValue(code.archive), w, m.tensors, nullptr);
  encodeWrappedHead(w, static_cast<int64_t>(inner.type));
  w.raw(inner.payload.data(), inner.payload.size());
  return m;
}

std::string shippedCodeId(const Message& m) {
  try {
    Reader r(m.payload.data(), m.payload.size());
    if (m.type != MessageType::kWithCode || r.u32() != kFields) return "";
    c10::IValue id = decodeIValue(r, m.tensors, nullptr);
    return id.isString() ? id.toStringRef() : "";
  } catch (const std::exception&) {
    return "";
  }
}

Message unwrapCode(Message&& outer, ShippedCode& code) {
  if (outer.type != MessageType::kWithCode) throwDecode("expected a WITH_CODE message");
  Reader r(outer.payload.data(), outer.payload.size());
  if (r.u32() != kFields) throwDecode("WITH_CODE has a wrong field count");
  c10::IValue id = decodeIValue(r, outer.tensors, nullptr);
  c10::IValue kind = decodeIValue(r, outer.tensors, nullptr);
  c10::IValue archive = decodeIValue(r, outer.tensors, nullptr);
  if (!id.isString() || !kind.isString() || !archive.isTensor()) {
    throwDecode("WITH_CODE expects (str code_id, str kind, Tensor archive, wrapped call)");
  }
  int64_t type = decodeWrappedHead(r);
  if (!isCall(type)) throwDecode("WITH_CODE wraps type " + std::to_string(type) + ", not a script call");
  code = ShippedCode{id.toStringRef(), kind.toStringRef(), archive.toTensor()};
  return wrappedMessage(std::move(outer), static_cast<MessageType>(type), r.offset());
}

}  // namespace torchrpc
