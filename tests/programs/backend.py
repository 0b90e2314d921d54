"""The one import that differs between torch.distributed.rpc and torchrpc.

    from tests.programs.backend import rpc, dist_autograd, DistributedOptimizer

RPC_BACKEND=torchrpc (the default):
    rpc = torchrpc, dist_autograd = torchrpc.autograd,
    DistributedOptimizer = torchrpc.optim.DistributedOptimizer
RPC_BACKEND=torch:
    rpc = torch.distributed.rpc, dist_autograd = torch.distributed.autograd,
    DistributedOptimizer = torch.distributed.optim.DistributedOptimizer

Names resolve on first use (PEP 562 module __getattr__), so the torch
backend works whether or not torchrpc's modules exist yet, and a name is
only imported when a program asks for it. RPC_BACKEND is read at that first
use: set it before importing a program.
"""

import importlib
import os

BACKENDS = ("torchrpc", "torch")

_MODULES = {
    "torch": {
        "rpc": ("torch.distributed.rpc", None),
        "dist_autograd": ("torch.distributed.autograd", None),
        "DistributedOptimizer": ("torch.distributed.optim", "DistributedOptimizer"),
    },
    "torchrpc": {
        "rpc": ("torchrpc", None),
        "dist_autograd": ("torchrpc.autograd", None),
        "DistributedOptimizer": ("torchrpc.optim", "DistributedOptimizer"),
    },
}

__all__ = ["rpc", "dist_autograd", "DistributedOptimizer", "name"]


def name() -> str:
    """The selected backend: "torchrpc" or "torch"."""
    b = os.environ.get("RPC_BACKEND", "torchrpc") or "torchrpc"
    if b not in BACKENDS:
        raise ValueError(f"RPC_BACKEND={b!r}: expected one of {', '.join(BACKENDS)}")
    return b


def __getattr__(attr):
    table = _MODULES[name()]
    if attr not in table:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    module, member = table[attr]
    value = importlib.import_module(module)
    if member is not None:
        value = getattr(value, member)
    globals()[attr] = value  # resolved once per process
    return value
