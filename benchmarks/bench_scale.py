"""torchrpc vs torch.distributed.rpc (TensorPipe) with many workers on one host.

    python benchmarks/bench_scale.py                    # N = 8, 16, 32, 64 (make bench-scale)
    python benchmarks/bench_scale.py --sizes 8,16       # a shorter run
    python benchmarks/bench_scale.py --transports default,tcp   # torchrpc over TCP too

For each N, each backend runs in a fresh world of N processes (one world at a
time: a worker costs about 230 MiB, so two 64-worker worlds would not fit):

  torchrpc          RpcOptions() with its default transports (shm on one host)
  torchrpc-tcp      RpcOptions(transports=["tcp"]) (--transports default,tcp)
  tensorpipe        torch.distributed.rpc, TensorPipe backend, default options:
                    the anchor every ratio is taken against

Workers fork from the tests' fork server, which imported torch and torchrpc
once (tests/rpc_harness.py), and rendezvous over 127.0.0.1 on a free port.
Each world measures, in order:

  init       every rank waits until all N processes are up, then calls
             init_rpc at the same moment; the slowest rank's time from that
             call to its return
  wave       one untimed round in which every worker calls every other one
             (connections are lazy: this opens them), then --calls calls per
             worker in rounds of one async call to every peer, waiting for the
             round before the next. The call is scripted_ops.add (TorchScript)
             on both backends: the same work. calls/s = all workers' calls /
             (last worker's end - first worker's start, one monotonic clock
             for every process); p50/p99 over every call's latency
  footprint  after the wave, each worker counts its threads (/proc/self/task),
             open fds (/proc/self/fd) and VmRSS; median and max over workers
  shutdown   every rank calls graceful shutdown at the same moment; the
             slowest rank's time
  host       the host memory the world took (MemAvailable before it minus
             its lowest while it ran): shared pages counted once, unlike RSS

Workers line up between steps on a multiprocessing barrier, never through the
RPC system under test. Every wait is bounded (--timeout per world): a hung
world is reported with the ranks that did not answer, and all its processes
are killed before the next one starts. So is a world that brings the host's
available memory under --min-free-mib (TensorPipe's RSS grows with N).

Prints one table per N with the ratio torchrpc / TensorPipe, and the issue's
targets at N = 32 and 64 (each PASS or MISS): init <= 0.5x, all-to-all calls/s
>= 3x, threads per worker <= TensorPipe's and flat in N, RSS per worker flat
in N ("flat": at most FLAT_TOLERANCE above the smallest N of the run).
Writes benchmarks/results/scale.json and plots each figure against N to
benchmarks/results/scale.png.
"""

import argparse
import json
import math
import os
import platform
import queue as queue_mod
import statistics
import sys
import time
import traceback
import warnings
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# One fork server for tests and benchmarks: its workers start with torch and
# torchrpc imported (about 2 s of CPU saved per worker).
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from rpc_harness import _CTX, free_port, worker_process  # noqa: E402

RESULTS = os.path.join(HERE, "results")
ANCHOR = "tensorpipe"
TARGET_SIZES = (32, 64)
INIT_RATIO_MAX = 0.5
CALLS_RATIO_MIN = 3.0
FLAT_TOLERANCE = 0.10  # "flat in N": within 10% of the smallest N measured
MEMORY_POLL_S = 0.5  # how often the parent checks the host's available memory

# Figures each world reports, in table order: (key, label, unit, higher is better).
FIGURES = [
    ("init_s", "init, slowest rank", "s", False),
    ("calls_per_s", "all-to-all calls/s", "calls/s", True),
    ("p50_us", "call latency p50", "us", False),
    ("p99_us", "call latency p99", "us", False),
    ("threads_median", "threads per worker (median)", "", False),
    ("threads_max", "threads per worker (max)", "", False),
    ("fds_median", "fds per worker (median)", "", False),
    ("fds_max", "fds per worker (max)", "", False),
    ("rss_mib_median", "RSS per worker MiB (median)", "MiB", False),
    ("rss_mib_max", "RSS per worker MiB (max)", "MiB", False),
    ("shutdown_s", "shutdown, slowest rank", "s", False),
    ("host_mib_used", "host memory used by the world", "MiB", False),
]


