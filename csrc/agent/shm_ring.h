#pragma once

// A single-producer single-consumer byte ring in memory shared by two
// processes, with futex wake-ups. The producer is whichever thread holds the
// connection's send lock, the consumer the connection's reader thread.
//
// Waiting: a side that finds nothing to do spins a little (a reply to a
// small call usually arrives within microseconds), then says it is waiting
// (readerWaiting / writerWaiting) and sleeps on a sequence word the other
// side bumps after every publish / consume. The other side issues the wake
// syscall only when the waiting flag is set, so a busy ring costs no system
// calls. Sleeps are bounded (the caller passes a timeout), so a waiter
// whose peer died notices on its own; nothing ever waits on a dead process.

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>

namespace torchrpc {
namespace shm {

inline void futexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeoutNs) {
  timespec ts{static_cast<time_t>(timeoutNs / 1000000000), static_cast<long>(timeoutNs % 1000000000)};
  // Not FUTEX_PRIVATE: the word lives in a mapping shared across processes.
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

inline void futexWake(std::atomic<uint32_t>* word) {
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

inline void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The shared part of one ring; each hot word on its own cache line.
struct RingHeader {
  alignas(64) std::atomic<uint64_t> head;  // bytes ever written (producer)
  alignas(64) std::atomic<uint64_t> tail;  // bytes ever consumed (consumer)
  alignas(64) std::atomic<uint32_t> dataSeq;
  std::atomic<uint32_t> readerWaiting;
  alignas(64) std::atomic<uint32_t> spaceSeq;
  std::atomic<uint32_t> writerWaiting;
  // Set by a side that closes the connection, so the other stops at once.
  alignas(64) std::atomic<uint32_t> closed;
};
static_assert(sizeof(RingHeader) == 320, "RingHeader layout is shared between processes");

class Ring {
 public:
  Ring() = default;
  Ring(RingHeader* header, char* data, uint64_t capacity) : h_(header), data_(data), mask_(capacity - 1) {}

  uint64_t capacity() const { return mask_ + 1; }

  // --- producer ---
  uint64_t writable() const {
    return capacity() - (h_->head.load(std::memory_order_relaxed) - h_->tail.load(std::memory_order_acquire));
  }
  // Copies n <= writable() bytes at the write position (not yet visible).
  void put(const char* p, size_t n) {
    uint64_t at = pending_;
    while (n > 0) {
      size_t off = at & mask_;
      size_t k = std::min<size_t>(n, capacity() - off);
      std::memcpy(data_ + off, p, k);
      p += k;
      n -= k;
      at += k;
    }
    pending_ = at;
  }
  // Starts a batch of put()s at the current head.
  void begin() { pending_ = h_->head.load(std::memory_order_relaxed); }
  // Makes the put() bytes visible and wakes a sleeping reader.
  void publish() {
    h_->head.store(pending_, std::memory_order_release);
    h_->dataSeq.fetch_add(1, std::memory_order_seq_cst);
    if (h_->readerWaiting.load(std::memory_order_seq_cst)) futexWake(&h_->dataSeq);
  }
  // Waits until some space frees (or timeoutNs passes, or the spin ends
  // with space). Returns the bytes writable now.
  uint64_t waitWritable(int64_t timeoutNs) {
    uint64_t w = writable();
    if (w > 0) return w;
    h_->writerWaiting.store(1, std::memory_order_seq_cst);
    uint32_t seq = h_->spaceSeq.load(std::memory_order_seq_cst);
    w = writable();
    if (w == 0 && !h_->closed.load()) futexWait(&h_->spaceSeq, seq, timeoutNs);
    h_->writerWaiting.store(0, std::memory_order_relaxed);
    return writable();
  }

  // --- consumer ---
  uint64_t readable() const {
    return h_->head.load(std::memory_order_acquire) - h_->tail.load(std::memory_order_relaxed);
  }
  // The contiguous readable bytes at the read position.
  std::pair<const char*, size_t> peek() const {
    uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    uint64_t n = h_->head.load(std::memory_order_acquire) - tail;
    size_t off = tail & mask_;
    return {data_ + off, static_cast<size_t>(std::min<uint64_t>(n, capacity() - off))};
  }
  // Frees n bytes and wakes a writer waiting for space.
  void consume(size_t n) {
    h_->tail.store(h_->tail.load(std::memory_order_relaxed) + n, std::memory_order_release);
    h_->spaceSeq.fetch_add(1, std::memory_order_seq_cst);
    if (h_->writerWaiting.load(std::memory_order_seq_cst)) futexWake(&h_->spaceSeq);
  }
  // Spins up to spinNs, then sleeps up to timeoutNs, until bytes are
  // readable. Returns readable().
  uint64_t waitReadable(int64_t spinNs, int64_t timeoutNs) {
    uint64_t r = readable();
    if (r > 0) return r;
    if (spinNs > 0) {
      // Yielding while spinning: on a machine with few cores the thread
      // that will produce the bytes (or the caller waiting for them) may
      // need this core.
      const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spinNs);
      do {
        for (int i = 0; i < 32; ++i) cpuRelax();
        if ((r = readable()) > 0) return r;
        ::sched_yield();
        if ((r = readable()) > 0) return r;
      } while (std::chrono::steady_clock::now() < until);
    }
    h_->readerWaiting.store(1, std::memory_order_seq_cst);
    uint32_t seq = h_->dataSeq.load(std::memory_order_seq_cst);
    r = readable();
    if (r == 0 && !h_->closed.load()) futexWait(&h_->dataSeq, seq, timeoutNs);
    h_->readerWaiting.store(0, std::memory_order_relaxed);
    return readable();
  }

  // Either side: marks the ring closed and wakes both of its waiters.
  void close() {
    h_->closed.store(1);
    h_->dataSeq.fetch_add(1);
    h_->spaceSeq.fetch_add(1);
    futexWake(&h_->dataSeq);
    futexWake(&h_->spaceSeq);
  }
  bool closed() const { return h_->closed.load(std::memory_order_relaxed) != 0; }

 private:
  RingHeader* h_ = nullptr;
  char* data_ = nullptr;
  uint64_t mask_ = 0;
  uint64_t pending_ = 0;  // producer's write position within a batch
};

}  // namespace shm
}  // namespace torchrpc
