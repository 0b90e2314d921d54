#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>

#include "wire/byte_io.h"
#include "wire/frame.h"
#include "wire/frame_layout.h"

namespace torchrpc {
namespace {
// The metadata buffer starts at this size and doubles as bytes arrive, so a
// header that lies about its size costs nothing until the bytes come.
constexpr size_t kInitialMetaBytes = 64 * 1024;
}  // namespace

std::pair<char*, size_t> FrameDecoder::want() {
  switch (stage_) {
    case Stage::kHeader:
      return {header_.data() + filled_, kFrameHeaderBytes - filled_};
    case Stage::kMeta: {
      if (filled_ == meta_.size()) {
        meta_.resize(std::min(metaTotal_, std::max(kInitialMetaBytes, 2 * meta_.size())));
      }
      return {meta_.data() + filled_, meta_.size() - filled_};
    }
    case Stage::kStorage: {
      c10::Storage& s = storages_[storage_];
      return {static_cast<char*>(s.mutable_data()) + filled_, sliceBytes_[storage_] - filled_};
    }
    case Stage::kDone:
      break;
  }
  throwDecode("take() the decoded frame first");
}

bool FrameDecoder::wrote(size_t n) {
  filled_ += n;
  try {
    switch (stage_) {
      case Stage::kHeader:
        if (filled_ == kFrameHeaderBytes) onHeader();
        break;
      case Stage::kMeta:
        if (filled_ == metaTotal_) onMeta();
        break;
      case Stage::kStorage:
        if (filled_ == sliceBytes_[storage_]) {
          ++storage_;
          nextStorage();
        }
        break;
      case Stage::kDone:
        break;
    }
  } catch (const RpcError&) {
    throw;
  } catch (const std::exception& e) {
    throwDecode(e.what());
  }
  return stage_ == Stage::kDone;
}

void FrameDecoder::onHeader() {
  Header h = parseHeader(header_.data(), limits_);
  const uint64_t meta = uint64_t{h.payloadBytes} + h.descriptorBytes;
  if (meta > bound_) {
    throwDecode("frame claims " + std::to_string(meta) + " payload bytes but only " +
                std::to_string(bound_) + " remain");
  }
  // Each storage takes 8 descriptor bytes and each tensor at least 16.
  if (uint64_t{h.storageCount} * 8 + uint64_t{h.tensorCount} * 16 > h.descriptorBytes) {
    throwDecode("descriptor section too small for " + std::to_string(h.tensorCount) + " tensors");
  }
  message_ = Message();
  message_.type = static_cast<MessageType>(h.type);
  message_.id = h.id;
  payloadBytes_ = h.payloadBytes;
  checksum_ = h.checksum;
  storageCount_ = h.storageCount;
  tensorCount_ = h.tensorCount;
  storageBytes_ = h.storageBytes;
  declared_ = kFrameHeaderBytes + meta + h.storageBytes;
  metaTotal_ = static_cast<size_t>(meta);
  meta_.clear();
  filled_ = 0;
  stage_ = Stage::kMeta;
  if (metaTotal_ == 0) onMeta();
}

void FrameDecoder::onMeta() {
  std::memset(header_.data() + kChecksumOffset, 0, 4);
  uint32_t crc = crc32c(0, header_.data(), kFrameHeaderBytes);
  crc = crc32c(crc, meta_.data(), metaTotal_);
  if (crc != checksum_) throwDecode("checksum mismatch (header, payload or descriptors corrupt)");

  Reader d(meta_.data() + payloadBytes_, metaTotal_ - payloadBytes_);
  sliceBytes_.assign(storageCount_, 0);
  uint64_t total = 0;
  for (auto& n : sliceBytes_) {
    n = d.u64();
    if (n > storageBytes_ - total) throwDecode("storage sizes exceed the header's total");
    total += n;
  }
  if (total != storageBytes_) throwDecode("storage sizes do not add up to the header's total");
  if (total > bound_) {
    throwDecode("frame claims " + std::to_string(total) + " tensor bytes but only " +
                std::to_string(bound_) + " remain");
  }

  views_.assign(tensorCount_, View{});
  for (uint32_t i = 0; i < tensorCount_; ++i) {
    View& v = views_[i];
    const std::string which = "tensor " + std::to_string(i);
    v.slice = d.u32();
    uint8_t dtype = d.u8();
    uint8_t ndim = d.u8();
    uint8_t flags = d.u8();
    d.u8();
    v.offsetBytes = d.u64();
    if (v.slice >= storageCount_) throwDecode(which + " names a missing storage");
    if (dtype >= static_cast<uint8_t>(c10::ScalarType::NumOptions) ||
        !sendableDtype(static_cast<c10::ScalarType>(dtype))) {
      throwDecode(which + " has unknown dtype " + std::to_string(dtype));
    }
    v.dtype = static_cast<c10::ScalarType>(dtype);
    if (ndim > limits_.maxDims) throwDecode(which + " has " + std::to_string(ndim) + " dims");
    if (flags > 1) throwDecode(which + " has unknown flags");
    v.requiresGrad = flags == 1;
    if (v.requiresGrad && !c10::isFloatingType(v.dtype) && !c10::isComplexType(v.dtype)) {
      throwDecode(which + " of an integer dtype requires grad");
    }
    v.sizes.resize(ndim);
    v.strides.resize(ndim);
    for (auto& s : v.sizes) s = d.i64();
    for (auto& s : v.strides) s = d.i64();
    // The view must lie inside its slice: checked with overflow-safe math.
    uint64_t item = c10::elementSize(v.dtype);
    if (v.offsetBytes % item != 0) throwDecode(which + " is misaligned");
    bool empty = false;
    uint64_t last = 0;
    uint64_t numel = 1;
    for (uint8_t k = 0; k < ndim; ++k) {
      if (v.sizes[k] < 0 || v.strides[k] < 0) throwDecode(which + " has a negative size or stride");
      if (v.sizes[k] == 0) empty = true;
    }
    for (uint8_t k = 0; k < ndim && !empty; ++k) {
      // Bounded so later arithmetic on the tensor (numel * itemsize) cannot overflow.
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(v.sizes[k]), &numel) || numel > (1ull << 48)) {
        throwDecode(which + " has too many elements");
      }
    }
    if (!empty) {
      for (uint8_t k = 0; k < ndim; ++k) {
        uint64_t step;
        if (__builtin_mul_overflow(static_cast<uint64_t>(v.sizes[k] - 1), static_cast<uint64_t>(v.strides[k]), &step) ||
            __builtin_add_overflow(last, step, &last)) {
          throwDecode(which + " shape overflows");
        }
      }
      uint64_t extent;
      if (__builtin_add_overflow(last, 1, &extent) || __builtin_mul_overflow(extent, item, &extent) ||
          __builtin_add_overflow(extent, v.offsetBytes, &extent) || extent > sliceBytes_[v.slice]) {
        throwDecode(which + " reaches past its storage");
      }
    } else if (v.offsetBytes > sliceBytes_[v.slice]) {
      throwDecode(which + " starts past its storage");
    }
  }
  if (d.remaining() != 0) throwDecode("trailing bytes after tensor descriptors");

  meta_.resize(payloadBytes_);
  message_.payload = std::move(meta_);
  meta_ = std::string();
  // Each storage is allocated once at its final size and read straight into.
  storages_.clear();
  storages_.reserve(storageCount_);
  external_.assign(storageCount_, false);
  for (uint32_t i = 0; i < storageCount_; ++i) {
    std::optional<c10::Storage> given;
    if (source_ && sliceBytes_[i] > 0) given = source_(i, sliceBytes_[i]);
    external_[i] = given.has_value();
    storages_.push_back(given ? std::move(*given) : allocateStorage(sliceBytes_[i]));
  }
  storage_ = 0;
  stage_ = Stage::kStorage;
  nextStorage();
}

