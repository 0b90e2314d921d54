#pragma once

// What the agent needs from a network: connections that carry whole
// Messages. The agent's RPC logic never touches sockets, so another
// transport (same-host shared memory, say) is another implementation of
// these two classes.

#include <functional>
#include <memory>
#include <string>

#include "messages/message.h"

namespace torchrpc {

class Connection {
 public:
  virtual ~Connection() = default;
  // Thread-safe; frames from concurrent senders never interleave. Tensor
  // bytes are written from the tensors' own memory. Throws RpcError(kPeerLost)
  // if the connection is closed.
  virtual void send(const Message& message) = 0;
  // Closes both directions; the reader then reports onClosed once.
  virtual void close() = 0;
  // The worker id at the other end (-1 until its handshake arrives).
  int64_t peerId() const { return peerId_; }
  void setPeerId(int64_t id) { peerId_ = id; }

 private:
  int64_t peerId_ = -1;
};

struct TransportCallbacks {
  // Each incoming message, on the connection's reader thread, in order.
  std::function<void(const std::shared_ptr<Connection>&, Message&&)> onMessage;
  // The connection ended (peer closed, died, or sent a corrupt frame); called
  // once, on the reader thread, after which no more messages arrive.
  std::function<void(const std::shared_ptr<Connection>&, const std::string& why)> onClosed;
};

class Transport {
 public:
  virtual ~Transport() = default;
  // Where peers reach this transport, e.g. "127.0.0.1:40123".
  virtual std::string address() const = 0;
  // Dials a peer's address. Throws RpcError(kPeerLost) on failure.
  virtual std::shared_ptr<Connection> connect(const std::string& address) = 0;
  // Stops listening, closes every connection and joins every thread; no
  // callback runs after it returns. Idempotent.
  virtual void shutdown() = 0;
};

}  // namespace torchrpc
