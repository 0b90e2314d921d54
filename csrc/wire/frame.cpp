#include "wire/frame.h"

#include "wire/frame_layout.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <ATen/ops/empty.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "wire/byte_io.h"

namespace torchrpc {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");

// CRC-32C (Castagnoli), table-driven. It covers the header and the small
// metadata sections only; tensor bytes are left to TCP's own checksum.
uint32_t crc32c(uint32_t crc, const char* data, size_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ static_cast<uint8_t>(data[i])) & 0xff] ^ (crc >> 8);
  return ~crc;
}

namespace {

void writeHeader(const Header& h, char* out) {
  std::string s;
  Writer w(s);
  w.u32(kFrameMagic);
  w.u8(kFrameVersion);
  w.u8(0);  // flags, reserved
  w.u16(h.type);
  w.i64(h.id);
  w.u32(h.payloadBytes);
  w.u32(h.descriptorBytes);
  w.u32(h.storageCount);
  w.u32(h.tensorCount);
  w.u64(h.storageBytes);
  w.u32(h.checksum);
  w.u32(0);  // reserved
  std::memcpy(out, s.data(), kFrameHeaderBytes);
}

}  // namespace

Header parseHeader(const char* bytes, const FrameLimits& limits) {
  Reader r(bytes, kFrameHeaderBytes);
  uint32_t magic = r.u32();
  if (magic != kFrameMagic) throwDecode("bad magic 0x" + c10::str(std::hex, magic));
  uint8_t version = r.u8();
  if (version != kFrameVersion) throwDecode("unsupported version " + std::to_string(version));
  r.u8();
  Header h;
  h.type = r.u16();
  if (!isKnownMessageType(h.type)) throwDecode("unknown message type " + std::to_string(h.type));
  h.id = r.i64();
  h.payloadBytes = r.u32();
  h.descriptorBytes = r.u32();
  h.storageCount = r.u32();
  h.tensorCount = r.u32();
  h.storageBytes = r.u64();
  h.checksum = r.u32();
  if (static_cast<uint64_t>(h.payloadBytes) + h.descriptorBytes > limits.maxPayloadBytes) {
    throwDecode("payload of " + std::to_string(h.payloadBytes + uint64_t{h.descriptorBytes}) +
                " bytes exceeds the limit of " + std::to_string(limits.maxPayloadBytes));
  }
  if (h.tensorCount > limits.maxTensors) {
    throwDecode(std::to_string(h.tensorCount) + " tensors exceed the limit of " +
                std::to_string(limits.maxTensors));
  }
  if (h.storageCount > h.tensorCount) throwDecode("more storages than tensors");
  if (h.storageBytes > limits.maxStorageBytes) {
    throwDecode("tensor data of " + std::to_string(h.storageBytes) +
                " bytes exceeds the limit of " + std::to_string(limits.maxStorageBytes));
  }
  uint64_t total = kFrameHeaderBytes + uint64_t{h.payloadBytes} + h.descriptorBytes + h.storageBytes;
  if (total > limits.maxFrameBytes) {
    throwDecode("frame of " + std::to_string(total) + " bytes exceeds max_frame_bytes (" +
                std::to_string(limits.maxFrameBytes) + ")");
  }
  return h;
}

bool sendableDtype(c10::ScalarType t) {
  switch (t) {
    case c10::kBool: case c10::kByte: case c10::kChar: case c10::kShort: case c10::kInt:
    case c10::kLong: case c10::kHalf: case c10::kBFloat16: case c10::kFloat: case c10::kDouble:
    case c10::kComplexHalf: case c10::kComplexFloat: case c10::kComplexDouble:
    case c10::kUInt16: case c10::kUInt32: case c10::kUInt64:
      return true;
    default:
      return false;
  }
}

namespace {

// Byte extent [start, end) a strided view touches in its storage.
std::pair<uint64_t, uint64_t> viewExtent(const at::Tensor& t) {
  uint64_t item = t.element_size();
  uint64_t start = static_cast<uint64_t>(t.storage_offset()) * item;
  if (t.numel() == 0) return {start, start};
  uint64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += static_cast<uint64_t>(t.size(d) - 1) * t.stride(d);
  return {start, start + (last + 1) * item};
}

}  // namespace

// Storage for received tensor bytes. Large buffers are 2 MiB-aligned and
// marked for transparent huge pages: the socket copy then touches a few
// dozen fresh pages instead of tens of thousands (page faults dominated a
// 64 MiB receive).
c10::Storage allocateStorage(uint64_t nbytes) {
  constexpr uint64_t kHuge = 2u << 20;
  if (nbytes < 4 * kHuge) {
    return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, c10::GetDefaultCPUAllocator(), false);
  }
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, nbytes) != 0) throw std::bad_alloc();
  ::madvise(p, nbytes, MADV_HUGEPAGE);
  c10::DataPtr data(p, p, &std::free, c10::Device(c10::DeviceType::CPU));
  return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), nullptr, false);
}