void FrameDecoder::nextStorage() {
  filled_ = 0;
  while (storage_ < storages_.size() && (sliceBytes_[storage_] == 0 || external_[storage_])) ++storage_;
  if (storage_ < storages_.size()) return;
  message_.tensors.reserve(tensorCount_);
  for (const View& v : views_) {
    at::Tensor t = at::empty({0}, at::TensorOptions().dtype(v.dtype));
    t.set_(storages_[v.slice], static_cast<int64_t>(v.offsetBytes / c10::elementSize(v.dtype)), v.sizes, v.strides);
    if (v.requiresGrad) t.requires_grad_(true);
    message_.tensors.push_back(std::move(t));
  }
  stage_ = Stage::kDone;
}

Message FrameDecoder::take() {
  TORCH_CHECK(stage_ == Stage::kDone, "no decoded frame to take");
  Message m = std::move(message_);
  message_ = Message();
  views_.clear();
  storages_.clear();
  stage_ = Stage::kHeader;
  filled_ = 0;
  declared_ = 0;
  return m;
}

Message frameFromBytes(const char* data, size_t size, const FrameLimits& limits) {
  FrameDecoder decoder(limits);
  size_t offset = 0;
  for (;;) {
    auto [dst, need] = decoder.want();
    if (need > size - offset) {
      throwDecode("truncated: needs " + std::to_string(need) + " bytes at offset " + std::to_string(offset) +
                  ", " + std::to_string(size - offset) + " remain");
    }
    std::memcpy(dst, data + offset, need);
    offset += need;
    decoder.setRemainingBound(size - offset);
    if (decoder.wrote(need)) break;
  }
  if (offset != size) throwDecode(std::to_string(size - offset) + " bytes after the frame");
  return decoder.take();
}

}  // namespace torchrpc
