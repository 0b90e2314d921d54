"""Parameter server, the shape of PyTorch's "Implementing a Parameter Server
Using Distributed RPC Framework" tutorial: rank 0 ("parameter_server") holds
an nn.Linear model; trainers reach it through an RRef made by
rpc.remote(ps, get_parameter_server), run its forward over rpc_sync with
`rref.owner()` + `rref.local_value()`, and train it with distributed autograd
and DistributedOptimizer(SGD) over the RRefs of its parameters.

Two phases, driven by the parameter server:
1. lockstep: for each step, each trainer in turn does one training step
   (rpc_sync to the trainer): deterministic, so the parameters equal
   `reference()`'s, a local model trained on the same batches in that order;
2. concurrent: every trainer runs CONCURRENT_STEPS steps on its own, all at
   once (rpc_async to all, then wait), as in the tutorial: checked for
   finishing and for the loss on a fixed batch going down.

A step holds the server's `turn` (begin_step ... end_step, one RPC each) from
its forward to its optimizer step: without it, one trainer's in-place SGD
update lands between another's forward and backward, and autograd rightly
refuses ("modified by an inplace operation"). While one trainer holds it,
another's begin_step blocks a server thread: the server must run other
requests (forward, backward, optimizer step) meanwhile.
"""

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from tests.programs.backend import DistributedOptimizer, dist_autograd, rpc

PS_NAME = "parameter_server"
IN, HIDDEN, OUT = 8, 16, 2
BATCH = 16
LR = 0.05
LOCKSTEP_STEPS = 3
CONCURRENT_STEPS = 4
SEED = 0


def trainer_name(rank: int) -> str:
    return f"trainer_{rank}"


# --- helpers from the tutorial ------------------------------------------------


def call_method(method, rref, *args, **kwargs):
    return method(rref.local_value(), *args, **kwargs)


def remote_method(method, rref, *args, **kwargs):
    args = [method, rref] + list(args)
    return rpc.rpc_sync(rref.owner(), call_method, args=args, kwargs=kwargs)


# --- data: a fixed linear target, batches that depend only on (step, trainer)


def batch(step: int, trainer: int):
    g = torch.Generator().manual_seed(1000 * step + trainer)
    w = torch.Generator().manual_seed(12345)
    true_w = torch.randn(IN, OUT, generator=w)
    x = torch.randn(BATCH, IN, generator=g)
    return x, x @ true_w


def eval_batch():
    return batch(999, 999)


def make_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


# --- the parameter server (rank 0) ---------------------------------------------


class ParameterServer(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = make_model()
        self.turn = threading.Semaphore(1)  # released by a later request, maybe another thread

    def begin_step(self):
        self.turn.acquire()

    def end_step(self):
        self.turn.release()

    def forward(self, x):
        return self.model(x)

    def get_param_rrefs(self):
        return [rpc.RRef(p) for p in self.model.parameters()]

    def params(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def eval_loss(self) -> float:
        x, y = eval_batch()
        with torch.no_grad():
            return F.mse_loss(self.model(x), y).item()


param_server = None
global_lock = threading.Lock()


def get_parameter_server():
    """Runs on the parameter server: the one ParameterServer of this process."""
    global param_server
    with global_lock:
        if param_server is None:
            param_server = ParameterServer()
        return param_server


# --- trainers ------------------------------------------------------------------


class TrainerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.param_server_rref = rpc.remote(PS_NAME, get_parameter_server)

    def get_global_param_rrefs(self):
        return remote_method(ParameterServer.get_param_rrefs, self.param_server_rref)

    def forward(self, x):
        return remote_method(ParameterServer.forward, self.param_server_rref, x)

    def begin_step(self):
        remote_method(ParameterServer.begin_step, self.param_server_rref)

    def end_step(self):
        remote_method(ParameterServer.end_step, self.param_server_rref)


class Trainer:
    def __init__(self, rank: int):
        self.rank = rank
        self.net = TrainerNet()
        self.opt = DistributedOptimizer(optim.SGD, self.net.get_global_param_rrefs(), lr=LR)

    def train_step(self, step: int) -> float:
        x, y = batch(step, self.rank)
        self.net.begin_step()
        try:
            with dist_autograd.context() as context_id:
                out = self.net(x)
                loss = F.mse_loss(out, y)
                dist_autograd.backward(context_id, [loss])
                self.opt.step(context_id)
        finally:
            self.net.end_step()
        return loss.item()


_trainer = None
_trainer_lock = threading.Lock()


def _get_trainer() -> Trainer:
    global _trainer
    with _trainer_lock:
        if _trainer is None:
            _trainer = Trainer(rpc.get_worker_info().id)
        return _trainer


def trainer_step(step: int) -> float:
    """Runs on a trainer (called by the parameter server): one training step."""
    return _get_trainer().train_step(step)


def run_trainer(first_step: int, steps: int):
    """Runs on a trainer: its own training loop, concurrently with the others."""
    t = _get_trainer()
    return [t.train_step(first_step + s) for s in range(steps)]


# --- entry points ----------------------------------------------------------------


def run(rank: int, world_size: int, port: int):
    torch.manual_seed(SEED)
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=60, init_method=f"tcp://127.0.0.1:{port}")
    name = PS_NAME if rank == 0 else trainer_name(rank)
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    result = None
    if rank == 0:
        trainers = [trainer_name(r) for r in range(1, world_size)]
        lockstep_losses = []
        for step in range(LOCKSTEP_STEPS):
            lockstep_losses.append(
                [rpc.rpc_sync(t, trainer_step, args=(step,)) for t in trainers])
        ps = get_parameter_server()
        lockstep_params = ps.params()
        eval_before = ps.eval_loss()
        futs = [rpc.rpc_async(t, run_trainer, args=(LOCKSTEP_STEPS, CONCURRENT_STEPS))
                for t in trainers]
        concurrent_losses = [f.wait() for f in futs]
        result = {
            "lockstep_losses": torch.tensor(lockstep_losses),
            "lockstep_params": lockstep_params,
            "eval_before": eval_before,
            "eval_after": ps.eval_loss(),
            "concurrent_losses": torch.tensor(concurrent_losses),
            "final_params": ps.params(),
        }
    rpc.shutdown()
    return result


def reference(world_size: int):
    """The lockstep phase computed locally: same model, batches and order."""
    model = make_model()
    opt = optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(LOCKSTEP_STEPS):
        row = []
        for rank in range(1, world_size):
            x, y = batch(step, rank)
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            row.append(loss.item())
        losses.append(row)
    return {
        "lockstep_losses": torch.tensor(losses),
        "lockstep_params": [p.detach().clone() for p in model.parameters()],
    }
