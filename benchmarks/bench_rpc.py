"""torchrpc over shared memory and over TCP vs torch.distributed.rpc
(TensorPipe), and vs the floors under them, on two local processes.

    python benchmarks/bench_rpc.py            # full run (about 3-4 minutes)
    python benchmarks/bench_rpc.py --quick    # smoke run for CI (under a minute)

Two processes are spawned: rank 0 ("w0") measures, rank 1 ("w1") serves.
Both run the same phases in turn, one backend per phase, each starting its
backend with a fresh free port and shutting it down before the next phase:

  torchrpc-shm  torchrpc, RpcOptions(transports=["shm"])
  torchrpc-tcp  torchrpc, RpcOptions(transports=["tcp"])
  tensorpipe    torch.distributed.rpc, TensorPipe backend, default options:
                the anchor every ratio is taken against
  floors        no RPC: what the RPCs cannot beat, measured by the same two
                processes. The p50 round trip of 64 bytes over a Unix socket
                and over TCP loopback (TCP_NODELAY), the faster of a pure
                Python loop and benchmarks/pingpong.c (compiled at run time
                with cc and loaded with ctypes; Python only where cc fails),
                w1 serving the same loop (floors.py); and the median of a
                64 MiB float32 dst.copy_(src) and of the local add_one (x + 1).

Every case runs for every RPC backend. The full run's order is floors, shm,
tcp, TensorPipe, TensorPipe, tcp, shm, floors (--order) and keeps each
metric's best over a backend's two phases, which evens out drift and
background load; --quick runs each once. Within a phase every quoted figure
is a median (p50): the machine is noisy. TensorPipe's RRef cases run in its
first phase only (torch.distributed.rpc cannot use RRefs after a second
init_rpc in one process). Both processes import this module, so both see the
same module-level functions (the TorchScript functions below and the Python
UDFs). The measuring process shows a progress bar per phase on stderr.

Prints the floors, a table with each torchrpc backend's ratio to TensorPipe
and to its floor (for one small call, the ping-pong over its own kind of
socket; for 64 MiB, local add_one and one memcpy each way), and the targets,
each "ok" or "MISSED". Two sweeps, the echo p50 against payload size (64 B to
64 MiB) and rpc_async calls/s against calls outstanding (1 to 256), are
plotted to benchmarks/results/rpc.png (plot_rpc.py). Everything goes to the
JSON at benchmarks/results/rpc.json (see --out).

Adding a case: write `def case_x(b: Backend, cfg: Config) -> Dict[str, float]`
that measures through the Backend adapter (b.rpc_sync / b.rpc_async / ... and
b.kind for the rare backend-specific code), raise Skip(...) where a backend
cannot run it, and append a Case(...) describing its metrics (their floor and
targets) to CASES.
"""

import argparse
import collections
import dataclasses
import gc
import json
import os
import platform
import queue as queue_mod
import socket
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.distributed.rpc import RRef as DistRRef
from tqdm import tqdm

# Loads torchrpc._C too: the TorchScript below uses torch.ops.torchrpc and
# torch.classes.torchrpc, which must exist before it compiles.
import scripted_ops

import floors

WORLD_SIZE = 2
CALLEE = "w1"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rpc.json")

SHM, TCP, ANCHOR, FLOORS = "torchrpc-shm", "torchrpc-tcp", "tensorpipe", "floors"
SUBJECTS = [SHM, TCP]
LABELS = {SHM: "torchrpc-shm", TCP: "torchrpc-tcp", ANCHOR: "TensorPipe"}

KiB, MiB = 1 << 10, 1 << 20
SWEEP_SIZES = (64, KiB, 16 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB)
SWEEP_OUTSTANDING = (1, 4, 16, 64, 256)


