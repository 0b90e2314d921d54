#include "agent/tcp_transport.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <vector>

#include "messages/control.h"

namespace torchrpc {
namespace {

using Clock = std::chrono::steady_clock;

// Bytes one connection may consume per wake-up before the loop serves the
// others (level-triggered epoll comes back for the rest).
constexpr size_t kFairShareBytes = 4 << 20;
// Reads at least this large go straight into their destination (a tensor's
// storage); smaller ones are batched through the staging buffer.
constexpr size_t kDirectReadBytes = 16 * 1024;
constexpr size_t kStagingBytes = 64 * 1024;
constexpr auto kAcceptBackoff = std::chrono::milliseconds(100);
void* const kListenTag = reinterpret_cast<void*>(1);
void* const kWakeTag = reinterpret_cast<void*>(2);

std::string errnoText(const std::string& what) { return what + ": " + std::strerror(errno); }

[[noreturn]] void throwPeerLost(const std::string& what) {
  throw RpcError(ErrorKind::kPeerLost, "torchrpc: " + what);
}

void logLine(const std::string& line) {
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

void tuneSocket(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // Large tensors move in fewer, larger copies with big kernel buffers
  // (the kernel caps these at net.core.[rw]mem_max).
  int bytes = 4 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

std::pair<std::string, int> splitAddress(const std::string& address) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos) throwPeerLost("bad address '" + address + "'");
  return {address.substr(0, colon), std::stoi(address.substr(colon + 1))};
}

std::string peerAddress(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  char host[INET_ADDRSTRLEN] = "?";
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    ::inet_ntop(AF_INET, &addr.sin_addr, host, sizeof(host));
  }
  return std::string(host) + ":" + std::to_string(ntohs(addr.sin_port));
}

// A frame as iovecs: header, payload, descriptors, then the tensors' bytes.
// Built from the message the frame was encoded from (the frame borrows it).
std::vector<iovec> framePieces(const Message& m, const EncodedFrame& f) {
  std::vector<iovec> iov;
  iov.reserve(f.chunks.size());
  auto add = [&](const char* p, size_t n) {
    if (n > 0) iov.push_back({const_cast<char*>(p), n});
  };
  add(f.header.data(), kFrameHeaderBytes);
  add(m.payload.data(), m.payload.size());
  add(f.descriptors.data(), f.descriptors.size());
  for (size_t i = 3; i < f.chunks.size(); ++i) add(f.chunks[i].data, f.chunks[i].size);
  return iov;
}

// Writes what the socket takes now, starting `done` bytes in. Returns the
// new total written; sets `err` on a real error (not EAGAIN).
size_t writeSome(int fd, std::vector<iovec> iov, size_t done, int& err) {
  err = 0;
  size_t first = 0;
  size_t skip = done;
  while (first < iov.size() && skip >= iov[first].iov_len) skip -= iov[first++].iov_len;
  if (first < iov.size()) {
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + skip;
    iov[first].iov_len -= skip;
  }
  while (first < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
      break;
    }
    done += static_cast<size_t>(n);
    auto left = static_cast<size_t>(n);
    while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (left > 0) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return done;
}

}  // namespace

class TcpTransport::TcpConnection : public Connection {
 public:
  const char* transportName() const override { return "tcp"; }
  double secondsSinceHeard() const override {
    return std::chrono::duration<double>(Clock::now() - lastRecv_.load()).count();
  }
  enum class State { kHello, kProof, kOpen };

  TcpConnection(TcpTransport& transport, int fd, State state)
      : transport_(transport), fd_(fd), state_(state), listener_(transport.options_.credentials),
        decoder_(transport.options_.limits) {
    lastRecv_ = Clock::now();
    lastSendNs_ = nowNs();
    serial_ = transport.nextSerial_.fetch_add(1);
    if (state == State::kOpen) open();
  }
  ~TcpConnection() override { ::close(fd_); }

