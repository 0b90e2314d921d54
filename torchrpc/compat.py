"""torch.distributed.rpc's option types, so that programs written for it
run with only their imports changed. init_rpc (torchrpc.api) turns them
into RpcOptions; torchrpc's own code uses RpcOptions directly."""

import enum
import warnings

__all__ = ["BackendType", "RpcBackendOptions", "TensorPipeRpcBackendOptions"]


class BackendType(enum.Enum):
    """The transport backends init_rpc accepts. torchrpc has one (its own TCP
    agent); TENSORPIPE names it, as torch's default backend."""

    TENSORPIPE = "TENSORPIPE"


class RpcBackendOptions:
    """The options every backend has (torch.distributed.rpc.RpcBackendOptions).

    rpc_timeout: default call timeout in seconds (0: none).
    init_method: "env://" or "tcp://host:port" (see init_rpc).
    """

    def __init__(self, rpc_timeout: float = 60.0, init_method: str = "env://"):
        self.rpc_timeout = rpc_timeout
        self.init_method = init_method


class TensorPipeRpcBackendOptions(RpcBackendOptions):
    """torch.distributed.rpc.TensorPipeRpcBackendOptions, same signature.

    num_worker_threads, rpc_timeout and init_method are honoured. The device
    fields (device_maps, devices, set_device_map, set_devices) and TensorPipe's
    _transports/_channels are accepted and kept, with a warning: torchrpc
    moves CPU tensors only, so there is nothing for them to configure.
    """

    def __init__(
        self,
        *,
        num_worker_threads: int = 16,
        rpc_timeout: float = 60.0,
        init_method: str = "env://",
        device_maps=None,
        devices=None,
        _transports=None,
        _channels=None,
    ):
        super().__init__(rpc_timeout, init_method)
        self.num_worker_threads = num_worker_threads
        self.device_maps = dict(device_maps or {})
        self.devices = list(devices or [])
        self._transports = _transports
        self._channels = _channels
        given = {"device_maps": device_maps, "devices": devices,
                 "_transports": _transports, "_channels": _channels}
        ignored = [name for name, value in given.items() if value is not None]
        if ignored:
            _warn_ignored(", ".join(ignored))

    def set_device_map(self, to: str, device_map):
        """Recorded only (see the class docstring)."""
        _warn_ignored("set_device_map")
        self.device_maps.setdefault(to, {}).update(device_map)

    def set_devices(self, devices):
        """Recorded only (see the class docstring)."""
        _warn_ignored("set_devices")
        self.devices = list(devices)

    def __repr__(self):
        return (
            f"TensorPipeRpcBackendOptions(num_worker_threads={self.num_worker_threads}, "
            f"rpc_timeout={self.rpc_timeout}, init_method={self.init_method!r})"
        )


def _warn_ignored(what: str):
    # stacklevel 3: the user's line that built the options or called the setter.
    warnings.warn(
        f"torchrpc ignores TensorPipeRpcBackendOptions {what}: it moves CPU tensors "
        f"only, over its own TCP transport",
        UserWarning,
        stacklevel=3,
    )
