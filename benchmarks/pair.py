"""Two spawned processes for a benchmark: rank 0 measures, rank 1 serves.

    results = pair.run(body, args, timeout)   # body(rank, *args) in each, at module level

Returns what rank 0's body returned, or None after printing the traceback of
any rank that failed.
"""

import multiprocessing as mp
import socket
import sys
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(body, rank, args, queue):
    try:
        queue.put((rank, "ok", body(rank, *args)))
    except BaseException as e:  # noqa: B036 (reported to the parent, whatever it is)
        queue.put((rank, "error", f"{e}\n{traceback.format_exc()}"))


def run(body, args: tuple, timeout: float):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(body, r, args, queue)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    outcome = {}
    for _ in procs:
        rank, status, value = queue.get(timeout=timeout)
        outcome[rank] = (status, value)
    for proc in procs:
        proc.join(timeout=30)
    failed = False
    for rank, (status, value) in sorted(outcome.items()):
        if status != "ok":
            print(f"w{rank} failed:\n{value}", file=sys.stderr)
            failed = True
    return None if failed else outcome[0][1]