  void send(const Message& message) override {
    EncodedFrame frame = encodeFrame(message);
    std::lock_guard<std::mutex> g(writeMu_);
    if (closed_.load()) throwPeerLost("connection to worker " + std::to_string(peerId_) + " is closed");
    size_t done = 0;
    if (queue_.empty()) {
      int err = 0;
      done = writeSome(fd_, framePieces(message, frame), 0, err);
      if (err != 0) {
        errno = err;
        std::string why = errnoText("send failed");
        closed_ = true;
        ::shutdown(fd_, SHUT_RDWR);
        throwPeerLost(why);
      }
      lastSendNs_ = nowNs();
      if (done == frame.totalBytes) return;
    }
    // The rest is written by the loop when the socket has room. The queued
    // copy shares the tensors; the frame is re-encoded from it, since an
    // encoded frame borrows from its message.
    auto out = std::make_unique<Outgoing>();
    out->message = message;
    out->frame = encodeFrame(out->message);
    out->done = done;
    queue_.push_back(std::move(out));
    updateInterestLocked();
  }

  void close() override {
    if (!closed_.exchange(true)) ::shutdown(fd_, SHUT_RDWR);
  }

  // Loop side: writes queued frames; false on an I/O error.
  bool flush() {
    std::lock_guard<std::mutex> g(writeMu_);
    while (!queue_.empty()) {
      Outgoing& o = *queue_.front();
      int err = 0;
      o.done = writeSome(fd_, framePieces(o.message, o.frame), o.done, err);
      if (err != 0) return false;
      if (o.done < o.frame.totalBytes) break;
      queue_.pop_front();
    }
    lastSendNs_ = nowNs();
    updateInterestLocked();
    return true;
  }

  void setPaused(bool paused) {
    std::lock_guard<std::mutex> g(writeMu_);
    paused_ = paused;
    updateInterestLocked();
  }

  void open() {
    state_ = State::kOpen;
    staging_.reset(new char[kStagingBytes]);
  }

  TcpTransport& transport_;
  const int fd_;
  State state_;
  std::string from_;  // the dialer's address, for log lines
  // Handshake (listening side): fixed-size, nothing allocated for strangers.
  std::array<char, kMaxListenerReadBytes> hs_{};
  size_t hsFilled_ = 0;
  ListenerHandshake listener_;
  Clock::time_point deadline_{};
  // Reading (loop thread only).
  FrameDecoder decoder_;
  std::unique_ptr<char[]> staging_;
  size_t stagedBegin_ = 0, stagedEnd_ = 0;
  uint64_t reserved_ = 0;
  bool paused_ = false;
  std::atomic<bool> finished_{false};
  std::atomic<Clock::time_point> lastRecv_;  // read by debug_info on other threads
  std::atomic<int64_t> lastSendNs_;
  std::atomic<bool> closed_{false};

 private:
  friend class TcpTransport;
  struct Outgoing {
    Message message;
    EncodedFrame frame;
    size_t done = 0;
  };

  void updateInterestLocked() {
    if (finished_) return;
    epoll_event ev{};
    ev.events = (paused_ ? 0u : static_cast<uint32_t>(EPOLLIN)) | (queue_.empty() ? 0u : static_cast<uint32_t>(EPOLLOUT));
    ev.data.ptr = this;
    ::epoll_ctl(transport_.epollFd_, EPOLL_CTL_MOD, fd_, &ev);
  }

  std::mutex writeMu_;
  std::deque<std::unique_ptr<Outgoing>> queue_;
};

TransportFactory tcpTransport(TcpOptions tcp) {
  return [tcp](const TransportOptions& options, TransportCallbacks callbacks) {
    return std::make_unique<TcpTransport>(options, tcp, std::move(callbacks));
  };
}

