#include "messages/python_call.h"

namespace torchrpc {
namespace {

c10::IValue tensorList(std::vector<at::Tensor>&& tensors) {
  return c10::IValue(c10::List<at::Tensor>(std::move(tensors)));
}

PickledValue pickledFrom(c10::IValue& bytes, const c10::IValue& tensors) {
  at::Tensor b = bytes.toTensor();
  if (b.scalar_type() != at::kByte || b.dim() != 1) {
    throwDecode("pickled bytes must be a 1-D uint8 tensor");
  }
  return PickledValue{std::move(b), tensors.toTensorVector()};
}

}  // namespace

template <MessageType kType>
std::vector<c10::IValue> PythonPayload<kType>::fields() && {
  std::vector<c10::IValue> f{c10::IValue(std::move(value_.bytes)),
                             tensorList(std::move(value_.tensors))};
  if (kType == MessageType::kPythonCall) f.emplace_back(isAsync_);
  return f;
}

template <MessageType kType>
std::unique_ptr<PythonPayload<kType>> PythonPayload<kType>::fromFields(
    std::vector<c10::IValue>&& f) {
  bool isAsync = kType == MessageType::kPythonCall ? f[2].toBool() : false;
  return std::make_unique<PythonPayload>(pickledFrom(f[0], f[1]), isAsync);
}

template class PythonPayload<MessageType::kPythonCall>;
template class PythonPayload<MessageType::kPythonRet>;
template class PythonPayload<MessageType::kPythonRRefFetchRet>;

std::vector<c10::IValue> PythonRemoteCall::fields() && {
  return {c10::IValue(std::move(value_.bytes)), tensorList(std::move(value_.tensors)),
          c10::IValue(isAsync_), rrefId_.toIValue(), forkId_.toIValue()};
}

std::unique_ptr<PythonRemoteCall> PythonRemoteCall::fromMessage(const Message& m, const ObjectCodec* objects) {
  return fromFields(decodeFields(m, MessageType::kPythonRemoteCall, objects));
}

std::unique_ptr<PythonRemoteCall> PythonRemoteCall::fromFields(std::vector<c10::IValue>&& f) {
  return std::make_unique<PythonRemoteCall>(pickledFrom(f[0], f[1]), f[2].toBool(),
                                            GloballyUniqueId::fromIValue(f[3]),
                                            GloballyUniqueId::fromIValue(f[4]));
}

}  // namespace torchrpc
