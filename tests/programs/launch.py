"""Runs a program of tests/programs on worker processes over loopback.

    run_program("param_server", 3, backend="torch", timeout=120)  # [rank 0 result, ...]
    run_local("param_server", "reference", (3,))                   # one process, no RPC

    python -m tests.programs.launch param_server --backend torch  # from the repository root

Each rank is a fresh spawned process. It sets RPC_BACKEND and
TORCHRPC_PYTHON_UDF=1 before it imports the program (the program's import of
tests.programs.backend reads them), limits torch to one intra-op thread
(two cores are shared; results are also comparable with a one-thread local
reference), calls `program.run(rank, world_size, port)` and sends back its
result (plain pickle). A rank that raises, dies or outlives the timeout makes
run_program raise with every failed rank's traceback; the others are killed.
This module imports nothing from torch or the program at module level.
"""

import argparse
import importlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import sys
import time
import traceback

PACKAGE = "tests.programs"

# Program modules and the world size each runs with.
PROGRAMS = {
    "param_server": 3,  # 1 parameter server + 2 trainers
    "pipeline": 3,  # driver + 2 stages
    "rnn": 2,  # driver (LSTM, decoder) + embedding table owner
    "batching_ps": 3,  # batching parameter server + 2 trainer processes x 4 trainers
    "rl_observers": 3,  # agent + 2 observers
}


class ProgramFailed(RuntimeError):
    """A rank raised or died; the message holds every failed rank's traceback."""


class ProgramTimeout(TimeoutError):
    """Some rank did not finish in time (all ranks were killed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module(module_name: str) -> str:
    return module_name if "." in module_name else f"{PACKAGE}.{module_name}"


def _child(module_name, func, args, rank, backend, queue):
    try:
        os.environ["RPC_BACKEND"] = backend
        os.environ["TORCHRPC_PYTHON_UDF"] = "1"
        t0 = time.monotonic()
        import torch

        torch.set_num_threads(1)
        mod = importlib.import_module(_module(module_name))
        t1 = time.monotonic()
        result = getattr(mod, func)(*args)
        seconds = (t1 - t0, time.monotonic() - t1)
        # Plain pickle: torch's queue reducers would pass tensors through
        # shared memory that dies with this process.
        queue.put((rank, True, pickle.dumps((result, seconds))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # flush the result before leaving
        os._exit(0)  # skip atexit/GC work


def _spawn(module_name, func, args_of_rank, n, backend, timeout, what, timings=None):
    if backend not in ("torchrpc", "torch"):
        raise ValueError(f"backend {backend!r}: expected 'torchrpc' or 'torch'")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(module_name, func, args_of_rank(r), r, backend, queue),
                    name=f"{module_name}-rank{r}", daemon=True)
        for r in range(n)
    ]
    for p in procs:
        p.start()
    results, failures = {}, {}
    deadline = time.monotonic() + timeout
    ok = False
    try:
        while len(results) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(n) if r not in results]
                raise ProgramTimeout(f"{what}: rank(s) {missing} did not finish within "
                                     f"{timeout:.0f} s (killed)")
            try:
                rank, good, value = queue.get(timeout=min(left, 0.5))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in results and not p.is_alive()]
                if not dead:
                    continue
                try:  # its last message may still be in flight
                    rank, good, value = queue.get(timeout=2.0)
                except queue_mod.Empty:
                    codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in dead)
                    raise ProgramFailed(f"{what}: died without reporting ({codes})") from None
            if good:
                results[rank], seconds = pickle.loads(value)
                if timings is not None:
                    timings[rank] = {"import_s": seconds[0], "run_s": seconds[1]}
                continue
            failures[rank] = value
            # The first failure often makes its peers fail too: collect what
            # comes within a moment, so the root cause is in the message.
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                try:
                    r2, good2, v2 = queue.get(timeout=max(0.01, end - time.monotonic()))
                except queue_mod.Empty:
                    break
                if not good2:
                    failures[r2] = v2
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise ProgramFailed(f"{what} failed on rank(s) {sorted(failures)}:\n{text}")
        ok = True
    finally:
        for p in procs:
            p.join(timeout=10 if ok else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        queue.close()
        queue.cancel_join_thread()
    return [results[r] for r in range(n)]


def run_program(module_name: str, world_size: int = None, backend: str = "torchrpc",
                timeout: float = 120.0, timings: dict = None):
    """[program.run(rank, world_size, port) for each rank], each in its own process.

    module_name: "param_server" (a module of tests/programs) or a dotted name.
    world_size: defaults to PROGRAMS[module_name].
    timings: a dict to fill with {rank: {"import_s", "run_s"}} (torch and the
        program's imports; run(), init_rpc to shutdown).
    """
    if world_size is None:
        world_size = PROGRAMS[module_name]
    port = free_port()
    return _spawn(module_name, "run", lambda r: (r, world_size, port), world_size, backend,
                  timeout, f"{module_name} ({backend}, world size {world_size})", timings)


def run_local(module_name: str, func: str = "reference", args=(), backend: str = "torch",
              timeout: float = 120.0):
    """program.func(*args) in one fresh process (same thread settings as the ranks).

    For local reference computations; backend only decides what the program's
    import of tests.programs.backend binds (the default works everywhere)."""
    return _spawn(module_name, func, lambda r: tuple(args), 1, backend, timeout,
                  f"{module_name}.{func} ({backend})")[0]


def mismatches(result: dict, reference: dict, rtol: float = 1e-5, atol: float = 1e-6):
    """Where `result` differs from `reference`, over reference's keys (tensors,
    lists of tensors, numbers): a list of messages, empty when they match."""
    import torch

    out = []
    for key, want in reference.items():
        if key not in result:
            out.append(f"{key}: missing from the result")
            continue
        try:
            torch.testing.assert_close(result[key], want, rtol=rtol, atol=atol,
                                       check_dtype=False)
        except AssertionError as e:
            out.append(f"{key}: {e}")
    return out


def summary(obj, width: int = 100) -> str:
    """A short printable form of a program's result (tensor shapes, short values)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return repr(obj)[:width]
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {summary(v, 60)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        return f"[{len(obj)} tensors, {sum(v.numel() for v in obj)} values]"
    if isinstance(obj, torch.Tensor) and obj.numel() > 12:
        return f"tensor{tuple(obj.shape)}"
    text = repr(obj).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run one program of tests/programs.")
    ap.add_argument("program", choices=sorted(PROGRAMS))
    ap.add_argument("--backend", default="torchrpc", choices=["torchrpc", "torch"])
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--reference", action="store_true", help="also run the local reference")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    timings = {}
    results = run_program(args.program, args.world_size, args.backend, args.timeout, timings)
    print(f"{args.program} on {args.backend}: {time.monotonic() - t0:.1f} s; per rank: " +
          ", ".join(f"{r}: import {t['import_s']:.1f} s + run {t['run_s']:.1f} s"
                    for r, t in sorted(timings.items())))
    for r, res in enumerate(results):
        print(f"rank {r}: {summary(res)}")
    if args.reference:
        ws = args.world_size or PROGRAMS[args.program]
        ref = run_local(args.program, "reference", (ws,))
        print(f"reference: {summary(ref)}")
        bad = mismatches(results[0], ref, rtol=1e-4, atol=1e-5)
        print("matches the reference" if not bad else "DIFFERS from the reference:\n" +
              "\n".join(bad))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
