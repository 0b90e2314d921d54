#include "agent/shm_transport.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <fstream>
#include <random>

#include "agent/shm_pool.h"
#include "agent/shm_ring.h"
#include "messages/control.h"

namespace torchrpc {
namespace {

using Clock = std::chrono::steady_clock;
using shm::PoolRef;
using shm::Ring;
using shm::RingHeader;

constexpr uint32_t kSetupMagic = 0x4d485354;  // "TSHM"
constexpr uint32_t kSetupVersion = 1;
// How long a reader or writer sleeps before it looks at the peer's socket,
// its heartbeat and silence clocks again.
constexpr int64_t kHousekeepingNs = 50'000'000;
constexpr uint64_t kMinRingBytes = 64 * 1024;
constexpr size_t kDrainBytes = 16 << 20;
constexpr uint64_t kMaxRingBytes = 1ull << 30;
constexpr uint64_t kMaxPoolBytes = 64ull << 30;

[[noreturn]] void throwPeerLost(const std::string& what) {
  throw RpcError(ErrorKind::kPeerLost, "torchrpc: " + what);
}

std::string errnoText(const std::string& what) { return what + ": " + std::strerror(errno); }

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

uint64_t roundUpPow2(uint64_t n) {
  uint64_t p = kMinRingBytes;
  while (p < n) p <<= 1;
  return p;
}

sockaddr_un abstractAddress(const std::string& name, socklen_t& len) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  addr.sun_path[0] = '\0';  // abstract: no file, gone with the socket
  std::memcpy(addr.sun_path + 1, name.data(), std::min(name.size(), sizeof(addr.sun_path) - 2));
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return addr;
}

// What the dialer sends with the memfd.
struct Setup {
  uint32_t magic;
  uint32_t version;
  uint64_t ringBytes;
  uint64_t poolBytes;
};

// Where everything lies in the segment. Direction 0 is dialer -> listener.
struct Layout {
  uint64_t ringBytes = 0, poolBytes = 0;
  uint32_t pages = 0;
  size_t header[2]{}, held[2]{}, ring[2]{}, pool[2]{};
  size_t total = 0;

  Layout(uint64_t ringSize, uint64_t poolSize) : ringBytes(ringSize), poolBytes(poolSize) {
    pages = static_cast<uint32_t>(poolSize / shm::kPoolPageBytes);
    auto align = [](size_t n, size_t a) { return (n + a - 1) / a * a; };
    size_t at = 0;
    for (int d = 0; d < 2; ++d) {
      header[d] = at;
      at += sizeof(RingHeader);
    }
    for (int d = 0; d < 2; ++d) {
      held[d] = at;
      at += size_t{pages} * sizeof(uint32_t);
    }
    at = align(at, 4096);
    for (int d = 0; d < 2; ++d) {
      ring[d] = at;
      at += ringBytes;
    }
    at = align(at, shm::kPoolPageBytes);
    for (int d = 0; d < 2; ++d) {
      pool[d] = at;
      at += size_t{pages} * shm::kPoolPageBytes;
    }
    total = at;
  }
};

// Sends `n` bytes and, if fd >= 0, the descriptor with them.
void sendWithFd(int sock, const void* data, size_t n, int fd) {
  iovec iov{const_cast<void*>(data), n};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  if (::sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(n)) throwPeerLost(errnoText("shared-memory set-up"));
}

// Waits for the socket to be readable until `deadline`.
void awaitReadable(int sock, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) throwPeerLost(what + ": timed out");
    pollfd p{sock, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left));
    if (r > 0) return;
    if (r < 0 && errno != EINTR) throwPeerLost(errnoText(what));
  }
}

