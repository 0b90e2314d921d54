#include "agent/shm_pool.h"

#include <sys/mman.h>

#include "errors.h"

namespace torchrpc {
namespace shm {

Segment::~Segment() { ::munmap(addr, bytes); }

void PoolSender::mark(uint32_t first, uint32_t n, bool used) {
  for (uint32_t p = first; p < first + n; ++p) {
    if (used) used_[p / 64] |= 1ull << (p % 64);
    else used_[p / 64] &= ~(1ull << (p % 64));
  }
}

void PoolSender::reclaim() {
  for (size_t i = 0; i < outstanding_.size();) {
    auto [first, n] = outstanding_[i];
    if (held_[first].load(std::memory_order_acquire) == 0) {
      mark(first, n, false);
      outstanding_[i] = outstanding_.back();
      outstanding_.pop_back();
    } else {
      ++i;
    }
  }
}

std::optional<uint32_t> PoolSender::allocate(uint64_t bytes) {
  const uint32_t want = pagesFor(bytes);
  if (want == 0 || want > pages_) return std::nullopt;
  reclaim();
  // First fit: small runs pack at the front, so a large one finds room.
  uint32_t run = 0;
  for (uint32_t p = 0; p < pages_; ++p) {
    if (run == 0 && used_[p / 64] == ~0ull && p % 64 == 0) {  // a full word: skip it
      p += 63;
      continue;
    }
    if (used_[p / 64] & (1ull << (p % 64))) {
      run = 0;
      continue;
    }
    if (++run == want) {
      uint32_t first = p + 1 - want;
      mark(first, want, true);
      outstanding_.emplace_back(first, want);
      held_[first].store(want, std::memory_order_release);
      return first;
    }
  }
  return std::nullopt;
}

uint64_t PoolSender::inUseBytes() {
  reclaim();
  uint64_t pages = 0;
  for (auto& [first, n] : outstanding_) pages += n;
  return pages * kPoolPageBytes;
}

namespace {
struct HeldRun {
  std::shared_ptr<Segment> segment;  // the mapping outlives every view of it
  std::atomic<uint32_t>* word;
};

void releaseHeld(void* ctx) {
  auto* run = static_cast<HeldRun*>(ctx);
  run->word->store(0, std::memory_order_release);
  delete run;
}

void checkRef(uint32_t pages, const PoolRef& ref) {
  if (ref.bytes == 0 || ref.page >= pages || pagesFor(ref.bytes) > pages - ref.page) {
    throw RpcError(ErrorKind::kDecode, "torchrpc: a shared-memory frame names pool pages " +
                                           std::to_string(ref.page) + "+" + std::to_string(ref.bytes) +
                                           " bytes outside the pool");
  }
}
}  // namespace

c10::Storage poolStorage(const std::shared_ptr<Segment>& segment, char* base, std::atomic<uint32_t>* held,
                         uint32_t pages, const PoolRef& ref) {
  checkRef(pages, ref);
  char* data = base + uint64_t{ref.page} * kPoolPageBytes;
  auto* ctx = new HeldRun{segment, &held[ref.page]};
  c10::DataPtr ptr(data, ctx, &releaseHeld, c10::Device(c10::DeviceType::CPU));
  return c10::Storage(c10::Storage::use_byte_size_t(), ref.bytes, std::move(ptr), nullptr, false);
}

void releaseRun(std::atomic<uint32_t>* held, uint32_t pages, const PoolRef& ref) {
  if (ref.page < pages) held[ref.page].store(0, std::memory_order_release);
}

}  // namespace shm
}  // namespace torchrpc
