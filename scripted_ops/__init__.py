"""Ready TorchScript functions every torchrpc worker registers at init_rpc.

Call them remotely by object or by qualified name, from Python or from
TorchScript (see torchrpc.stubs for typed calls):

    torchrpc.rpc_sync("w1", scripted_ops.add, (x, y))
"""

from typing import List

import torch
from torch import Tensor

import torchrpc._C  # noqa: F401  (defines the torch.ops.torchrpc operators used below)


@torch.jit.script
def echo(x: Tensor) -> Tensor:
    """Returns its argument unchanged (round-trip and latency checks)."""
    return x


@torch.jit.script
def identity(xs: List[Tensor]) -> List[Tensor]:
    """Returns a list of tensors unchanged."""
    return xs


@torch.jit.script
def add(x: Tensor, y: Tensor) -> Tensor:
    """x + y."""
    return x + y


@torch.jit.script
def mul(x: Tensor, y: Tensor) -> Tensor:
    """x * y."""
    return x * y


@torch.jit.script
def matmul(x: Tensor, y: Tensor) -> Tensor:
    """x @ y."""
    return torch.matmul(x, y)


@torch.jit.script
def add_one(x: Tensor) -> Tensor:
    """x + 1: the small call benchmarks measure."""
    return x + 1


@torch.jit.script
def param_put(name: str, value: Tensor) -> None:
    """Stores a copy of `value` on this worker under `name`."""
    torch.ops.torchrpc.param_put(name, value)


@torch.jit.script
def param_get(name: str) -> Tensor:
    """A copy of the tensor stored under `name`; error if there is none."""
    return torch.ops.torchrpc.param_get(name)


@torch.jit.script
def param_add_(name: str, delta: Tensor) -> Tensor:
    """Adds `delta` in place to the tensor stored under `name`; returns the new value."""
    return torch.ops.torchrpc.param_add_(name, delta)


@torch.jit.script
def sleep_ms(ms: int) -> int:
    """Sleeps `ms` milliseconds without the GIL and returns `ms` (timeouts, benchmarks)."""
    torch.ops.torchrpc.sleep_ms(ms)
    return ms


@torch.jit.script
def worker_name() -> str:
    """The name of the worker that runs it."""
    return torch.ops.torchrpc.worker_name()


ALL = [echo, identity, add, mul, matmul, add_one, param_put, param_get, param_add_, sleep_ms,
       worker_name]
