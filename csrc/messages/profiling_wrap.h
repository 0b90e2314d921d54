#pragma once

// RUN_WITH_PROFILING_REQ/RESP around an already-encoded message, spliced in
// unchanged like the autograd wrapper (autograd_wrap.h). The request
// carries nothing but its key; the response carries the callee's events for
// that request as JSON (agent/remote_profiling.h) under the same key.

#include "messages/message.h"

namespace torchrpc {

// `outerType` is kRunWithProfilingReq or kRunWithProfilingResp.
Message wrapForProfiling(MessageType outerType, const std::string& data, const GloballyUniqueId& key,
                         Message&& inner);

// The inverse; throws RpcError(kDecode) if `outer` is malformed or wraps a
// profiling message again.
Message unwrapProfiling(Message&& outer, std::string& data, GloballyUniqueId& key);

}  // namespace torchrpc