// Receives exactly `n` bytes and at most one descriptor (-1 if none came).
int recvWithFd(int sock, void* data, size_t n, Clock::time_point deadline, const std::string& what) {
  awaitReadable(sock, deadline, what);
  // The rest of a message that began arriving must not take forever either.
  timeval tv{1, 0};
  ::setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  iovec iov{data, n};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t got = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
  int fd = -1;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  }
  if (got != static_cast<ssize_t>(n)) {
    if (fd >= 0) ::close(fd);
    throwPeerLost(what + ": the peer hung up during set-up");
  }
  return fd;
}

std::shared_ptr<shm::Segment> mapSegment(int memfd, size_t bytes) {
  void* addr = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (addr == MAP_FAILED) throwPeerLost(errnoText("mapping shared memory"));
  return std::make_shared<shm::Segment>(addr, bytes);
}

}  // namespace

std::string localHostId() {
  std::string boot;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot;
  struct stat st {};
  ::stat("/proc/self/ns/net", &st);
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return boot + "." + std::to_string(st.st_ino) + "." + host;
}

// ---------------------------------------------------------------------------

class ShmTransport::ShmConnection : public Connection, public std::enable_shared_from_this<ShmConnection> {
 public:
  ShmConnection(ShmTransport& transport, int sock, std::shared_ptr<shm::Segment> segment, const Layout& layout,
                bool dialer, int64_t peerId, uint64_t serial)
      : transport_(transport), sock_(sock), segment_(std::move(segment)), pages_(layout.pages),
        decoder_(transport.options_.limits) {
    peerId_ = peerId;
    serial_ = serial;
    char* base = static_cast<char*>(segment_->addr);
    const int out = dialer ? 0 : 1, in = 1 - out;
    out_ = Ring(reinterpret_cast<RingHeader*>(base + layout.header[out]), base + layout.ring[out], layout.ringBytes);
    in_ = Ring(reinterpret_cast<RingHeader*>(base + layout.header[in]), base + layout.ring[in], layout.ringBytes);
    pool_ = shm::PoolSender(base + layout.pool[out], reinterpret_cast<std::atomic<uint32_t>*>(base + layout.held[out]),
                            layout.pages);
    inPool_ = base + layout.pool[in];
    inHeld_ = reinterpret_cast<std::atomic<uint32_t>*>(base + layout.held[in]);
    maxSpinNs_ = static_cast<int64_t>(transport.shm_.spinMicros * 1000);
    spinNs_ = maxSpinNs_;
    lastRecv_ = Clock::now();
    lastSendNs_ = nowNs();
    decoder_.setStorageSource([this](uint32_t index, uint64_t nbytes) -> std::optional<c10::Storage> {
      for (size_t i = 0; i < refs_.size(); ++i) {
        if (refs_[i].storage != index) continue;
        if (refs_[i].bytes != nbytes) {
          throw RpcError(ErrorKind::kDecode, "torchrpc: a pool reference disagrees with its frame's storage size");
        }
        c10::Storage s = shm::poolStorage(segment_, inPool_, inHeld_, pages_, refs_[i]);
        refs_[i] = refs_.back();
        refs_.pop_back();
        return s;
      }
      return std::nullopt;
    });
  }

  ~ShmConnection() override {
    releaseRefs();
    if (sock_ >= 0) ::close(sock_);
  }

  const char* transportName() const override { return "shm"; }
  double secondsSinceHeard() const override {
    return std::chrono::duration<double>(Clock::now() - lastRecv_.load()).count();
  }

  std::vector<std::pair<std::string, int64_t>> stats() const override {
    std::lock_guard<std::mutex> g(sendMu_);
    return {{"pool_bytes", static_cast<int64_t>(pool_.capacityBytes())},
            {"pool_in_use_bytes", static_cast<int64_t>(pool_.inUseBytes())},
            {"pool_sends", static_cast<int64_t>(poolSends_)},
            {"pool_fallbacks", static_cast<int64_t>(poolFallbacks_)}};
  }

  void start() {
    auto self = shared_from_this();
    reader_ = std::thread([self] { self->readLoop(); });
    writer_ = std::thread([self] { self->writeLoop(); });
  }

