#pragma once

// The handshake every connection begins with, before any frame is read: a
// mutual challenge-response over HMAC-SHA256 (OpenSSL's libcrypto) that
// proves both ends hold the job's secret, binds the proof to both worker ids,
// both sides' fresh nonces and the job id, and so cannot be replayed or
// reflected. Messages have fixed sizes, so a listener reads at most
// kMaxListenerReadBytes from a stranger and allocates nothing for it.
//
//   dialer   -> listener  HELLO      magic, version, dialer id, listener id, dialer nonce
//   listener -> dialer    CHALLENGE  magic, status, listener nonce, listener MAC
//   dialer   -> listener  PROOF      dialer MAC
//
// A listener MAC the dialer cannot verify means a wrong secret (or another
// job): the dialer hangs up. A wrong dialer MAC makes the listener hang up.

#include <array>
#include <cstdint>
#include <string>

namespace torchrpc {

constexpr size_t kNonceBytes = 32;
constexpr size_t kMacBytes = 32;
constexpr size_t kHelloBytes = 4 + 2 + 2 + 8 + 8 + kNonceBytes;      // 56
constexpr size_t kChallengeBytes = 4 + 2 + 2 + 8 + kNonceBytes + kMacBytes;  // 80
constexpr size_t kProofBytes = kMacBytes;                            // 32
constexpr size_t kMaxListenerReadBytes = kHelloBytes + kProofBytes;

// What a worker proves itself with.
struct Credentials {
  std::string secret;  // raw bytes; never empty once init_rpc resolved it
  std::string jobId;   // distinct per job (rank 0 draws it)
  int64_t selfId = -1;
};

// Why a listener refused a HELLO; sent in CHALLENGE's status field.
enum class HandshakeStatus : uint16_t { kOk = 0, kWrongWorker = 1, kBadVersion = 2 };

using Nonce = std::array<unsigned char, kNonceBytes>;
using Mac = std::array<unsigned char, kMacBytes>;

// The listening side, fed the fixed-size messages as they arrive.
class ListenerHandshake {
 public:
  explicit ListenerHandshake(const Credentials& creds) : creds_(creds) {}
  // Checks HELLO and fills `challenge`. Returns an empty string on success,
  // else why the peer is refused (a refusal is still written to `challenge`
  // when `replyable`, so an honest dialer learns why).
  std::string onHello(const char* hello, std::array<char, kChallengeBytes>& challenge, bool& replyable);
  // True if PROOF is the dialer's MAC (constant-time compare).
  bool onProof(const char* proof) const;
  int64_t dialerId() const { return dialerId_; }

 private:
  const Credentials& creds_;
  int64_t dialerId_ = -1;
  Mac expected_{};
};

// The dialing side, run on a connected blocking-with-deadline socket.
// Throws RpcError(kAuth) when the listener cannot prove the secret,
// RpcError(kPeerLost) on I/O failure or timeout.
void dialHandshake(int fd, const Credentials& creds, int64_t listenerId, double timeoutSeconds,
                   const std::string& peerName);
// The listening side on a blocking-with-deadline socket (transports that
// give each pending handshake its own thread). Returns the dialer's id;
// throws RpcError(kAuth) naming why a dialer was refused, RpcError(kPeerLost)
// on I/O failure or timeout.
int64_t listenHandshake(int fd, const Credentials& creds, double timeoutSeconds);

}  // namespace torchrpc
