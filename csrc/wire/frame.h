#pragma once

// Frames: how a Message crosses a byte stream. The layout is documented in
// wire/FORMAT.md; keep the two in step.

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "messages/message.h"

namespace torchrpc {

constexpr uint32_t kFrameMagic = 0x43505254;  // "TRPC" read as little-endian bytes
constexpr uint8_t kFrameVersion = 1;
constexpr size_t kFrameHeaderBytes = 48;

// Hard limits checked against the header before anything is allocated.
struct FrameLimits {
  uint32_t maxPayloadBytes = 1u << 30;      // payload + descriptors
  uint32_t maxTensors = 1u << 20;
  uint64_t maxStorageBytes = 1ull << 40;    // all tensor bytes of one frame
  uint8_t maxDims = 64;
};

// A frame ready to write: header and descriptors are owned here, the payload
// and tensor bytes are borrowed from the Message (which must outlive it), so
// encoding copies no tensor bytes.
struct EncodedFrame {
  struct Chunk {
    const char* data;
    size_t size;
  };
  std::array<char, kFrameHeaderBytes> header;
  std::string descriptors;
  // header, payload, descriptors, then each storage's bytes, in wire order.
  std::vector<Chunk> chunks;
  size_t totalBytes = 0;
};

EncodedFrame encodeFrame(const Message& message);

// Where a decoder reads from: a socket, or bytes in memory.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Fills dst with exactly n bytes or throws RpcError.
  virtual void readExact(char* dst, size_t n) = 0;
  // An upper bound on the bytes this source can still deliver (memory sources
  // know it; sockets don't), so a lying header cannot make us allocate.
  virtual uint64_t remainingBound() const { return UINT64_MAX; }
};

// Reads one frame. Throws RpcError(kDecode) naming what is wrong; never reads
// or allocates beyond what the header, checked against `limits`, allows.
Message readFrame(ByteSource& source, const FrameLimits& limits);

// Decodes a whole frame held in memory (Python, tests and tools).
Message frameFromBytes(const char* data, size_t size, const FrameLimits& limits = {});

}  // namespace torchrpc