  void send(const Message& message) override {
    EncodedFrame frame = encodeFrame(message);
    std::unique_lock<std::mutex> g(sendMu_);
    if (closing_) throwPeerLost("connection to worker " + std::to_string(peerId_) + " is closed");
    Outgoing out;
    placeTensors(frame, out);
    const size_t total = out.prefix.size() + frame.totalBytes - out.pooledBytes;
    if (queue_.empty() && total <= out_.writable()) {
      // The common case: the whole frame fits now; no thread hop.
      out_.begin();
      out_.put(out.prefix.data(), out.prefix.size());
      forEachPiece(message, frame, out.skip, [&](const char* p, size_t n) { out_.put(p, n); });
      out_.publish();
      lastSendNs_ = nowNs();
      return;
    }
    // Owned copies for the writer thread: the caller's message may go away.
    auto queued = std::make_unique<Outgoing>(std::move(out));
    queued->message = message;
    queued->frame = encodeFrame(queued->message);
    queue_.push_back(std::move(queued));
    g.unlock();
    writerCv_.notify_one();
  }

  void close() override { requestClose(CloseReason::kLocal, "closed locally"); }

  // A caller waiting for a reply reads the ring itself: no wake-up of the
  // reader thread and no hand-over from it. While a caller polls, the reader
  // thread stands aside (it neither spins nor asks to be woken), and the
  // last caller to stop wakes it if bytes are left.
  bool pollUntil(const std::function<bool()>& done, std::chrono::steady_clock::time_point until) override {
    if (closingNow()) return false;
    pollers_.fetch_add(1);
    auto self = shared_from_this();
    while (!done() && Clock::now() < until && !closingNow()) {
      std::unique_lock<std::mutex> g(readMu_, std::try_to_lock);
      if (g.owns_lock() && in_.readable() > 0 && !closingNow()) {
        try {
          drain(self);
        } catch (const std::exception& e) {
          requestClose(CloseReason::kBroken, e.what());  // the reader thread reports it
        }
        continue;
      }
      g = std::unique_lock<std::mutex>();
      std::this_thread::yield();
    }
    if (pollers_.fetch_sub(1) == 1) {
      readerEpoch_.fetch_add(1);
      shm::futexWake(&readerEpoch_);  // process-private word, cheap when nobody sleeps
    }
    return true;
  }

  // Ends the connection; the reader thread reports it (exactly once).
  void requestClose(CloseReason reason, const std::string& why) {
    {
      std::lock_guard<std::mutex> g(sendMu_);
      if (closing_) return;
      closing_ = true;
      closeReason_ = reason;
      closeWhy_ = why;
    }
    out_.close();
    in_.close();
    ::shutdown(sock_, SHUT_RDWR);
    writerCv_.notify_all();
  }

  // Once closing: waits for a polling caller in the middle of delivering;
  // after this none delivers again (it checks closing under readMu_).
  void quiesce() { std::lock_guard<std::mutex> g(readMu_); }

  void join() {
    for (std::thread* t : {&reader_, &writer_}) {
      if (!t->joinable()) continue;
      if (t->get_id() == std::this_thread::get_id()) t->detach();
      else t->join();
    }
  }

  bool exited() const { return exited_.load(); }

 private:
  // A frame on the ring: [u32 pool refs][u32 0][PoolRef...] then the frame
  // with the pooled storages' bytes left out.
  struct Outgoing {
    std::string prefix;
    std::vector<bool> skip;  // by storage: its bytes are in the pool
    uint64_t pooledBytes = 0;
    Message message;  // set when queued
    EncodedFrame frame;
    size_t piece = 0, offset = 0;  // progress of a queued frame
  };

