#pragma once

// Frames: how a Message crosses a byte stream. The layout is documented in
// wire/FORMAT.md; keep the two in step.

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Storage.h>

#include "wire/envelope.h"

namespace torchrpc {

constexpr uint32_t kFrameMagic = 0x43505254;  // "TRPC" read as little-endian bytes
constexpr uint8_t kFrameVersion = 1;
constexpr size_t kFrameHeaderBytes = 48;

// Hard limits checked against the header before anything is allocated.
struct FrameLimits {
  uint32_t maxPayloadBytes = 1u << 30;      // payload + descriptors
  uint32_t maxTensors = 1u << 20;
  uint64_t maxStorageBytes = 1ull << 40;    // all tensor bytes of one frame
  uint64_t maxFrameBytes = 1ull << 41;      // header + payload + descriptors + tensors
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
  // header, payload, descriptors, then each storage's bytes, in wire order
  // (chunks[3 + i] is storage i, empty when it sends no bytes).
  std::vector<Chunk> chunks;
  size_t totalBytes = 0;
};

EncodedFrame encodeFrame(const Message& message);

// Decodes frames from a byte stream as its bytes arrive, so one thread can
// serve many connections: the owner asks want() where the next bytes go,
// writes up to that many there, and reports them with wrote(). Buffers grow
// with the bytes received; tensor storage is allocated (uncommitted) once the
// checksummed metadata has arrived, and read into directly, so tensor bytes
// are copied once, from the kernel into their final storage.
class FrameDecoder {
 public:
  explicit FrameDecoder(const FrameLimits& limits) : limits_(limits) {}
  // Where the next bytes go and how many the current section still needs (> 0).
  std::pair<char*, size_t> want();
  // `n` bytes were written at want().first. Returns true when a whole frame
  // is decoded; take() hands it over and readies the next. Throws
  // RpcError(kDecode) naming what is wrong.
  bool wrote(size_t n);
  Message take();
  // True between a frame's first byte and its last.
  bool midFrame() const { return stage_ != Stage::kHeader || filled_ > 0; }
  // The whole size the current frame declared (0 until its header is read).
  uint64_t declaredBytes() const { return declared_; }
  // A bound on the bytes the source can still deliver (memory sources know
  // it; sockets don't), so a lying header cannot make us allocate.
  void setRemainingBound(uint64_t bound) { bound_ = bound; }
  // Storages that arrive out of band (a shared-memory pool): asked for each
  // storage (by index, with its size) once the metadata is in; a storage it
  // returns is used as is and its bytes are not expected in the stream.
  using StorageSource = std::function<std::optional<c10::Storage>(uint32_t index, uint64_t nbytes)>;
  void setStorageSource(StorageSource source) { source_ = std::move(source); }

 private:
  enum class Stage { kHeader, kMeta, kStorage, kDone };
  void onHeader();
  void onMeta();
  void nextStorage();

  FrameLimits limits_;
  uint64_t bound_ = UINT64_MAX;
  Stage stage_ = Stage::kHeader;
  size_t filled_ = 0;  // bytes of the current section received
  std::array<char, kFrameHeaderBytes> header_{};
  uint32_t payloadBytes_ = 0;
  uint32_t checksum_ = 0;
  uint32_t storageCount_ = 0;
  uint32_t tensorCount_ = 0;
  uint64_t storageBytes_ = 0;
  uint64_t declared_ = 0;
  std::string meta_;  // payload then descriptors; grows as bytes arrive
  size_t metaTotal_ = 0;
  struct View {
    uint32_t slice;
    c10::ScalarType dtype;
    bool requiresGrad;
    uint64_t offsetBytes;
    std::vector<int64_t> sizes, strides;
  };
  std::vector<View> views_;
  std::vector<uint64_t> sliceBytes_;
  std::vector<c10::Storage> storages_;
  std::vector<bool> external_;  // storages_[i] came from source_
  StorageSource source_;
  size_t storage_ = 0;  // index of the storage being filled
  Message message_;
};

// Decodes a whole frame held in memory (Python, tests and tools).
Message frameFromBytes(const char* data, size_t size, const FrameLimits& limits = {});

}  // namespace torchrpc
