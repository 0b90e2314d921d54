"""Worker worlds driven by commands, for tests that attack, stop or kill workers.

`World(n, ...)` spawns workers w0..w{n-1} on loopback (init_method tcp://),
each in its own process, and keeps a multiprocessing Pipe to each: the test
sends a module-level function and its arguments (pickled by reference), the
worker runs it and sends back the result or its traceback. The test process
itself never joins the RPC world, so it can signal, starve or kill a worker
and watch the others. Per rank a test can give RpcOptions kwargs, extra
environment variables, a file for the worker's stderr, and a function the
worker runs right after init_rpc. `hard_timeout` bounds a test with SIGALRM;
a world kills its children when it closes, so nothing can hang the suite.
"""

import functools
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
import traceback

from rpc_harness import free_port, options_per_rank, worker_process

import torchrpc
import torchrpc.testing

_NOFILE = 4096  # a worker's soft RLIMIT_NOFILE: room for 1,000 connections


# -- outcomes of calls (run in the workers) -------------------------------------


def future_outcome(fut, within):
    """How a call ended within `within` seconds: (error class name, or "ok" /
    "pending"; message; monotonic time it completed; is it an RpcError)."""
    done = threading.Event()
    done_at = []

    def on_done(_):
        done_at.append(time.monotonic())
        done.set()

    fut.add_done_callback(on_done)
    if not done.wait(max(0.0, within)):
        return ("pending", "", None, False)
    try:
        fut.wait()
        return ("ok", "", done_at[0], False)
    except Exception as e:
        return (type(e).__name__, str(e), done_at[0], isinstance(e, torchrpc.RpcError))


# -- hard timeouts -------------------------------------------------------------


def hard_timeout(seconds):
    """Fails the test (and so runs its finally blocks) after `seconds`."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            def on_alarm(signum, frame):
                raise TimeoutError(f"{fn.__name__} exceeded its hard timeout of {seconds} s")

            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(seconds)
            try:
                return fn(*args, **kwargs)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)

        return wrapper

    return deco


# -- worker processes driven by commands ----------------------------------------


def _child_main(rank, world_size, port, options, env, stderr_path, after_ready, conn):
    """A worker: init_rpc, report pid and address, run after_ready() (which
    may raise: the process then exits as a script would), then run commands
    until told to stop."""
    if stderr_path:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    for key in ("TORCHRPC_SECRET", "TORCHRPC_SECRET_FILE"):
        os.environ.pop(key, None)  # only what the test gives the worker
    os.environ.update(env or {})
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = _NOFILE if hard == resource.RLIM_INFINITY else min(_NOFILE, hard)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        torchrpc.init_rpc(
            f"w{rank}", rank=rank, world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            options=torchrpc.RpcOptions(**options),
        )
        address = torchrpc.api._current().agent.address
        conn.send(("ready", {"pid": os.getpid(), "address": address}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        os._exit(1)
    if after_ready is not None:
        after_ready()  # an exception here ends the process the ordinary way
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            break
        if fn is None:
            break
        try:
            conn.send(("ok", fn(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    os._exit(0)


class World:
    """`world_size` workers w0..w{n-1} in spawned processes, on loopback.

    options: RpcOptions kwargs for all ranks, or a list per rank.
    transport: "tcp" or "shm": every rank that names no transports in its
    options uses only that one.
    env: a list per rank of extra environment variables; a worker sees
    TORCHRPC_SECRET / TORCHRPC_SECRET_FILE only if its entry sets them.
    stderr_paths: a list per rank of a file to append the worker's stderr to
    (None: the test's own stderr).
    after_ready: {rank: fn}; that worker calls fn() once init_rpc is done and
    its pid reported, before it takes commands.
    """

    def __init__(self, world_size, options=None, env=None, stderr_paths=None,
                 after_ready=None, timeout=90, transport=None):
        port = free_port()
        per_rank = options_per_rank(options, world_size, transport)
        env = env or [{}] * world_size
        stderr_paths = stderr_paths or [None] * world_size
        after_ready = after_ready or {}
        self.procs, self.conns, self.info = [], [], [None] * world_size
        try:
            for r in range(world_size):
                parent_end, child_end = mp.Pipe()
                p = worker_process(
                    _child_main,
                    (r, world_size, port, per_rank[r], env[r], stderr_paths[r],
                     after_ready.get(r), child_end),
                )
                p.start()
                child_end.close()
                self.procs.append(p)
                self.conns.append(parent_end)
            for r in range(world_size):
                kind, value = self._recv(r, timeout)
                if kind != "ready":
                    raise AssertionError(f"worker w{r} failed to start:\n{value}")
                self.info[r] = value
        except BaseException:
            self.close()
            raise

    def pid(self, rank):
        return self.info[rank]["pid"]

    def address(self, rank):
        """(host, port) that worker `rank` listens on with TCP."""
        return torchrpc.testing.tcp_endpoint(self.info[rank]["address"])

    def _recv(self, rank, timeout):
        conn = self.conns[rank]
        if not conn.poll(timeout):
            raise AssertionError(f"worker w{rank} did not answer within {timeout} s")
        try:
            return conn.recv()
        except EOFError:
            raise AssertionError(
                f"worker w{rank} died (exit code {self.procs[rank].exitcode})"
            ) from None

    def send(self, rank, fn, *args):
        self.conns[rank].send((fn, args))

    def recv(self, rank, timeout=60):
        kind, value = self._recv(rank, timeout)
        if kind != "ok":
            raise AssertionError(f"command on worker w{rank} failed:\n{value}")
        return value

    def do(self, rank, fn, *args, timeout=60):
        """Runs fn(*args) on worker `rank` and returns its result."""
        self.send(rank, fn, *args)
        return self.recv(rank, timeout)

    def recv_all(self, ranks, within):
        """The results of commands sent to `ranks`, all due within `within` s."""
        deadline = time.monotonic() + within
        return [self.recv(r, max(0.0, deadline - time.monotonic())) for r in ranks]

    def alive(self, rank):
        return self.procs[rank].is_alive()

    def close(self):
        for p in self.procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped child must not linger
                except OSError:
                    pass
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        for c in self.conns:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
