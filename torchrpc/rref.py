"""Remote references.

`remote()` keeps a result on the worker that computed it (the owner) and
returns an RRef to it. RRefs can be passed to other workers as arguments
(inside TorchScript values or pickled Python arguments); each copy is a fork
the owner counts, and the owner frees the value once every fork is dropped.
The protocol lives in csrc/rref/rref_context.h; this is its Python face.
"""

from typing import Any, Optional

import torch

from torchrpc import _C, _handle

__all__ = ["RRef"]

_PLAIN_VALUES = (torch.Tensor, int, float, bool, str, complex, type(None), list, tuple, dict)


def _agent():
    # The C++ handle, set before rendezvous: a peer may send us an RRef
    # before init_rpc has returned here.
    return _C.current_agent()


class RRef:
    """A reference to a value owned by some worker.

    RRef(value) makes a local owner reference. Values TorchScript can type
    (tensors, numbers, strings, containers of them) are fetched as IValues;
    anything else is a Python object, fetched pickled.
    """

    # _attributes: names of the value's attributes remote() proxies found on
    # the owner (each is asked once).
    __slots__ = ("_c", "_attributes")

    def __init__(self, value: Any = None, *, _script_object=None):
        if _script_object is None:
            agent = _agent()
            try:
                _script_object = agent.rref_local(value, not isinstance(value, _PLAIN_VALUES))
            except RuntimeError:
                # A container TorchScript cannot type ([], [obj], {k: obj}).
                _script_object = agent.rref_local(value, True)
        self._c = _script_object
        self._attributes = set()

    def _info(self):
        return _agent().rref_info(self._c)  # (is_owner, owner_id, is_python, confirmed)

    def is_owner(self) -> bool:
        """True on the worker that holds the value."""
        return self._info()[0]

    def owner(self):
        """The owner's WorkerInfo."""
        return _handle._current().workers[self._info()[1]]

    def owner_name(self) -> str:
        return self.owner().name

    def confirmed_by_owner(self) -> bool:
        """True once the owner has registered this reference."""
        return self._info()[3]

    def to_here(self, timeout: Optional[float] = None):
        """The value, fetched from the owner (blocks; raises the error that
        creating it raised, if it failed)."""
        from torchrpc import python_udf  # which imports this module

        is_owner, _, is_python, _ = self._info()
        value = _agent().rref_fetch(self._c, _handle._timeout(timeout))
        if is_python and not is_owner:
            return python_udf.loads_result(value)
        return _wrap(value)

    def local_value(self):
        """The value itself; only on the owner."""
        if not self.is_owner():
            state = _handle._current()
            raise RuntimeError(  # torch's message, word for word
                f"For UserRRef(rref_id={_gid(self._id())}, fork_id={_gid(self._fork_id())}), "
                f"can't call localValue() on user {state.self_info!r}. "
                f"Call it on owner {self.owner()!r}"
            )
        return self.to_here()

    def backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
        """Runs backward from the tensor this RRef holds, on its owner.

        With a context id, a distributed backward in that context (from any
        worker); without one, a plain local backward, which only the owner
        may run (as torch.distributed.rpc.RRef.backward).
        """
        _C.rref_backward(_agent(), self._c, int(dist_autograd_ctx_id), bool(retain_graph))

    def torchscript(self):
        """This reference as a torch.classes.torchrpc.RRef, for TorchScript code
        (arguments, attributes of ScriptModules, torch.jit.save)."""
        return self._c

    def rpc_sync(self, timeout: Optional[float] = None):
        """Proxy: rref.rpc_sync().method(*args) runs value.method on the owner."""
        return _Proxy(self, "rpc_sync", timeout)

    def rpc_async(self, timeout: Optional[float] = None):
        return _Proxy(self, "rpc_async", timeout)

    def remote(self, timeout: Optional[float] = None):
        return _Proxy(self, "remote", timeout)

    def _is_user_of(self, worker_id: int) -> bool:
        """True for a user reference to a value `worker_id` owns."""
        is_owner, owner_id, _, _ = self._info()
        return not is_owner and owner_id == worker_id

    def _id(self):
        return _agent().rref_id(self._c)

    def _fork_id(self):
        """This user reference's own id; None for an owner."""
        return _agent().rref_fork_id(self._c)

    def _fork(self):
        """A new fork of this reference, as the tuple _unfork() takes on the
        receiving worker; registered at once, so it must be sent."""
        return _agent().rref_fork(self._c)

    def __reduce__(self):
        # A fork made by a pickle that is never sent would keep the value
        # alive forever: only RPC's own pickler (python_udf) may make one.
        raise RuntimeError(
            "torchrpc: Can not pickle rref in python pickler: an RRef can only be "
            "pickled by RPC, as an argument or result of rpc_sync/rpc_async/remote"
        )

    def __repr__(self):
        # As torch prints its RRefs, with the ids the RRef protocol uses
        # (one counter per worker from 0, as in torch).
        if self.is_owner():
            return f"OwnerRRef({_gid(self._id())})"
        return f"UserRRef(RRefId = {_gid(self._id())}, ForkId = {_gid(self._fork_id())})"