# -- in each worker ----------------------------------------------------------------


def _footprint() -> Dict[str, float]:
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {
        "threads": len(os.listdir("/proc/self/task")),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_mib": rss_kib / 1024.0,
    }


class _TorchRpc:
    def __init__(self, transports: Optional[List[str]]):
        import torchrpc

        self.rpc = torchrpc
        self.transports = transports

    def init(self, rank, world_size, port, timeout):
        opts = self.rpc.RpcOptions(init_timeout=timeout, shutdown_timeout=timeout,
                                   transports=self.transports)
        self.rpc.init_rpc(f"w{rank}", rank=rank, world_size=world_size,
                          init_method=f"tcp://127.0.0.1:{port}", options=opts)

    def shutdown(self, timeout):
        self.rpc.shutdown(graceful=True, timeout=timeout)


class _TensorPipe:
    def __init__(self):
        import torch.distributed.rpc as rpc

        self.rpc = rpc

    def init(self, rank, world_size, port, timeout):
        # torch's own deprecation warning from inside init_rpc, once per worker.
        warnings.filterwarnings("ignore", message="You are using a Backend")
        self.rpc.init_rpc(
            f"w{rank}", rank=rank, world_size=world_size,
            rpc_backend_options=self.rpc.TensorPipeRpcBackendOptions(
                init_method=f"tcp://127.0.0.1:{port}"),
        )

    def shutdown(self, timeout):
        self.rpc.shutdown(graceful=True)


def _backend(name):
    if name == ANCHOR:
        return _TensorPipe()
    transport = name.split("-", 1)[1] if "-" in name else None
    return _TorchRpc([transport] if transport else None)


def _wave_round(b, rank, world_size, x, latencies):
    import scripted_ops

    futs = []
    for peer in range(world_size):
        if peer == rank:
            continue
        t0 = time.monotonic()
        fut = b.rpc.rpc_async(f"w{peer}", scripted_ops.add, (x, x))
        if latencies is not None:
            fut.add_done_callback(lambda _f, t0=t0: latencies.append(time.monotonic() - t0))
        futs.append(fut)
    for fut in futs:
        fut.wait()


def _worker(name, rank, world_size, port, rounds, timeout, barrier, queue):
    try:
        b = _backend(name)
        queue.put((rank, "ready", None))
        barrier.wait(timeout)  # every process is up: init starts together
        t0 = time.monotonic()
        b.init(rank, world_size, port, timeout)
        init_s = time.monotonic() - t0
        x = torch.ones(4)
        _wave_round(b, rank, world_size, x, None)  # opens every connection
        barrier.wait(timeout)
        latencies: List[float] = []
        start = time.monotonic()
        for _ in range(rounds):
            _wave_round(b, rank, world_size, x, latencies)
        end = time.monotonic()
        barrier.wait(timeout)  # every call of every worker done: counts are steady
        out = {"init_s": init_s, "wave_start": start, "wave_end": end,
               "latencies": latencies, **_footprint()}
        barrier.wait(timeout)
        t0 = time.monotonic()
        b.shutdown(timeout)
        out["shutdown_s"] = time.monotonic() - t0
        queue.put((rank, "ok", out))
    except BaseException as e:  # noqa: B036 (reported to the parent, whatever it is)
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        barrier.abort()  # the others stop waiting for this one


# -- in the parent -------------------------------------------------------------------


def _kill_all(procs, grace):
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


