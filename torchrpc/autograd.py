"""Distributed autograd: same names and meaning as torch.distributed.autograd.

    with torchrpc.autograd.context() as context_id:
        loss = torchrpc.rpc_sync("w1", forward, (x,)).sum()
        torchrpc.autograd.backward(context_id, [loss])
        grads = torchrpc.autograd.get_gradients(context_id)  # {tensor: grad}

Inside a context every call (rpc_sync/rpc_async/remote, RRef fetches and
proxies, TorchScript callers) carries the context to the callee, and the
tensors it sends with requires_grad are linked into a graph spanning the
workers. backward() runs that whole graph once (FAST mode) and accumulates
gradients into the context on each worker that holds leaves, never into
.grad. Leaving the context releases it on every worker that took part.
The protocol is described in csrc/autograd/dist_autograd.h.
"""

from typing import Dict, List

import torch

from torchrpc import _C
from torchrpc._handle import _current

__all__ = ["context", "backward", "get_gradients"]

class context:
    """A distributed autograd context; `with` yields its id (an int).

    The context is current on this thread until the block ends; contexts do
    not nest.
    """

    def __enter__(self) -> int:
        self._agent = _current().agent
        self.autograd_context_id = _C.autograd_new_context(self._agent)
        return self.autograd_context_id

    def __exit__(self, *exc):
        _C.autograd_release_context(self._agent, self.autograd_context_id)
        return False


def backward(context_id: int, roots: List[torch.Tensor], retain_graph: bool = False) -> None:
    """Runs the backward pass from `roots` across every worker the graph
    spans; returns when it has finished everywhere.

    Errors raised by any worker's part come back as that error, naming the
    worker; a worker lost meanwhile raises PeerLostError. The graph is kept
    until the context ends, so a second backward works with or without
    retain_graph and adds to the same gradients.
    """
    if isinstance(roots, torch.Tensor):
        roots = [roots]
    _C.autograd_backward(_current().agent, int(context_id), list(roots), bool(retain_graph))


def get_gradients(context_id: int) -> Dict[torch.Tensor, torch.Tensor]:
    """The gradients this worker's leaves received in the context."""
    return _C.autograd_gradients(_current().agent, int(context_id))
