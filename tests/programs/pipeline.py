"""Two-stage model-parallel pipeline, the shape of PyTorch's "Distributed
Pipeline Parallelism Using RPC" tutorial (DistResNet50, with small MLP
stages): the driver (rank 0, "master") creates one stage on "worker1" and one
on "worker2" with rpc.remote; its forward splits the batch into micro-batches
and chains them through RRefs:

    x_rref = RRef(x)
    y_rref = p1_rref.remote().forward(x_rref)      # stage 1 fetches x from the driver
    z_fut = p2_rref.rpc_async().forward(y_rref)    # stage 2 fetches y from worker1
    torch.cat(torch.futures.wait_all(futures))

Training: distributed autograd (through the RRef fetches) and
DistributedOptimizer(SGD) over both stages' parameter RRefs (each stage's
`parameter_rrefs()`). `reference()` trains the same stages locally.
"""

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from tests.programs.backend import DistributedOptimizer, dist_autograd, rpc

IN, HIDDEN, OUT = 8, 32, 4
BATCH = 16
SPLIT_SIZE = 4  # micro-batch size: 4 micro-batches in flight per step
STEPS = 4
LR = 0.05


class Stage(nn.Module):
    """A pipeline stage; `forward` takes an RRef to its input, as in the tutorial."""

    def __init__(self, seed: int, d_in: int, d_out: int, last: bool):
        super().__init__()
        torch.manual_seed(seed)
        self._lock = threading.Lock()
        layers = [nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d_out)]
        if not last:
            layers.append(nn.ReLU())
        self.seq = nn.Sequential(*layers)

    def forward(self, x_rref):
        x = x_rref.to_here()
        with self._lock:
            out = self.seq(x)
        return out

    def parameter_rrefs(self):
        return [rpc.RRef(p) for p in self.parameters()]

    def params(self):
        return [p.detach().clone() for p in self.parameters()]


class Stage1(Stage):
    def __init__(self):
        super().__init__(seed=1, d_in=IN, d_out=HIDDEN, last=False)


class Stage2(Stage):
    def __init__(self):
        super().__init__(seed=2, d_in=HIDDEN, d_out=OUT, last=True)


class DistPipeline(nn.Module):
    def __init__(self, split_size, workers):
        super().__init__()
        self.split_size = split_size
        self.p1_rref = rpc.remote(workers[0], Stage1)
        self.p2_rref = rpc.remote(workers[1], Stage2)

    def forward(self, xs):
        out_futures = []
        for x in iter(xs.split(self.split_size, dim=0)):
            x_rref = rpc.RRef(x)
            y_rref = self.p1_rref.remote().forward(x_rref)
            z_fut = self.p2_rref.rpc_async().forward(y_rref)
            out_futures.append(z_fut)
        return torch.cat(torch.futures.wait_all(out_futures))

    def parameter_rrefs(self):
        remote_params = []
        remote_params.extend(self.p1_rref.remote().parameter_rrefs().to_here())
        remote_params.extend(self.p2_rref.remote().parameter_rrefs().to_here())
        return remote_params

    def params(self):
        return self.p1_rref.rpc_sync().params() + self.p2_rref.rpc_sync().params()


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randn(BATCH, OUT, generator=g)
    return x, y


def run_master(split_size):
    model = DistPipeline(split_size, ["worker1", "worker2"])
    opt = DistributedOptimizer(optim.SGD, model.parameter_rrefs(), lr=LR)
    losses = []
    for step in range(STEPS):
        inputs, labels = batch(step)
        with dist_autograd.context() as context_id:
            outputs = model(inputs)
            loss = F.mse_loss(outputs, labels)
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)
        losses.append(loss.item())
    return {"losses": torch.tensor(losses), "params": model.params()}


def run(rank: int, world_size: int, port: int):
    assert world_size == 3, "pipeline: a driver and two stages"
    torch.manual_seed(0)
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=60, init_method=f"tcp://127.0.0.1:{port}")
    name = "master" if rank == 0 else f"worker{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    result = run_master(SPLIT_SIZE) if rank == 0 else None
    rpc.shutdown()
    return result


def reference(world_size: int = 3):
    s1, s2 = Stage1(), Stage2()
    params = list(s1.parameters()) + list(s2.parameters())
    opt = optim.SGD(params, lr=LR)
    losses = []
    for step in range(STEPS):
        inputs, labels = batch(step)
        opt.zero_grad()
        outputs = torch.cat([s2.seq(s1.seq(x)) for x in inputs.split(SPLIT_SIZE, dim=0)])
        loss = F.mse_loss(outputs, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": torch.tensor(losses), "params": [p.detach().clone() for p in params]}