def _gid(created_on_and_local_id):
    created_on, local_id = created_on_and_local_id
    return f"GloballyUniqueId(created_on={created_on}, local_id={local_id})"


def _owned(rref_id):
    """The owner reference this worker holds for `rref_id`: an RRef a caller
    sent back to its owner by id (python_udf)."""
    return RRef(_script_object=_agent().rref_owned(tuple(rref_id)))


def _unfork(info):
    """The RRef a received fork names (python_udf unpickles forks with it).
    Requests are served only once this worker knows the others (the agent
    holds them until then), so the owner and parent can be told at once."""
    return RRef(_script_object=_agent().rref_unfork(tuple(info)))


class _OwnerMethod:
    """What a proxy call sends: method `name` of the value `rref` names. The
    owner looks the method up (bind) when the call arrives, so a missing
    attribute raises AttributeError there, which the caller gets back, and an
    @async_execution method is served as one."""

    __slots__ = ("rref", "name")

    def __init__(self, rref, name):
        self.rref, self.name = rref, name

    def bind(self):
        return getattr(self.rref.local_value(), self.name)

    def __call__(self, *args, **kwargs):
        return self.bind()(*args, **kwargs)

    def __repr__(self):
        # Names the call in errors: "AttributeError raised by 'RRef value.step' on ..."
        return f"RRef value.{self.name}"


def _missing_attribute(rref, name):
    """On the owner: None if the value has attribute `name`, else the text of
    the AttributeError looking it up raises."""
    try:
        getattr(rref.local_value(), name)
        return None
    except AttributeError as e:
        return str(e)


class _Proxy:
    """rref.rpc_sync(), rpc_async() and remote(): the value's methods, called
    on the owner as Python callables (as torchrpc.rpc_sync and co. would).

    rpc_sync() and rpc_async() look the method up in the call itself, so a
    missing one raises AttributeError from the call (rpc_async: from wait()).
    remote() first asks the owner whether the value has it (once per RRef and
    name), so that a missing method raises AttributeError from the remote()
    call, as in torch, not later from to_here()."""

    def __init__(self, rref, how, timeout):
        self._rref, self._how, self._timeout = rref, how, timeout

    def __getattr__(self, name):
        def method(*args, **kwargs):
            from torchrpc import python_udf  # which imports this module

            state, owner = _handle._current(), self._rref._info()[1]
            func, timeout = _OwnerMethod(self._rref, name), _handle._timeout(self._timeout)
            if self._how == "remote":
                self._check_attribute(state, owner, name, timeout)
                obj = python_udf.remote(state, owner, func, args, kwargs, timeout)
                return RRef(_script_object=obj)
            sync = self._how == "rpc_sync"
            return python_udf.call(state, owner, func, args, kwargs, timeout, sync)

        return method

    def _check_attribute(self, state, owner, name, timeout):
        from torchrpc import python_udf  # which imports this module

        rref = self._rref
        if name in rref._attributes:
            return
        if rref.is_owner():
            missing = _missing_attribute(rref, name)
        else:
            missing = python_udf.call(state, owner, _missing_attribute, (rref, name), {},
                                      timeout, True)
        if missing is not None:
            raise AttributeError(missing)
        rref._attributes.add(name)


def _is_script_rref(value) -> bool:
    return isinstance(value, torch.ScriptObject) and value._type().qualified_name() == (
        "__torch__.torch.classes.torchrpc.RRef"
    )


def _map_values(value, leaf):
    """`value` with `leaf` applied to everything inside lists, tuples and dicts."""
    if isinstance(value, list):
        return [_map_values(v, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_values(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _map_values(v, leaf) for k, v in value.items()}
    return leaf(value)


def _wrap(value):
    """Script RRef objects (also inside containers) as Python RRefs."""
    return _map_values(value, lambda v: RRef(_script_object=v) if _is_script_rref(v) else v)


def _unwrap(value):
    """Python RRefs (also inside containers) as the script objects TorchScript takes."""
    return _map_values(value, lambda v: v._c if isinstance(v, RRef) else v)
