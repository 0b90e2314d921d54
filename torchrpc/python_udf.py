"""The Python fallback: pickling callables and values with tensors beside.

Tensors are taken out of the pickle stream (persistent ids) so their bytes
travel beside the payload, written straight from tensor memory. The pickle
stream itself travels as a uint8 tensor for the same reason.
"""

import io
import pickle
import traceback

import torch


class _Pickler(pickle.Pickler):
    def __init__(self, f):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = []

    def persistent_id(self, obj):
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided:
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, tensors):
        super().__init__(f)
        self._tensors = tensors

    def persistent_load(self, pid):
        return self._tensors[pid]


def dumps(obj):
    """(uint8 tensor of the pickle stream, [tensors it refers to])."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    data = bytearray(buf.getbuffer())
    return torch.frombuffer(data, dtype=torch.uint8), pickler.tensors


def loads(pickled, tensors):
    """Inverse of dumps."""
    return _Unpickler(io.BytesIO(pickled.numpy()), tensors).load()


def loads_result(value):
    """Unpickles the (pickled, tensors) pair a PYTHON_RET future holds."""
    return loads(value[0], value[1])


def run_python_call(pickled, tensors):
    """Runs a PYTHON_CALL on the callee (called from C++ with the GIL).

    Returns ("ok", pickled, tensors) or ("err", class name, message, traceback).
    """
    try:
        fn, args, kwargs = loads(pickled, tensors)
        return ("ok",) + dumps(fn(*args, **kwargs))
    except BaseException as e:  # every failure goes back to the caller
        return _error(e)


def run_python_remote(pickled, tensors):
    """Runs a PYTHON_REMOTE_CALL; the owner keeps the returned object.

    Returns ("ok", result) or ("err", class name, message, traceback).
    """
    try:
        fn, args, kwargs = loads(pickled, tensors)
        return ("ok", fn(*args, **kwargs))
    except BaseException as e:
        return _error(e)


def _error(e: BaseException):
    cls = type(e)
    return ("err", f"{cls.__module__}.{cls.__qualname__}", str(e), traceback.format_exc())