namespace {
// Descriptors are sent with 16-byte-aligned storage slices, so every element
// offset within a slice stays a multiple of every dtype's size.
constexpr uint64_t kSliceAlign = 16;
}  // namespace

EncodedFrame encodeFrame(const Message& m) {
  EncodedFrame f;
  struct Slice {
    const char* base;
    uint64_t start, end;
  };
  std::vector<Slice> slices;
  std::vector<uint32_t> sliceOf(m.tensors.size());
  std::unordered_map<const c10::StorageImpl*, uint32_t> byStorage;

  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const at::Tensor& t = m.tensors[i];
    if (!t.defined()) throw RpcError(ErrorKind::kArgument, "torchrpc: cannot send an undefined tensor");
    if (!t.device().is_cpu() || t.layout() != c10::kStrided || t.is_quantized()) {
      throw RpcError(ErrorKind::kArgument, "torchrpc: only dense CPU tensors can be sent, got " +
                                               t.toString() + " on " + t.device().str());
    }
    if (t.is_conj() || t.is_neg()) {
      throw RpcError(ErrorKind::kArgument,
                     "torchrpc: resolve conjugate/negative views (resolve_conj()) before sending");
    }
    if (!sendableDtype(t.scalar_type())) {
      throw RpcError(ErrorKind::kArgument, std::string("torchrpc: cannot send dtype ") +
                                               c10::toString(t.scalar_type()));
    }
    auto [start, end] = viewExtent(t);
    const c10::StorageImpl* key = t.storage().unsafeGetStorageImpl();
    auto [it, fresh] = byStorage.emplace(key, static_cast<uint32_t>(slices.size()));
    if (fresh) {
      slices.push_back({static_cast<const char*>(t.storage().data()), start, end});
    } else if (end > start) {
      Slice& s = slices[it->second];
      if (s.end == s.start) {
        s.start = start;
        s.end = end;
      } else {
        s.start = std::min(s.start, start);
        s.end = std::max(s.end, end);
      }
    }
    sliceOf[i] = it->second;
  }

  Writer d(f.descriptors);
  uint64_t storageBytes = 0;
  for (Slice& s : slices) {
    if (s.end == s.start) {
      s.start = s.end = 0;  // only empty views: send nothing (data may be null)
    } else {
      s.start -= s.start % kSliceAlign;
    }
    d.u64(s.end - s.start);
    storageBytes += s.end - s.start;
  }
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const at::Tensor& t = m.tensors[i];
    const Slice& s = slices[sliceOf[i]];
    uint64_t start = viewExtent(t).first;
    d.u32(sliceOf[i]);
    d.u8(static_cast<uint8_t>(t.scalar_type()));
    d.u8(static_cast<uint8_t>(t.dim()));
    d.u8(t.requires_grad() ? 1 : 0);
    d.u8(0);
    d.u64(t.numel() == 0 || start < s.start ? 0 : start - s.start);
    for (int64_t k = 0; k < t.dim(); ++k) d.i64(t.size(k));
    for (int64_t k = 0; k < t.dim(); ++k) d.i64(t.stride(k));
  }

  Header h{static_cast<uint16_t>(m.type), m.id, Writer::checkedLength(m.payload.size()),
           Writer::checkedLength(f.descriptors.size()), static_cast<uint32_t>(slices.size()),
           Writer::checkedLength(m.tensors.size()), storageBytes, 0};
  writeHeader(h, f.header.data());
  uint32_t crc = crc32c(0, f.header.data(), kFrameHeaderBytes);
  crc = crc32c(crc, m.payload.data(), m.payload.size());
  crc = crc32c(crc, f.descriptors.data(), f.descriptors.size());
  std::memcpy(f.header.data() + kChecksumOffset, &crc, 4);

  f.chunks.reserve(3 + slices.size());
  f.chunks.push_back({f.header.data(), kFrameHeaderBytes});
  f.chunks.push_back({m.payload.data(), m.payload.size()});
  f.chunks.push_back({f.descriptors.data(), f.descriptors.size()});
  for (const Slice& s : slices) f.chunks.push_back({s.base + s.start, s.end - s.start});
  f.totalBytes = kFrameHeaderBytes + m.payload.size() + f.descriptors.size() + storageBytes;
  return f;
}

}  // namespace torchrpc
