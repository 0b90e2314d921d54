#pragma once

// What the agent needs from a network: authenticated connections that carry
// whole Messages. The agent's RPC logic never touches sockets; each
// transport (tcp_transport.h, shm_transport.h) implements these classes and
// is handed to the agent as a TransportFactory, so adding one touches
// neither the agent nor the other transports.
//
// Addresses carry their transport's scheme: "tcp://10.0.0.2:40123",
// "shm://<host id>/<socket name>". A worker publishes one address per
// transport (TransportSet joins them with ',').

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "agent/handshake.h"
#include "messages/message.h"
#include "wire/frame.h"

namespace torchrpc {

class Connection {
 public:
  virtual ~Connection() = default;
  // Thread-safe and never blocks on the peer: what the socket does not take
  // at once is queued and written by the transport. Frames from concurrent
  // senders never interleave. Throws RpcError(kPeerLost) if the connection
  // is closed.
  virtual void send(const Message& message) = 0;
  // Closes both directions; the transport then reports onClosed once.
  virtual void close() = 0;
  // Reads this connection on the calling thread, delivering what arrives,
  // until done() or `until`, where the transport allows it (shared memory):
  // a caller waiting for a reply then needs no other thread to wake it.
  // False, having done nothing, where it does not (the transport's own
  // thread delivers).
  virtual bool pollUntil(const std::function<bool()>& done, std::chrono::steady_clock::time_point until) {
    return false;
  }
  // The worker id the handshake authenticated.
  int64_t peerId() const { return peerId_; }
  // Distinct for every connection a transport ever made (unlike its address,
  // which a later connection may reuse).
  uint64_t serial() const { return serial_; }
  // The scheme of the transport that made it ("tcp", "shm").
  virtual const char* transportName() const = 0;
  // Transport-specific counters for debug_info (shm: its tensor pool).
  virtual std::vector<std::pair<std::string, int64_t>> stats() const { return {}; }
  // Seconds since anything (a heartbeat included) arrived on it.
  virtual double secondsSinceHeard() const = 0;

 protected:
  int64_t peerId_ = -1;
  uint64_t serial_ = 0;
};

// Why a connection ended.
enum class CloseReason {
  kLocal,       // this side closed it (shutdown, or the agent asked)
  kPeerClosed,  // the peer hung up (or its process died)
  kSilent,      // nothing arrived for peer_timeout: the peer froze or the network broke
  kBroken,      // an I/O error, or the peer sent a malformed frame
};

struct TransportCallbacks {
  // Each incoming message of an authenticated connection, in order, on a
  // transport thread (which must not block for long: it serves every
  // connection).
  std::function<void(const std::shared_ptr<Connection>&, Message&&)> onMessage;
  // An authenticated connection ended; called once, after which no more
  // messages arrive on it.
  std::function<void(const std::shared_ptr<Connection>&, CloseReason, const std::string& why)> onClosed;
  // A connection failed the handshake (a stranger, a wrong secret, a
  // handshake never finished); for metrics. May be unset.
  std::function<void()> onRejected;
};

// What every transport shares; each has its own options beside these
// (TcpOptions, ShmOptions), bound into its factory.
struct TransportOptions {
  std::string selfName;  // for log lines
  Credentials credentials;
  double handshakeTimeout = 5.0;
  size_t maxPendingHandshakes = 64;  // connections mid-handshake; beyond, the oldest is dropped
  double heartbeatInterval = 0.5;  // idle connections send HEARTBEAT this often
  double peerTimeout = 2.0;        // a connection silent this long is closed (kSilent)
  FrameLimits limits;
};

class Transport {
 public:
  virtual ~Transport() = default;
  // "tcp", "shm": the scheme of its addresses.
  virtual std::string scheme() const = 0;
  // Where peers reach this transport, with its scheme: "tcp://127.0.0.1:40123".
  virtual std::string address() const = 0;
  // Whether an address of this scheme can be dialed from here (a
  // shared-memory address only from the same host).
  virtual bool reaches(const std::string& address) const { return true; }
  // Dials worker `peerId` at `address` (of this transport's scheme) and runs
  // the handshake. Throws RpcError(kPeerLost) on failure, RpcError(kAuth) if
  // the peer cannot prove it holds the secret.
  virtual std::shared_ptr<Connection> connect(const std::string& address, int64_t peerId,
                                              const std::string& peerName) = 0;
  // Sends `message` on every authenticated connection, ignoring failures.
  virtual void broadcast(const Message& message) = 0;
  // Stops listening, closes every connection and joins every thread; no
  // callback runs after it returns. Idempotent.
  virtual void shutdown() = 0;
};

// Thrown by Transport::connect when the address cannot be dialed at all
// (nothing listens there): another transport may still reach the peer. A
// peer that was reached but failed the handshake, or did not answer in
// time, is a plain RpcError(kPeerLost), and no other transport is tried.
class Unreachable : public RpcError {
 public:
  explicit Unreachable(const std::string& message) : RpcError(ErrorKind::kPeerLost, message) {}
};

// Builds a transport that reports to `callbacks`; its own options are bound in.
using TransportFactory =
    std::function<std::unique_ptr<Transport>(const TransportOptions& options, TransportCallbacks callbacks)>;

// "scheme://rest" -> {"scheme", "rest"}; {"", address} without a scheme.
std::pair<std::string, std::string> splitScheme(const std::string& address);

}  // namespace torchrpc
