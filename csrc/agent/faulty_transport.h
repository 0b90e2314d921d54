#pragma once

// Fault injection for tests: a transport decorator that drops, delays or
// duplicates chosen message types on send, so the protocols' retries and
// idempotence are exercised over real connections. Enabled by
// RpcOptions(faults=...) or TORCHRPC_FAULTS, e.g.
//   "RREF_USER_DELETE:drop:0.2,SCRIPT_CALL:delay:0.05,RREF_FORK_REQUEST:dup:0.5"
// drop:P and dup:P take a probability, delay:S seconds.

#include <memory>
#include <string>
#include <vector>

#include "agent/transport.h"

namespace torchrpc {

struct FaultRule {
  enum class Action { kDrop, kDelay, kDuplicate };
  MessageType type;
  Action action;
  double value;  // probability, or seconds for kDelay
};

// Parses a fault spec; throws RpcError(kArgument) naming the bad part.
std::vector<FaultRule> parseFaults(const std::string& spec);

// `inner`'s transports wrapped in fault injection, or `inner` itself when
// `faults` is empty.
TransportFactory withFaults(TransportFactory inner, const std::string& faults);

}  // namespace torchrpc