def size_label(nbytes: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"

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
    pipeline_repeats: int = 5
    # Large tensor round trips: (label, float32 elements, warm-up, repeats).
    big: tuple = (("1MiB", 1 << 18, 10, 100), ("64MiB", 1 << 24, 1, 7))
    # TorchScript caller: calls per timed batch, warm-up and measured batches.
    script_batch: int = 50
    script_warmup_batches: int = 6
    script_batches: int = 60
    # RRef cases: warm-up and measured round trips.
    rref_warmup: int = 200
    rref_iters: int = 2000
    # Size sweep: per size, min(max_iters, max(min_iters, bytes // size)) calls.
    sweep_sizes: tuple = SWEEP_SIZES
    sweep_bytes: int = 128 * MiB
    sweep_min_iters: int = 5
    sweep_max_iters: int = 500
    # Outstanding-calls sweep: calls per burst, bursts per point.
    sweep_outstanding: tuple = SWEEP_OUTSTANDING
    sweep_calls: int = 500
    sweep_repeats: int = 3
    # Floors: ping-pong bytes, warm-up and measured round trips per loop;
    # memcpy / local add_one warm-up and repeats (on the 64 MiB tensor of `big`).
    pingpong_bytes: int = 64
    pingpong_warmup: int = 1000
    pingpong_iters: int = 10000
    memcpy_warmup: int = 2
    memcpy_repeats: int = 10
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
            big=(("1MiB", 1 << 18, 3, 10), ("64MiB", 1 << 24, 0, 3)),
            script_warmup_batches=1,
            script_batches=6,
            rref_warmup=30,
            rref_iters=150,
            sweep_sizes=(64, 16 * KiB, MiB, 16 * MiB),
            sweep_bytes=32 * MiB,
            sweep_min_iters=3,
            sweep_max_iters=200,
            sweep_outstanding=(1, 16, 256),
            sweep_calls=300,
            pingpong_warmup=200,
            pingpong_iters=2000,
            memcpy_warmup=1,
            memcpy_repeats=5,
        )


class Skip(Exception):
    """Raised by a case that a backend cannot run (recorded, not an error);
    raised by Backend.init, it skips the whole phase."""


# ---------------------------------------------------------------------------
# Backends: one small adapter per RPC system, so cases are written once.


class Backend:
    kind = ""  # "torchrpc" | "tensorpipe"
    label = ""
    note = ""  # said in the report: how this phase deviates from its label

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

    def connections(self) -> Optional[dict]:
        """What the backend says about its connection to each peer, if anything."""
        return None


class TorchRpcBackend(Backend):
    kind = "torchrpc"
    transports: List[str] = []

    def init(self, rank, port, cfg):
        import torchrpc

        self.rpc = torchrpc
        options = dict(
            num_worker_threads=16,
            rpc_timeout=cfg.rpc_timeout,
            python_udf=True,  # python_udf_small sends plain Python functions
            init_timeout=cfg.init_timeout,
            shutdown_timeout=cfg.shutdown_timeout,
        )
        opts = torchrpc.RpcOptions(transports=list(self.transports), **options)
        for fn in SCRIPT_FUNCTIONS:
            torchrpc.register(fn)
        torchrpc.init_rpc(f"w{rank}", rank=rank, world_size=WORLD_SIZE,
                          init_method=f"tcp://127.0.0.1:{port}", options=opts)

    def shutdown(self, cfg):
        self.rpc.shutdown(graceful=True, timeout=cfg.shutdown_timeout)

    def connections(self):
        # Recorded beside the figures: each peer's transport and its counters.
        return self.rpc.debug_info()["connections"]


class TorchRpcShm(TorchRpcBackend):
    label = LABELS[SHM]
    transports = ["shm"]


class TorchRpcTcp(TorchRpcBackend):
    label = LABELS[TCP]
    transports = ["tcp"]


class TensorPipeBackend(Backend):
    kind = "tensorpipe"
    label = LABELS[ANCHOR]
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
    SHM: TorchRpcShm,
    TCP: TorchRpcTcp,
    ANCHOR: TensorPipeBackend,
}
PHASE_ERROR_GRACE_S = 30.0  # how long the run goes on after a phase failed

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
    return {"median_calls_per_s": statistics.median(rates), "best_calls_per_s": max(rates)}


def _make_big_case(label: str, func):
    """A case calling func (echo or add_one) on one of cfg.big's tensors (by label)."""

    def case_big(b: Backend, cfg: Config):
        _, n, warmup, repeats = {s[0]: s for s in cfg.big}[label]
        x = torch.rand(n, dtype=torch.float32)
        want = x + 1 if func is add_one else x
        _check(b.rpc_sync(func, (x,)), want, f"{b.label} {func.name} {label}")
        del want
        ms = [us / 1e3 for us in _latencies_us(lambda: b.rpc_sync(func, (x,)), warmup, repeats)]
        return {"median_ms": _percentile(ms, 0.50), "min_ms": ms[0]}

    case_big.__name__ = f"case_{func.name}_{label}"
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


