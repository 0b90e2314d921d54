#pragma once

// TCP transport: one event-loop thread (epoll) serves the listening socket,
// every handshake and every connection, so a thousand idle sockets cost
// descriptors, not threads. Senders write from their own thread straight
// from tensor memory (sendmsg); what the kernel does not take at once is
// queued and finished by the loop, so no thread ever blocks on a slow peer.
// The loop also runs the liveness protocol: idle connections send HEARTBEAT
// and a connection silent for peer_timeout is closed.

#include <atomic>
#include <chrono>
#include <deque>
#include <vector>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "agent/transport.h"

namespace torchrpc {

struct TcpOptions {
  std::string listenHost = "127.0.0.1";     // an IPv4 address; "0.0.0.0" for all
  std::string advertisedHost = "127.0.0.1"; // what peers are told to dial
  uint64_t maxInflightBytes = 8ull << 30;   // all frames being received at once
};

TransportFactory tcpTransport(TcpOptions tcp);

class TcpTransport : public Transport {
 public:
  TcpTransport(TransportOptions options, TcpOptions tcp, TransportCallbacks callbacks);
  ~TcpTransport() override;

  std::string scheme() const override { return "tcp"; }
  std::string address() const override { return "tcp://" + address_; }
  std::shared_ptr<Connection> connect(const std::string& address, int64_t peerId,
                                      const std::string& peerName) override;
  void broadcast(const Message& message) override;
  void shutdown() override;

  class TcpConnection;

 private:
  void loop();
  void onListenReady();
  void onReadable(const std::shared_ptr<TcpConnection>& conn);
  void onHandshakeBytes(const std::shared_ptr<TcpConnection>& conn);
  void onFrameBytes(const std::shared_ptr<TcpConnection>& conn);
  void tick();
  void add(const std::shared_ptr<TcpConnection>& conn, bool reading);
  // Ends a connection: deregisters it, reports it if authenticated.
  void finish(const std::shared_ptr<TcpConnection>& conn, CloseReason reason, const std::string& why);
  // Feeds n bytes written at the decoder's want() to it; delivers a whole
  // frame. False when the connection ended or waits for in-flight budget.
  bool advance(const std::shared_ptr<TcpConnection>& conn, size_t n);
  bool reserve(TcpConnection& conn);
  void release(TcpConnection& conn);
  void warnRejected(const TcpConnection& conn, const std::string& why);

  TransportOptions options_;
  TcpOptions tcp_;
  TransportCallbacks callbacks_;
  int listenFd_ = -1;
  int epollFd_ = -1;
  int wakeFd_ = -1;
  std::string address_;
  std::atomic<bool> stopped_{false};
  std::atomic<uint64_t> nextSerial_{1};
  std::thread loop_;

  std::mutex mu_;  // guards conns_
  std::unordered_map<TcpConnection*, std::shared_ptr<TcpConnection>> conns_;
  // Loop-thread state.
  size_t pendingHandshakes_ = 0;
  std::deque<std::weak_ptr<TcpConnection>> pending_;  // mid-handshake, oldest first
  std::deque<std::weak_ptr<TcpConnection>> waiting_;  // frames waiting for in-flight budget
  std::vector<std::shared_ptr<TcpConnection>> graveyard_;  // finished this loop turn
  uint64_t inflight_ = 0;
  std::chrono::steady_clock::time_point acceptPausedUntil_{};
  bool acceptPaused_ = false;
  bool warnedFdExhaustion_ = false;
  std::chrono::steady_clock::time_point lastTick_{};
  std::chrono::steady_clock::time_point lastAuthWarning_{};
  size_t suppressedAuthWarnings_ = 0;
};

}  // namespace torchrpc
