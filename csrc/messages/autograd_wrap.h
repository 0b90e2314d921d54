#pragma once

// FORWARD_AUTOGRAD_REQ/RESP around an already-encoded message. The agent
// wraps requests and responses at the Message level: the inner payload is
// spliced in unchanged (see encodeWrappedHead), so wrapping costs a few
// dozen bytes and never decodes the inner message. The result is the same
// encoding as ForwardAutogradReq/Resp built from a command.

#include "messages/message.h"

namespace torchrpc {

struct AutogradHeader {
  int64_t fromWorkerId = -1;
  int64_t contextId = -1;
  int64_t messageId = -1;  // names the send/recv pair within the context
};

// `outerType` is kForwardAutogradReq or kForwardAutogradResp. The inner
// message's tensors become the outer message's, in the same order.
Message wrapWithAutograd(MessageType outerType, const AutogradHeader& header, Message&& inner);

// The inverse; throws RpcError(kDecode) if `outer` is malformed or wraps an
// autograd message again.
Message unwrapAutograd(Message&& outer, AutogradHeader& header);

}  // namespace torchrpc
