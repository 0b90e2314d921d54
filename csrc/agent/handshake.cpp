#include "agent/handshake.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "errors.h"

namespace torchrpc {
namespace {

constexpr uint32_t kHandshakeMagic = 0x53485254;  // "TRHS"
constexpr uint16_t kHandshakeVersion = 1;

void putU16(char* p, uint16_t v) { std::memcpy(p, &v, 2); }
void putU32(char* p, uint32_t v) { std::memcpy(p, &v, 4); }
void putI64(char* p, int64_t v) { std::memcpy(p, &v, 8); }
uint16_t getU16(const char* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
uint32_t getU32(const char* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
int64_t getI64(const char* p) { int64_t v; std::memcpy(&v, p, 8); return v; }

Nonce freshNonce() {
  Nonce n;
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: the system's random generator failed");
  }
  return n;
}

// HMAC-SHA256(secret, label | job | dialer | listener | dialer nonce | listener nonce).
// The label differs per direction, so one side's MAC never passes as the other's.
Mac mac(const Credentials& creds, const char* label, int64_t dialer, int64_t listener,
        const Nonce& dialerNonce, const Nonce& listenerNonce) {
  std::string msg(label);
  msg.push_back('\0');
  char len[4];
  putU32(len, static_cast<uint32_t>(creds.jobId.size()));
  msg.append(len, 4);
  msg.append(creds.jobId);
  char ids[16];
  putI64(ids, dialer);
  putI64(ids + 8, listener);
  msg.append(ids, 16);
  msg.append(reinterpret_cast<const char*>(dialerNonce.data()), dialerNonce.size());
  msg.append(reinterpret_cast<const char*>(listenerNonce.data()), listenerNonce.size());
  Mac out;
  unsigned int outLen = 0;
  if (!HMAC(EVP_sha256(), creds.secret.data(), static_cast<int>(creds.secret.size()),
            reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out.data(), &outLen) ||
      outLen != out.size()) {
    throw RpcError(ErrorKind::kRpc, "torchrpc: HMAC-SHA256 failed");
  }
  return out;
}

constexpr const char* kListenerLabel = "torchrpc handshake v1 listener";
constexpr const char* kDialerLabel = "torchrpc handshake v1 dialer";

[[noreturn]] void lost(const std::string& what) { throw RpcError(ErrorKind::kPeerLost, "torchrpc: " + what); }

// Blocking I/O of exactly n bytes, bounded by `deadline`.
template <typename Op>
void exchangeExact(int fd, char* p, size_t n, std::chrono::steady_clock::time_point deadline, short events,
                   Op op, const std::string& what) {
  while (n > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) lost(what + ": handshake timed out");
    pollfd pfd{fd, events, 0};
    int r = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;  // re-checks the deadline
    ssize_t k = op(fd, p, n);
    if (k == 0) lost(what + ": the peer closed the connection during the handshake");
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      lost(what + ": " + std::strerror(errno));
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
}

}  // namespace

std::string ListenerHandshake::onHello(const char* hello, std::array<char, kChallengeBytes>& challenge,
                                       bool& replyable) {
  replyable = false;
  if (getU32(hello) != kHandshakeMagic) return "did not start with a torchrpc handshake";
  replyable = true;
  char* c = challenge.data();
  std::memset(c, 0, challenge.size());
  putU32(c, kHandshakeMagic);
  putU16(c + 4, kHandshakeVersion);
  if (getU16(hello + 4) != kHandshakeVersion) {
    putU16(c + 6, static_cast<uint16_t>(HandshakeStatus::kBadVersion));
    return "speaks handshake version " + std::to_string(getU16(hello + 4));
  }
  dialerId_ = getI64(hello + 8);
  const int64_t listenerId = getI64(hello + 16);
  if (listenerId != creds_.selfId) {
    putU16(c + 6, static_cast<uint16_t>(HandshakeStatus::kWrongWorker));
    putI64(c + 8, creds_.selfId);
    return "dialed worker " + std::to_string(listenerId) + " but reached worker " + std::to_string(creds_.selfId);
  }
  Nonce dialerNonce;
  std::memcpy(dialerNonce.data(), hello + 24, kNonceBytes);
  Nonce listenerNonce = freshNonce();
  Mac own = mac(creds_, kListenerLabel, dialerId_, creds_.selfId, dialerNonce, listenerNonce);
  expected_ = mac(creds_, kDialerLabel, dialerId_, creds_.selfId, dialerNonce, listenerNonce);
  putI64(c + 8, creds_.selfId);
  std::memcpy(c + 16, listenerNonce.data(), kNonceBytes);
  std::memcpy(c + 16 + kNonceBytes, own.data(), kMacBytes);
  return "";
}

bool ListenerHandshake::onProof(const char* proof) const {
  return CRYPTO_memcmp(proof, expected_.data(), kMacBytes) == 0;
}

void dialHandshake(int fd, const Credentials& creds, int64_t listenerId, double timeoutSeconds,
                   const std::string& peerName) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeoutSeconds));
  const std::string what = "handshake with worker '" + peerName + "'";
  auto sendOp = [](int f, char* p, size_t n) { return ::send(f, p, n, MSG_NOSIGNAL); };
  auto recvOp = [](int f, char* p, size_t n) { return ::recv(f, p, n, 0); };

  Nonce dialerNonce = freshNonce();
  std::array<char, kHelloBytes> hello{};
  putU32(hello.data(), kHandshakeMagic);
  putU16(hello.data() + 4, kHandshakeVersion);
  putI64(hello.data() + 8, creds.selfId);
  putI64(hello.data() + 16, listenerId);
  std::memcpy(hello.data() + 24, dialerNonce.data(), kNonceBytes);
  exchangeExact(fd, hello.data(), hello.size(), deadline, POLLOUT, sendOp, what);

  std::array<char, kChallengeBytes> challenge{};
  exchangeExact(fd, challenge.data(), challenge.size(), deadline, POLLIN, recvOp, what);
  if (getU32(challenge.data()) != kHandshakeMagic) lost(what + ": the peer is not a torchrpc worker");
  switch (static_cast<HandshakeStatus>(getU16(challenge.data() + 6))) {
    case HandshakeStatus::kOk: break;
    case HandshakeStatus::kWrongWorker:
      lost(what + ": its address is now served by worker " + std::to_string(getI64(challenge.data() + 8)));
    case HandshakeStatus::kBadVersion:
      lost(what + ": it speaks another handshake version");
    default:
      lost(what + ": refused with an unknown status");
  }
  Nonce listenerNonce;
  std::memcpy(listenerNonce.data(), challenge.data() + 16, kNonceBytes);
  Mac expected = mac(creds, kListenerLabel, creds.selfId, listenerId, dialerNonce, listenerNonce);
  Mac proof = mac(creds, kDialerLabel, creds.selfId, listenerId, dialerNonce, listenerNonce);
  if (CRYPTO_memcmp(expected.data(), challenge.data() + 16 + kNonceBytes, kMacBytes) != 0) {
    // Still answer, so the listener logs a failed authentication rather than
    // a dropped connection; our proof cannot pass with another secret.
    ::send(fd, proof.data(), proof.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    throw RpcError(ErrorKind::kAuth,
                   "torchrpc: authentication failed: worker '" + peerName +
                       "' could not prove it holds this job's secret (different TORCHRPC_SECRET / "
                       "RpcOptions(secret=...), or another job's worker at that address)");
  }
  exchangeExact(fd, reinterpret_cast<char*>(proof.data()), proof.size(), deadline, POLLOUT, sendOp, what);
}

}  // namespace torchrpc

