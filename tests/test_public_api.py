"""Pins the public API: a change here is a change users see."""

import torchrpc
import torchrpc.messages
import torchrpc.stubs


def test_public_names():
    assert sorted(torchrpc.__all__) == sorted(
        [
            "RpcOptions", "WorkerInfo", "init_rpc", "shutdown", "rpc_sync", "rpc_async",
            "register", "script", "get_worker_info", "get_rpc_timeout", "remote", "debug_info",
            "RRef",
            "BackendType", "RpcBackendOptions", "TensorPipeRpcBackendOptions",
            "RpcError", "DecodeError", "RpcTimeoutError", "RemoteError", "PeerLostError",
            "RpcShutdownError", "ArgumentError", "FunctionNotFoundError",
            "PythonCallDisabledError", "InvalidWorkerError", "AuthenticationError",
            "RpcCancelledError", "CodeRefusedError", "cancel", "metrics", "metrics_text",
            "metrics_port", "profile", "profile_remote", "remote_events", "add_remote_events",
        ]
    )
    for name in torchrpc.__all__:
        assert hasattr(torchrpc, name), name
    assert torchrpc.stubs.__all__ == ["stub", "Stub"]
    # torch.distributed.rpc.functions, reached the same way.
    assert torchrpc.functions.__all__ == ["async_execution"]


def test_error_hierarchy():
    assert issubclass(torchrpc.RpcTimeoutError, TimeoutError)
    assert issubclass(torchrpc.ArgumentError, TypeError)
    assert issubclass(torchrpc.PeerLostError, ConnectionError)
    # torch raises RuntimeError for bad worker names and ranks, torchrpc raised ValueError.
    assert issubclass(torchrpc.InvalidWorkerError, RuntimeError)
    assert issubclass(torchrpc.InvalidWorkerError, ValueError)
    for name in torchrpc.errors.__all__:
        assert issubclass(getattr(torchrpc, name), torchrpc.RpcError)


def test_message_types_are_numbered_and_complete():
    values = [int(t) for t in torchrpc.messages.MessageType]
    assert values == list(range(1, len(values) + 1))
    assert set(torchrpc.messages.MESSAGE_CLASSES) == set(torchrpc.messages.MessageType)