TcpTransport::TcpTransport(TransportOptions options, TcpOptions tcp, TransportCallbacks callbacks)
    : options_(std::move(options)), tcp_(std::move(tcp)), callbacks_(std::move(callbacks)) {
  listenFd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listenFd_ < 0) throw RpcError(ErrorKind::kRpc, errnoText("torchrpc: socket()"));
  int one = 1;
  ::setsockopt(listenFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  int bytes = 4 << 20;
  ::setsockopt(listenFd_, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  const std::string& host = tcp_.listenHost;
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    ::close(listenFd_);
    throw RpcError(ErrorKind::kRpc, "torchrpc: cannot listen on '" + host + "': not an IPv4 address");
  }
  if (::bind(listenFd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listenFd_, 1024) != 0) {
    auto msg = errnoText("torchrpc: cannot listen on " + host);
    ::close(listenFd_);
    throw RpcError(ErrorKind::kRpc, msg);
  }
  socklen_t len = sizeof(addr);
  ::getsockname(listenFd_, reinterpret_cast<sockaddr*>(&addr), &len);
  address_ = tcp_.advertisedHost + ":" + std::to_string(ntohs(addr.sin_port));

  epollFd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wakeFd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = kListenTag;
  ::epoll_ctl(epollFd_, EPOLL_CTL_ADD, listenFd_, &ev);
  ev.data.ptr = kWakeTag;
  ::epoll_ctl(epollFd_, EPOLL_CTL_ADD, wakeFd_, &ev);
  lastTick_ = Clock::now();
  loop_ = std::thread([this] { loop(); });
}

TcpTransport::~TcpTransport() { shutdown(); }

void TcpTransport::add(const std::shared_ptr<TcpConnection>& conn, bool reading) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopped_.load()) {
      conn->close();
      throwPeerLost("transport is shut down");
    }
    conns_[conn.get()] = conn;
  }
  epoll_event ev{};
  ev.events = reading ? EPOLLIN : 0;
  ev.data.ptr = conn.get();
  ::epoll_ctl(epollFd_, EPOLL_CTL_ADD, conn->fd_, &ev);
}

void TcpTransport::loop() {
  std::vector<epoll_event> events(256);
  const double tickSeconds = std::min(0.1, options_.heartbeatInterval / 4);
  const int tickMs = std::max(1, static_cast<int>(tickSeconds * 1000));
  auto nextTick = Clock::now();
  std::vector<std::shared_ptr<TcpConnection>> resumed;
  while (!stopped_.load()) {
    int n = ::epoll_wait(epollFd_, events.data(), static_cast<int>(events.size()), tickMs);
    for (int i = 0; i < n && !stopped_.load(); ++i) {
      void* tag = events[i].data.ptr;
      if (tag == kListenTag) {
        onListenReady();
        continue;
      }
      if (tag == kWakeTag) {
        uint64_t v;
        (void)!::read(wakeFd_, &v, sizeof(v));
        continue;
      }
      std::shared_ptr<TcpConnection> conn;
      {
        std::lock_guard<std::mutex> g(mu_);
        auto it = conns_.find(static_cast<TcpConnection*>(tag));
        if (it == conns_.end()) continue;
        conn = it->second;
      }
      const uint32_t what = events[i].events;
      if ((what & EPOLLOUT) && !conn->flush()) {
        finish(conn, conn->closed_ ? CloseReason::kLocal : CloseReason::kBroken, errnoText("send failed"));
        continue;
      }
      if (what & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        if (conn->paused_ && !(what & EPOLLIN)) {
          finish(conn, CloseReason::kPeerClosed, "connection closed by peer");
        } else {
          onReadable(conn);
        }
      }
    }
    // Connections whose frames waited for in-flight budget go on.
    for (auto& r : resumed) {
      if (!r->finished_) onFrameBytes(r);
    }
    resumed.clear();
    for (;;) {
      std::shared_ptr<TcpConnection> c;
      if (waiting_.empty()) break;
      c = waiting_.front().lock();
      if (!c || c->finished_) {
        waiting_.pop_front();
        continue;
      }
      if (!reserve(*c)) break;
      waiting_.pop_front();
      c->setPaused(false);
      resumed.push_back(c);
    }
    if (Clock::now() >= nextTick) {
      tick();
      nextTick = Clock::now() + seconds(tickSeconds);
    }
    graveyard_.clear();  // closes the descriptors of connections nobody else holds
  }
}

