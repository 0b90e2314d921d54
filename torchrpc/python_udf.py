"""The Python fallback: pickling callables and values with tensors beside,
calling them on a worker that opted in (python_udf=True), and running them there.

Tensors are taken out of the pickle stream (persistent ids) so their bytes
travel beside the payload, written straight from tensor memory. The pickle
stream itself travels as a uint8 tensor for the same reason. RRefs travel
as persistent ids too: pickling one makes a fork the receiver registers, so
only this pickler may do it (RRef.__reduce__ refuses every other pickler).
An RRef sent in a call to its own owner (a proxy call, an optimizer step)
travels by id instead, with no fork and no protocol messages: the caller
keeps it, and so the owner's value, alive until the reply (see dumps).
"""

import io
import pickle
import sys
import traceback

import torch

from torchrpc import _C, _handle
from torchrpc import rref as rref_mod
from torchrpc.errors import FunctionNotFoundError, PythonCallDisabledError
from torchrpc.functions import _is_async_execution


class _Pickler(pickle.Pickler):
    def __init__(self, f, to, held):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = []
        self._to = to
        self._held = held

    def persistent_id(self, obj):
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided:
            self.tensors.append(obj)
            return len(self.tensors) - 1
        if type(obj) is rref_mod.RRef:
            if self._held is not None and obj._is_user_of(self._to):
                self._held.append(obj)
                return ("owned", obj._id())
            return ("rref", obj._fork())
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, tensors):
        super().__init__(f)
        self._tensors = tensors

    def persistent_load(self, pid):
        if type(pid) is int:
            return self._tensors[pid]
        if pid[0] == "owned":
            return rref_mod._owned(pid[1])
        return rref_mod._unfork(pid[1])


def dumps(obj, to=None, held=None):
    """(uint8 tensor of the pickle stream, [tensors it refers to]).

    For a call to worker `to`, RRefs that worker owns are appended to `held`
    instead of forked: the caller must keep `held` until the reply.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf, to, held)
    pickler.dump(obj)
    data = bytearray(buf.getbuffer())
    return torch.frombuffer(data, dtype=torch.uint8), pickler.tensors


def loads(pickled, tensors):
    """Inverse of dumps."""
    return _Unpickler(io.BytesIO(pickled.numpy()), tensors).load()


def loads_result(value):
    """Unpickles the (pickled, tensors) pair a PYTHON_RET future holds."""
    return loads(value[0], value[1])


def call(state, dst, func, args, kwargs, timeout, sync):
    """Calls `func(*args, **kwargs)` on worker `dst` (rpc_sync and rpc_async
    of a Python callable, RRef proxies): its result, or a Future of it."""
    _check_python_udf(state, dst, func)
    held = []  # RRefs owned by dst, sent by id: alive until the reply
    pickled, tensors = dumps((func, args, kwargs), dst, held)
    if sync:
        result = state.agent.python_call(dst, _what(func), pickled, tensors, timeout, True)
        del held
        return loads_result(result)
    # A torch Future that completes with the unpickled result or fails with
    # the call's error (its own class), `held` kept until the reply.
    return state.agent.python_call(dst, _what(func), pickled, tensors, timeout, False,
                                   loads_result, held)


def remote(state, dst, func, args, kwargs, timeout):
    """remote() of a Python callable: the script object of the RRef to its result."""
    _check_python_udf(state, dst, func)
    pickled, tensors = dumps((func, args, kwargs))
    return state.agent.remote_python(dst, _what(func), pickled, tensors, timeout)


def _what(func):
    return getattr(func, "__qualname__", repr(func))


def _check_python_udf(state, dst, func):
    if not callable(func):
        raise TypeError(f"torchrpc: cannot call {func!r}: not a function")
    if not state.python_udf[dst]:
        raise PythonCallDisabledError(
            f"torchrpc: worker {state.workers[dst].name!r} does not run Python callables "
            f"(it must start with RpcOptions(python_udf=True)); "
            f"register {getattr(func, '__name__', func)!r} as a TorchScript function instead"
        )


def run_python_call(pickled, tensors):
    """Runs a PYTHON_CALL on the callee (called from C++ with the GIL).

    Returns ("ok", pickled, tensors) or ("err", class name, message,
    traceback); for an @async_execution function, ("future", F): F completes
    with one of those two once the function's Future does.
    """
    return _run(pickled, tensors, lambda value: ("ok",) + dumps(value))


def run_python_remote(pickled, tensors):
    """Runs a PYTHON_REMOTE_CALL; the owner keeps the returned object.

    Returns ("ok", result) or ("err", class name, message, traceback); for an
    @async_execution function, ("future", F), F completing with one of those.
    """
    return _run(pickled, tensors, lambda value: ("ok", value))


def _run(pickled, tensors, reply):
    """Both entry points: unpickle, call, and reply(result), now or (for
    async_execution) when the returned Future completes."""
    try:
        try:
            fn, args, kwargs = loads(pickled, tensors)
        except (AttributeError, ImportError) as e:
            raise _not_found(e) from e
        _C.wait_received_forks()  # RRef arguments are confirmed by their owners first
        fn = _target(fn)
        result = fn(*args, **kwargs)
        if _is_async_execution(fn):
            return ("future", _reply_when_done(fn, result, reply))
        return reply(result)
    except BaseException as e:  # every failure goes back to the caller
        _log(e)
        return _error(e)


def _me() -> str:
    state = _handle._state
    return repr(state.self_info) if state is not None else "a worker still in init_rpc"


def _not_found(e: BaseException) -> FunctionNotFoundError:
    """What a call whose function (or an argument's class) the callee cannot
    import raises on the caller: a RuntimeError, with torch's words."""
    return FunctionNotFoundError(
        f"cannot load the Python call: {e}. The RPC pickler does not serialize function "
        f"code: functions and classes travel by reference, so define them at module level "
        f"in a module the callee imports too"
    )


def _log(e: BaseException):
    """A failed call is told on the callee's stderr too (as torch does), so
    the worker's own log shows what its peers were sent back."""
    print(f"On {_me()}:\n{e!r}\n{traceback.format_exc()}", file=sys.stderr)


def _target(fn):
    """What a request calls: an RRef proxy's method is looked up here, on the
    owner, so its own async_execution mark (or AttributeError) counts."""
    return fn.bind() if type(fn) is rref_mod._OwnerMethod else fn


def _reply_when_done(fn, fut, reply):
    """A Future that completes with reply(fut's value), or with the error
    tuple if fut failed or reply raised; it never completes with an error
    itself, so the C++ side only ever sees a reply to send."""
    # torch._C.Future: what rpc_async() and then() return; torch.futures.Future
    # (what Future() makes) derives from it.
    if not isinstance(fut, torch._C.Future):
        raise RuntimeError(
            f"Functions decorated with @rpc.async_function must return a "
            f"torch.futures.Future object, but got {type(fut)} from "
            f"{getattr(fn, '__qualname__', fn)!r}"
        )
    out = torch.futures.Future()

    def done(f):
        try:
            r = reply(f.value())
        except BaseException as e:
            r = _error(e)
        out.set_result(r)

    # Not then(): it would wrap an error in RuntimeError and lose its class.
    fut.add_done_callback(done)
    return out


def _error(e: BaseException):
    cls = type(e)
    return ("err", f"{cls.__module__}.{cls.__qualname__}", str(e), traceback.format_exc())
