#pragma once

// The tensor pool of one direction of a shared-memory connection: pages of
// shared memory the sender copies tensor bytes into, which the receiver
// wraps as tensor storage without copying. A shared word per page says
// whether the run starting there is still held: the sender sets it to the
// run's length before the frame naming it is published, and the receiver's
// storage deleter clears it when the last tensor viewing the run is freed,
// in whatever order and on whatever thread that happens. The sender alone
// decides placement, so only those words are shared.

#include <c10/core/Storage.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace torchrpc {
namespace shm {

constexpr uint64_t kPoolPageBytes = 16 * 1024;
// Smaller tensors go inline with the frame: a copy that small costs less
// than a page.
constexpr uint64_t kPoolMinBytes = 16 * 1024;

// A mapped shared segment; received storages keep it alive.
struct Segment {
  Segment(void* a, size_t n) : addr(a), bytes(n) {}
  ~Segment();
  void* addr;
  size_t bytes;
};

// Where a frame's storage lies in the pool (what the ring carries for it).
struct PoolRef {
  uint32_t storage;  // index of the storage within its frame
  uint32_t page;     // first page
  uint64_t bytes;
};
static_assert(sizeof(PoolRef) == 16, "PoolRef is a wire format");

inline uint32_t pagesFor(uint64_t bytes) {
  return static_cast<uint32_t>((bytes + kPoolPageBytes - 1) / kPoolPageBytes);
}

// The sending side: placement, under the connection's send lock.
class PoolSender {
 public:
  PoolSender() = default;
  PoolSender(char* base, std::atomic<uint32_t>* held, uint32_t pages)
      : base_(base), held_(held), pages_(pages), used_((pages + 63) / 64, 0) {}

  // The first page of a free run for `bytes`, marked held; nullopt when the
  // pool has no such run (the caller streams the bytes instead).
  std::optional<uint32_t> allocate(uint64_t bytes);
  char* page(uint32_t p) const { return base_ + uint64_t{p} * kPoolPageBytes; }
  // Bytes of runs the receiver still holds.
  uint64_t inUseBytes();
  uint64_t capacityBytes() const { return uint64_t{pages_} * kPoolPageBytes; }

 private:
  void reclaim();
  void mark(uint32_t first, uint32_t n, bool used);

  char* base_ = nullptr;
  std::atomic<uint32_t>* held_ = nullptr;
  uint32_t pages_ = 0;
  std::vector<uint64_t> used_;  // bitmap of pages this side believes held
  std::vector<std::pair<uint32_t, uint32_t>> outstanding_;  // (first page, pages)
};

// The receiving side: storage over the run `ref` names, released when freed.
// Throws RpcError(kDecode) if `ref` lies outside the pool.
c10::Storage poolStorage(const std::shared_ptr<Segment>& segment, char* base, std::atomic<uint32_t>* held,
                         uint32_t pages, const PoolRef& ref);
// Releases a run the receiver will not use (its frame failed to decode).
void releaseRun(std::atomic<uint32_t>* held, uint32_t pages, const PoolRef& ref);

}  // namespace shm
}  // namespace torchrpc
