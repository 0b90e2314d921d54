#include "wire/ivalue_codec.h"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>

#include <torch/custom_class.h>

namespace torchrpc {
namespace {

enum TypeTag : uint8_t {
  kTAny = 0,
  kTTensor = 1,
  kTInt = 2,
  kTFloat = 3,
  kTComplex = 4,
  kTBool = 5,
  kTStr = 6,
  kTNone = 7,
  kTList = 8,
  kTTuple = 9,
  kTDict = 10,
  kTOptional = 11,
  kTDevice = 12,
  kTNumber = 13,
  kTObject = 14,  // the ObjectCodec's class
};

enum ValueTag : uint8_t {
  kVNone = 0,
  kVBool = 1,
  kVInt = 2,
  kVDouble = 3,
  kVComplex = 4,
  kVString = 5,
  kVTensor = 6,
  kVList = 7,
  kVTuple = 8,
  kVDict = 9,
  kVDevice = 10,
  kVObject = 11,  // ObjectCodec-encoded object
};

// True if `objects` is a codec for the class named `qualifiedName`.
bool encodes(const ObjectCodec* objects, const std::string& qualifiedName) {
  return objects && objects->className == qualifiedName;
}

// Objects are encoded by the agent that sends them (an RRef is forked);
// encoding without an agent (Python's encode_message, say) has no codec.
[[noreturn]] void noObjectCodec(const std::string& typeName) {
  throw RpcError(ErrorKind::kArgument, "torchrpc: cannot send a value of type " + typeName +
                                           " here: no object codec (RRefs travel only in an agent's messages)");
}

void encodeTypeAt(const c10::TypePtr& type, Writer& out, const ObjectCodec* objects, int depth) {
  if (depth > kMaxNesting) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: type nested too deeply to encode");
  }
  switch (type->kind()) {
    case c10::TypeKind::AnyType: out.u8(kTAny); return;
    case c10::TypeKind::TensorType: out.u8(kTTensor); return;
    case c10::TypeKind::IntType: out.u8(kTInt); return;
    case c10::TypeKind::FloatType: out.u8(kTFloat); return;
    case c10::TypeKind::ComplexType: out.u8(kTComplex); return;
    case c10::TypeKind::BoolType: out.u8(kTBool); return;
    case c10::TypeKind::StringType: out.u8(kTStr); return;
    case c10::TypeKind::NoneType: out.u8(kTNone); return;
    case c10::TypeKind::DeviceObjType: out.u8(kTDevice); return;
    case c10::TypeKind::NumberType: out.u8(kTNumber); return;
    case c10::TypeKind::ListType:
      out.u8(kTList);
      encodeTypeAt(type->expectRef<c10::ListType>().getElementType(), out, objects, depth + 1);
      return;
    case c10::TypeKind::OptionalType:
      out.u8(kTOptional);
      encodeTypeAt(type->expectRef<c10::OptionalType>().getElementType(), out, objects, depth + 1);
      return;
    case c10::TypeKind::DictType: {
      const auto& d = type->expectRef<c10::DictType>();
      out.u8(kTDict);
      encodeTypeAt(d.getKeyType(), out, objects, depth + 1);
      encodeTypeAt(d.getValueType(), out, objects, depth + 1);
      return;
    }
    case c10::TypeKind::TupleType: {
      const auto& elems = type->expectRef<c10::TupleType>().elements();
      out.u8(kTTuple);
      out.u32(Writer::checkedLength(elems.size()));
      for (const auto& e : elems) encodeTypeAt(e, out, objects, depth + 1);
      return;
    }
    case c10::TypeKind::ClassType:
      if (encodes(objects, type->expectRef<c10::ClassType>().name()->qualifiedName())) {
        out.u8(kTObject);
        return;
      }
      if (!objects) noObjectCodec(type->annotation_str());
      [[fallthrough]];
    default:
      throw RpcError(ErrorKind::kArgument,
                     "torchrpc: cannot send values of type " + type->annotation_str());
  }
}

c10::TypePtr decodeTypeAt(Reader& in, const ObjectCodec* objects, int depth) {
  if (depth > kMaxNesting) throwDecode("type nested deeper than " + std::to_string(kMaxNesting));
  uint8_t tag = in.u8();
  switch (tag) {
    case kTAny: return c10::AnyType::get();
    case kTTensor: return c10::TensorType::get();
    case kTInt: return c10::IntType::get();
    case kTFloat: return c10::FloatType::get();
    case kTComplex: return c10::ComplexType::get();
    case kTBool: return c10::BoolType::get();
    case kTStr: return c10::StringType::get();
    case kTNone: return c10::NoneType::get();
    case kTDevice: return c10::DeviceObjType::get();
    case kTNumber: return c10::NumberType::get();
    case kTObject: {
      if (!objects) throwDecode("object type where no objects are accepted (no object codec)");
      auto cls = torch::getCustomClass(objects->className);
      if (!cls) throwDecode("object type " + objects->className + " is not registered");
      return cls;
    }
    case kTList: return c10::ListType::create(decodeTypeAt(in, objects, depth + 1));
    case kTOptional: return c10::OptionalType::create(decodeTypeAt(in, objects, depth + 1));
    case kTDict: {
      auto key = decodeTypeAt(in, objects, depth + 1);
      switch (key->kind()) {
        case c10::TypeKind::StringType:
        case c10::TypeKind::IntType:
        case c10::TypeKind::FloatType:
        case c10::TypeKind::BoolType:
        case c10::TypeKind::ComplexType:
        case c10::TypeKind::TensorType:
          break;
        default:
          throwDecode("dict key type " + key->annotation_str() + " is not hashable");
      }
      return c10::DictType::create(std::move(key), decodeTypeAt(in, objects, depth + 1));
    }
    case kTTuple: {
      uint32_t n = in.count(1, "tuple type");
      std::vector<c10::TypePtr> elems;
      elems.reserve(n);
      for (uint32_t i = 0; i < n; ++i) elems.push_back(decodeTypeAt(in, objects, depth + 1));
      return c10::TupleType::create(std::move(elems));
    }
    default:
      throwDecode("unknown type tag " + std::to_string(tag));
  }
}

uint32_t tensorIndex(const at::Tensor& t, std::vector<at::Tensor>& tensors) {
  tensors.push_back(t);
  return Writer::checkedLength(tensors.size() - 1);
}

void encodeAt(const c10::IValue& v, Writer& out, std::vector<at::Tensor>& tensors, const ObjectCodec* objects,
              int depth) {
  if (depth > kMaxNesting) {
    throw RpcError(ErrorKind::kArgument, "torchrpc: value nested deeper than " +
                                             std::to_string(kMaxNesting) + " cannot be sent");
  }
  if (v.isNone()) {
    out.u8(kVNone);
  } else if (v.isBool()) {
    out.u8(kVBool);
    out.u8(v.toBool() ? 1 : 0);
  } else if (v.isInt()) {
    out.u8(kVInt);
    out.i64(v.toInt());
  } else if (v.isDouble()) {
    out.u8(kVDouble);
    out.f64(v.toDouble());
  } else if (v.isComplexDouble()) {
    auto c = v.toComplexDouble();
    out.u8(kVComplex);
    out.f64(c.real());
    out.f64(c.imag());
  } else if (v.isString()) {
    out.u8(kVString);
    out.bytes(v.toStringRef());
  } else if (v.isTensor()) {
    out.u8(kVTensor);
    out.u32(tensorIndex(v.toTensor(), tensors));
  } else if (v.isList()) {
    out.u8(kVList);
    encodeTypeAt(v.toList().elementType(), out, objects, depth + 1);
    auto elems = v.toListRef();
    out.u32(Writer::checkedLength(elems.size()));
    for (const c10::IValue& e : elems) encodeAt(e, out, tensors, objects, depth + 1);
  } else if (v.isTuple()) {
    const auto& elems = v.toTupleRef().elements();
    out.u8(kVTuple);
    out.u32(Writer::checkedLength(elems.size()));
    for (const auto& e : elems) encodeAt(e, out, tensors, objects, depth + 1);
  } else if (v.isGenericDict()) {
    auto dict = v.toGenericDict();
    out.u8(kVDict);
    encodeTypeAt(c10::DictType::create(dict.keyType(), dict.valueType()), out, objects, depth + 1);
    out.u32(Writer::checkedLength(dict.size()));
    for (const auto& entry : dict) {
      encodeAt(entry.key(), out, tensors, objects, depth + 1);
      encodeAt(entry.value(), out, tensors, objects, depth + 1);
    }
  } else if (v.isDevice()) {
    auto d = v.toDevice();
    out.u8(kVDevice);
    out.u8(static_cast<uint8_t>(d.type()));
    out.u8(static_cast<uint8_t>(d.index()));
  } else if (v.isObject() && encodes(objects, v.toObjectRef().type()->name()->qualifiedName())) {
    out.u8(kVObject);
    encodeAt(objects->encode(v), out, tensors, objects, depth + 1);
  } else if (v.isObject() && !objects) {
    noObjectCodec(v.type()->annotation_str());
  } else {
    throw RpcError(ErrorKind::kArgument,
                   "torchrpc: cannot send a value of type " + v.type()->annotation_str());
  }
}

// TorchScript strings are UTF-8; Python could not even read anything else.
// Strict UTF-8 (RFC 3629, what Python accepts): no overlong forms, no
// surrogates, nothing above U+10FFFF. The second byte's range depends on the
// first; later continuation bytes are 80..BF.
bool validUtf8(const std::string& s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (i + len > n) return false;
    auto second = static_cast<unsigned char>(s[i + 1]);
    if (second < lo || second > hi) return false;
    for (size_t k = 2; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

void expectMatch(const c10::IValue& v, const c10::TypePtr& type, const char* where) {
  if (!valueMatchesType(v, type)) {
    throwDecode(std::string(where) + " holds a " + v.type()->annotation_str() + " where " +
                type->annotation_str() + " was declared");
  }
}

c10::IValue decodeAt(Reader& in, const std::vector<at::Tensor>& tensors, const ObjectCodec* objects,
                     int depth) {
  if (depth > kMaxNesting) throwDecode("value nested deeper than " + std::to_string(kMaxNesting));
  uint8_t tag = in.u8();
  switch (tag) {
    case kVNone: return c10::IValue();
    case kVBool: {
      uint8_t b = in.u8();
      if (b > 1) throwDecode("bool byte " + std::to_string(b));
      return c10::IValue(b == 1);
    }
    case kVInt: return c10::IValue(in.i64());
    case kVDouble: return c10::IValue(in.f64());
    case kVComplex: {
      double re = in.f64();
      double im = in.f64();
      return c10::IValue(c10::complex<double>(re, im));
    }
    case kVString: {
      std::string s = in.bytes();
      if (!validUtf8(s)) throwDecode("string is not valid UTF-8");
      return c10::IValue(std::move(s));
    }
    case kVTensor: {
      uint32_t i = in.u32();
      if (i >= tensors.size()) {
        throwDecode("tensor index " + std::to_string(i) + " but the frame has " +
                    std::to_string(tensors.size()) + " tensors");
      }
      return c10::IValue(tensors[i]);
    }
    case kVList: {
      auto elemType = decodeTypeAt(in, objects, depth + 1);
      uint32_t n = in.count(1, "list");
      c10::impl::GenericList list(elemType);
      list.reserve(n);
      for (uint32_t i = 0; i < n; ++i) {
        auto e = decodeAt(in, tensors, objects, depth + 1);
        expectMatch(e, elemType, "list");
        list.push_back(std::move(e));
      }
      return c10::IValue(std::move(list));
    }
    case kVTuple: {
      uint32_t n = in.count(1, "tuple");
      std::vector<c10::IValue> elems;
      elems.reserve(n);
      for (uint32_t i = 0; i < n; ++i) elems.push_back(decodeAt(in, tensors, objects, depth + 1));
      return c10::IValue(c10::ivalue::Tuple::create(std::move(elems)));
    }
    case kVDict: {
      // One Dict type, so decodeTypeAt's hashable-key check applies.
      auto type = decodeTypeAt(in, objects, depth + 1);
      if (type->kind() != c10::TypeKind::DictType) throwDecode("dict of non-dict type");
      const auto& dictType = type->expectRef<c10::DictType>();
      const auto& valueType = dictType.getValueType();
      uint32_t n = in.count(2, "dict");
      c10::impl::GenericDict dict(dictType.getKeyType(), valueType);
      dict.reserve(n);
      for (uint32_t i = 0; i < n; ++i) {
        auto k = decodeAt(in, tensors, objects, depth + 1);
        expectMatch(k, dictType.getKeyType(), "dict key");
        auto val = decodeAt(in, tensors, objects, depth + 1);
        expectMatch(val, valueType, "dict value");
        dict.insert_or_assign(std::move(k), std::move(val));
      }
      return c10::IValue(std::move(dict));
    }
    case kVDevice: {
      uint8_t type = in.u8();
      auto index = static_cast<int8_t>(in.u8());
      if (type >= static_cast<uint8_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES) ||
          index < -1) {
        throwDecode("invalid device " + std::to_string(type) + ":" + std::to_string(index));
      }
      return c10::IValue(c10::Device(static_cast<c10::DeviceType>(type), index));
    }
    case kVObject: {
      auto encoded = decodeAt(in, tensors, objects, depth + 1);
      if (!objects) throwDecode("object where no objects are accepted (no object codec)");
      try {
        return objects->decode(encoded);
      } catch (const std::exception& e) {
        throwDecode(std::string("cannot rebuild ") + objects->className + ": " + e.what());
      }
    }
    default:
      throwDecode("unknown value tag " + std::to_string(tag) + " at offset " +
                  std::to_string(in.offset() - 1));
  }
}

}  // namespace

void encodeWrappedHead(Writer& out, int64_t type) {
  out.u8(kVTuple);
  out.u32(2);
  out.u8(kVInt);
  out.i64(type);
  out.u8(kVTuple);
}

int64_t decodeWrappedHead(Reader& in) {
  if (in.u8() != kVTuple || in.u32() != 2 || in.u8() != kVInt) throwDecode("wrapped message has a bad head");
  int64_t type = in.i64();
  if (in.u8() != kVTuple) throwDecode("wrapped message has a bad head");
  return type;
}

void encodeIValue(const c10::IValue& value, Writer& out, std::vector<at::Tensor>& tensors,
                  const ObjectCodec* objects) {
  encodeAt(value, out, tensors, objects, 0);
}

c10::IValue decodeIValue(Reader& in, const std::vector<at::Tensor>& tensors, const ObjectCodec* objects) {
  return decodeAt(in, tensors, objects, 0);
}

void encodeType(const c10::TypePtr& type, Writer& out, const ObjectCodec* objects) {
  encodeTypeAt(type, out, objects, 0);
}

c10::TypePtr decodeType(Reader& in, const ObjectCodec* objects) { return decodeTypeAt(in, objects, 0); }

bool valueMatchesType(const c10::IValue& v, const c10::TypePtr& type) {
  switch (type->kind()) {
    case c10::TypeKind::AnyType: return true;
    case c10::TypeKind::TensorType: return v.isTensor();
    case c10::TypeKind::IntType: return v.isInt();
    case c10::TypeKind::FloatType: return v.isDouble();
    case c10::TypeKind::ComplexType: return v.isComplexDouble();
    case c10::TypeKind::BoolType: return v.isBool();
    case c10::TypeKind::StringType: return v.isString();
    case c10::TypeKind::NoneType: return v.isNone();
    case c10::TypeKind::NumberType: return v.isInt() || v.isDouble() || v.isComplexDouble();
    case c10::TypeKind::OptionalType:
      return v.isNone() ||
             valueMatchesType(v, type->expectRef<c10::OptionalType>().getElementType());
    default:
      if (v.isTensor()) return c10::TensorType::get()->isSubtypeOf(*type);
      return v.type()->isSubtypeOf(*type);
  }
}

}  // namespace torchrpc
