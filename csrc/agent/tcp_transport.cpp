#include "agent/tcp_transport.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace torchrpc {
namespace {

std::string errnoText(const std::string& what) { return what + ": " + std::strerror(errno); }

[[noreturn]] void throwPeerLost(const std::string& what) {
  throw RpcError(ErrorKind::kPeerLost, "torchrpc: " + what);
}

void tuneSocket(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
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

}  // namespace

class TcpTransport::TcpConnection : public Connection,
                                    public ByteSource,
                                    public std::enable_shared_from_this<TcpConnection> {
 public:
  explicit TcpConnection(int fd) : fd_(fd) {}
  ~TcpConnection() override { ::close(fd_); }

  void send(const Message& message) override {
    EncodedFrame frame = encodeFrame(message);
    std::vector<iovec> iov;
    iov.reserve(frame.chunks.size());
    for (const auto& c : frame.chunks) {
      if (c.size > 0) iov.push_back({const_cast<char*>(c.data), c.size});
    }
    std::lock_guard<std::mutex> g(writeMu_);
    if (closed_.load()) throwPeerLost("connection is closed");
    size_t first = 0;
    while (first < iov.size()) {
      msghdr msg{};
      msg.msg_iov = iov.data() + first;
      msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
      ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        throwPeerLost(errnoText("send failed"));
      }
      // Advance past what was written, possibly mid-chunk.
      auto left = static_cast<size_t>(n);
      while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
      if (left > 0) {
        iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
        iov[first].iov_len -= left;
      }
    }
  }

  void close() override {
    if (!closed_.exchange(true)) ::shutdown(fd_, SHUT_RDWR);
  }

  // ByteSource: small reads are served from a buffer filled by large recv()s
  // (one syscall can bring many pipelined frames); large reads go straight
  // into the destination, which is the tensor's final storage.
  void readExact(char* dst, size_t n) override {
    size_t buffered = std::min(n, end_ - begin_);
    std::memcpy(dst, buf_.data() + begin_, buffered);
    begin_ += buffered;
    dst += buffered;
    n -= buffered;
    if (n == 0) return;
    if (n >= kDirectReadBytes) {
      recvAll(dst, n);
      return;
    }
    while (n > 0) {
      begin_ = 0;
      end_ = recvSome(buf_.data(), buf_.size());
      size_t take = std::min(n, end_);
      std::memcpy(dst, buf_.data(), take);
      begin_ = take;
      dst += take;
      n -= take;
    }
  }

 private:
  static constexpr size_t kDirectReadBytes = 16 * 1024;

  size_t recvSome(char* dst, size_t n) {
    for (;;) {
      ssize_t got = ::recv(fd_, dst, n, 0);
      if (got > 0) return static_cast<size_t>(got);
      if (got == 0) throwPeerLost("connection closed by peer");
      if (errno != EINTR) throwPeerLost(errnoText("receive failed"));
    }
  }
  void recvAll(char* dst, size_t n) {
    while (n > 0) {
      ssize_t got = ::recv(fd_, dst, n, MSG_WAITALL);  // one wake-up per large read
      if (got == 0) throwPeerLost("connection closed by peer");
      if (got < 0) {
        if (errno == EINTR) continue;
        throwPeerLost(errnoText("receive failed"));
      }
      dst += got;
      n -= static_cast<size_t>(got);
    }
  }

  int fd_;
  std::mutex writeMu_;
  std::atomic<bool> closed_{false};
  std::array<char, 64 * 1024> buf_;
  size_t begin_ = 0;
  size_t end_ = 0;
};

TcpTransport::TcpTransport(const std::string& host, const std::string& advertisedHost,
                           TransportCallbacks callbacks, FrameLimits limits)
    : callbacks_(std::move(callbacks)), limits_(limits) {
  listenFd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listenFd_ < 0) throw RpcError(ErrorKind::kRpc, errnoText("torchrpc: socket()"));
  int one = 1;
  ::setsockopt(listenFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    ::close(listenFd_);
    throw RpcError(ErrorKind::kRpc, "torchrpc: cannot listen on '" + host + "': not an IPv4 address");
  }
  if (::bind(listenFd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listenFd_, 128) != 0) {
    auto msg = errnoText("torchrpc: cannot listen on " + host);
    ::close(listenFd_);
    throw RpcError(ErrorKind::kRpc, msg);
  }
  socklen_t len = sizeof(addr);
  ::getsockname(listenFd_, reinterpret_cast<sockaddr*>(&addr), &len);
  address_ = advertisedHost + ":" + std::to_string(ntohs(addr.sin_port));
  acceptThread_ = std::thread([this] { acceptLoop(); });
}

TcpTransport::~TcpTransport() { shutdown(); }

void TcpTransport::acceptLoop() {
  for (;;) {
    int fd = ::accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // the listening socket was shut down
    }
    if (stopped_.load()) {
      ::close(fd);
      return;
    }
    adopt(fd);
  }
}

std::shared_ptr<TcpTransport::TcpConnection> TcpTransport::adopt(int fd) {
  tuneSocket(fd);
  auto conn = std::make_shared<TcpConnection>(fd);
  std::lock_guard<std::mutex> g(mu_);
  if (stopped_.load()) {
    conn->close();
    throwPeerLost("transport is shut down");
  }
  connections_.push_back(conn);
  readers_.emplace_back([this, conn] {
    std::string why;
    try {
      for (;;) callbacks_.onMessage(conn, readFrame(*conn, limits_));
    } catch (const RpcError& e) {
      why = e.what();
    } catch (const std::exception& e) {
      why = std::string("torchrpc: malformed frame: ") + e.what();
    }
    conn->close();
    callbacks_.onClosed(conn, why);
  });
  return conn;
}

std::shared_ptr<Connection> TcpTransport::connect(const std::string& address) {
  auto [host, port] = splitAddress(address);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) {
    throwPeerLost("cannot resolve '" + host + "'");
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int rc = fd < 0 ? -1 : ::connect(fd, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  if (rc != 0) {
    auto msg = errnoText("cannot connect to " + address);
    if (fd >= 0) ::close(fd);
    throwPeerLost(msg);
  }
  return adopt(fd);
}

void TcpTransport::shutdown() {
  if (stopped_.exchange(true)) return;
  ::shutdown(listenFd_, SHUT_RDWR);
  if (acceptThread_.joinable()) acceptThread_.join();
  ::close(listenFd_);
  std::vector<std::thread> readers;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& c : connections_) c->close();
    readers.swap(readers_);
  }
  for (auto& t : readers) t.join();
  std::lock_guard<std::mutex> g(mu_);
  connections_.clear();
}

}  // namespace torchrpc
