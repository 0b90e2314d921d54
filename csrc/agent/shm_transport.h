#pragma once

// Shared-memory transport, for peers on the same host (same boot, network
// namespace and host name). A connection is set up over a Unix socket in the
// abstract namespace: the handshake (handshake.h) runs on it, then the dialer
// passes a sealed memfd holding, per direction, a ring (shm_ring.h) and a
// tensor pool (shm_pool.h). Frames then go through the rings with futex
// wake-ups; the socket stays open only so each side learns at once when the
// other process is gone (the kernel closes it on any exit, SIGKILL included).
// Nothing is ever named in /dev/shm: a memfd disappears with its last
// mapping, so a crashed peer leaves nothing behind.
//
// Per connection a reader thread consumes the incoming ring, delivers
// messages, sends heartbeats and judges silence; senders write into the
// outgoing ring from their own thread when the frame fits, else queue it for
// the connection's writer thread, so no sender ever waits on the peer.

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agent/transport.h"

namespace torchrpc {

struct ShmOptions {
  uint64_t ringBytes = 4ull << 20;   // each direction; rounded up to a power of two
  uint64_t poolBytes = 256ull << 20; // each direction's tensor pool; 0 disables it
  double spinMicros = 50;            // longest spin before a reader sleeps
};

TransportFactory shmTransport(ShmOptions shm);

// This host as shared memory sees it: boot id, network namespace, host name.
std::string localHostId();

class ShmTransport : public Transport {
 public:
  ShmTransport(TransportOptions options, ShmOptions shm, TransportCallbacks callbacks);
  ~ShmTransport() override;

  std::string scheme() const override { return "shm"; }
  std::string address() const override;
  bool reaches(const std::string& address) const override;
  std::shared_ptr<Connection> connect(const std::string& address, int64_t peerId,
                                      const std::string& peerName) override;
  void broadcast(const Message& message) override;
  void shutdown() override;

  class ShmConnection;

 private:
  void acceptLoop();
  // Handshake and set-up of an accepted socket, on its own thread; sets
  // `done` (under mu_) once the socket is a connection's or closed.
  void onAccepted(int fd, const std::shared_ptr<std::atomic<bool>>& done);
  void adopt(const std::shared_ptr<ShmConnection>& conn);
  void reapFinished();

  TransportOptions options_;
  ShmOptions shm_;
  TransportCallbacks callbacks_;
  std::string hostId_;
  std::string socketName_;
  int listenFd_ = -1;
  int wakeFd_ = -1;
  std::atomic<bool> stopped_{false};
  std::atomic<uint64_t> nextSerial_{1};
  std::thread acceptor_;

  std::mutex mu_;  // guards the members below
  std::vector<std::shared_ptr<ShmConnection>> conns_;
  struct Pending {
    int fd;
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
    bool evicted;  // shut down to make room
  };
  std::vector<Pending> handshakes_;
};

}  // namespace torchrpc
