"""A tour of torchrpc with three workers on this machine.

    python -m torchrpc.demo
        starts worker0 here and worker1, worker2 as two child processes
        (a free localhost port, nothing to set up).

    torchrun --standalone --nproc-per-node=3 -m torchrpc.demo
        each process is one worker (init_method="env://": RANK, WORLD_SIZE,
        MASTER_ADDR and MASTER_PORT come from torchrun).

worker0 makes the calls; the others serve. Every worker runs this same
module, so every worker defines (and registers) the same functions below.
"""

import multiprocessing
import os
import socket
import statistics
import sys
import time

import torch
from torch import Tensor

import scripted_ops
import torchrpc

WORLD_SIZE = 3  # when launched locally

# ---------------------------------------------------------------------------
# Functions workers call on each other. Module level, so that every worker
# defines them under the same qualified names (torchrpc.demo.<name>).


@torchrpc.script  # = torch.jit.script + torchrpc.register
def add_one(x: Tensor) -> Tensor:
    return x + 1


@torchrpc.script
def scale(x: Tensor, factor: float = 2.0) -> Tensor:
    return x * factor


@torchrpc.script
def safe_sqrt(x: Tensor) -> Tensor:
    if bool((x < 0).any()):
        raise ValueError("safe_sqrt: negative input")
    return torch.sqrt(x)


@torchrpc.script
def layer(x: Tensor, w: torch.classes.torchrpc.RRef) -> Tensor:
    """One layer, run where its weight lives (w is owned by this worker)."""
    weight = w.local_value()
    assert isinstance(weight, Tensor)
    return torch.tanh(x @ weight)


def make_weight(seed: int) -> Tensor:
    """A parameter created on (and owned by) the worker this runs on."""
    torch.manual_seed(seed)
    return torch.randn(4, 4, requires_grad=True)


def where_am_i(greeting: str) -> str:
    """Plain Python (not TorchScript): runs only where python_udf=True."""
    return f"{greeting} from pid {os.getpid()} ({sys.platform}, Python {sys.version.split()[0]})"


# ---------------------------------------------------------------------------


def say(what: str, detail: str = ""):
    print(f"[worker0] {what:<16} {detail}".rstrip(), flush=True)


def tour(world_size: int):
    """What worker0 shows. The other workers only serve."""
    peers = [f"worker{r}" for r in range(1, world_size)] or ["worker0"]
    w1, w2 = peers[0], peers[-1]
    x = torch.tensor([1.0, 2.0, 3.0])

    say("started", f"{world_size} workers: " + ", ".join(f"worker{r}" for r in range(world_size)))

    y = torchrpc.rpc_sync(w1, add_one, (x,))
    say("script call", f"rpc_sync({w1!r}, add_one, (x,)) -> {y.tolist()}")

    name = scale.qualified_name
    y = torchrpc.rpc_sync(w2, name, (x,), {"factor": 10.0})
    say("by name", f"rpc_sync({w2!r}, {name!r}, (x,), {{'factor': 10.0}}) -> {y.tolist()}")

    y = torchrpc.rpc_sync(w1, torch.add, (x, 100))
    say("builtin", f"rpc_sync({w1!r}, torch.add, (x, 100)) -> {y.tolist()}")

    futs = [torchrpc.rpc_async(p, add_one, (torch.full((2,), float(i)),))
            for i, p in enumerate(peers)]
    say("async", f"rpc_async(...) to {', '.join(peers)}, then wait() -> "
        f"{[f.wait().tolist() for f in futs]}")

    s = torchrpc.rpc_sync(w2, where_am_i, ("hello",))
    say("Python fallback", f"rpc_sync({w2!r}, where_am_i, ('hello',)) -> {s!r}")

    try:
        torchrpc.rpc_sync(w1, safe_sqrt, (torch.tensor([4.0, -1.0]),))
        say("remote error", "NOT RAISED (unexpected)")
    except ValueError as e:  # re-raised on the caller with the callee's class
        say("remote error", f"caught {type(e).__name__}: {str(e).splitlines()[0]}")

    t0 = time.perf_counter()
    try:
        torchrpc.rpc_sync(w1, scripted_ops.sleep_ms, (1000,), timeout=0.2)
        say("timeout", "DID NOT TIME OUT (unexpected)")
    except torchrpc.RpcTimeoutError as e:
        say("timeout", f"caught RpcTimeoutError after {time.perf_counter() - t0:.2f} s: {e}")
    say("", "(the caller sent CANCEL: the callee finishes its 1 s sleep, then sends no reply)")

    r = torchrpc.remote(w1, scripted_ops.add, (torch.ones(2), torch.ones(2)))
    total = torchrpc.rpc_sync(w2, torch.sum, (r.to_here(),))
    say("remote", f"RRef owned by {r.owner_name()}: to_here() -> {r.to_here().tolist()}, "
                  f"summed on {w2} -> {total.item()}")

    train(w1, w2)

    small = torch.ones(4)
    for _ in range(50):  # warm up
        torchrpc.rpc_sync(w1, add_one, (small,))
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        torchrpc.rpc_sync(w1, add_one, (small,))
        lat.append((time.perf_counter() - t0) * 1e6)
    say("latency", f"p50 of 200 small add_one calls to {w1}: {statistics.median(lat):.0f} us")


