// Names and kinds of the message types (message_type.h).

#include "wire/message_type.h"

namespace torchrpc {

const std::string& messageTypeName(MessageType type) {
  static const std::vector<std::string> names = {
      "SCRIPT_CALL", "SCRIPT_RET", "PYTHON_CALL", "PYTHON_RET", "SCRIPT_REMOTE_CALL",
      "PYTHON_REMOTE_CALL", "REMOTE_RET", "SCRIPT_RREF_FETCH_CALL", "PYTHON_RREF_FETCH_CALL",
      "SCRIPT_RREF_FETCH_RET", "PYTHON_RREF_FETCH_RET", "RREF_USER_DELETE", "RREF_FORK_REQUEST",
      "RREF_CHILD_ACCEPT", "RREF_ACK", "FORWARD_AUTOGRAD_REQ", "FORWARD_AUTOGRAD_RESP",
      "BACKWARD_AUTOGRAD_REQ", "BACKWARD_AUTOGRAD_RESP", "CLEANUP_AUTOGRAD_CONTEXT_REQ",
      "CLEANUP_AUTOGRAD_CONTEXT_RESP", "RUN_WITH_PROFILING_REQ", "RUN_WITH_PROFILING_RESP",
      "RREF_BACKWARD_REQ", "RREF_BACKWARD_RESP", "EXCEPTION", "HANDSHAKE", "HEARTBEAT", "CANCEL",
      "SCHEMA_QUERY", "SCHEMA_RET", "SHUTDOWN_NOTICE", "CANCEL_RET",
      "WITH_CODE"};
  static_assert(kMaxMessageType == 34, "name the new message type above");
  return names.at(static_cast<size_t>(type) - 1);
}

bool isResponse(MessageType type) {
  switch (type) {
    case MessageType::kScriptRet:
    case MessageType::kPythonRet:
    case MessageType::kRemoteRet:
    case MessageType::kScriptRRefFetchRet:
    case MessageType::kPythonRRefFetchRet:
    case MessageType::kRRefAck:
    case MessageType::kForwardAutogradResp:
    case MessageType::kBackwardAutogradResp:
    case MessageType::kCleanupAutogradContextResp:
    case MessageType::kRunWithProfilingResp:
    case MessageType::kRRefBackwardResp:
    case MessageType::kException:
    case MessageType::kSchemaRet:
    case MessageType::kCancelRet:
      return true;
    default:
      return false;
  }
}

}  // namespace torchrpc