void TcpTransport::onListenReady() {
  for (;;) {
    int fd = ::accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors (or memory): back off and try again soon. The
        // pending connection stays in the backlog; peers are not refused.
        if (!warnedFdExhaustion_) {
          logLine("torchrpc: worker '" + options_.selfName + "' ran out of file descriptors (" +
                  std::strerror(errno) + "); pausing accept() and retrying every 100 ms (logged once)");
          warnedFdExhaustion_ = true;
        }
        epoll_event ev{};
        ev.events = 0;
        ev.data.ptr = kListenTag;
        ::epoll_ctl(epollFd_, EPOLL_CTL_MOD, listenFd_, &ev);
        acceptPaused_ = true;
        acceptPausedUntil_ = Clock::now() + kAcceptBackoff;
        return;
      }
      return;
    }
    tuneSocket(fd);
    auto conn = std::make_shared<TcpConnection>(*this, fd, TcpConnection::State::kHello);
    conn->deadline_ = Clock::now() + seconds(options_.handshakeTimeout);
    conn->from_ = peerAddress(fd);
    add(conn, true);
    pending_.push_back(conn);
    ++pendingHandshakes_;
    // Too many strangers mid-handshake: the oldest goes. An honest peer
    // finishes in one round trip, so it is never the oldest for long.
    while (pendingHandshakes_ > options_.maxPendingHandshakes && !pending_.empty()) {
      auto oldest = pending_.front().lock();
      pending_.pop_front();
      if (oldest && oldest->state_ != TcpConnection::State::kOpen && !oldest->finished_) {
        finish(oldest, CloseReason::kLocal, "too many pending handshakes");
      }
    }
  }
}

void TcpTransport::onReadable(const std::shared_ptr<TcpConnection>& conn) {
  if (conn->state_ == TcpConnection::State::kOpen) {
    onFrameBytes(conn);
  } else {
    onHandshakeBytes(conn);
  }
}

void TcpTransport::warnRejected(const TcpConnection& conn, const std::string& why) {
  if (callbacks_.onRejected) callbacks_.onRejected();
  // A flood of strangers must not flood the log: at most one line a second.
  auto now = Clock::now();
  if (now - lastAuthWarning_ < std::chrono::seconds(1)) {
    ++suppressedAuthWarnings_;
    return;
  }
  std::string more = suppressedAuthWarnings_ ? " (" + std::to_string(suppressedAuthWarnings_) + " more since the last line)" : "";
  suppressedAuthWarnings_ = 0;
  lastAuthWarning_ = now;
  logLine("torchrpc: worker '" + options_.selfName + "' rejected a connection from " + conn.from_ + ": " + why + more);
}

void TcpTransport::onHandshakeBytes(const std::shared_ptr<TcpConnection>& conn) {
  using State = TcpConnection::State;
  const size_t target = conn->state_ == State::kHello ? kHelloBytes : kHelloBytes + kProofBytes;
  ssize_t r = ::recv(conn->fd_, conn->hs_.data() + conn->hsFilled_, target - conn->hsFilled_, 0);
  if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
    if (conn->hsFilled_ > 0) warnRejected(*conn, "it hung up during the handshake");
    finish(conn, CloseReason::kPeerClosed, "closed during the handshake");
    return;
  }
  if (r < 0) return;
  conn->hsFilled_ += static_cast<size_t>(r);
  if (conn->hsFilled_ < target) return;
  if (conn->state_ == State::kHello) {
    std::array<char, kChallengeBytes> challenge;
    bool replyable = false;
    std::string refused = conn->listener_.onHello(conn->hs_.data(), challenge, replyable);
    if (replyable) ::send(conn->fd_, challenge.data(), challenge.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (!refused.empty()) {
      warnRejected(*conn, "it " + refused);
      finish(conn, CloseReason::kLocal, refused);
      return;
    }
    conn->state_ = State::kProof;
    return;
  }
  if (!conn->listener_.onProof(conn->hs_.data() + kHelloBytes)) {
    warnRejected(*conn, "authentication failed: it claimed to be worker " + std::to_string(conn->listener_.dialerId()) +
                            " but does not hold this job's secret (wrong TORCHRPC_SECRET?)");
    finish(conn, CloseReason::kLocal, "authentication failed");
    return;
  }
  conn->peerId_ = conn->listener_.dialerId();
  conn->open();
  --pendingHandshakes_;
  conn->lastRecv_ = Clock::now();
  onFrameBytes(conn);  // the first frames may already be here
}

