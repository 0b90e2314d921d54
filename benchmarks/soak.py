"""Soak test: 4 workers over loopback TCP, 10^6 calls, no lost or wrong replies,
no memory growth, no RRefs left behind.

    python benchmarks/soak.py                  # 10^6 calls (make soak)
    python benchmarks/soak.py --calls 20000    # a short run

Four worker processes start with torchrpc.init_rpc (tcp://127.0.0.1:port,
rank 0 hosts the store). Every worker is a caller and a callee: it drives
its share of --calls to the three others with rpc_async, never more than
--window requests outstanding (a sliding window, oldest first), and serves
theirs. Calls are mixed: scalars, small tensors, tensors of a few KiB, now
and then a ~1 MiB tensor, and RRef traffic (about --rref-share of the calls):
remote() creates a value on one worker, the RRef is passed to a third worker
(a fork) whose TorchScript function fetches it with to_here(), or back to its
owner, or fetched here with to_here(); then it is dropped.

Checked, each a failure that makes the run exit 1:
  * every reply is the exact value expected for its call (each call carries a
    unique index and data derived from it, the reply must echo both); every
    call completes exactly once (a lost reply surfaces as RpcTimeoutError
    after --rpc-timeout seconds);
  * each worker's RSS (/proc/self/statm) when it finished driving, and again
    once everything was dropped, is within --max-rss-growth (5%) of its RSS
    after a warm-up of --warmup (10%) of its calls;
  * once all workers are done and every RRef is dropped, each worker's
    torchrpc.debug_info() shows no owned values, forks, pending children,
    unconfirmed or live users, and no pending requests.

The driver (this process) shows progress with tqdm and prints calls/s, latency
percentiles (issue to reply, under the window's load) and RSS per worker.
"""

import argparse
import array
import collections
import gc
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import random
import sys
import time
from typing import Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import torchrpc  # noqa: E402
from rpc_harness import free_port, report_from_child  # noqa: E402

WORLD_SIZE = 4
RREF_KEYS = ("owned_values", "user_forks", "pending_children", "unconfirmed_users",
             "live_users")

# ---------------------------------------------------------------------------
# Remote functions: module level, so every spawned worker registers the same
# qualified names.


@torchrpc.script
def soak_scalar(i: int, f: float) -> Tuple[int, float]:
    return i, f * 2.0


@torchrpc.script
def soak_tensor(i: int, x: Tensor) -> Tuple[int, Tensor]:
    return i, x + 1


@torchrpc.script
def soak_make(i: int, n: int) -> Tensor:
    """The value an RRef refers to: n int64 elements starting at i."""
    return torch.arange(n, dtype=torch.int64) + i


@torchrpc.script
def soak_rref_sum(r: torch.classes.torchrpc.RRef, i: int) -> Tuple[int, int]:
    """Fetches an RRef's value (here a fork, or the owner's own) and sums it."""
    v = r.to_here()
    assert isinstance(v, Tensor)
    return i, int(v.sum().item())


def rref_sum_expected(i: int, n: int) -> int:
    return n * (n - 1) // 2 + n * i