  // Copies large storages into the pool where it has room (under sendMu_).
  void placeTensors(const EncodedFrame& frame, Outgoing& out) {
    const size_t storages = frame.chunks.size() - 3;
    out.skip.assign(storages, false);
    std::vector<PoolRef> refs;
    for (size_t i = 0; i < storages; ++i) {
      const auto& c = frame.chunks[3 + i];
      if (c.size < shm::kPoolMinBytes || pages_ == 0) continue;
      auto page = pool_.allocate(c.size);
      if (!page) {
        ++poolFallbacks_;
        continue;
      }
      std::memcpy(pool_.page(*page), c.data, c.size);
      refs.push_back({static_cast<uint32_t>(i), *page, c.size});
      out.skip[i] = true;
      out.pooledBytes += c.size;
      ++poolSends_;
    }
    uint32_t head[2] = {static_cast<uint32_t>(refs.size()), 0};
    out.prefix.assign(reinterpret_cast<const char*>(head), sizeof(head));
    out.prefix.append(reinterpret_cast<const char*>(refs.data()), refs.size() * sizeof(PoolRef));
  }

  template <typename F>
  static void forEachPiece(const Message& m, const EncodedFrame& f, const std::vector<bool>& skip, F&& fn) {
    fn(f.header.data(), kFrameHeaderBytes);
    if (!m.payload.empty()) fn(m.payload.data(), m.payload.size());
    if (!f.descriptors.empty()) fn(f.descriptors.data(), f.descriptors.size());
    for (size_t i = 3; i < f.chunks.size(); ++i) {
      if (!skip[i - 3] && f.chunks[i].size > 0) fn(f.chunks[i].data, f.chunks[i].size);
    }
  }

  // Frames too large for the ring's free space, in order.
  void writeLoop() {
    std::unique_lock<std::mutex> g(sendMu_);
    for (;;) {
      writerCv_.wait(g, [&] { return closing_ || !queue_.empty(); });
      if (closing_) break;
      Outgoing& o = *queue_.front();
      std::vector<std::pair<const char*, size_t>> pieces;
      pieces.emplace_back(o.prefix.data(), o.prefix.size());
      forEachPiece(o.message, o.frame, o.skip, [&](const char* p, size_t n) { pieces.emplace_back(p, n); });
      out_.begin();
      uint64_t room = out_.writable();
      while (o.piece < pieces.size() && room > 0) {
        size_t k = std::min<uint64_t>(room, pieces[o.piece].second - o.offset);
        out_.put(pieces[o.piece].first + o.offset, k);
        room -= k;
        o.offset += k;
        if (o.offset == pieces[o.piece].second) {
          ++o.piece;
          o.offset = 0;
        }
      }
      out_.publish();
      lastSendNs_ = nowNs();
      if (o.piece == pieces.size()) {
        auto done = std::move(queue_.front());
        queue_.pop_front();
        g.unlock();
        done.reset();  // may free tensors: never under the lock
        g.lock();
        continue;
      }
      g.unlock();
      out_.waitWritable(kHousekeepingNs);
      g.lock();
    }
    decltype(queue_) dropped;
    dropped.swap(queue_);
    g.unlock();
  }

