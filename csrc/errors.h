#pragma once

// torchrpc's one C++ exception type. Every failure that reaches a user is an
// RpcError whose kind picks the Python class it becomes (see
// python/bindings.cpp and torchrpc/errors.py), so C++ code never has to know
// about Python and Python code never has to parse messages.

#include <cstdint>
#include <stdexcept>
#include <string>

namespace torchrpc {

enum class ErrorKind : uint8_t {
  kRpc = 0,         // torchrpc.RpcError: anything not covered below.
  kDecode = 1,      // torchrpc.DecodeError: a frame or payload is malformed.
  kTimeout = 2,     // torchrpc.RpcTimeoutError: a call's deadline passed.
  kRemote = 3,      // The callee raised; re-raised as its own class if possible.
  kPeerLost = 4,    // torchrpc.PeerLostError: the connection to a peer died.
  kShutdown = 5,    // torchrpc.RpcShutdownError: the agent is not running.
  kArgument = 6,    // torchrpc.ArgumentError (a TypeError): schema mismatch.
  kNotFound = 7,    // torchrpc.FunctionNotFoundError: unknown function name.
  kForbidden = 8,   // torchrpc.PythonCallDisabledError: UDFs not enabled.
  kAuth = 9,        // torchrpc.AuthenticationError: a peer failed the handshake.
  kCancelled = 10,  // torchrpc.RpcCancelledError: torchrpc.cancel() gave the call up.
  kCodeRefused = 11,  // torchrpc.CodeRefusedError: code shipped to a worker without accept_code.
};

class RpcError : public std::runtime_error {
 public:
  RpcError(ErrorKind kind, const std::string& message, std::string remoteType = "",
           std::string remoteTraceback = "")
      : std::runtime_error(message),
        kind_(kind),
        remoteType_(std::move(remoteType)),
        remoteTraceback_(std::move(remoteTraceback)) {}

  ErrorKind kind() const { return kind_; }
  // For kRemote: the exception's qualified Python class name on the callee,
  // e.g. "builtins.ValueError".
  const std::string& remoteType() const { return remoteType_; }
  const std::string& remoteTraceback() const { return remoteTraceback_; }

 private:
  ErrorKind kind_;
  std::string remoteType_;
  std::string remoteTraceback_;
};

[[noreturn]] inline void throwDecode(const std::string& what) {
  throw RpcError(ErrorKind::kDecode, "torchrpc: malformed frame: " + what);
}

}  // namespace torchrpc