bool TcpTransport::reserve(TcpConnection& conn) {
  const uint64_t n = conn.decoder_.declaredBytes();
  // One frame is always admitted, so a frame larger than the budget waits
  // for the others instead of forever.
  if (inflight_ > 0 && inflight_ + n > tcp_.maxInflightBytes) return false;
  inflight_ += n;
  conn.reserved_ = n;
  return true;
}

void TcpTransport::release(TcpConnection& conn) {
  inflight_ -= conn.reserved_;
  conn.reserved_ = 0;
}

bool TcpTransport::advance(const std::shared_ptr<TcpConnection>& conn, size_t n) {
  bool done;
  try {
    done = conn->decoder_.wrote(n);
  } catch (const std::exception& e) {
    finish(conn, CloseReason::kBroken, e.what());
    return false;
  }
  if (conn->reserved_ == 0 && conn->decoder_.declaredBytes() > 0 && !reserve(*conn)) {
    conn->setPaused(true);
    waiting_.push_back(conn);
    return false;
  }
  if (!done) return true;
  Message m = conn->decoder_.take();
  release(*conn);
  if (m.type == MessageType::kHeartbeat) return true;  // liveness only: lastRecv_ is updated
  try {
    callbacks_.onMessage(conn, std::move(m));
  } catch (const std::exception& e) {
    finish(conn, CloseReason::kBroken, std::string("torchrpc: bad message: ") + e.what());
    return false;
  }
  return !conn->finished_;
}

void TcpTransport::onFrameBytes(const std::shared_ptr<TcpConnection>& conn) {
  TcpConnection& c = *conn;
  size_t consumed = 0;
  while (!c.finished_ && !c.paused_) {
    while (c.stagedBegin_ < c.stagedEnd_) {
      auto [dst, need] = c.decoder_.want();
      size_t n = std::min(need, c.stagedEnd_ - c.stagedBegin_);
      std::memcpy(dst, c.staging_.get() + c.stagedBegin_, n);
      c.stagedBegin_ += n;
      if (!advance(conn, n)) return;
    }
    if (consumed >= kFairShareBytes) return;
    auto [dst, need] = c.decoder_.want();
    const bool direct = need >= kDirectReadBytes;
    ssize_t r = direct ? ::recv(c.fd_, dst, need, 0) : ::recv(c.fd_, c.staging_.get(), kStagingBytes, 0);
    if (r == 0) {
      finish(conn, c.closed_ ? CloseReason::kLocal : CloseReason::kPeerClosed, "connection closed by peer");
      return;
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      finish(conn, c.closed_ ? CloseReason::kLocal : CloseReason::kBroken, errnoText("receive failed"));
      return;
    }
    c.lastRecv_ = Clock::now();
    consumed += static_cast<size_t>(r);
    if (direct) {
      if (!advance(conn, static_cast<size_t>(r))) return;
    } else {
      c.stagedBegin_ = 0;
      c.stagedEnd_ = static_cast<size_t>(r);
    }
  }
}

void TcpTransport::finish(const std::shared_ptr<TcpConnection>& conn, CloseReason reason, const std::string& why) {
  if (conn->finished_) return;
  conn->finished_ = true;
  conn->close();
  ::epoll_ctl(epollFd_, EPOLL_CTL_DEL, conn->fd_, nullptr);
  if (conn->state_ != TcpConnection::State::kOpen) --pendingHandshakes_;
  release(*conn);
  {
    std::lock_guard<std::mutex> g(mu_);
    conns_.erase(conn.get());
  }
  graveyard_.push_back(conn);
  if (conn->state_ == TcpConnection::State::kOpen) callbacks_.onClosed(conn, reason, why);
}

