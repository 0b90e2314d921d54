"""torchrpc vs torch.distributed.rpc (TensorPipe) on two local processes.

    python benchmarks/bench_rpc.py            # full run (about 1 minute)
    python benchmarks/bench_rpc.py --quick    # smoke run for CI (seconds)

Two processes are spawned. Both run the same phases in turn, one backend
per phase, each starting its backend with a fresh free port and shutting it
down before the next phase. The full run does torchrpc, TensorPipe,
TensorPipe, torchrpc (--order) and keeps each metric's best over a backend's
two phases, which evens out drift and background load; --quick runs each
once. TensorPipe's RRef cases run in its first phase only (torch.distributed.rpc
cannot use RRefs after a second init_rpc in one process). Rank 0 ("w0")
measures, rank 1 ("w1") only serves. Both processes import this module, so
both see the same module-level functions (the TorchScript functions below and
the Python UDFs).

Prints a table with torchrpc / TensorPipe ratios and writes JSON to
benchmarks/results/rpc.json (see --out).

Adding a case: write `def case_x(b: Backend, cfg: Config) -> Dict[str, float]`
that measures through the Backend adapter (b.rpc_sync / b.rpc_async / ... and
b.kind for the rare backend-specific code), raise Skip(...) where a backend
cannot run it, and append a Case(...) describing its metrics to CASES.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import queue as queue_mod
import socket
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.distributed.rpc import RRef as DistRRef

# Loads torchrpc._C too: the TorchScript below uses torch.ops.torchrpc and
# torch.classes.torchrpc, which must exist before it compiles.
import scripted_ops

WORLD_SIZE = 2
CALLEE = "w1"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rpc.json")

# ---------------------------------------------------------------------------
# Functions called remotely. Module level: both spawned processes define them.


@torch.jit.script
def add_one(x: Tensor) -> Tensor:
    return x + 1


@torch.jit.script
def echo(x: Tensor) -> Tensor:
    return x


def py_add_one(x):
    return x + 1


@torch.jit.script
def rref_sum(r: torch.classes.torchrpc.RRef) -> Tensor:
    """torchrpc: fetches an RRef's tensor (here on its owner) and sums it."""
    v = r.to_here()
    assert isinstance(v, torch.Tensor)
    return v.sum()


@torch.jit.script
def anchor_rref_sum(r: DistRRef[Tensor]) -> Tensor:
    """torch.distributed.rpc: rref_sum's TorchScript twin."""
    return r.to_here().sum()


SCRIPT_FUNCTIONS = [add_one, echo, rref_sum]  # torchrpc registers these on both ranks

# TorchScript callers: the whole call loop runs inside TorchScript (no Python
# per call). Both wait on each call before sending the next.


@torch.jit.script
def torchrpc_script_caller(to: str, qualified_name: str, x: Tensor, n: int,
                           timeout: float) -> Tensor:
    args: List[Any] = [x]
    out = x
    for _ in range(n):
        v = torch.ops.torchrpc.rpc_async(to, qualified_name, args, timeout).wait()
        assert isinstance(v, torch.Tensor)
        out = v
    return out


@torch.jit.script
def anchor_script_caller(to: str, x: Tensor, n: int) -> Tensor:
    out = x
    for _ in range(n):
        out = torch.distributed.rpc.rpc_async(to, add_one, (x,)).wait()
    return out


# ---------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    quick: bool = False
    # Latency cases: warm-up calls, then measured calls.
    warmup: int = 300
    latency_iters: int = 3000
    # Pipelined rpc_async: calls in flight per repeat, repeats.
    pipeline_calls: int = 4000
    pipeline_repeats: int = 7
    # Large tensor round trips: (label, float32 elements, warm-up, repeats).
    big: tuple = (("1MiB", 1 << 18, 10, 100), ("64MiB", 1 << 24, 2, 10))
    # TorchScript caller: calls per timed batch, warm-up and measured batches.
    script_batch: int = 50
    script_warmup_batches: int = 6
    script_batches: int = 60
    # RRef cases: warm-up and measured round trips.
    rref_warmup: int = 200
    rref_iters: int = 2000
    rpc_timeout: float = 60.0
    init_timeout: float = 60.0
    shutdown_timeout: float = 60.0
    phase_timeout: float = 600.0  # how long rank 1 serves one phase at most

    @staticmethod
    def make(quick: bool) -> "Config":
        if not quick:
            return Config()
        return Config(
            quick=True,
            warmup=50,
            latency_iters=300,
            pipeline_calls=1000,
            pipeline_repeats=3,
            big=(("1MiB", 1 << 18, 3, 10), ("64MiB", 1 << 24, 1, 3)),
            script_warmup_batches=1,
            script_batches=6,
            rref_warmup=30,
            rref_iters=150,
        )


