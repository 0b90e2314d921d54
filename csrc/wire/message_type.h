#pragma once

// Every message torchrpc sends. Values are part of the wire format: never
// renumber, only append. messageTypeName (message_type.cpp) must name each,
// and the catalog (messages/message.cpp) must give each its fields.

#include <cstdint>
#include <string>
#include <vector>

namespace torchrpc {

enum class MessageType : uint16_t {
  // A registered TorchScript function or builtin op, by qualified name, with
  // its schema-typed argument stack.
  kScriptCall = 1,
  // The single IValue a ScriptCall returned.
  kScriptRet = 2,
  // A pickled Python callable and its arguments; run only where opted in.
  kPythonCall = 3,
  // The pickled result of a PythonCall.
  kPythonRet = 4,
  // A ScriptCall whose result stays on the callee, owned by an RRef.
  kScriptRemoteCall = 5,
  // A PythonCall whose result stays on the callee, owned by an RRef.
  kPythonRemoteCall = 6,
  // The owner confirms it created an RRef's value (or failed to).
  kRemoteRet = 7,
  // A user asks the owner for the TorchScript value an RRef names.
  kScriptRRefFetchCall = 8,
  // A user asks the owner for the Python value an RRef names.
  kPythonRRefFetchCall = 9,
  // The owner's answer to kScriptRRefFetchCall.
  kScriptRRefFetchRet = 10,
  // The owner's answer to kPythonRRefFetchCall (pickled).
  kPythonRRefFetchRet = 11,
  // A user reference was dropped; the owner forgets that fork.
  kRRefUserDelete = 12,
  // A child fork asks the owner to record it.
  kRRefForkRequest = 13,
  // The owner tells a parent that a child fork is recorded.
  kRRefChildAccept = 14,
  // Plain acknowledgement of an RRef control message.
  kRRefAck = 15,
  // Any request wrapped with distributed-autograd metadata.
  kForwardAutogradReq = 16,
  // Any response wrapped with distributed-autograd metadata.
  kForwardAutogradResp = 17,
  // Gradients flowing back to the worker that sent a forward message.
  kBackwardAutogradReq = 18,
  kBackwardAutogradResp = 19,
  // Release an autograd context on every worker that took part.
  kCleanupAutogradContextReq = 20,
  kCleanupAutogradContextResp = 21,
  // Any request to run under the profiler; the response carries its events.
  kRunWithProfilingReq = 22,
  kRunWithProfilingResp = 23,
  // Run backward from an RRef's value on its owner.
  kRRefBackwardReq = 24,
  kRRefBackwardResp = 25,
  // A request failed; carries the error's class, message and traceback.
  kException = 26,
  // Unused since protocol 2: connections now begin with the authenticated
  // handshake of agent/handshake.h, before any frame. Kept for its number.
  kHandshake = 27,
  // Liveness: sent on a connection idle for heartbeat_interval; never answered.
  kHeartbeat = 28,
  // The caller gave up on request `message_id` (timeout or torchrpc.cancel);
  // the callee drops it if not started, discards its result if it has. Sent
  // with id 0 when no answer is wanted, else answered with CANCEL_RET.
  kCancel = 29,
  // Ask a worker for the schema of a function registered under a name.
  kSchemaQuery = 30,
  // The schema string, or empty if the name is unknown.
  kSchemaRet = 31,
  // Graceful shutdown: a worker tells a peer it will send no more requests.
  kShutdownNotice = 32,
  // The answer to CANCEL: whether the request had not started (never ran).
  kCancelRet = 33,
  // A SCRIPT_CALL or SCRIPT_REMOTE_CALL of code shipped by value (its name is
  // "sha256:<hex>"), carrying the code's archive: sent until the callee is
  // known to hold it, after which the plain call with the name alone goes.
  // Answered by the wrapped call's response.
  kWithCode = 34,
};

// The highest MessageType value; every value from 1 to it is defined.
constexpr uint16_t kMaxMessageType = 34;

inline bool isKnownMessageType(uint16_t t) { return t >= 1 && t <= kMaxMessageType; }

// "SCRIPT_CALL", ... for errors and the Python MessageType enum.
const std::string& messageTypeName(MessageType type);

// True for messages that answer a request (matched by message id).
bool isResponse(MessageType type);

}  // namespace torchrpc
