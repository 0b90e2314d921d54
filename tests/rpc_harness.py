"""Runs test bodies on real worker processes (rendezvous over loopback TCP).

`run_workers(body, n)` starts n processes (`worker_process`); each calls
init_rpc as worker "w{rank}", runs `body(rank)` and shuts down. Bodies are
module-level functions (pickled by reference) and return picklable results.

`run_workers(..., transport="tcp" | "shm")` forces that transport on every
rank (RpcOptions(transports=[transport])) and checks, through
debug_info()["connections"] read in each worker after its body, that every
connection a worker dialed uses it (`transports_used` / `assert_transport`,
which bodies that shut down themselves can call too).
"""

import multiprocessing as mp
import os
import pickle
import socket
import traceback

import torchrpc

# Workers fork from a server that imported torch and torchrpc once, instead
# of each spawned interpreter importing them again (about 2 s of CPU per
# worker on the 2-core test machine: most of the suite's time under spawn).
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torchrpc", "scripted_ops"])


def _run_in_env(env, target, args):
    # The fork server's environment is the one it started with: give the
    # worker the environment its parent has now, as spawn would.
    os.environ.clear()
    os.environ.update(env)
    target(*args)


def worker_process(target, args):
    """A daemon process that runs target(*args) (a module-level function:
    it is pickled by reference) with this process's current environment."""
    return _CTX.Process(target=_run_in_env, args=(dict(os.environ), target, args), daemon=True)


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
    queue = _CTX.Queue()
    procs = [worker_process(target, (*args_of_rank(r), queue)) for r in range(world_size)]
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


# -- transports -------------------------------------------------------------------


def options_per_rank(options, world_size, transport=None):
    """RpcOptions kwargs per rank from one dict or a list of them; with
    `transport`, every rank that names no transports itself gets
    transports=[transport]."""
    per_rank = options if isinstance(options, list) else [options or {}] * world_size
    assert len(per_rank) == world_size, (len(per_rank), world_size)
    if transport is None:
        return list(per_rank)
    return [o if "transports" in o else {**o, "transports": [transport]} for o in per_rank]


def transports_used():
    """{peer name: transport} for the connections this worker dialed, or None
    once this worker has shut down (nothing left to ask)."""
    if torchrpc._handle._state is None:
        return None
    return {peer: c["transport"] for peer, c in torchrpc.debug_info()["connections"].items()}


def assert_transport(seen, expected, require_some=True):
    """`seen`: transports_used() of each worker (None: that worker could not
    tell). Every connection must use `expected`; with `require_some`, at
    least one connection must have been reported."""
    wrong = {
        (f"w{rank}", peer): t
        for rank, conns in enumerate(seen) if conns
        for peer, t in conns.items() if t != expected
    }
    assert not wrong, f"connections not over {expected!r}: {wrong}"
    if require_some:
        assert any(conns for conns in seen), (
            f"no worker reported a connection, so none is known to use {expected!r}: {seen}")


def _child(body, rank, world_size, port, options, graceful, shutdown_timeout, queue):
    def run():
        torchrpc.init_rpc(
            f"w{rank}", rank=rank, world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            options=torchrpc.RpcOptions(**options),
        )
        result = body(rank)
        used = transports_used() if "transports" in options else None
        torchrpc.shutdown(graceful=graceful, timeout=shutdown_timeout)
        return result, used

    report_from_child(rank, queue, run)


def run_workers(body, world_size=2, options=None, graceful=True, timeout=90, may_die=(),
                transport=None):
    """Returns [body(rank) for each rank]; raises with the child traceback on failure.

    `options` is RpcOptions kwargs, or a list of them per rank. Ranks in
    `may_die` may vanish without reporting (a test kills them). `transport`
    ("tcp", "shm"): every rank uses only that one, and every connection
    still known when the bodies return must use it; unless some rank may
    die or shut down in its body, at least one must be known.
    """
    # Workers that finish early wait in shutdown for the slowest one.
    shutdown_timeout = timeout
    port = free_port()
    per_rank = options_per_rank(options, world_size, transport)
    graceful_of = graceful if isinstance(graceful, list) else [graceful] * world_size
    outs = spawn_and_collect(
        _child,
        lambda r: (body, r, world_size, port, per_rank[r], graceful_of[r], shutdown_timeout),
        world_size, timeout, may_die,
    )
    results = [out[0] if out is not None else None for out in outs]
    if transport is not None:
        seen = [out[1] if out is not None else None for out in outs]
        everyone_told = not may_die and all(s is not None for s in seen)
        assert_transport(seen, transport, require_some=everyone_told and world_size > 1)
    return results
