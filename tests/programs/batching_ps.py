"""Batch-updating parameter server, the shape of PyTorch's "Implementing
Batch RPC Processing Using Asynchronous Executions" tutorial
(BatchUpdateParameterServer, with a small MLP instead of ResNet50).

The server (rank 0, "ps", num_worker_threads=2) owns the model behind a local
RRef. TRAINERS_PER_PROCESS trainers run on each trainer process (rpc_async
from the server, one per trainer: 2 processes x 4 = 8 trainers) and each
sends its gradients with

    rpc.rpc_sync(ps_rref.owner(), BatchUpdateParameterServer.update_and_fetch_model,
                 args=(ps_rref, grads))

update_and_fetch_model is a @staticmethod @rpc.functions.async_execution
returning a torch.futures.Future that completes once all 8 trainers have sent
this round's gradients, when the server averages them and takes an SGD
(momentum) step. So 8 calls are in flight at once on a server with 2 threads:
without async execution, that deadlocks.

Each trainer's batches depend only on (trainer, step), so the result is
deterministic up to the order gradients are summed in; `reference()` computes
it locally.
"""

import threading

import torch
import torch.nn as nn
import torch.optim as optim

from tests.programs.backend import rpc

TRAINERS_PER_PROCESS = 4
BATCHES = 3  # per trainer: the server takes this many steps
IN, HIDDEN, OUT = 8, 16, 2
BATCH = 8
LR, MOMENTUM = 0.05, 0.9
PS_THREADS = 2
TRAINER_THREADS = 2 * TRAINERS_PER_PROCESS  # each trainer blocks a thread in rpc_sync


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def batch(trainer_id: int, step: int):
    g = torch.Generator().manual_seed(10_000 + 100 * trainer_id + step)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


class BatchUpdateParameterServer(object):
    def __init__(self, batch_update_size):
        self.model = make_model()
        self.lock = threading.Lock()
        self.future_model = torch.futures.Future()
        self.batch_update_size = batch_update_size
        self.curr_update_size = 0
        self.updates = 0
        self.optimizer = optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)

    def get_model(self):
        return self.model

    @staticmethod
    @rpc.functions.async_execution
    def update_and_fetch_model(ps_rref, grads):
        # Using the RRef to retrieve the local PS instance
        self = ps_rref.local_value()
        with self.lock:
            for p, g in zip(self.model.parameters(), grads):
                p.grad += g
            self.curr_update_size += 1
            # save the current future_model and return it to make sure the
            # returned Future object holds the correct model even if another
            # thread modifies future_model before this thread returns.
            fut = self.future_model

            if self.curr_update_size >= self.batch_update_size:
                # update the model
                for p in self.model.parameters():
                    p.grad /= self.batch_update_size
                self.curr_update_size = 0
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
                self.updates += 1
                # by setting the result on the Future object, all previous
                # requests expecting this updated model will be notified and
                # the their responses will be sent accordingly.
                fut.set_result(self.model)
                self.future_model = torch.futures.Future()

        return fut

    def params(self):
        return [p.detach().clone() for p in self.model.parameters()]


class Trainer(object):
    def __init__(self, ps_rref, trainer_id):
        self.ps_rref, self.loss_fn = ps_rref, torch.nn.MSELoss()
        self.trainer_id = trainer_id

    def get_next_batch(self):
        for step in range(BATCHES):
            yield batch(self.trainer_id, step)

    def train(self):
        losses = []
        m = self.ps_rref.rpc_sync().get_model()
        for inputs, labels in self.get_next_batch():
            loss = self.loss_fn(m(inputs), labels)
            loss.backward()
            losses.append(loss.item())
            m = rpc.rpc_sync(
                self.ps_rref.owner(),
                BatchUpdateParameterServer.update_and_fetch_model,
                args=(self.ps_rref, [p.grad for p in m.cpu().parameters()]),
            )
        return losses


def run_trainer(ps_rref, trainer_id):
    trainer = Trainer(ps_rref, trainer_id)
    return trainer.train()


def run_ps(trainers):
    ps = BatchUpdateParameterServer(batch_update_size=len(trainers))
    ps_rref = rpc.RRef(ps)
    futs = []
    for trainer_id, trainer in enumerate(trainers):
        futs.append(rpc.rpc_async(trainer, run_trainer, args=(ps_rref, trainer_id)))
    losses = torch.futures.wait_all(futs)
    return {"losses": torch.tensor(losses), "params": ps.params(),
            "updates": ps.updates}


def run(rank: int, world_size: int, port: int):
    threads = PS_THREADS if rank == 0 else TRAINER_THREADS
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=threads, rpc_timeout=60, init_method=f"tcp://127.0.0.1:{port}")
    if rank == 0:
        rpc.init_rpc("ps", rank=rank, world_size=world_size, rpc_backend_options=options)
        # trainer i runs on process 1 + i % (world_size - 1)
        n = TRAINERS_PER_PROCESS * (world_size - 1)
        result = run_ps([f"trainer{1 + i % (world_size - 1)}" for i in range(n)])
    else:
        rpc.init_rpc(f"trainer{rank}", rank=rank, world_size=world_size,
                     rpc_backend_options=options)
        result = None
    rpc.shutdown()
    return result


def reference(world_size: int = 3):
    n = TRAINERS_PER_PROCESS * (world_size - 1)
    model = make_model()
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.MSELoss()
    losses = [[] for _ in range(n)]
    for step in range(BATCHES):
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for t in range(n):
            model.zero_grad()
            inputs, labels = batch(t, step)
            loss = loss_fn(model(inputs), labels)
            loss.backward()
            losses[t].append(loss.item())
            for g, p in zip(grads, model.parameters()):
                g += p.grad
        for g, p in zip(grads, model.parameters()):
            p.grad = g / n
        opt.step()
    return {"losses": torch.tensor(losses),
            "params": [p.detach().clone() for p in model.parameters()], "updates": BATCHES}
