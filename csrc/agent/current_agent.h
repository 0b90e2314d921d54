#pragma once

// The one process-wide handle: the Agent init_rpc started, for the
// torch.ops.torchrpc operators (TorchScript code has no other way to reach
// it). Everything else receives its Agent explicitly.

#include <memory>

#include "agent/agent.h"

namespace torchrpc {

void setCurrentAgent(std::shared_ptr<Agent> agent);
// The running agent; throws RpcError(kShutdown) if there is none.
std::shared_ptr<Agent> currentAgent();

}  // namespace torchrpc
