"""DistributedOptimizer: one optimizer per worker that owns parameters,
stepped from anywhere with an autograd context's gradients.

Same meaning as torch.distributed.optim.DistributedOptimizer, on torchrpc.
"""

from typing import Dict, List

import torch

from torchrpc.api import remote, rpc_async, rpc_sync
from torchrpc.errors import PythonCallDisabledError
from torchrpc.optim import owner
from torchrpc.optim.functional import SCRIPT_OPTIMIZERS, script_config
from torchrpc.rref import RRef

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer:
    """Optimizes parameters that live on various workers.

    optimizer_class: a torch.optim class (or any class taking `params` first
        and having step()). SGD, Adam, AdamW, Adagrad and RMSprop run on the
        owners as TorchScript (ScriptOptimizer, no GIL); any other class is
        imported there by path and needs the owners to run Python callables
        (RpcOptions(python_udf=True)).
    params_rref: torchrpc.RRefs to parameter tensors (leaves), owned by any
        workers. Each owner gets one optimizer over its own parameters.
    args, kwargs: the rest of optimizer_class's constructor arguments.

    The optimizers exist (or the constructor has raised creation's error) by
    the time the constructor returns. step(context_id) steps them all at once;
    call it inside the context's `with` block (leaving it releases the
    gradients). As in torch, ScriptOptimizers take no lock: step one
    DistributedOptimizer from one thread at a time.
    """

    def __init__(self, optimizer_class, params_rref, *args, **kwargs):
        by_owner = _group_by_owner(params_rref)
        config = script_config(optimizer_class, *args, **kwargs)
        if config is not None:
            self._step = owner.step_script_optimizer
            ready = owner.script_optimizer_ready
            self._optimizers = {
                name: remote(name, owner.create_script_optimizer, (config[0], rrefs, *config[1:]))
                for name, rrefs in by_owner.items()
            }
        else:
            self._step = owner.step_python_optimizer
            ready = owner.python_optimizer_ready
            path = _class_path(optimizer_class)
            self._optimizers = {
                name: _remote_python(name, path, rrefs, args, kwargs)
                for name, rrefs in by_owner.items()
            }
        _wait_all([rpc_async(name, ready, (rref,)) for name, rref in self._optimizers.items()])

    def step(self, context_id: int) -> None:
        """Steps every owner's optimizer, in parallel, with the gradients that
        autograd context `context_id` accumulated on that owner; returns when
        all are done, raising the first error any of them raised."""
        if not isinstance(context_id, int):
            raise TypeError(f"step() takes an autograd context id (int), got {context_id!r}")
        if self._step is None:
            raise RuntimeError("torchrpc.optim: this torchrpc has no distributed autograd "
                               "(torch.ops.torchrpc.get_gradients)")
        owners = list(self._optimizers.items())
        # The last owner is called synchronously: one owner (the common
        # case) then costs no future at all.
        pending = [rpc_async(name, self._step, (rref, context_id)) for name, rref in owners[:-1]]
        last = None
        try:
            rpc_sync(owners[-1][0], self._step, (owners[-1][1], context_id))
        except Exception as e:  # noqa: BLE001  (raised after the others finished)
            last = e
        _wait_all(pending)
        if last is not None:
            raise last


def _group_by_owner(params_rref) -> Dict[str, List[RRef]]:
    groups: Dict[str, List[RRef]] = {}
    for rref in params_rref:
        if not isinstance(rref, RRef):
            raise TypeError(f"DistributedOptimizer takes torchrpc.RRefs to parameters, "
                            f"got {type(rref).__name__}")
        groups.setdefault(rref.owner_name(), []).append(rref)
    if not groups:
        raise ValueError("DistributedOptimizer got no parameters")
    return groups


def _class_path(cls) -> str:
    """"module:Qual.Name", by which the owner imports the class (never pickled code)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    if "<locals>" in path or cls.__module__ == "__main__":
        raise ValueError(f"DistributedOptimizer: {cls!r} must be importable by path on its "
                         f"owners (defined at module level, outside __main__)")
    return path


def _remote_python(name: str, path: str, rrefs, args, kwargs) -> RRef:
    try:
        return remote(name, owner.create_python_optimizer, (path, rrefs, args, kwargs))
    except PythonCallDisabledError as e:
        script_ones = ", ".join(sorted({c.__name__ for c in SCRIPT_OPTIMIZERS}))
        raise PythonCallDisabledError(
            f"DistributedOptimizer: worker {name!r} owns parameters but does not run Python "
            f"callables, and {path} has no TorchScript version (only torch.optim's "
            f"{script_ones} do); start {name!r} with RpcOptions(python_udf=True) or use one "
            f"of those"
        ) from e


def _wait_all(futures: List[torch.futures.Future]) -> None:
    """Waits for every future (none is left running), then raises the first error."""
    first = None
    for fut in futures:
        try:
            fut.wait()
        except Exception as e:  # noqa: BLE001  (re-raised below)
            first = first or e
    if first is not None:
        raise first