def run_world(name, world_size, rounds, timeout, min_free_mib, progress=None) -> Dict:
    """One world of `world_size` workers of backend `name`: its figures, or
    {"error": why} (every process killed)."""
    queue = _CTX.Queue()
    barrier = _CTX.Barrier(world_size)
    port = free_port()
    procs = [worker_process(_worker, (name, r, world_size, port, rounds, timeout, barrier, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors, ready = {}, {}, set()
    deadline = time.monotonic() + timeout
    base_free = low_free = _available_mib()
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            low_free = min(low_free, _available_mib())
            if low_free < min_free_mib:
                # A world that would push the host into the OOM killer is
                # stopped while the machine can still answer.
                return {"error": f"stopped: host memory available fell to {low_free:.0f} MiB "
                                 f"(< --min-free-mib {min_free_mib}) with {len(results)}"
                                 f"/{world_size} workers done"}
            try:
                rank, status, value = queue.get(timeout=min(MEMORY_POLL_S, max(0.01, left)))
            except queue_mod.Empty:
                if time.monotonic() >= deadline:
                    break
                continue
            if status == "ready":
                ready.add(rank)
                if progress is not None:
                    progress(f"{name} N={world_size}: {len(ready)}/{world_size} up")
            elif status == "ok":
                results[rank] = value
                if progress is not None:
                    progress(f"{name} N={world_size}: {len(results)}/{world_size} done")
            else:
                errors[rank] = value
    finally:
        _kill_all(procs, grace=10 if len(results) == world_size else 2)
    if errors:
        # The first worker that failed for a reason of its own: the others
        # then fail at the barrier it broke.
        own = [r for r in errors if not errors[r].startswith("BrokenBarrierError")]
        rank = own[0] if own else next(iter(errors))
        return {"error": f"{len(errors)} worker(s) failed; w{rank} first:\n{errors[rank]}"}
    if len(results) < world_size:
        silent = sorted(set(range(world_size)) - set(results))
        return {"error": f"timed out after {timeout:.0f} s: {len(silent)} worker(s) never "
                         f"reported (w{silent[0]}...; {len(ready)}/{world_size} had started)"}
    out = summarize([results[r] for r in range(world_size)], rounds)
    # What the world took from the host, shared pages counted once (RSS
    # counts torch's libraries, shared with the fork server, in every worker).
    out["host_mib_used"] = base_free - low_free
    return out


def _pct(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(per_rank: List[Dict], rounds: int) -> Dict:
    world_size = len(per_rank)
    calls = sum(len(r["latencies"]) for r in per_rank)
    span = max(r["wave_end"] for r in per_rank) - min(r["wave_start"] for r in per_rank)
    lat = sorted(v for r in per_rank for v in r["latencies"])
    out = {
        "world_size": world_size,
        "rounds": rounds,
        "calls": calls,
        "init_s": max(r["init_s"] for r in per_rank),
        "calls_per_s": calls / span,
        "p50_us": _pct(lat, 0.50) * 1e6,
        "p99_us": _pct(lat, 0.99) * 1e6,
        "shutdown_s": max(r["shutdown_s"] for r in per_rank),
    }
    for key in ("threads", "fds", "rss_mib"):
        values = [r[key] for r in per_rank]
        out[f"{key}_median"] = statistics.median(values)
        out[f"{key}_max"] = max(values)
    return out


def _fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def print_tables(results, subjects, sizes):
    for n in sizes:
        anchor = results[ANCHOR].get(n, {})
        cols = subjects + [ANCHOR] + [f"{s}/TP" for s in subjects]
        print(f"\nN = {n}")
        print(f"{'':32}" + "".join(f"{c:>16}" for c in cols))
        for key, label, _, _ in FIGURES:
            row = [results[s].get(n, {}).get(key) for s in subjects + [ANCHOR]]
            ratios = []
            for s in subjects:
                v, a = results[s].get(n, {}).get(key), anchor.get(key)
                ratios.append(v / a if v is not None and a else None)
            print(f"{label:32}" + "".join(f"{_fmt(v):>16}" for v in row)
                  + "".join(f"{(_fmt(r) + 'x') if r is not None else '-':>16}" for r in ratios))
        for s in subjects + [ANCHOR]:
            if "error" in results[s].get(n, {}):
                print(f"  {s} failed: {results[s][n]['error'].splitlines()[0]}")


def check_targets(results, subject, sizes) -> List[Dict]:
    """The issue's targets at N = 32 and 64 (those this run measured)."""
    got = results[subject]
    tp = results[ANCHOR]
    ok_sizes = [n for n in sizes if "error" not in got.get(n, {"error": 1})]
    base = min(ok_sizes) if ok_sizes else None
    checks = []
    for n in [n for n in sizes if n in TARGET_SIZES]:
        s, a = got.get(n, {}), tp.get(n, {})

        def add(what, value, bound, ok):
            checks.append({"n": n, "target": what, "value": value, "bound": bound, "ok": ok})

        if "error" in s or "error" in a:
            add("world ran", None, None, False)
            continue
        r = s["init_s"] / a["init_s"]
        add(f"init <= {INIT_RATIO_MAX}x TensorPipe", r, INIT_RATIO_MAX, r <= INIT_RATIO_MAX)
        r = s["calls_per_s"] / a["calls_per_s"]
        add(f"calls/s >= {CALLS_RATIO_MIN}x TensorPipe", r, CALLS_RATIO_MIN, r >= CALLS_RATIO_MIN)
        add("threads per worker <= TensorPipe's", s["threads_max"], a["threads_max"],
            s["threads_max"] <= a["threads_max"])
        for key, what in (("threads_max", "threads per worker flat in N"),
                          ("rss_mib_median", "RSS per worker flat in N")):
            bound = got[base][key] * (1 + FLAT_TOLERANCE)
            add(f"{what} (<= N={base} +{FLAT_TOLERANCE:.0%})", s[key], bound, s[key] <= bound)
    return checks


def plot(results, columns, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f for f in FIGURES if not f[0].endswith("_max")]
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows))
    for ax, (key, label, unit, _) in zip(axes.flat, keys):
        for name in columns:
            pts = [(n, results[name][n][key]) for n in sizes
                   if key in results[name].get(n, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label="TensorPipe" if name == ANCHOR else name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("workers (N)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        if unit:
            ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("torchrpc vs torch.distributed.rpc (TensorPipe), all workers on one host")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,16,32,64", help="world sizes, comma-separated")
    ap.add_argument("--transports", default="default",
                    help="torchrpc columns: 'default' (its default transports) and/or "
                         "transport names (tcp, shm), comma-separated")
    ap.add_argument("--calls", type=int, default=300,
                    help="timed calls per worker (rounded up to whole rounds of N-1)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a world may take from start to its last result "
                         "(default 60 + 2 s per worker)")
    ap.add_argument("--min-free-mib", type=int, default=1024,
                    help="stop a world when the host's available memory falls below this")
    ap.add_argument("--out", default=os.path.join(RESULTS, "scale.json"))
    args = ap.parse_args()
    from tqdm import tqdm

    sizes = [int(s) for s in args.sizes.split(",")]
    subjects = ["torchrpc" if t == "default" else f"torchrpc-{t}"
                for t in args.transports.split(",")]
    columns = subjects + [ANCHOR]
    results: Dict[str, Dict[int, Dict]] = {c: {} for c in columns}
    worlds = [(n, c) for n in sizes for c in columns]
    bar = tqdm(total=len(worlds), file=sys.stderr, disable=None, unit="world")
    for n, name in worlds:
        rounds = math.ceil(args.calls / (n - 1))
        timeout = args.timeout or 60.0 + 2.0 * n
        bar.set_description(f"{name} N={n}")
        res = run_world(name, n, rounds, timeout, args.min_free_mib, progress=lambda s: bar.set_postfix_str(s))
        results[name][n] = res
        if "error" in res:
            tqdm.write(f"{name} N={n} failed: {res['error']}", file=sys.stderr)
        bar.update(1)
    bar.close()

    print_tables(results, subjects, sizes)
    checks = {s: check_targets(results, s, sizes) for s in subjects}
    for s in subjects:
        if checks[s]:
            print(f"\ntargets, {s} (N = 32 and 64):")
        for c in checks[s]:
            value = "-" if c["value"] is None else _fmt(c["value"])
            bound = "" if c["bound"] is None else f" (bound {_fmt(c['bound'])})"
            print(f"  {'PASS' if c['ok'] else 'MISS'}  N={c['n']:<3} {c['target']}: {value}{bound}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "args": vars(args),
        "columns": {c: ("torch.distributed.rpc TensorPipe backend, default options"
                        if c == ANCHOR else f"torchrpc, transports={c.split('-', 1)[1]}"
                        if "-" in c else "torchrpc, default transports") for c in columns},
        "results": {c: {str(n): v for n, v in r.items()} for c, r in results.items()},
        "targets": checks,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    png = os.path.join(os.path.dirname(args.out), "scale.png")
    plot(results, columns, sizes, png)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