def train(w1: str, w2: str):
    """A model split across two workers: weights live where they are used,
    the loss is computed here, and backward and the optimizer step run on
    every worker that holds a piece."""
    import torchrpc.autograd as dist_autograd
    from torchrpc.optim import DistributedOptimizer

    weights = [torchrpc.remote(w, make_weight, (seed,)) for seed, w in enumerate((w1, w2))]
    opt = DistributedOptimizer(torch.optim.SGD, weights, lr=0.2)
    x, target = torch.randn(8, 4), torch.zeros(8, 4)
    losses = []
    for _ in range(20):
        with dist_autograd.context() as ctx:
            h = x
            for w in weights:  # each layer runs on its weight's owner
                h = torchrpc.rpc_sync(w.owner_name(), layer, (h, w))
            loss = ((h - target) ** 2).mean()
            dist_autograd.backward(ctx, [loss])  # gradients flow back to w1 and w2
            opt.step(ctx)  # SGD steps on each owner, in TorchScript
        losses.append(loss.item())
    say("training", f"20 SGD steps of a 2-layer model on {w1} + {w2}: "
                    f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def run_worker(rank: int, world_size: int, init_method: str):
    name = f"worker{rank}"
    torchrpc.init_rpc(
        name,
        rank=rank,
        world_size=world_size,
        init_method=init_method,
        # python_udf=True lets peers run pickled Python functions here
        # (where_am_i). Off by default: unpickling runs arbitrary code.
        options=torchrpc.RpcOptions(python_udf=True),
    )
    try:
        if rank == 0:
            tour(world_size)
    finally:
        # Graceful: waits until every worker is done, so the servers stay up
        # while worker0 calls them.
        torchrpc.shutdown()
    if rank == 0:
        say("shutdown", "all workers done")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, init_method: str):
    run_worker(rank, world_size, init_method)


def launch_local(world_size: int = WORLD_SIZE) -> int:
    """worker0 in this process, the others in spawned child processes."""
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_child, args=(r, world_size, init_method), name=f"worker{r}")
                for r in range(1, world_size)]
    for p in children:
        p.start()
    code = 0
    try:
        run_worker(0, world_size, init_method)
    except BaseException as e:
        print(f"[worker0] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    for p in children:
        p.join(timeout=30)
        if p.is_alive():
            print(f"[demo] {p.name} did not exit; terminating it", file=sys.stderr, flush=True)
            p.terminate()
            p.join(timeout=5)
        if p.exitcode != 0:
            print(f"[demo] {p.name} exited with code {p.exitcode}", file=sys.stderr, flush=True)
            code = 1
    return code


def main() -> int:
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        # Launched by torchrun (or similar): this process is one worker.
        run_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://")
        return 0
    return launch_local()


if __name__ == "__main__":
    # Run main() from the imported module torchrpc.demo, not from __main__:
    # the functions above then get the qualified names torchrpc.demo.* in
    # every worker, including the spawned ones.
    from torchrpc.demo import main as _main

    sys.exit(_main())