class Skip(Exception):
    """Raised by a case that a backend cannot run (recorded, not an error)."""


# ---------------------------------------------------------------------------
# Backends: one small adapter per RPC system, so cases are written once.


class Backend:
    kind = ""  # "torchrpc" | "tensorpipe"
    label = ""

    def init(self, rank: int, port: int, cfg: Config):
        raise NotImplementedError

    def shutdown(self, cfg: Config):
        raise NotImplementedError

    # Both systems share these names: `self.rpc` is torchrpc or torch.distributed.rpc.
    def rpc_sync(self, func, args=()):
        return self.rpc.rpc_sync(CALLEE, func, args)

    def rpc_async(self, func, args=()):
        return self.rpc.rpc_async(CALLEE, func, args)

    def remote(self, func, args=()):
        """An RRef (with .to_here()) to func(*args) kept on the callee."""
        return self.rpc.remote(CALLEE, func, args)

    def check_rrefs(self):
        """Raises Skip where this phase cannot use RRefs."""


class TorchRpcBackend(Backend):
    kind = "torchrpc"
    label = "torchrpc"

    def init(self, rank, port, cfg):
        import torchrpc

        self.rpc = torchrpc
        for fn in SCRIPT_FUNCTIONS:
            torchrpc.register(fn)
        torchrpc.init_rpc(
            f"w{rank}",
            rank=rank,
            world_size=WORLD_SIZE,
            init_method=f"tcp://127.0.0.1:{port}",
            options=torchrpc.RpcOptions(
                num_worker_threads=16,
                rpc_timeout=cfg.rpc_timeout,
                python_udf=True,  # case 3 sends plain Python functions
                init_timeout=cfg.init_timeout,
                shutdown_timeout=cfg.shutdown_timeout,
            ),
        )

    def shutdown(self, cfg):
        self.rpc.shutdown(graceful=True, timeout=cfg.shutdown_timeout)


class TensorPipeBackend(Backend):
    kind = "tensorpipe"
    label = "TensorPipe"
    _inits = 0  # per process: init_rpc calls so far

    def init(self, rank, port, cfg):
        import torch.distributed.rpc as rpc

        self.rpc = rpc
        TensorPipeBackend._inits += 1
        self.generation = TensorPipeBackend._inits
        rpc.init_rpc(
            f"w{rank}",
            rank=rank,
            world_size=WORLD_SIZE,
            rpc_backend_options=rpc.TensorPipeRpcBackendOptions(
                init_method=f"tcp://127.0.0.1:{port}"
            ),
        )

    def shutdown(self, cfg):
        self.rpc.shutdown(graceful=True)

    def check_rrefs(self):
        # torch.distributed.rpc's RRefContext is a process-wide singleton bound
        # to the first agent: after shutdown() and a second init_rpc, RRef
        # forks, acks and deletes still go to the dead agent ("RPC is no longer
        # running on this node"), RRefs leak and graceful shutdown hangs.
        if self.generation > 1:
            raise Skip("torch.distributed.rpc RRefs only work under a process's first "
                       "init_rpc; measured in the first TensorPipe phase only")


BACKENDS: Dict[str, Callable[[], Backend]] = {
    "torchrpc": TorchRpcBackend,
    "tensorpipe": TensorPipeBackend,
}
ANCHOR = "tensorpipe"
PHASE_ERROR_GRACE_S = 30.0  # how long the run goes on after a phase failed
SUBJECT = "torchrpc"

# ---------------------------------------------------------------------------
# Measurement helpers


def _check(got, want, what):
    if not torch.equal(got, want):
        raise AssertionError(f"{what}: wrong result (got {got!r}, want {want!r})")


