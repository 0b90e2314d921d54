"""Decorators for functions run over RPC (torch.distributed.rpc.functions)."""

import functools

import torch

__all__ = ["async_execution"]

# The attribute torch.distributed.rpc.functions.async_execution sets; the
# same name, so code that tests for it keeps working.
_MARK = "_wrapped_async_rpc_function"


def async_execution(fn):
    """Marks `fn` as returning a torch.futures.Future whose value is the RPC's
    result: the callee sends the reply when that future completes, and no
    worker thread waits for it meanwhile (fn may return at once, say with
    `rpc_async(...).then(...)` or a Future that a later call completes).

    Works for rpc_sync, rpc_async, remote and RRef proxies. Put it under
    @staticmethod / @classmethod, which keep the mark when accessed:

        class Server:
            @staticmethod
            @torchrpc.functions.async_execution
            def add(to, x): return torchrpc.rpc_async(to, torch.add, (x, 1))

    On a TorchScript function it goes on top of @torch.jit.script and returns
    the ScriptFunction itself: a function whose schema returns Future[T]
    already says so, and the callee waits for that future the same way.
    """
    if isinstance(fn, torch.jit.ScriptFunction):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    setattr(wrapper, _MARK, fn)
    return wrapper


def _is_async_execution(fn) -> bool:
    """True if calling `fn` over RPC replies when its returned Future completes.
    Bound methods, static and class methods carry their function's mark."""
    return hasattr(fn, _MARK)