def case_sweep_size(b: Backend, cfg: Config):
    """rpc_sync(echo) p50 per payload size, fewer calls for bigger payloads."""
    out = {}
    for size in cfg.sweep_sizes:
        x = torch.rand(size // 4, dtype=torch.float32)
        _check(b.rpc_sync(echo, (x,)), x, f"{b.label} echo {size_label(size)}")
        iters = min(cfg.sweep_max_iters, max(cfg.sweep_min_iters, cfg.sweep_bytes // size))
        lat = _latencies_us(lambda: b.rpc_sync(echo, (x,)), max(1, iters // 10), iters)
        out[f"p50_us_{size_label(size)}"] = _percentile(lat, 0.50)
    return out


def case_sweep_outstanding(b: Backend, cfg: Config):
    """rpc_async(add_one) calls/s with at most k calls outstanding (a new call
    as soon as the oldest is done), median of bursts, per k."""
    x = torch.arange(4, dtype=torch.float32)
    _check(b.rpc_async(add_one, (x,)).wait(), x + 1, f"{b.label} rpc_async add_one")

    def burst(k: int, calls: int) -> float:
        pending: collections.deque = collections.deque()
        t0 = time.perf_counter()
        for _ in range(calls):
            if len(pending) == k:
                pending.popleft().wait()
            pending.append(b.rpc_async(add_one, (x,)))
        while pending:
            pending.popleft().wait()
        return calls / (time.perf_counter() - t0)

    burst(16, cfg.sweep_calls // 4)  # warm-up
    out = {}
    for k in cfg.sweep_outstanding:
        gc.collect()
        rates = [burst(k, cfg.sweep_calls) for _ in range(cfg.sweep_repeats)]
        out[f"calls_per_s_{k}"] = statistics.median(rates)
    return out


# ---------------------------------------------------------------------------
# Floors: rank 0's half of the floors phase (rank 1's is in _run_floors).


def floor_pingpong(sock: socket.socket, impls: Dict[str, floors.PingPong], cfg: Config):
    """p50 round trip of cfg.pingpong_bytes per ping-pong loop; p50_us: the faster."""
    out = {}
    for name, run_loop in impls.items():
        lat = run_loop(sock, cfg.pingpong_warmup + cfg.pingpong_iters, cfg.pingpong_bytes, False)
        out[f"{name}_p50_us"] = _percentile(sorted(lat[cfg.pingpong_warmup:]), 0.50)
    out["p50_us"] = min(out.values())
    return out


def floor_memcpy(cfg: Config):
    """Median dst.copy_(src) and local add_one(x) on the 64 MiB tensor of cfg.big."""
    n = {s[0]: s[1] for s in cfg.big}["64MiB"]
    src = torch.rand(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    warmup, repeats = cfg.memcpy_warmup, cfg.memcpy_repeats
    copy_us = _latencies_us(lambda: dst.copy_(src), warmup, repeats)
    add_us = _latencies_us(lambda: add_one(src), warmup, repeats)
    _check(dst, src, "memcpy")
    return {"memcpy_ms": _percentile(copy_us, 0.50) / 1e3,
            "add_one_ms": _percentile(add_us, 0.50) / 1e3}


# The ping-pong floors, (case name, socket family): rank 1 listens at the plan's
# "unix" path and at the floors phase's port, rank 0 connects to each in turn.
PINGPONG_CASES = (("pingpong_unix", socket.AF_UNIX), ("pingpong_tcp", socket.AF_INET))
FLOOR_CASES = [name for name, _ in PINGPONG_CASES] + ["memcpy_64MiB"]


def floor_values(merged: Dict[str, Dict[str, dict]]) -> Dict[str, float]:
    """The floors the metrics refer to (Metric.floor), from the merged floors phases."""
    got = {n: r["values"] for n, r in merged.get(FLOORS, {}).items() if r["status"] == "ok"}
    out = {}
    if "pingpong_unix" in got:
        out["unix_pingpong_us"] = got["pingpong_unix"]["p50_us"]
    if "pingpong_tcp" in got:
        out["tcp_pingpong_us"] = got["pingpong_tcp"]["p50_us"]
    if "memcpy_64MiB" in got:
        m = got["memcpy_64MiB"]
        out.update(memcpy_ms=m["memcpy_ms"], add_one_ms=m["add_one_ms"],
                   memcpy2_ms=2 * m["memcpy_ms"],
                   add_one_2memcpy_ms=m["add_one_ms"] + 2 * m["memcpy_ms"])
    return out


FLOOR_NAMES = {
    "unix_pingpong_us": "Unix ping-pong",
    "tcp_pingpong_us": "TCP ping-pong",
    "memcpy2_ms": "2 memcpy",
    "add_one_2memcpy_ms": "add_one + 2 memcpy",
}
# Metric.floor values: per torchrpc backend, the floor_values key it is held against.
PINGPONG = {SHM: "unix_pingpong_us", TCP: "tcp_pingpong_us"}
MEMCPY2 = {SHM: "memcpy2_ms", TCP: "memcpy2_ms"}
ADD_ONE_2MEMCPY = {SHM: "add_one_2memcpy_ms", TCP: "add_one_2memcpy_ms"}


# ---------------------------------------------------------------------------
# What is measured, against what, and the targets


@dataclasses.dataclass
class Target:
    backend: str  # SHM or TCP
    ref: str  # ANCHOR, or "floor": the metric's floor for that backend
    ratio: float  # backend / ref at most this (at least, where higher is better)


@dataclasses.dataclass
class Metric:
    key: str  # key in the case's result dict
    unit: str
    better: str  # "lower" | "higher"
    floor: Optional[Dict[str, str]] = None  # backend -> floor_values key
    targets: Tuple[Target, ...] = ()
    show: bool = True  # in the printed table (always in the JSON)


@dataclasses.dataclass
class Case:
    name: str
    description: str
    fn: Callable[[Backend, Config], Dict[str, float]]
    metrics: List[Metric]


def vs_tp(shm: Optional[float], tcp: Optional[float]) -> Tuple[Target, ...]:
    """Targets for torchrpc-shm / TensorPipe and torchrpc-tcp / TensorPipe."""
    return tuple(Target(b, ANCHOR, r) for b, r in ((SHM, shm), (TCP, tcp)) if r is not None)


def hidden(key: str, unit: str = "us", better: str = "lower") -> Metric:
    return Metric(key, unit, better, show=False)


CASES: List[Case] = [
    Case("script_small", "SCRIPT_CALL rpc_sync add_one(4 floats)", case_script_small,
         [Metric("p50_us", "us", "lower", PINGPONG,
                 vs_tp(0.15, 0.8) + (Target(SHM, "floor", 3.0), Target(TCP, "floor", 3.0))),
          Metric("p99_us", "us", "lower")]),
    Case("builtin_small", "builtin rpc_sync torch.add(4 floats, 1)", case_builtin_small,
         [Metric("p50_us", "us", "lower", PINGPONG), hidden("p99_us")]),
    Case("python_udf_small", "Python UDF rpc_sync py_add_one(4 floats)", case_python_udf_small,
         [Metric("p50_us", "us", "lower", PINGPONG), hidden("p99_us")]),
    Case("pipelined", "pipelined rpc_async add_one, all in flight", case_pipelined,
         [Metric("median_calls_per_s", "calls/s", "higher", targets=vs_tp(10.0, 1.5)),
          hidden("best_calls_per_s", "calls/s", "higher")]),
    Case("echo_1MiB", "echo 1 MiB float32 round trip", _make_big_case("1MiB", echo),
         [Metric("median_ms", "ms", "lower"), hidden("min_ms", "ms")]),
    Case("echo_64MiB", "echo 64 MiB float32 round trip", _make_big_case("64MiB", echo),
         [Metric("median_ms", "ms", "lower", MEMCPY2, vs_tp(1.0, 1.0)), hidden("min_ms", "ms")]),
    Case("add_one_64MiB", "rpc_sync add_one(64 MiB float32), result checked",
         _make_big_case("64MiB", add_one),
         [Metric("median_ms", "ms", "lower", ADD_ONE_2MEMCPY,
                 vs_tp(0.45, None) + (Target(SHM, "floor", 1.2),)),
          hidden("min_ms", "ms")]),
    Case("torchscript_caller", "rpc_async(add_one).wait() looped in TorchScript, per call",
         case_torchscript_caller,
         [Metric("p50_us", "us", "lower", PINGPONG, vs_tp(0.1, 0.8)), hidden("min_us")]),
    Case("rref_roundtrip", "remote(echo, 4 floats).to_here()", case_rref_roundtrip,
         [Metric("p50_us", "us", "lower", targets=vs_tp(0.8, 0.8)), hidden("p99_us")]),
    Case("rref_fork_chain", "remote(echo) on w1 + rpc_sync(w1, rref_sum, (rref,))",
         case_rref_fork_chain,
         [Metric("p50_us", "us", "lower", targets=vs_tp(0.8, 0.8)), hidden("p99_us")]),
    Case("sweep_size", "rpc_sync echo p50 against payload size", case_sweep_size,
         [hidden(f"p50_us_{size_label(s)}") for s in SWEEP_SIZES]),
    Case("sweep_outstanding", "rpc_async add_one calls/s against calls outstanding",
         case_sweep_outstanding,
         [hidden(f"calls_per_s_{k}", "calls/s", "higher") for k in SWEEP_OUTSTANDING]),
]

# ---------------------------------------------------------------------------
# The two processes


def _measure(phase: str, cases: List[Tuple[str, Callable[[], Dict[str, float]]]], results):
    """Rank 0: runs each case under the phase's progress bar and reports it."""
    # disable=None: a bar only where stderr is a terminal.
    bar = tqdm(total=len(cases), file=sys.stderr, disable=None, leave=True,
               bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
    for name, fn in cases:
        bar.set_description_str(f"{phase:<15} {name:<18}")
        t1 = time.monotonic()
        try:
            values = fn()
            status, detail = "ok", ""
        except Skip as e:
            values, status, detail = {}, "skipped", str(e)
        except Exception:
            values, status, detail = {}, "error", traceback.format_exc()
        if status != "ok":
            bar.write(f"  [{phase}] {name}: {status}: {detail}", file=sys.stderr)
        results.put(("case", phase, name, status, values, detail, time.monotonic() - t1))
        bar.update(1)
    bar.set_description_str(f"{phase:<15} {'done':<18}")
    bar.close()


def _run_phase(rank: int, phase: str, backend_name: str, port: int, paths: dict,
               cfg: Config, cases: List[str], results, phase_done):
    """One backend's phase in one process. Rank 0 measures and reports."""
    b = BACKENDS[backend_name]()
    t0 = time.monotonic()
    try:
        b.init(rank, port, cfg)
    except Skip as e:  # raised alike on both ranks, before their rendezvous
        if rank == 0:
            print(f"{phase:<15} skipped: {e}", file=sys.stderr, flush=True)
            for name in cases:
                results.put(("case", phase, name, "skipped", {}, str(e), 0.0))
            results.put(("phase", phase, "skipped", {}, str(e)))
            phase_done.set()
        return
    init_s = time.monotonic() - t0
    try:
        if rank == 0:
            _measure(phase, [(c.name, lambda c=c: c.fn(b, cfg)) for c in CASES
                             if c.name in cases], results)
            info = {"init_s": round(init_s, 3), "connections": b.connections()}
            if b.note:
                info["note"] = b.note
            results.put(("phase", phase, "ok", info, ""))
        else:
            # Serve until rank 0 is done measuring (no polling: the event blocks).
            if not phase_done.wait(cfg.phase_timeout):
                raise TimeoutError(f"rank 1: phase {phase} did not finish in time")
    finally:
        if rank == 0:
            phase_done.set()
        b.shutdown(cfg)


def _run_floors(rank: int, phase: str, port: int, paths: dict, cfg: Config, results,
                phase_done):
    """The floors phase: rank 1 serves a ping-pong per socket kind (Unix
    socket at paths["unix"], TCP loopback at port) and per loop (Python, C
    where paths["pingpong_so"] was built); rank 0 pings, then times memcpy."""
    impls = floors.pingpong_impls(paths["pingpong_so"])
    iters = cfg.pingpong_warmup + cfg.pingpong_iters
    addrs = {socket.AF_UNIX: paths["unix"], socket.AF_INET: ("127.0.0.1", port)}
    if rank == 1:
        listeners = [floors.listen(fam, addrs[fam], cfg.phase_timeout)
                     for _, fam in PINGPONG_CASES]
        try:
            for listener in listeners:
                with floors.accept(listener) as conn:
                    try:
                        for run_loop in impls.values():
                            run_loop(conn, iters, cfg.pingpong_bytes, True)
                    except OSError:
                        pass  # rank 0 stopped early; it reports why
        finally:
            for listener in listeners:
                listener.close()
        if not phase_done.wait(cfg.phase_timeout):
            raise TimeoutError(f"rank 1: phase {phase} did not finish in time")
        return

    def pingpong(fam):
        with floors.connect(fam, addrs[fam], cfg.phase_timeout) as sock:
            return floor_pingpong(sock, impls, cfg)

    try:
        _measure(phase, [(name, lambda fam=fam: pingpong(fam)) for name, fam in PINGPONG_CASES]
                 + [("memcpy_64MiB", lambda: floor_memcpy(cfg))], results)
        info = {"pingpong_loops": list(impls)}
        if not paths["pingpong_so"]:
            info["note"] = "pingpong.c was not built: Python ping-pong only"
        results.put(("phase", phase, "ok", info, ""))
    finally:
        phase_done.set()


def _worker(rank: int, plan: List[tuple], cfg: Config, cases: List[str], results, events):
    torch.set_num_threads(1)
    for (phase, backend_name, port, paths), done in zip(plan, events):
        try:
            if backend_name == FLOORS:
                _run_floors(rank, phase, port, paths, cfg, results, done)
            else:
                _run_phase(rank, phase, backend_name, port, paths, cfg, cases, results, done)
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
    """'floors#1', 'torchrpc-shm#1', 'tensorpipe#1', 'tensorpipe#2', ...: one per phase."""
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
    report = {"cases": {p: {} for p in phases}, "phases": {p: {} for p in phases}, "errors": []}

    def handle(msg):
        if msg[0] == "case":
            _, phase, name, status, values, detail, secs = msg
            report["cases"][phase][name] = {"status": status, "values": values,
                                              "detail": detail, "seconds": round(secs, 2)}
        elif msg[0] == "phase":
            _, phase, status, info, detail = msg
            report["phases"][phase].update(info, status=status, detail=detail)
            if status == "error":
                report["errors"].append(f"phase {phase} failed on rank {info['rank']}:\n{detail}")
                print(f"  [{phase}] phase FAILED on rank {info['rank']}:\n{detail}",
                      file=sys.stderr, flush=True)
                # The other process may now wait for its peer forever (in
                # init or shutdown): give it a little while, not the whole budget.
                return (PHASE_ERROR_GRACE_S,
                        f"gave up {PHASE_ERROR_GRACE_S:.0f} s after a phase failed")
        return None

    with tempfile.TemporaryDirectory(prefix="bench_rpc-") as tmp:
        so = None
        if FLOORS in order:
            so, why = floors.build_pingpong(tmp)
            if so is None:
                print(f"pingpong.c not built, floors use the Python ping-pong only: {why}",
                      file=sys.stderr, flush=True)
        plan = [(phase, backend, port,
                 {"unix": os.path.join(tmp, f"pingpong-{i}.sock"), "pingpong_so": so}
                 if backend == FLOORS else {})
                for i, (phase, backend, port) in enumerate(zip(phases, order,
                                                               free_ports(len(order))))]
        run_workers(ctx, _worker, (plan, cfg, cases, results, events), results, "bench-rpc",
                    total_timeout, handle, report["errors"],
                    timeout_error=f"benchmark did not finish within {total_timeout:.0f} s "
                    "(--timeout)",
                    died_error="{name} died (exit code {code}) before finishing",
                    terminate=True)
    return report


# ---------------------------------------------------------------------------
# Report


def _fmt(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "calls/s":
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
    return x / y if x is not None and y else None


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _print_columns(head: List[str], lines: List[List[str]], left: int = 2, indent: str = ""):
    """Prints an aligned table: the first `left` columns left-aligned, the rest right."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = indent + "  ".join(("{:<%d}" if i < left else "{:>%d}") % w
                             for i, w in enumerate(widths))
    print(fmt.format(*head).rstrip())
    print(indent + "  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line).rstrip())


def merge_rounds(report: dict) -> Dict[str, Dict[str, dict]]:
    """{backend: {case: {"status", "values"}}}: each metric's best over the
    phases (rounds) of that backend that ran the case successfully."""
    better = {(c.name, m.key): m.better for c in CASES for m in c.metrics}  # floors: lower
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
            for k, v in r["values"].items():
                old = m["values"].get(k)
                pick = min if better.get((name, k), "lower") == "lower" else max
                m["values"][k] = v if old is None else pick(old, v)
    return merged


def summarize(merged: Dict[str, Dict[str, dict]], fv: Dict[str, float]) -> List[dict]:
    """One row per (case, metric): values per backend, ratios of each torchrpc
    backend to TensorPipe and to its floor (fv: floor_values), targets met."""
    rows = []
    for case in CASES:
        got = {b: merged.get(b, {}).get(case.name) for b in SUBJECTS + [ANCHOR]}
        if all(r is None for r in got.values()):
            continue
        for m in case.metrics:
            values = {b: (r or {}).get("values", {}).get(m.key) for b, r in got.items()}
            floor = {b: m.floor[b] for b in SUBJECTS} if m.floor else {}
            vs = {ANCHOR: {b: _ratio(values[b], values[ANCHOR]) for b in SUBJECTS},
                  "floor": {b: _ratio(values[b], fv.get(floor.get(b, ""))) for b in SUBJECTS}}
            targets = []
            for t in m.targets:
                ratio = vs[t.ref][t.backend]
                met = None
                if ratio is not None:
                    met = ratio <= t.ratio if m.better == "lower" else ratio >= t.ratio
                targets.append({
                    "backend": t.backend, "ratio": ratio, "met": met, "target": t.ratio,
                    "op": "<=" if m.better == "lower" else ">=",
                    "against": LABELS[ANCHOR] if t.ref == ANCHOR else FLOOR_NAMES[floor[t.backend]],
                })
            rows.append({
                "case": case.name, "description": case.description, "metric": m.key,
                "unit": m.unit, "better": m.better, "values": values,
                "status": {b: (r or {}).get("status") for b, r in got.items()},
                "floor": {b: {"name": FLOOR_NAMES[k], "value": fv.get(k)}
                          for b, k in floor.items()},
                "ratio_vs_tensorpipe": vs[ANCHOR], "ratio_vs_floor": vs["floor"],
                "targets": targets, "show": m.show,
            })
    return rows


def print_floors(merged: Dict[str, Dict[str, dict]]):
    got = merged.get(FLOORS)
    if not got:
        print("Floors: not measured (no floors phase in --order)")
        return
    print("Floors: no RPC, the same two processes (rank 0 timing, rank 1 serving)")
    for case, key, what, stat, unit in (
            ("pingpong_unix", "p50_us", "ping-pong 64 B, Unix socket", "p50", "us"),
            ("pingpong_tcp", "p50_us", "ping-pong 64 B, TCP loopback", "p50", "us"),
            ("memcpy_64MiB", "memcpy_ms", "memcpy 64 MiB (dst.copy_(src))", "median", "ms"),
            ("memcpy_64MiB", "add_one_ms", "local add_one 64 MiB", "median", "ms")):
        r = got.get(case, {"status": "not run", "values": {}})
        if r["status"] != "ok":
            print(f"  {what:<32} {r['status']}")
            continue
        loops = ", ".join(f"{k[:-len('_p50_us')]} {_fmt(v)}" for k, v in sorted(r["values"].items())
                          if k.endswith("_p50_us"))
        print(f"  {what:<32} {stat:<6} {_fmt(r['values'][key]):>6} {unit}"
              + (f"  (faster of: {loops})" if loops else ""))


def _cell(row: dict, backend: str) -> str:
    status = row["status"][backend]
    if status in ("skipped", "error") and row["values"][backend] is None:
        return {"skipped": "skip", "error": "ERROR"}[status]
    return _fmt(row["values"][backend], row["unit"])


def print_table(rows: List[dict]):
    head = ["case", "metric", LABELS[SHM], LABELS[TCP], LABELS[ANCHOR], "shm/TP", "tcp/TP",
            "floor", "shm/floor", "tcp/floor"]
    lines = []
    for r in rows:
        if not r["show"]:
            continue
        floor = r["floor"].get(SHM, {}).get("name", "")
        if "ping-pong" in floor:
            floor = "ping-pong"  # each over its own transport
        lines.append([r["case"], f"{r['metric']} ({r['unit']})",
                      *[_cell(r, b) for b in (SHM, TCP, ANCHOR)],
                      *[_fmt_ratio(r["ratio_vs_tensorpipe"][b]) for b in SUBJECTS],
                      floor, *[_fmt_ratio(r["ratio_vs_floor"][b]) for b in SUBJECTS]])
    _print_columns(head, lines)
    print("X/TP = torchrpc over X / TensorPipe; X/floor = torchrpc over X / its floor "
          "(ping-pong: over a Unix socket\nfor shm, TCP loopback for tcp). Latencies: lower "
          "is better (0.50x = twice as fast); calls/s: higher is better.")


def print_targets(rows: List[dict]):
    lines = []
    for r in rows:
        for t in r["targets"]:
            if t["met"] is None:
                status = r["status"][t["backend"]]
                verdict = f"n/a ({status})" if status and status != "ok" else "n/a"
            else:
                verdict = "ok" if t["met"] else "MISSED"
            lines.append([f"{r['case']} {r['metric']}",
                          f"{LABELS[t['backend']]} {t['op']} {t['target']:g}x {t['against']}",
                          _fmt_ratio(t["ratio"]), verdict])
    print("Targets (each a ratio measured in this run):")
    _print_columns(["case", "target", "measured", "verdict"], lines, indent="  ")


def sweep_data(merged: Dict[str, Dict[str, dict]], cfg: Config) -> dict:
    def series(case: str, keys: List[str]) -> Dict[str, List[Optional[float]]]:
        return {b: [merged.get(b, {}).get(case, {}).get("values", {}).get(k) for k in keys]
                for b in SUBJECTS + [ANCHOR]}

    sizes, outstanding = list(cfg.sweep_sizes), list(cfg.sweep_outstanding)
    return {
        "sizes_bytes": sizes,
        "size_labels": [size_label(s) for s in sizes],
        "p50_us": series("sweep_size", [f"p50_us_{size_label(s)}" for s in sizes]),
        "outstanding": outstanding,
        "calls_per_s": series("sweep_outstanding", [f"calls_per_s_{k}" for k in outstanding]),
    }


def print_sweep(sweep: dict):
    for title, xs, key, unit in (
            ("rpc_sync echo p50 (us) by payload", sweep["size_labels"], "p50_us", "us"),
            ("rpc_async calls/s by calls outstanding", [str(k) for k in sweep["outstanding"]],
             "calls_per_s", "calls/s")):
        lines = [[LABELS[b]] + [_fmt(v, unit) for v in ys] for b, ys in sweep[key].items()
                 if any(v is not None for v in ys)]
        if lines:
            _print_columns([title] + xs, lines, left=1)
            print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (CI smoke test)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON results path; the plot goes beside it (.png)")
    ap.add_argument("--order", default=None,
                    help="comma-separated phases (backends, and floors), in the order they "
                    "run; one named twice runs twice and each metric keeps its best value "
                    "(default: floors,torchrpc-shm,torchrpc-tcp,tensorpipe in --quick; full "
                    "runs add the same in reverse)")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES),
                    help="comma-separated case names to run (the floors phase always runs "
                    "its own)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before the whole run is abandoned (default 120 quick, 600 full)")
    args = ap.parse_args(argv)

    cfg = Config.make(args.quick)
    if args.order is None:
        once = [FLOORS, SHM, TCP, ANCHOR]
        args.order = ",".join(once if args.quick else once + once[::-1])
    order = [b.strip() for b in args.order.split(",") if b.strip()]
    for b in order:
        if b not in BACKENDS and b != FLOORS:
            ap.error(f"unknown phase {b!r} (choose from {', '.join([*BACKENDS, FLOORS])})")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    known = {c.name for c in CASES}
    for c in cases:
        if c not in known:
            ap.error(f"unknown case {c!r} (choose from {', '.join(sorted(known))})")
    total_timeout = args.timeout or (120.0 if args.quick else 600.0)
    cfg.phase_timeout = total_timeout

    print(f"bench_rpc: {'quick' if args.quick else 'full'} run, phases {order}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    report = run(cfg, order, cases, total_timeout)
    elapsed = time.monotonic() - t0
    merged = merge_rounds(report)
    fv = floor_values(merged)
    rows = summarize(merged, fv)
    sweep = sweep_data(merged, cfg)

    print()
    print_floors(merged)
    print()
    print_table(rows)
    print()
    print_targets(rows)
    print()
    print_sweep(sweep)
    notes = sorted({f"{p.split('#')[0]}: {i['note']}" for p, i in report["phases"].items()
                    if i.get("note")})
    for note in notes:
        print(f"note: {note}")
    failed = [f"{p}/{n}" for p, cs in report["cases"].items()
              for n, c in cs.items() if c["status"] == "error"]
    missing = [f"{p}/{n}" for p, b in zip(phase_labels(order), order)
               for n in (FLOOR_CASES if b == FLOORS else cases)
               if n not in report["cases"].get(p, {})]
    print(f"elapsed {elapsed:.1f} s")

    doc = {
        "benchmark": "rpc",
        "mode": "quick" if args.quick else "full",
        "subjects": SUBJECTS,
        "anchor": ANCHOR,
        "labels": LABELS,
        "backend_options": {
            SHM: 'torchrpc.RpcOptions(transports=["shm"])',
            TCP: 'torchrpc.RpcOptions(transports=["tcp"])',
            ANCHOR: "torch.distributed.rpc TensorPipe backend, default options",
        },
        "order": order,
        "config": dataclasses.asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(elapsed, 1),
        "floors": fv,
        "rows": [{k: v for k, v in r.items() if k != "show"} for r in rows],
        "sweep": sweep,
        "notes": notes,
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
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        import plot_rpc
    except ImportError as e:
        print(f"no plot ({e}); `pip install matplotlib`", file=sys.stderr)
    else:
        plot_rpc.plot(doc, png)
        print(f"wrote {png}")

    if doc["errors"]:
        print("\nFAILED:", file=sys.stderr)
        for e in doc["errors"]:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
