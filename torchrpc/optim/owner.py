"""What runs on a parameter's owner for DistributedOptimizer.

TorchScript functions build a ScriptOptimizer over the owner's parameters
and step it with one autograd context's gradients; peers call them by
qualified name, which every worker that imported torchrpc.optim resolves.
The Python functions do the same for any other optimizer class and need
the owner to run Python callables (RpcOptions(python_udf=True)).
"""

import importlib
import threading
from typing import Dict, List, Optional

import torch
from torch import Tensor

import torchrpc._C  # noqa: F401  (defines torch.classes.torchrpc.RRef and the ops used below)
from torchrpc.optim.functional import ScriptOptimizer

__all__ = [
    "HAS_GRADIENTS",
    "create_script_optimizer",
    "script_optimizer_ready",
    "step_script_optimizer",
    "create_python_optimizer",
    "python_optimizer_ready",
    "step_python_optimizer",
]

# torch.ops.torchrpc.get_gradients comes with distributed autograd; the
# functions that read gradients compile only where it exists.
HAS_GRADIENTS = hasattr(torch.ops.torchrpc, "get_gradients")


@torch.jit.script
def _local_tensors(rrefs: List[torch.classes.torchrpc.RRef]) -> List[Tensor]:
    """The tensors these RRefs hold; they must be owned here. The very tensors,
    not copies: the optimizer updates them in place."""
    tensors: List[Tensor] = []
    for r in rrefs:
        value = r.local_value()
        if isinstance(value, Tensor):
            tensors.append(value)
        else:
            raise ValueError("torchrpc.optim: a parameter RRef owned by '" + r.owner_name()
                             + "' does not hold a tensor")
    return tensors


@torch.jit.script
def create_script_optimizer(kind: str, params: List[torch.classes.torchrpc.RRef],
                            hparams: Dict[str, float], flags: Dict[str, bool]) -> ScriptOptimizer:
    """A ScriptOptimizer over the parameters these RRefs hold (owned here)."""
    return ScriptOptimizer(kind, _local_tensors(params), hparams, flags)


@torch.jit.script
def _local_script_optimizer(rref: torch.classes.torchrpc.RRef) -> ScriptOptimizer:
    value = rref.local_value()
    if isinstance(value, ScriptOptimizer):
        return value
    raise ValueError("torchrpc.optim: this RRef does not hold a ScriptOptimizer")


@torch.jit.script
def script_optimizer_ready(rref: torch.classes.torchrpc.RRef) -> bool:
    """Waits until the optimizer exists (raising creation's error, if any)."""
    return _local_script_optimizer(rref).kind != ""


if HAS_GRADIENTS:

    @torch.jit.script
    def step_script_optimizer(rref: torch.classes.torchrpc.RRef, context_id: int) -> None:
        """Steps the ScriptOptimizer `rref` holds with context `context_id`'s
        gradients; parameters without one are left alone."""
        _local_script_optimizer(rref).step(torch.ops.torchrpc.get_gradients(context_id))

    @torch.jit.script
    def _gradients_for(context_id: int, params: List[Tensor]) -> List[Optional[Tensor]]:
        # Looked up in TorchScript: its Dict[Tensor, Tensor] matches keys by
        # tensor identity, whatever Python objects wrap them.
        grads = torch.ops.torchrpc.get_gradients(context_id)
        found: List[Optional[Tensor]] = []
        for p in params:
            found.append(grads.get(p))
        return found

else:
    step_script_optimizer = None
    _gradients_for = None


def _import_class(path: str):
    """The object named "package.module:Qual.Name"."""
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def create_python_optimizer(class_path: str, params, args, kwargs):
    """`cls(local_params, *args, **kwargs)` with cls imported by path."""
    cls = _import_class(class_path)
    return cls(_local_tensors([p.torchscript() for p in params]), *args, **kwargs)


def python_optimizer_ready(rref) -> bool:
    """Waits until the optimizer exists (raising creation's error, if any)."""
    rref.local_value()
    return True


# As torch.distributed.optim does: Python optimizers on one worker step one at
# a time, so two that share a parameter never update it at once.
_python_step_lock = threading.Lock()


def step_python_optimizer(rref, context_id: int) -> None:
    """Sets each parameter's .grad from context `context_id` (None where it has
    no gradient there, so no stale one is reused) and calls step()."""
    if _gradients_for is None:
        raise RuntimeError("torchrpc.optim: this torchrpc has no distributed autograd "
                           "(torch.ops.torchrpc.get_gradients)")
    optimizer = rref.local_value()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with _python_step_lock:
        for param, grad in zip(params, _gradients_for(context_id, params)):
            param.grad = grad
        optimizer.step()