  void readLoop() {
    auto self = shared_from_this();
    int64_t lastHousekeeping = nowNs();
    try {
      while (!closingNow()) {
        const uint32_t epoch = readerEpoch_.load();
        if (pollers_.load() > 0) {
          // A caller is reading; wait until it stops (bounded, for housekeeping).
          shm::futexWait(&readerEpoch_, epoch, 1'000'000);
          const int64_t now = nowNs();
          if (now - lastHousekeeping >= kHousekeepingNs) {
            housekeeping(false);
            lastHousekeeping = now;
          }
          continue;
        }
        const int64_t waitStart = nowNs();
        uint64_t r = in_.waitReadable(spinNs_, kHousekeepingNs);
        if (r > 0) {
          adaptSpin(nowNs() - waitStart);
          std::lock_guard<std::mutex> g(readMu_);  // a polling caller may have taken it all
          drain(self);
        }
        const int64_t now = nowNs();
        if (r == 0 || now - lastHousekeeping >= kHousekeepingNs) {
          housekeeping(now - lastHousekeeping > 4 * kHousekeepingNs);
          lastHousekeeping = now;
        }
      }
    } catch (const RpcError& e) {
      requestClose(CloseReason::kBroken, e.what());
    } catch (const std::exception& e) {
      requestClose(CloseReason::kBroken, e.what());
    }
    CloseReason reason;
    std::string why;
    {
      std::lock_guard<std::mutex> g(sendMu_);
      reason = closeReason_;
      why = closeWhy_;
    }
    releaseRefs();
    try {
      transport_.callbacks_.onClosed(self, reason, why);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "torchrpc: onClosed failed: %s\n", e.what());
    }
    exited_ = true;
  }

  bool closingNow() const { return closing_.load(); }

  // Spin about as long as replies have recently taken to come, within bounds.
  void adaptSpin(int64_t waited) {
    if (waited <= spinNs_) return;
    if (waited < 4 * maxSpinNs_) spinNs_ = std::min(maxSpinNs_, std::max<int64_t>(spinNs_ * 2, 2000));
    else spinNs_ /= 2;
  }

  // Feeds the readable bytes to the parser (under readMu_), at most
  // kDrainBytes at a time so a peer that never stops sending cannot starve
  // housekeeping.
  void drain(const std::shared_ptr<ShmConnection>& self) {
    size_t total = 0;
    if (in_.readable() > 0) lastRecv_ = Clock::now();
    while (total < kDrainBytes) {
      auto [p, n] = in_.peek();
      if (n == 0) return;
      size_t used = parse(self, p, n);
      in_.consume(used);
      total += used;
    }
  }

  size_t parse(const std::shared_ptr<ShmConnection>& self, const char* p, size_t n) {
    size_t used = 0;
    while (used < n) {
      if (stage_ == Stage::kPrefix || stage_ == Stage::kRefs) {
        size_t want = (stage_ == Stage::kPrefix ? 8 : refCount_ * sizeof(PoolRef)) - staged_.size();
        size_t k = std::min(want, n - used);
        staged_.append(p + used, k);
        used += k;
        if (k < want) continue;
        if (stage_ == Stage::kPrefix) {
          uint32_t head[2];
          std::memcpy(head, staged_.data(), sizeof(head));
          staged_.clear();
          if (head[0] > transport_.options_.limits.maxTensors || head[1] != 0) {
            throw RpcError(ErrorKind::kDecode, "torchrpc: corrupt shared-memory frame prefix");
          }
          refCount_ = head[0];
          stage_ = refCount_ > 0 ? Stage::kRefs : Stage::kFrame;
        } else {
          refs_.resize(refCount_);
          std::memcpy(refs_.data(), staged_.data(), staged_.size());
          staged_.clear();
          stage_ = Stage::kFrame;
        }
        continue;
      }
      auto [dst, need] = decoder_.want();
      size_t k = std::min(need, n - used);
      std::memcpy(dst, p + used, k);
      used += k;
      if (decoder_.wrote(k)) {
        Message m = decoder_.take();
        releaseRefs();  // any the frame did not claim
        stage_ = Stage::kPrefix;
        if (m.type == MessageType::kHeartbeat) continue;
        transport_.callbacks_.onMessage(self, std::move(m));
      }
    }
    return used;
  }

  void releaseRefs() {
    for (const PoolRef& r : refs_) shm::releaseRun(inHeld_, pages_, r);
    refs_.clear();
  }

  // Liveness, on the reader thread: the peer's process, its heartbeats, ours.
  void housekeeping(bool stalled) {
    pollfd pfd{sock_, POLLIN | POLLRDHUP, 0};
    bool gone = in_.closed() || (::poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLRDHUP | POLLERR)));
    if (gone) {
      {
        std::lock_guard<std::mutex> g(readMu_);
        drain(shared_from_this());  // what it sent before leaving (a SHUTDOWN_NOTICE, say)
      }
      requestClose(CloseReason::kPeerClosed, "worker " + std::to_string(peerId_) + " closed the connection");
      return;
    }
    const auto& o = transport_.options_;
    if (stalled) lastRecv_ = Clock::now();  // we were not looking: judge next time
    if (Clock::now() - lastRecv_.load() > std::chrono::duration<double>(o.peerTimeout)) {
      requestClose(CloseReason::kSilent, "worker " + std::to_string(peerId_) + " sent nothing for " +
                                             c10::str(o.peerTimeout) +
                                             " s (peer_timeout): it froze, died or the network failed");
      return;
    }
    if (nowNs() - lastSendNs_.load() >= static_cast<int64_t>(o.heartbeatInterval * 1e9)) {
      try {
        send(Heartbeat().toMessage());
      } catch (const RpcError&) {
      }
    }
  }

  ShmTransport& transport_;
  int sock_;
  std::shared_ptr<shm::Segment> segment_;
  uint32_t pages_;
  Ring out_, in_;
  char* inPool_ = nullptr;
  std::atomic<uint32_t>* inHeld_ = nullptr;

  // Sending side, guarded by sendMu_.
  mutable std::mutex sendMu_;
  std::condition_variable writerCv_;
  mutable shm::PoolSender pool_;
  std::deque<std::unique_ptr<Outgoing>> queue_;
  uint64_t poolSends_ = 0, poolFallbacks_ = 0;
  std::atomic<bool> closing_{false};  // set under sendMu_; read anywhere
  CloseReason closeReason_ = CloseReason::kLocal;
  std::string closeWhy_;
  std::atomic<int64_t> lastSendNs_{0};

  // Reading state: the reader thread's, or a polling caller's, under readMu_.
  std::mutex readMu_;
  std::atomic<int> pollers_{0};           // callers in pollUntil
  std::atomic<uint32_t> readerEpoch_{0};  // bumped when the last one leaves
  enum class Stage { kPrefix, kRefs, kFrame };
  Stage stage_ = Stage::kPrefix;
  std::string staged_;
  uint32_t refCount_ = 0;
  std::vector<PoolRef> refs_;  // this frame's pool storages not yet claimed
  FrameDecoder decoder_;
  std::atomic<Clock::time_point> lastRecv_;
  int64_t spinNs_ = 0, maxSpinNs_ = 0;

  std::thread reader_, writer_;
  std::atomic<bool> exited_{false};
};

