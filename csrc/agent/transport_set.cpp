#include "agent/transport_set.h"

#include <sstream>

namespace torchrpc {

std::pair<std::string, std::string> splitScheme(const std::string& address) {
  auto at = address.find("://");
  if (at == std::string::npos) return {"", address};
  return {address.substr(0, at), address.substr(at + 3)};
}

TransportSet::TransportSet(std::vector<std::unique_ptr<Transport>> transports)
    : transports_(std::move(transports)) {
  TORCH_CHECK(!transports_.empty(), "torchrpc: an agent needs at least one transport");
}

std::string TransportSet::address() const {
  std::string out;
  for (const auto& t : transports_) out += (out.empty() ? "" : ",") + t->address();
  return out;
}

std::shared_ptr<Connection> TransportSet::connect(const std::string& addresses, int64_t peerId,
                                                  const std::string& peerName) {
  std::vector<std::string> offered;
  std::stringstream in(addresses);
  for (std::string a; std::getline(in, a, ',');) {
    if (!a.empty()) offered.push_back(a);
  }
  std::string failures;
  for (const auto& t : transports_) {
    for (const std::string& a : offered) {
      if (splitScheme(a).first != t->scheme() || !t->reaches(a)) continue;
      try {
        return t->connect(a, peerId, peerName);
      } catch (const Unreachable& e) {
        // Nothing listens there: try the next way. (A peer that answered but
        // failed, or froze, would fail every way, each taking its timeout.)
        failures += std::string(failures.empty() ? "" : "; ") + e.what();
      }
    }
  }
  if (!failures.empty()) throw RpcError(ErrorKind::kPeerLost, failures);
  std::string mine;
  for (const auto& t : transports_) mine += (mine.empty() ? "" : ", ") + t->scheme();
  throw RpcError(ErrorKind::kPeerLost, "torchrpc: no transport reaches worker '" + peerName + "': it offers " +
                                           addresses + " and this worker uses " + mine +
                                           " (RpcOptions(transports=...))");
}

void TransportSet::broadcast(const Message& message) {
  for (const auto& t : transports_) t->broadcast(message);
}

void TransportSet::shutdown() {
  for (const auto& t : transports_) t->shutdown();
}

}  // namespace torchrpc
