#pragma once

// The frame header and the helpers the encoder (frame.cpp) and the decoder
// (frame_decoder.cpp) share. Internal to wire/.

#include <c10/core/ScalarType.h>
#include <c10/core/Storage.h>

#include <cstddef>
#include <cstdint>

#include "wire/frame.h"

namespace torchrpc {

struct Header {
  uint16_t type;
  int64_t id;
  uint32_t payloadBytes;
  uint32_t descriptorBytes;
  uint32_t storageCount;
  uint32_t tensorCount;
  uint64_t storageBytes;
  uint32_t checksum;
};

constexpr size_t kChecksumOffset = 40;

// CRC-32C (Castagnoli) of header and metadata.
uint32_t crc32c(uint32_t crc, const char* data, size_t n);
// Checks magic, version, type and every size against `limits`.
Header parseHeader(const char* bytes, const FrameLimits& limits);
bool sendableDtype(c10::ScalarType t);
// Uninitialised storage for received tensor bytes: pages are committed only
// as the bytes arrive.
c10::Storage allocateStorage(uint64_t nbytes);

}  // namespace torchrpc