// ---------------------------------------------------------------------------

TransportFactory shmTransport(ShmOptions shm) {
  return [shm](const TransportOptions& options, TransportCallbacks callbacks) {
    return std::make_unique<ShmTransport>(options, shm, std::move(callbacks));
  };
}

ShmTransport::ShmTransport(TransportOptions options, ShmOptions shm, TransportCallbacks callbacks)
    : options_(std::move(options)), shm_(shm), callbacks_(std::move(callbacks)), hostId_(localHostId()) {
  shm_.ringBytes = roundUpPow2(std::min(shm_.ringBytes, kMaxRingBytes));
  shm_.poolBytes = std::min(shm_.poolBytes, kMaxPoolBytes) / shm::kPoolPageBytes * shm::kPoolPageBytes;
  std::random_device rd;
  char name[64];
  std::snprintf(name, sizeof(name), "torchrpc-%d-%08x%08x", static_cast<int>(::getpid()), rd(), rd());
  socketName_ = name;
  listenFd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  socklen_t len;
  sockaddr_un addr = abstractAddress(socketName_, len);
  if (listenFd_ < 0 || ::bind(listenFd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
      ::listen(listenFd_, 256) != 0) {
    auto msg = errnoText("torchrpc: cannot listen for shared-memory peers");
    if (listenFd_ >= 0) ::close(listenFd_);
    throw RpcError(ErrorKind::kRpc, msg);
  }
  wakeFd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  acceptor_ = std::thread([this] { acceptLoop(); });
}

ShmTransport::~ShmTransport() { shutdown(); }

std::string ShmTransport::address() const { return "shm://" + hostId_ + "/" + socketName_; }

bool ShmTransport::reaches(const std::string& address) const {
  const std::string rest = splitScheme(address).second;
  auto slash = rest.find('/');
  return slash != std::string::npos && rest.substr(0, slash) == hostId_;
}

void ShmTransport::acceptLoop() {
  while (!stopped_) {
    pollfd fds[2] = {{listenFd_, POLLIN, 0}, {wakeFd_, POLLIN, 0}};
    if (::poll(fds, 2, 1000) <= 0) continue;
    if (stopped_) break;
    int fd = ::accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    std::lock_guard<std::mutex> g(mu_);
    // Finished handshakes are joined here, so their threads never pile up.
    for (auto it = handshakes_.begin(); it != handshakes_.end();) {
      if (it->done->load()) {
        it->thread.join();
        it = handshakes_.erase(it);
      } else {
        ++it;
      }
    }
    if (stopped_) {
      ::close(fd);
      continue;
    }
    if (handshakes_.size() >= options_.maxPendingHandshakes) {
      // Too many connections mid-handshake: end the oldest (as TCP does), so
      // idle strangers cannot lock a worker's peers out. Its thread fails
      // its handshake at once and is joined on a later accept.
      for (auto& h : handshakes_) {
        if (!h.done->load() && !h.evicted) {
          h.evicted = true;
          ::shutdown(h.fd, SHUT_RDWR);
          break;
        }
      }
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    handshakes_.push_back({fd, std::thread([this, fd, done] { onAccepted(fd, done); }), done, false});
  }
}

void ShmTransport::onAccepted(int fd, const std::shared_ptr<std::atomic<bool>>& done) {
  std::shared_ptr<ShmConnection> conn;  // owns fd once made
  bool ok = false;
  try {
    const int64_t dialer = listenHandshake(fd, options_.credentials, options_.handshakeTimeout);
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(options_.handshakeTimeout));
    Setup setup{};
    int memfd = recvWithFd(fd, &setup, sizeof(setup), deadline, "shared-memory set-up");
    if (memfd < 0) throwPeerLost("shared-memory set-up came without its segment");
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{memfd};
    Layout layout(setup.ringBytes, setup.poolBytes);
    struct stat st {};
    int seals = ::fcntl(memfd, F_GET_SEALS);
    if (setup.magic != kSetupMagic || setup.version != kSetupVersion || setup.ringBytes < kMinRingBytes ||
        setup.ringBytes > kMaxRingBytes || (setup.ringBytes & (setup.ringBytes - 1)) != 0 ||
        setup.poolBytes > kMaxPoolBytes || setup.poolBytes % shm::kPoolPageBytes != 0 ||
        ::fstat(memfd, &st) != 0 || static_cast<size_t>(st.st_size) != layout.total || seals < 0 ||
        (seals & (F_SEAL_SHRINK | F_SEAL_SEAL)) != (F_SEAL_SHRINK | F_SEAL_SEAL)) {
      throwPeerLost("bad shared-memory set-up from worker " + std::to_string(dialer));
    }
    auto segment = mapSegment(memfd, layout.total);
    conn = std::make_shared<ShmConnection>(*this, fd, std::move(segment), layout, false, dialer, nextSerial_++);
    char yes = 1;
    sendWithFd(fd, &yes, 1, -1);
    ok = true;
  } catch (const RpcError& e) {
    if (!stopped_ && callbacks_.onRejected) callbacks_.onRejected();
    if (e.kind() == ErrorKind::kAuth && !stopped_) std::fprintf(stderr, "%s\n", e.what());
  }
  {
    // Under mu_, so that eviction and shutdown() never touch a descriptor
    // after it was closed (and perhaps reused).
    std::lock_guard<std::mutex> g(mu_);
    done->store(true);
    if (!conn) ::close(fd);
    if (ok && !stopped_) {
      reapFinished();
      conns_.push_back(conn);
      conn->start();  // under mu_: shutdown() cannot miss its threads
    }
  }
}  // a connection not kept closes its descriptor here



std::shared_ptr<Connection> ShmTransport::connect(const std::string& address, int64_t peerId,
                                                  const std::string& peerName) {
  if (!reaches(address)) throw Unreachable("torchrpc: shared memory cannot reach " + address + " from this host");
  const std::string rest = splitScheme(address).second;
  const std::string name = rest.substr(rest.find('/') + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  socklen_t len;
  sockaddr_un addr = abstractAddress(name, len);
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    auto msg = errnoText("torchrpc: cannot connect to worker '" + peerName + "' over shared memory");
    if (fd >= 0) ::close(fd);
    throw Unreachable(msg);
  }
  const double timeout = std::min(options_.handshakeTimeout, std::max(options_.peerTimeout, 1.0));
  try {
    dialHandshake(fd, options_.credentials, peerId, timeout, peerName);
    Layout layout(shm_.ringBytes, shm_.poolBytes);
    int memfd = ::memfd_create("torchrpc-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0) throwPeerLost(errnoText("memfd_create"));
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{memfd};
    if (::ftruncate(memfd, static_cast<off_t>(layout.total)) != 0 ||
        ::fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      throwPeerLost(errnoText("sizing shared memory"));
    }
    auto segment = mapSegment(memfd, layout.total);
    Setup setup{kSetupMagic, kSetupVersion, layout.ringBytes, layout.poolBytes};
    sendWithFd(fd, &setup, sizeof(setup), memfd);
    char ok = 0;
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout));
    recvWithFd(fd, &ok, 1, deadline, "shared-memory set-up with worker '" + peerName + "'");
    if (ok != 1) throwPeerLost("worker '" + peerName + "' refused the shared-memory set-up");
    auto conn = std::make_shared<ShmConnection>(*this, fd, std::move(segment), layout, true, peerId, nextSerial_++);
    adopt(conn);
    return conn;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

void ShmTransport::adopt(const std::shared_ptr<ShmConnection>& conn) {
  std::lock_guard<std::mutex> g(mu_);
  if (stopped_) throwPeerLost("the transport is shut down");
  reapFinished();
  conns_.push_back(conn);
  conn->start();  // under mu_: shutdown() cannot miss its threads
}

void ShmTransport::reapFinished() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if ((*it)->exited()) {
      (*it)->join();
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void ShmTransport::broadcast(const Message& message) {
  std::vector<std::shared_ptr<ShmConnection>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    all = conns_;
  }
  for (auto& c : all) {
    try {
      c->send(message);
    } catch (const RpcError&) {
    }
  }
}

void ShmTransport::shutdown() {
  if (stopped_.exchange(true)) return;
  uint64_t one = 1;
  ssize_t ignored = ::write(wakeFd_, &one, sizeof(one));
  (void)ignored;
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<Pending> handshakes;
  std::vector<std::shared_ptr<ShmConnection>> conns;
  {
    std::lock_guard<std::mutex> g(mu_);
    // A stalled stranger: end its handshake now. (A finished one's
    // descriptor belongs to its connection, or is closed.)
    for (auto& h : handshakes_) {
      if (!h.done->load()) ::shutdown(h.fd, SHUT_RDWR);
    }
    handshakes.swap(handshakes_);
    conns = conns_;
  }
  for (auto& h : handshakes) h.thread.join();
  for (auto& c : conns) c->requestClose(CloseReason::kLocal, "shut down");
  for (auto& c : conns) {
    c->quiesce();
    c->join();
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    conns_.clear();
  }
  ::close(listenFd_);
  ::close(wakeFd_);
}

}  // namespace torchrpc
