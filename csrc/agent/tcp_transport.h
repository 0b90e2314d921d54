#pragma once

// TCP transport: one listening socket, one reader thread per connection,
// TCP_NODELAY, and writes straight from tensor memory with sendmsg().

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "agent/transport.h"
#include "wire/frame.h"

namespace torchrpc {

class TcpTransport : public Transport {
 public:
  // Listens on `host` (an IPv4 address; "0.0.0.0" for all) at an ephemeral
  // port; `advertisedHost` is the address peers are told to dial.
  TcpTransport(const std::string& host, const std::string& advertisedHost,
               TransportCallbacks callbacks, FrameLimits limits = {});
  ~TcpTransport() override;

  std::string address() const override { return address_; }
  std::shared_ptr<Connection> connect(const std::string& address) override;
  void shutdown() override;

 private:
  class TcpConnection;
  void acceptLoop();
  std::shared_ptr<TcpConnection> adopt(int fd);

  TransportCallbacks callbacks_;
  FrameLimits limits_;
  int listenFd_ = -1;
  std::string address_;
  std::thread acceptThread_;
  std::mutex mu_;
  std::vector<std::shared_ptr<TcpConnection>> connections_;
  std::vector<std::thread> readers_;
  std::atomic<bool> stopped_{false};
};

}  // namespace torchrpc