# ---------------------------------------------------------------------------
# Worker


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Calls:
    """One worker's share of the calls, issued in a sliding window."""

    def __init__(self, rank, cfg, progress):
        self.rank, self.cfg, self.progress = rank, cfg, progress
        self.n = cfg.calls // WORLD_SIZE + (1 if rank < cfg.calls % WORLD_SIZE else 0)
        self.rng = random.Random(cfg.seed * 1000 + rank)
        self.peers = [f"w{r}" for r in range(WORLD_SIZE) if r != rank]
        self.latency = array.array("d", bytes(8 * self.n))  # seconds, per call
        self.seen = bytearray(self.n)  # 1 once call j's reply was checked
        self.errors = []  # first few failures, as text
        self.error_count = 0
        self.kinds = collections.Counter()
        self.sent_bytes = 0

    def fail(self, what: str):
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(what)

    def issue(self, j: int):
        """Starts call j; returns what complete() needs."""
        cfg, rng = self.cfg, self.rng
        i = (self.rank << 40) + j  # unique over the whole run
        dst = rng.choice(self.peers)
        u = rng.random()
        t0 = time.perf_counter()
        if u < cfg.rref_share:
            return self.issue_rref(j, i, dst, t0)
        if rng.random() < cfg.mib_share:
            kind, x = "1MiB", torch.arange(1 << 18, dtype=torch.int32) + (j % 1000)
        elif u < cfg.rref_share + 0.40:
            kind, x = "scalar", None
        elif u < cfg.rref_share + 0.75:
            kind, x = "small", torch.arange(rng.randint(1, 64), dtype=torch.int64) + i
        else:
            kind, x = "KiB", torch.arange(rng.randint(256, 2048), dtype=torch.float32) + (j % 4096)
        if x is None:
            f = float(j) + 0.25
            fut = torchrpc.rpc_async(dst, soak_scalar, (i, f))
            expected = (i, f * 2.0)
        else:
            fut = torchrpc.rpc_async(dst, soak_tensor, (i, x))
            expected = (i, x)
            self.sent_bytes += x.numel() * x.element_size()
        self.kinds[kind] += 1
        self.stamp(fut, j, t0)
        return (kind, j, dst, fut, expected, None)

    def issue_rref(self, j, i, owner, t0):
        """remote() on `owner`, then one of: fork to a third worker that
        fetches it, pass it back to its owner, or to_here() from here."""
        rng = self.rng
        n = rng.randint(1, 512)
        rref = torchrpc.remote(owner, soak_make, (i, n))
        how = rng.random()
        if how < 0.7:
            third = rng.choice([p for p in self.peers if p != owner])
            kind, fut = "rref_fork", torchrpc.rpc_async(third, soak_rref_sum, (rref, i))
        elif how < 0.85:
            kind, fut = "rref_owner", torchrpc.rpc_async(owner, soak_rref_sum, (rref, i))
        else:
            kind, fut = "rref_to_here", None
        self.kinds[kind] += 1
        if fut is not None:
            self.stamp(fut, j, t0)
        return (kind, j, owner, fut, (i, rref_sum_expected(i, n)), (rref, n, t0))

    def stamp(self, fut, j, t0):
        latency = self.latency

        def done(_, j=j, t0=t0):
            latency[j] = time.perf_counter() - t0

        fut.add_done_callback(done)

    def complete(self, entry):
        kind, j, dst, fut, expected, rref_info = entry
        what = f"call {j} ({kind} to {dst})"
        try:
            if kind == "rref_to_here":
                rref, n, t0 = rref_info
                value = rref.to_here()
                self.latency[j] = time.perf_counter() - t0
                right = isinstance(value, Tensor) and torch.equal(
                    value, torch.arange(n, dtype=torch.int64) + expected[0])
                got = expected if right else ("to_here()", value)
            else:
                got = fut.wait()
        except Exception as e:
            self.fail(f"{what}: {type(e).__name__}: {e}")
            return
        if self.seen[j]:
            self.fail(f"{what}: completed twice")
        self.seen[j] = 1
        if kind in ("small", "KiB", "1MiB"):
            i, x = expected
            ok = (isinstance(got, tuple) and len(got) == 2 and got[0] == i
                  and isinstance(got[1], Tensor) and got[1].dtype == x.dtype
                  and torch.equal(got[1], x + 1))
        else:
            ok = got == expected
        if not ok:
            self.fail(f"{what}: reply {_short(got)} where {_short(expected)} was expected")

    def drive(self, on_warm):
        window = collections.deque()
        warm_at = max(1, int(self.n * self.cfg.warmup))
        tenth = max(1, self.n // 10)
        progress, slot = self.progress, self.rank
        self.rss_trace = []  # RSS after every tenth of the calls: the trend, for the report
        for j in range(self.n):
            if len(window) >= self.cfg.window:
                self.complete(window.popleft())
            window.append(self.issue(j))
            if j & 255 == 0:
                progress[slot] = j - len(window)
            if j + 1 == warm_at:
                on_warm()
            if (j + 1) % tenth == 0:
                self.rss_trace.append(rss_bytes())
        while window:
            self.complete(window.popleft())
        progress[slot] = self.n


def _short(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    if isinstance(v, Tensor):
        return f"tensor({v.dtype}, {tuple(v.shape)}, first={v.flatten()[:3].tolist()})"
    return repr(v)[:100]


def rss_after_malloc_trim() -> int:
    """RSS once glibc has returned its free memory to the system: growth
    that disappears here is allocator retention, not live objects."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def rref_state():
    gc.collect()
    info = torchrpc.debug_info()
    return {k: info[k] for k in RREF_KEYS + ("pending_requests",)}


def worker(rank, port, cfg, progress, barrier, queue):
    def run():
        torch.set_num_threads(1)
        torchrpc.init_rpc(
            f"w{rank}", rank=rank, world_size=WORLD_SIZE,
            init_method=f"tcp://127.0.0.1:{port}",
            options=torchrpc.RpcOptions(rpc_timeout=cfg.rpc_timeout, rref_leaks="warn",
                                        shutdown_timeout=cfg.phase_timeout),
        )
        barrier.wait(timeout=cfg.phase_timeout)
        calls = Calls(rank, cfg, progress)
        rss = {"start": rss_bytes()}
        t0 = time.perf_counter()
        calls.drive(on_warm=lambda: rss.__setitem__("warm", rss_bytes()))
        drive_s = time.perf_counter() - t0
        gc.collect()
        rss["end"] = rss_bytes()  # finished driving; the others may still be calling
        barrier.wait(timeout=cfg.phase_timeout)  # nobody calls anymore
        # RRef deletes travel asynchronously: wait (bounded) for the tables to empty.
        deadline = time.monotonic() + cfg.settle_timeout
        state = rref_state()
        while any(state.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            state = rref_state()
        rss["settled"] = rss_bytes()
        rss["trimmed"] = rss_after_malloc_trim()  # diagnosis only: freed but kept by malloc?
        barrier.wait(timeout=cfg.phase_timeout)  # everyone has looked at its tables
        torchrpc.shutdown(graceful=True, timeout=cfg.phase_timeout)
        return {
            "rank": rank, "calls": calls.n, "drive_s": drive_s, "rss": rss,
            "state": state, "errors": calls.errors, "error_count": calls.error_count,
            "unseen": calls.n - sum(calls.seen), "kinds": dict(calls.kinds),
            "sent_bytes": calls.sent_bytes, "latency": calls.latency.tobytes(),
            "rss_trace": calls.rss_trace,
        }

    report_from_child(rank, queue, run)


# ---------------------------------------------------------------------------
# Driver


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def supervise(cfg) -> Tuple[list, list]:
    """Runs the workers; returns (results by rank, errors)."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    progress = ctx.RawArray("q", WORLD_SIZE)
    barrier = ctx.Barrier(WORLD_SIZE)
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, cfg, progress, barrier, queue),
                         name=f"soak-w{r}", daemon=True) for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    results, errors = [None] * WORLD_SIZE, []
    bar = tqdm(total=cfg.calls, unit="call", unit_scale=True, dynamic_ncols=True,
               mininterval=0.5, smoothing=0.05)
    last_done, last_change = -1, time.monotonic()

    def take(timeout):
        """One worker's report into results/errors: False if none came, or it failed."""
        try:
            rank, ok, value = queue.get(timeout=timeout)
        except queue_mod.Empty:
            return False
        if ok:
            results[rank] = pickle.loads(value)
        else:
            errors.append(f"worker w{rank} failed:\n{value}")
        return ok

    try:
        while any(r is None for r in results):
            if not take(0.25) and errors:
                break
            done = sum(progress[:])
            bar.update(done - bar.n)
            now = time.monotonic()
            if done != last_done:
                last_done, last_change = done, now
            dead = [r for r, p in enumerate(procs) if results[r] is None and not p.is_alive()]
            if dead:
                if take(2.0):  # its last words may still be in the queue
                    continue
                if not errors:
                    errors += [f"worker w{r} died (exit code {procs[r].exitcode}) without "
                               "reporting" for r in dead]
                break
            if now - last_change > cfg.stall_timeout:
                stuck = {f"w{r}": progress[r] for r in range(WORLD_SIZE)}
                errors.append(f"no progress for {cfg.stall_timeout:g} s (calls done per worker: "
                              f"{stuck}; finished: "
                              f"{[f'w{r}' for r in range(WORLD_SIZE) if results[r]]})")
                break
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    return results, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1_000_000, help="calls in total, all workers")
    p.add_argument("--window", type=int, default=64, help="outstanding calls per caller")
    p.add_argument("--seed", type=int, default=1, help="seed of the call mix")
    p.add_argument("--rref-share", type=float, default=0.05, help="share of calls that are RRef "
                   "round trips (remote + fork/owner/to_here + drop). Each blocks a worker thread "
                   "of its callee in to_here(); a share high enough to fill all 16 threads of "
                   "two workers at once deadlocks them until --rpc-timeout (as in "
                   "torch.distributed.rpc)")
    p.add_argument("--mib-share", type=float, default=0.001, help="share of ~1 MiB tensor calls")
    p.add_argument("--warmup", type=float, default=0.10,
                   help="share of each worker's calls before its baseline RSS")
    p.add_argument("--max-rss-growth", type=float, default=0.05,
                   help="fail above this RSS growth after warm-up (0.05 = 5%%)")
    p.add_argument("--rpc-timeout", type=float, default=60.0,
                   help="seconds before an unanswered call counts as lost")
    p.add_argument("--stall-timeout", type=float, default=180.0,
                   help="seconds without progress before the driver gives up")
    p.add_argument("--settle-timeout", type=float, default=30.0,
                   help="seconds each worker waits for its RRef tables to empty at the end")
    p.add_argument("--phase-timeout", type=float, default=600.0,
                   help="seconds a worker waits for the others between phases")
    cfg = p.parse_args(argv)
    if cfg.calls < WORLD_SIZE:
        p.error(f"--calls must be at least {WORLD_SIZE}")

    print(f"soak: {WORLD_SIZE} workers over loopback TCP, {cfg.calls:,} calls, window "
          f"{cfg.window} per caller, seed {cfg.seed}")
    sys.stdout.flush()
    t0 = time.monotonic()
    results, errors = supervise(cfg)
    wall = time.monotonic() - t0
    if errors or any(r is None for r in results):
        print("\nFAILED")
        for e in errors or ["a worker did not report"]:
            print("  " + e.replace("\n", "\n  "))
        return 1

    failures = []
    latencies = []
    kinds = collections.Counter()
    for r in results:
        lat = array.array("d")
        lat.frombytes(r["latency"])
        latencies.extend(lat)
        kinds.update(r["kinds"])
        name = f"w{r['rank']}"
        if r["error_count"]:
            failures.append(f"{name}: {r['error_count']} wrong, lost or failed replies; first: "
                            + "; ".join(r["errors"][:5]))
        if r["unseen"]:
            failures.append(f"{name}: {r['unseen']} calls never completed")
        leftover = {k: v for k, v in r["state"].items() if v}
        if leftover:
            failures.append(f"{name}: debug_info() after every RRef was dropped: {leftover}")
    latencies.sort()
    drive_s = max(r["drive_s"] for r in results)
    total = sum(r["calls"] for r in results)

    print("\nsummary")
    print(f"  calls             {total:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(kinds.items()))})")
    print(f"  rate              {total / drive_s:,.0f} calls/s (driving {drive_s:.1f} s; "
          f"wall {wall:.1f} s with start-up and shutdown)")
    print(f"  latency           p50 {percentile(latencies, 0.5) * 1e3:.2f} ms, "
          f"p90 {percentile(latencies, 0.9) * 1e3:.2f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1e3:.2f} ms, "
          f"max {latencies[-1] * 1e3:.1f} ms (issue to reply, {cfg.window} outstanding "
          "per caller)")
    print(f"  errors            {sum(r['error_count'] for r in results)} wrong/lost replies, "
          f"{sum(r['unseen'] for r in results)} never completed")
    print("  RSS (MiB)         worker  start   warm    end     settled  growth   "
          "after malloc_trim (not judged)")
    max_growth = 0.0
    for r in results:
        rss = r["rss"]
        growth = max(rss["end"], rss["settled"]) / rss["warm"] - 1
        max_growth = max(max_growth, growth)
        print(f"                    w{r['rank']}      {rss['start'] / 2**20:<7.1f}"
              f"{rss['warm'] / 2**20:<8.1f}{rss['end'] / 2**20:<8.1f}"
              f"{rss['settled'] / 2**20:<9.1f}{growth * 100:+.2f}%   "
              f"{rss['trimmed'] / 2**20:.1f}")
        if growth > cfg.max_rss_growth:
            failures.append(f"w{r['rank']}: RSS grew {growth * 100:.2f}% after warm-up "
                            f"(limit {cfg.max_rss_growth * 100:g}%)")
    print("  RSS every tenth of the calls (MiB): " + "; ".join(
        f"w{r['rank']} " + " ".join(f"{v / 2**20:.0f}" for v in r["rss_trace"]) for r in results))
    print(f"  max RSS growth    {max_growth * 100:+.2f}% (limit {cfg.max_rss_growth * 100:g}%; "
          "end or settled vs warm)")
    print("  debug_info at end " + "; ".join(
        f"w{r['rank']}: " + (", ".join(f"{k}={v}" for k, v in r["state"].items() if v) or "all 0")
        for r in results))
    for f in failures:
        print("  FAIL " + f)
    print("OK" if not failures else "FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