void TcpTransport::tick() {
  const auto now = Clock::now();
  // A loop that itself stalled (a long callback, a suspended process) has
  // not read what its peers sent meanwhile: judge silence next time.
  const bool stalled = now - lastTick_ > seconds(options_.peerTimeout / 2);
  lastTick_ = now;
  if (acceptPaused_ && now >= acceptPausedUntil_) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = kListenTag;
    ::epoll_ctl(epollFd_, EPOLL_CTL_MOD, listenFd_, &ev);
    acceptPaused_ = false;
  }
  while (!pending_.empty()) {
    auto p = pending_.front().lock();
    if (p && !p->finished_ && p->state_ != TcpConnection::State::kOpen) break;
    pending_.pop_front();
  }
  std::vector<std::shared_ptr<TcpConnection>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    all.reserve(conns_.size());
    for (auto& [raw, c] : conns_) all.push_back(c);
  }
  const int64_t nowSendNs = nowNs();
  const auto heartbeatNs = static_cast<int64_t>(options_.heartbeatInterval * 1e9);
  for (auto& c : all) {
    if (c->finished_) continue;
    if (c->state_ != TcpConnection::State::kOpen) {
      if (now > c->deadline_) {
        warnRejected(*c, "it did not finish the handshake within " + c10::str(options_.handshakeTimeout) + " s");
        finish(c, CloseReason::kLocal, "handshake timed out");
      }
      continue;
    }
    if (!stalled && now - c->lastRecv_.load() > seconds(options_.peerTimeout)) {
      finish(c, CloseReason::kSilent,
             "worker " + std::to_string(c->peerId()) + " sent nothing for " + c10::str(options_.peerTimeout) +
                 " s (peer_timeout): it froze, died or the network failed");
      continue;
    }
    if (nowSendNs - c->lastSendNs_.load() >= heartbeatNs) {
      try {
        c->send(Heartbeat().toMessage());
      } catch (const RpcError&) {
      }
    }
  }
}

std::shared_ptr<Connection> TcpTransport::connect(const std::string& address, int64_t peerId,
                                                  const std::string& peerName) {
  auto [host, port] = splitAddress(splitScheme(address).second);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) {
    throwPeerLost("cannot resolve '" + host + "'");
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    ::freeaddrinfo(res);
    throwPeerLost(errnoText("socket()"));
  }
  tuneSocket(fd);
  // A frozen or unreachable peer must not stall the caller for long.
  const double timeout = std::min(options_.handshakeTimeout, std::max(options_.peerTimeout, 1.0));
  int rc = ::connect(fd, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  if (rc != 0 && errno == EINPROGRESS) {
    pollfd pfd{fd, POLLOUT, 0};
    int ready;
    do {
      ready = ::poll(&pfd, 1, static_cast<int>(timeout * 1000));
    } while (ready < 0 && errno == EINTR);
    int soErr = 0;
    socklen_t len = sizeof(soErr);
    if (ready == 1) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &soErr, &len);
    errno = ready == 1 ? soErr : ETIMEDOUT;
    rc = ready == 1 && soErr == 0 ? 0 : -1;
  }
  if (rc != 0) {
    auto msg = errnoText("cannot connect to " + address);
    ::close(fd);
    throwPeerLost(msg);
  }
  try {
    dialHandshake(fd, options_.credentials, peerId, timeout, peerName);
  } catch (...) {
    ::close(fd);
    throw;
  }
  auto conn = std::make_shared<TcpConnection>(*this, fd, TcpConnection::State::kOpen);
  conn->peerId_ = peerId;
  add(conn, true);
  return conn;
}

void TcpTransport::broadcast(const Message& message) {
  std::vector<std::shared_ptr<TcpConnection>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [raw, c] : conns_) all.push_back(c);
  }
  for (auto& c : all) {
    if (c->state_ != TcpConnection::State::kOpen) continue;
    try {
      c->send(message);
    } catch (const RpcError&) {
    }
  }
}

void TcpTransport::shutdown() {
  if (stopped_.exchange(true)) return;
  uint64_t one = 1;
  (void)!::write(wakeFd_, &one, sizeof(one));
  if (loop_.joinable()) loop_.join();
  std::unordered_map<TcpConnection*, std::shared_ptr<TcpConnection>> conns;
  {
    std::lock_guard<std::mutex> g(mu_);
    conns.swap(conns_);
  }
  for (auto& [raw, c] : conns) {
    c->finished_ = true;
    c->close();
  }
  conns.clear();
  graveyard_.clear();
  pending_.clear();
  waiting_.clear();
  ::close(listenFd_);
  ::close(epollFd_);
  ::close(wakeFd_);
}

}  // namespace torchrpc