namespace torchrpc {

int64_t listenHandshake(int fd, const Credentials& creds, double timeoutSeconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeoutSeconds));
  auto recvOp = [](int f, char* p, size_t n) { return ::recv(f, p, n, MSG_DONTWAIT); };
  auto sendOp = [](int f, char* p, size_t n) { return ::send(f, p, n, MSG_DONTWAIT | MSG_NOSIGNAL); };
  const std::string what = "a connecting worker";
  ListenerHandshake hs(creds);
  std::array<char, kHelloBytes> hello;
  exchangeExact(fd, hello.data(), hello.size(), deadline, POLLIN, recvOp, what);
  std::array<char, kChallengeBytes> challenge;
  bool replyable = false;
  std::string why = hs.onHello(hello.data(), challenge, replyable);
  if (replyable) exchangeExact(fd, challenge.data(), challenge.size(), deadline, POLLOUT, sendOp, what);
  if (!why.empty()) throw RpcError(ErrorKind::kAuth, "torchrpc: refused a connection: it " + why);
  std::array<char, kProofBytes> proof;
  exchangeExact(fd, proof.data(), proof.size(), deadline, POLLIN, recvOp, what);
  if (!hs.onProof(proof.data())) {
    throw RpcError(ErrorKind::kAuth, "torchrpc: refused worker " + std::to_string(hs.dialerId()) +
                                         ": authentication failed (wrong secret or another job)");
  }
  return hs.dialerId();
}

}  // namespace torchrpc
