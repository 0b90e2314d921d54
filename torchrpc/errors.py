"""Exceptions torchrpc raises. Every one derives from RpcError.

A function that raised on the callee is re-raised on the caller as the same
class when the caller can import it (builtins always), else as RemoteError;
either way the message names the worker and function and carries the remote
traceback.
"""

import builtins
import importlib
import sys

__all__ = [
    "RpcError",
    "DecodeError",
    "RpcTimeoutError",
    "RemoteError",
    "PeerLostError",
    "AuthenticationError",
    "CodeRefusedError",
    "RpcCancelledError",
    "RpcShutdownError",
    "ArgumentError",
    "FunctionNotFoundError",
    "PythonCallDisabledError",
    "InvalidWorkerError",
]


class RpcError(RuntimeError):
    """Base class of every torchrpc error."""


class DecodeError(RpcError, ValueError):
    """A frame or payload was malformed (truncated, corrupt, over a limit)."""


class RpcTimeoutError(RpcError, TimeoutError):
    """A call did not complete within its timeout."""


class RemoteError(RpcError):
    """The callee raised an exception whose class the caller cannot import."""

    def __init__(self, message, remote_type="", remote_traceback=""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class PeerLostError(RpcError, ConnectionError):
    """The connection to a peer failed or the peer process died."""


class RpcShutdownError(RpcError):
    """The agent is not running (not initialized, or shut down)."""


class ArgumentError(RpcError, TypeError):
    """Arguments do not match the function's schema."""


class FunctionNotFoundError(RpcError, LookupError):
    """No function is registered under the requested name on the callee."""


class PythonCallDisabledError(RpcError):
    """A Python callable was sent to a worker that did not opt in (python_udf)."""


class AuthenticationError(PeerLostError, PermissionError):
    """A peer failed the connection handshake: it does not hold this job's
    secret (or belongs to another job). A PeerLostError too, since the
    connection is refused."""


class RpcCancelledError(RpcError):
    """torchrpc.cancel() gave the call up before its reply arrived."""


class CodeRefusedError(RpcError, PermissionError):
    """Compiled code was shipped by value to a worker that does not accept
    code (RpcOptions(accept_code=True) opts in). Nothing of it was loaded."""


class InvalidWorkerError(RpcError, ValueError):
    """A worker name, rank or destination is malformed or names no worker.

    torch.distributed.rpc raises RuntimeError here, earlier torchrpc raised
    ValueError: this is both, so code written for either keeps working.
    """


def _find_class(qualified_name):
    """The exception class named `module.Class`, if importable."""
    module_name, _, name = qualified_name.rpartition(".")
    if not module_name:
        return None
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except Exception:
        return None
    cls = getattr(module, name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls
    return None


def make_error(kind, message, remote_type="", remote_traceback=""):
    """Builds the exception for a C++ RpcError (called from torchrpc._C)."""
    if kind != "RemoteError":
        return globals()[kind](message)
    if remote_traceback:
        message = f"{message}\n\nRemote traceback:\n{remote_traceback}"
    cls = _find_class(remote_type) if remote_type else None
    if cls is None:
        why = "its class cannot be imported here" if remote_type else "it has no class"
    else:
        try:
            exc = cls(message)
            exc.remote_traceback = remote_traceback
            return exc
        except Exception as e:  # constructor takes other arguments
            why = f"{cls.__qualname__}(message) raised {type(e).__name__}: {e}"
    # "Original exception on remote side was": torch's words, which programs match on.
    return RemoteError(
        f"torchrpc: the callee's exception {remote_type or '(unknown)'} cannot be rebuilt "
        f"here ({why}). Original exception on remote side was {remote_type}: {message}",
        remote_type, remote_traceback,
    )


# builtins is always importable; named here so linters see it is used.
assert _find_class("builtins.ValueError") is builtins.ValueError
