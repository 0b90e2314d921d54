#pragma once

// The transports one agent listens on, in order of preference. A worker
// publishes every transport's address; to reach a peer the agent takes the
// first of its own transports whose scheme the peer also offers and that can
// reach it (shared memory only on the same host), falling back to the next
// when a dial fails.

#include <memory>
#include <string>
#include <vector>

#include "agent/transport.h"

namespace torchrpc {

class TransportSet {
 public:
  explicit TransportSet(std::vector<std::unique_ptr<Transport>> transports);
  // Every transport's address, comma-separated, in preference order.
  std::string address() const;
  // Dials worker `peerId`, whose published addresses are `addresses`.
  std::shared_ptr<Connection> connect(const std::string& addresses, int64_t peerId, const std::string& peerName);
  void broadcast(const Message& message);
  void shutdown();

 private:
  std::vector<std::unique_ptr<Transport>> transports_;
};

}  // namespace torchrpc
