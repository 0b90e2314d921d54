"""Runs test bodies on real worker processes over loopback TCP.

`run_workers(body, n)` spawns n processes; each calls init_rpc as worker
"w{rank}", runs `body(rank)` and shuts down. Bodies are module-level
functions (spawn pickles them by reference) and return picklable results.
"""

import multiprocessing as mp
import os
import pickle
import socket
import traceback

import torchrpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_from_child(rank, queue, run):
    """A test child's life after start-up: run(), send its result (or the
    traceback) to the parent, and leave at once."""
    try:
        result = run()
        # Plain pickle: torch's queue reducers would pass tensors through
        # shared memory that dies with this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # flush the result before leaving
        os._exit(0)  # skip atexit/GC work


def spawn_and_collect(target, args_of_rank, world_size, timeout, may_die=(), label="w"):
    """Starts target(*args_of_rank(rank), queue) in `world_size` spawned
    processes and returns their results by rank; raises with the child's
    traceback when one fails. Ranks in `may_die` may vanish without
    reporting (a test kills them)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(*args_of_rank(r), queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        expected = world_size - len(may_die)
        while len([r for r in results if r not in may_die]) < expected:
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"worker {label}{rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results.get(r) for r in range(world_size)]


def _child(body, rank, world_size, port, options, graceful, shutdown_timeout, queue):
    def run():
        torchrpc.init_rpc(
            f"w{rank}", rank=rank, world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            options=torchrpc.RpcOptions(**options),
        )
        result = body(rank)
        torchrpc.shutdown(graceful=graceful, timeout=shutdown_timeout)
        return result

    report_from_child(rank, queue, run)


def run_workers(body, world_size=2, options=None, graceful=True, timeout=90, may_die=()):
    """Returns [body(rank) for each rank]; raises with the child traceback on failure.

    `options` is RpcOptions kwargs, or a list of them per rank. Ranks in
    `may_die` may vanish without reporting (a test kills them).
    """
    # Workers that finish early wait in shutdown for the slowest one.
    shutdown_timeout = timeout
    port = free_port()
    per_rank = options if isinstance(options, list) else [options or {}] * world_size
    graceful_of = graceful if isinstance(graceful, list) else [graceful] * world_size
    return spawn_and_collect(
        _child,
        lambda r: (body, r, world_size, port, per_rank[r], graceful_of[r], shutdown_timeout),
        world_size, timeout, may_die,
    )
