"""Optimizers for distributed training with torchrpc.

DistributedOptimizer(optimizer_class, params_rref, *args, **kwargs)
    one optimizer on each worker that owns some of the parameters;
    step(context_id) updates them all with that autograd context's gradients.
ScriptOptimizer, script_optimizer(optimizer_class, params, *args, **kwargs)
    TorchScript versions of torch.optim's SGD, Adam, AdamW, Adagrad and
    RMSprop, making the same updates; the owners run these.

    with torchrpc.autograd.context() as ctx:
        loss = torchrpc.rpc_sync("w1", forward, (w_rref, x)).sum()
        torchrpc.autograd.backward(ctx, [loss])
        opt.step(ctx)

Every worker must import torchrpc.optim (importing torchrpc does) so that
peers can call its TorchScript functions by name.
"""

from torchrpc.optim.distributed import DistributedOptimizer
from torchrpc.optim.functional import SCRIPT_OPTIMIZERS, ScriptOptimizer, script_optimizer

__all__ = ["DistributedOptimizer", "ScriptOptimizer", "script_optimizer", "SCRIPT_OPTIMIZERS"]