def _percentile(sorted_values: List[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def _latencies_us(call: Callable[[], object], warmup: int, iters: int) -> List[float]:
    for _ in range(warmup):
        call()
    gc.collect()
    out = []
    clock = time.perf_counter_ns
    for _ in range(iters):
        t0 = clock()
        call()
        out.append((clock() - t0) / 1e3)
    out.sort()
    return out


def _latency_case(b: Backend, cfg: Config, func, args, want, p99: bool) -> Dict[str, float]:
    _check(b.rpc_sync(func, args), want, f"{b.label} {getattr(func, '__name__', func)}")
    lat = _latencies_us(lambda: b.rpc_sync(func, args), cfg.warmup, cfg.latency_iters)
    out = {"p50_us": _percentile(lat, 0.50)}
    if p99:
        out["p99_us"] = _percentile(lat, 0.99)
    return out


# ---------------------------------------------------------------------------
# Cases. Each returns {metric: value}; metrics are described in CASES.


def case_script_small(b: Backend, cfg: Config):
    x = torch.arange(4, dtype=torch.float32)
    return _latency_case(b, cfg, add_one, (x,), x + 1, p99=True)


def case_builtin_small(b: Backend, cfg: Config):
    x = torch.arange(4, dtype=torch.float32)
    return _latency_case(b, cfg, torch.add, (x, 1), x + 1, p99=True)


def case_python_udf_small(b: Backend, cfg: Config):
    x = torch.arange(4, dtype=torch.float32)
    return _latency_case(b, cfg, py_add_one, (x,), x + 1, p99=True)


def case_pipelined(b: Backend, cfg: Config):
    x = torch.arange(4, dtype=torch.float32)
    n = cfg.pipeline_calls
    # Warm up with one smaller burst; check every result once.
    futs = [b.rpc_async(add_one, (x,)) for _ in range(max(1, n // 4))]
    for f in futs:
        _check(f.wait(), x + 1, f"{b.label} pipelined add_one")
    del futs
    rates = []
    for _ in range(cfg.pipeline_repeats):
        gc.collect()
        t0 = time.perf_counter()
        futs = [b.rpc_async(add_one, (x,)) for _ in range(n)]
        for f in futs:
            f.wait()
        rates.append(n / (time.perf_counter() - t0))
        del futs
    return {"best_calls_per_s": max(rates), "median_calls_per_s": statistics.median(rates)}


def _make_big_case(label: str):
    """A case echoing one of cfg.big's tensors (by label)."""

    def case_big(b: Backend, cfg: Config):
        _, n, warmup, repeats = {s[0]: s for s in cfg.big}[label]
        x = torch.rand(n, dtype=torch.float32)
        _check(b.rpc_sync(echo, (x,)), x, f"{b.label} echo {label}")
        for _ in range(warmup):
            b.rpc_sync(echo, (x,))
        gc.collect()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            b.rpc_sync(echo, (x,))
            times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times)}

    case_big.__name__ = f"case_echo_{label}"
    return case_big


def case_torchscript_caller(b: Backend, cfg: Config):
    """rpc_async(...).wait() looped inside TorchScript; per call, from batches."""
    x = torch.arange(4, dtype=torch.float32)
    if b.kind == "torchrpc":
        name = scripted_ops.add_one.qualified_name  # "__torch__.scripted_ops.add_one"

        def loop(n: int) -> Tensor:
            return torchrpc_script_caller(CALLEE, name, x, n, -1.0)  # -1: default timeout
    else:
        def loop(n: int) -> Tensor:
            return anchor_script_caller(CALLEE, x, n)
    _check(loop(1), x + 1, f"{b.label} TorchScript caller")
    n = cfg.script_batch
    for _ in range(cfg.script_warmup_batches):
        loop(n)
    gc.collect()
    per_call = []
    clock = time.perf_counter_ns
    for _ in range(cfg.script_batches):
        t0 = clock()
        loop(n)
        per_call.append((clock() - t0) / 1e3 / n)
    per_call.sort()
    return {"p50_us": _percentile(per_call, 0.50), "min_us": per_call[0]}


def _rref_echo(b: Backend):
    """The echo function remote() runs on the callee."""
    return scripted_ops.echo if b.kind == "torchrpc" else echo


def _rref_latency_case(b: Backend, cfg: Config, call, want, what) -> Dict[str, float]:
    """Latencies of call(); each RRef is created and dropped inside the timed call.

    A call that fails is counted, not timed, and the run goes on, so that an
    intermittent failure (a protocol race) is reported with how often it
    happens; the case then fails, the successful calls' p50 in its message.
    """
    failures: List[str] = []
    failed = object()

    def guarded():
        try:
            return call()
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
            return failed

    for _ in range(max(1, cfg.rref_warmup)):  # warm-up calls' results are checked
        got = guarded()
        if got is not failed:
            _check(got, want, f"{b.label} {what}")
    gc.collect()
    lat = []
    clock = time.perf_counter_ns
    for _ in range(cfg.rref_iters):
        t0 = clock()
        ok = guarded() is not failed
        t = (clock() - t0) / 1e3
        if ok:
            lat.append(t)
    lat.sort()
    if failures:
        total = max(1, cfg.rref_warmup) + cfg.rref_iters
        raise AssertionError(
            f"{b.label} {what}: {len(failures)} of {total} calls failed (first: {failures[0]}); "
            f"p50 of the {len(lat)} timed calls that worked: {_percentile(lat, 0.50):.0f} us")
    return {"p50_us": _percentile(lat, 0.50), "p99_us": _percentile(lat, 0.99)}


def case_rref_roundtrip(b: Backend, cfg: Config):
    """remote(echo, x).to_here()."""
    b.check_rrefs()
    x = torch.arange(4, dtype=torch.float32)
    fn = _rref_echo(b)
    return _rref_latency_case(b, cfg, lambda: b.remote(fn, (x,)).to_here(), x,
                              "remote echo + to_here")


def case_rref_fork_chain(b: Backend, cfg: Config):
    """remote(echo, x) on w1, then rpc_sync to w1 (the owner) of a scripted
    function that takes the RRef and fetches it: a fork sent back to the owner."""
    b.check_rrefs()
    x = torch.arange(4, dtype=torch.float32)
    fn = _rref_echo(b)
    summer = rref_sum if b.kind == "torchrpc" else anchor_rref_sum

    def call():
        return b.rpc_sync(summer, (b.remote(fn, (x,)),))

    return _rref_latency_case(b, cfg, call, x.sum(), "remote echo + fork to owner")


@dataclasses.dataclass
class Metric:
    key: str  # key in the case's result dict
    unit: str
    better: str  # "lower" | "higher"
    target: Optional[float] = None  # torchrpc/anchor ratio the project aims for
    show: bool = True  # in the printed table (always in the JSON)


@dataclasses.dataclass
class Case:
    name: str
    description: str
    fn: Callable[[Backend, Config], Dict[str, float]]
    metrics: List[Metric]


CASES: List[Case] = [
    Case("script_small", "SCRIPT_CALL rpc_sync add_one(4 floats)", case_script_small,
         [Metric("p50_us", "us", "lower", 0.8), Metric("p99_us", "us", "lower")]),
    Case("builtin_small", "builtin rpc_sync torch.add(4 floats, 1)", case_builtin_small,
         [Metric("p50_us", "us", "lower"), Metric("p99_us", "us", "lower", show=False)]),
    Case("python_udf_small", "Python UDF rpc_sync py_add_one(4 floats)", case_python_udf_small,
         [Metric("p50_us", "us", "lower"), Metric("p99_us", "us", "lower", show=False)]),
    Case("pipelined", "pipelined rpc_async add_one, all in flight", case_pipelined,
         [Metric("best_calls_per_s", "calls/s", "higher", 1.5),
          Metric("median_calls_per_s", "calls/s", "higher")]),
    Case("echo_1MiB", "echo 1 MiB float32 round trip", _make_big_case("1MiB"),
         [Metric("median_ms", "ms", "lower"), Metric("min_ms", "ms", "lower", show=False)]),
    Case("echo_64MiB", "echo 64 MiB float32 round trip", _make_big_case("64MiB"),
         [Metric("median_ms", "ms", "lower", 1.0), Metric("min_ms", "ms", "lower", show=False)]),
    Case("torchscript_caller", "rpc_async(add_one).wait() looped in TorchScript, per call",
         case_torchscript_caller,
         [Metric("p50_us", "us", "lower", 0.8), Metric("min_us", "us", "lower", show=False)]),
    Case("rref_roundtrip", "remote(echo, 4 floats).to_here()", case_rref_roundtrip,
         [Metric("p50_us", "us", "lower", 0.8), Metric("p99_us", "us", "lower", show=False)]),
    Case("rref_fork_chain", "remote(echo) on w1 + rpc_sync(w1, rref_sum, (rref,))",
         case_rref_fork_chain,
         [Metric("p50_us", "us", "lower", 0.8), Metric("p99_us", "us", "lower", show=False)]),
]

# ---------------------------------------------------------------------------
# The two processes


def _run_phase(rank: int, phase: str, backend_name: str, port: int, cfg: Config,
               cases: List[str], results, phase_done):
    """One backend's phase in one process. Rank 0 measures and reports."""
    b = BACKENDS[backend_name]()
    t0 = time.monotonic()
    b.init(rank, port, cfg)
    init_s = time.monotonic() - t0
    try:
        if rank == 0:
            for case in CASES:
                if case.name not in cases:
                    continue
                t1 = time.monotonic()
                try:
                    values = case.fn(b, cfg)
                    status, detail = "ok", ""
                except Skip as e:
                    values, status, detail = {}, "skipped", str(e)
                except Exception:
                    values, status, detail = {}, "error", traceback.format_exc()
                results.put(("case", phase, case.name, status, values, detail,
                             time.monotonic() - t1))
            results.put(("phase", phase, "ok", {"init_s": round(init_s, 3)}, ""))
        else:
            # Serve until rank 0 is done measuring (no polling: the event blocks).
            if not phase_done.wait(cfg.phase_timeout):
                raise TimeoutError(f"rank 1: phase {phase} did not finish in time")
    finally:
        if rank == 0:
            phase_done.set()
        b.shutdown(cfg)


def _worker(rank: int, plan: List[tuple], cfg: Config, cases: List[str], results, events):
    torch.set_num_threads(1)
    for (phase, backend_name, port), done in zip(plan, events):
        try:
            _run_phase(rank, phase, backend_name, port, cfg, cases, results, done)
        except BaseException:
            results.put(("phase", phase, "error", {"rank": rank}, traceback.format_exc()))
            # Unblock the other process and go on with the next backend; if
            # this one left things broken, the parent's deadline ends the run.
            done.set()
    results.put(("exit", rank))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> List[int]:
    """n distinct free ports: one per phase."""
    ports: List[int] = []
    while len(ports) < n:
        p = _free_port()
        if p not in ports:
            ports.append(p)
    return ports


def phase_labels(order: List[str]) -> List[str]:
    """'torchrpc#1', 'tensorpipe#1', 'tensorpipe#2', ...: one per phase."""
    seen: Dict[str, int] = {}
    labels = []
    for b in order:
        seen[b] = seen.get(b, 0) + 1
        labels.append(f"{b}#{seen[b]}")
    return labels


def run_workers(ctx, target: Callable, args: tuple, results, name: str, timeout: float,
                handle: Callable[[tuple], Optional[tuple]], errors: List[str], *,
                timeout_error: str, died_error: str, terminate: bool) -> None:
    """Start WORLD_SIZE processes target(rank, *args) (named f"{name}-w{rank}")
    and pass each message they put on `results` to handle(msg) until every
    rank has put ("exit", rank), a process died, or `timeout` seconds passed.
    handle may return (grace_s, error): the run then gives up grace_s from
    now at the latest, and `error` becomes the message for running out of
    time (instead of timeout_error). Problems are appended to `errors`
    (died_error is formatted with name= and code=). At the end the processes
    are joined; one still alive is terminated (terminate=True, then killed
    if need be) or killed."""
    procs = [ctx.Process(target=target, args=(r,) + tuple(args),
                         name=f"{name}-w{r}", daemon=True) for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    exited = set()
    deadline = time.monotonic() + timeout
    try:
        while len(exited) < WORLD_SIZE:
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append(timeout_error)
                break
            try:
                msg = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [p for r, p in enumerate(procs) if r not in exited and not p.is_alive()]
                if dead:
                    # Give the queue a moment: a process's last messages may still be in flight.
                    try:
                        msg = results.get(timeout=2.0)
                    except queue_mod.Empty:
                        errors += [died_error.format(name=p.name, code=p.exitcode)
                                   for p in dead]
                        break
                else:
                    continue
            if msg[0] == "exit":
                exited.add(msg[1])
                continue
            cut = handle(msg)
            if cut is not None:
                grace_s, timeout_error = cut
                deadline = min(deadline, time.monotonic() + grace_s)
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                errors.append(f"{p.name} did not exit; {'terminated' if terminate else 'killed'}")
                if terminate:
                    p.terminate()
                    p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def run(cfg: Config, order: List[str], cases: List[str], total_timeout: float) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    events = [ctx.Event() for _ in order]
    phases = phase_labels(order)
    plan = list(zip(phases, order, free_ports(len(order))))
    report = {"cases": {p: {} for p in phases}, "phases": {p: {} for p in phases}, "errors": []}

    def handle(msg):
        if msg[0] == "case":
            _, phase, name, status, values, detail, secs = msg
            report["cases"][phase][name] = {"status": status, "values": values,
                                              "detail": detail, "seconds": round(secs, 2)}
            mark = {"ok": "", "skipped": " (skipped)", "error": " (ERROR)"}[status]
            print(f"  [{phase}] {name}: {secs:.1f} s{mark}", file=sys.stderr, flush=True)
            if status == "error":
                print(detail, file=sys.stderr, flush=True)
        elif msg[0] == "phase":
            _, phase, status, info, detail = msg
            report["phases"][phase].update(info, status=status)
            if status == "error":
                report["errors"].append(f"phase {phase} failed on rank {info['rank']}:\n{detail}")
                print(f"  [{phase}] phase FAILED on rank {info['rank']}:\n{detail}",
                      file=sys.stderr, flush=True)
                # The other process may now wait for its peer forever (in
                # init or shutdown): give it a little while, not the whole budget.
                return (PHASE_ERROR_GRACE_S,
                        f"gave up {PHASE_ERROR_GRACE_S:.0f} s after a phase failed")
        return None

    run_workers(ctx, _worker, (plan, cfg, cases, results, events), results, "bench-rpc",
                total_timeout, handle, report["errors"],
                timeout_error=f"benchmark did not finish within {total_timeout:.0f} s (--timeout)",
                died_error="{name} died (exit code {code}) before finishing", terminate=True)
    return report


# ---------------------------------------------------------------------------
# Report


def _fmt(v: Optional[float], unit: str) -> str:
    if v is None:
        return "-"
    if unit == "calls/s":
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def merge_rounds(report: dict) -> Dict[str, Dict[str, dict]]:
    """{backend: {case: {"status", "values"}}}: each metric's best over the
    phases (rounds) of that backend that ran the case successfully."""
    by_case = {c.name: c for c in CASES}
    merged: Dict[str, Dict[str, dict]] = {}
    for phase, results in report["cases"].items():
        backend = phase.split("#")[0]
        for name, r in results.items():
            m = merged.setdefault(backend, {}).setdefault(
                name, {"status": r["status"], "values": {}, "rounds": 0})
            if r["status"] != "ok":
                if m["rounds"] == 0:
                    m["status"] = r["status"]
                continue
            m["status"] = "ok"
            m["rounds"] += 1
            better = {mt.key: mt.better for mt in by_case[name].metrics}
            for k, v in r["values"].items():
                old = m["values"].get(k)
                pick = min if better.get(k, "lower") == "lower" else max
                m["values"][k] = v if old is None else pick(old, v)
    return merged


def summarize(merged: Dict[str, Dict[str, dict]]) -> List[dict]:
    rows = []
    for case in CASES:
        subj = merged.get(SUBJECT, {}).get(case.name)
        anch = merged.get(ANCHOR, {}).get(case.name)
        if subj is None and anch is None:
            continue
        for m in case.metrics:
            s = (subj or {}).get("values", {}).get(m.key)
            a = (anch or {}).get("values", {}).get(m.key)
            ratio = s / a if s is not None and a else None
            meets = None
            if ratio is not None and m.target is not None:
                meets = ratio <= m.target if m.better == "lower" else ratio >= m.target
            rows.append({
                "case": case.name, "description": case.description, "metric": m.key,
                "unit": m.unit, "better": m.better, SUBJECT: s, ANCHOR: a,
                "ratio": ratio, "target": m.target, "meets_target": meets, "show": m.show,
                "status": {SUBJECT: (subj or {}).get("status"), ANCHOR: (anch or {}).get("status")},
            })
    return rows


def print_table(rows: List[dict]):
    head = ["case", "metric", "torchrpc", "TensorPipe", "ratio torchrpc/TP", "target"]
    lines = []
    for r in rows:
        if not r["show"]:
            continue
        metric = f"{r['metric']} ({r['unit']})"
        if r["ratio"] is None:
            ratio = "-"
        else:
            ratio = f"{r['ratio']:.2f}x ({r['better']} better)"
        if r["target"] is None:
            target = ""
        else:
            op = "<=" if r["better"] == "lower" else ">="
            verdict = {True: "ok", False: "MISSED", None: "n/a"}[r["meets_target"]]
            target = f"{op} {r['target']:.1f}x {verdict}"
        lines.append([r["case"], metric, _fmt(r[SUBJECT], r["unit"]),
                      _fmt(r[ANCHOR], r["unit"]), ratio, target])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join("{:<%d}" % w if i < 2 or i >= 4 else "{:>%d}" % w
                    for i, w in enumerate(widths))
    print(fmt.format(*head))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))
    print("ratio = torchrpc / TensorPipe. Latencies: lower is better (0.50x = twice as fast).")
    print("Throughput (calls/s): higher is better (2.00x = twice the calls per second).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (CI smoke test)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    ap.add_argument("--order", default=None,
                    help="comma-separated backends, in the order their phases run; a backend "
                    "named twice runs twice and each metric keeps its best value "
                    "(default: torchrpc,tensorpipe in --quick, "
                    "torchrpc,tensorpipe,tensorpipe,torchrpc in full runs)")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES),
                    help="comma-separated case names to run")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before the whole run is abandoned (default 120 quick, 600 full)")
    args = ap.parse_args(argv)

    cfg = Config.make(args.quick)
    if args.order is None:
        args.order = ("torchrpc,tensorpipe" if args.quick
                      else "torchrpc,tensorpipe,tensorpipe,torchrpc")
    order = [b.strip() for b in args.order.split(",") if b.strip()]
    for b in order:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    known = {c.name for c in CASES}
    for c in cases:
        if c not in known:
            ap.error(f"unknown case {c!r} (choose from {', '.join(sorted(known))})")
    total_timeout = args.timeout or (120.0 if args.quick else 600.0)
    cfg.phase_timeout = total_timeout

    print(f"bench_rpc: {'quick' if args.quick else 'full'} run, backends {order}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    report = run(cfg, order, cases, total_timeout)
    elapsed = time.monotonic() - t0
    merged = merge_rounds(report)
    rows = summarize(merged)

    print()
    print_table(rows)
    failed = [f"{p}/{n}" for p, cs in report["cases"].items()
              for n, c in cs.items() if c["status"] == "error"]
    missing = [f"{p}/{n}" for p in phase_labels(order) for n in cases
               if n not in report["cases"].get(p, {})]
    print(f"\nelapsed {elapsed:.1f} s")

    doc = {
        "benchmark": "rpc",
        "mode": "quick" if args.quick else "full",
        "subject": SUBJECT,
        "anchor": ANCHOR,
        "anchor_options": "torch.distributed.rpc TensorPipe backend, default options",
        "order": order,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(elapsed, 1),
        "rows": [{k: v for k, v in r.items() if k != "show"} for r in rows],
        "best": merged,
        "raw": report["cases"],
        "phases": report["phases"],
        "errors": report["errors"] + [f"case failed: {f}" for f in failed]
        + [f"case missing: {m}" for m in missing],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")

    if doc["errors"]:
        print("\nFAILED:", file=sys.stderr)
        for e in doc["errors"]:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
