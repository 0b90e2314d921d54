"""What the connection handshake costs: connection set-up and first calls.

    python benchmarks/bench_handshake.py            # about 30 s on 2 cores
    python benchmarks/bench_handshake.py -n 1000 --rounds 5

Every torchrpc connection starts with a mutual HMAC-SHA256 challenge-response
(csrc/agent/handshake.h: HELLO 56 bytes, CHALLENGE 80 bytes, PROOF 32 bytes)
before any frame. This starts a 3-worker torchrpc world on loopback (the
launcher of benchmarks/bench_rpc.py) and, from inside worker 1, measures:

  connect       plain TCP connect + close to worker 0's listen address (the
                kernel completes it; worker 0 drops the unauthenticated
                socket when it sees EOF)
  connect+hs    connect + the full handshake as worker 1 through
                torchrpc.testing.authenticated_socket (a Python client: its
                two HMACs and struct packing are in the figure; the line
                "client crypto" is that part alone) + close
  first call    rpc_sync(scripted_ops.echo) to a peer never called before (it
                dials and handshakes inside the call), with every cache the
                call path uses warmed beforehand by calls to/from worker 0, so
                the difference to the steady p50 is connection set-up; one
                sample each way per world: w1 -> w2 and w2 -> w1, over
                --rounds fresh worlds. Also the very first rpc of worker 1
                (to w0), caches cold, for reference.
  later calls   p50 of the rpc_sync calls that follow on that connection

connect and connect+hs alternate, one of each per iteration, so drift and
background load hit both alike. Prints a table; --json writes the figures.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

import torch

WORLD = 3
NAMES = [f"w{r}" for r in range(WORLD)]
KEY = "bench_handshake/"


def _pct(values, q):
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[k]


def _summary(us):
    return {"p50_us": _pct(us, 0.50), "p90_us": _pct(us, 0.90), "min_us": min(us), "n": len(us)}


def _timed_call_us(to, x):
    import scripted_ops
    import torchrpc

    t0 = time.perf_counter_ns()
    y = torchrpc.rpc_sync(to, scripted_ops.echo, (x,))
    t = (time.perf_counter_ns() - t0) / 1e3
    if not torch.equal(y, x):
        raise AssertionError(f"echo from {to}: wrong result {y!r}")
    return t


def _steady_p50_us(to, x, warmup, iters):
    for _ in range(warmup):
        _timed_call_us(to, x)
    return _pct([_timed_call_us(to, x) for _ in range(iters)], 0.50)


def _handshake_loop(n, warmup):
    """Worker 1: plain connects vs authenticated connects to worker 0."""
    import torchrpc
    import torchrpc.testing as tt

    state = torchrpc.api._current()
    job_id, secret = state.credentials
    me = state.self_info.id
    addr0 = json.loads(state.store.get("torchrpc/worker/0"))["address"]
    host, port = addr0.rsplit(":", 1)
    port = int(port)
    clock = time.perf_counter_ns

    def plain():
        t0 = clock()
        s = socket.create_connection((host, port), timeout=10.0)  # as authenticated_socket
        s.close()
        return (clock() - t0) / 1e3

    def authed():
        t0 = clock()
        s = tt.authenticated_socket(addr0, me, 0, secret, job_id)
        s.close()
        return (clock() - t0) / 1e3

    def crypto():
        # authenticated_socket's local work without I/O: nonce, HELLO, 2 MACs.
        t0 = clock()
        nonce = os.urandom(32)
        tt.struct.pack("<IHHqq", tt._HS_MAGIC, tt._HS_VERSION, 0, me, 0)
        other = nonce  # any 32 bytes
        tt._handshake_mac(secret, job_id, b"torchrpc handshake v1 listener", me, 0, nonce, other)
        tt._handshake_mac(secret, job_id, b"torchrpc handshake v1 dialer", me, 0, nonce, other)
        return (clock() - t0) / 1e3

    for _ in range(warmup):
        plain()
        authed()
    a, b, c = [], [], []
    for _ in range(n):
        a.append(plain())
        b.append(authed())
        c.append(crypto())
    return {"connect": _summary(a), "connect_hs": _summary(b), "client_crypto": _summary(c),
            "address": addr0}


def _worker(rank, port, cfg, first_round, results):
    torch.set_num_threads(1)
    try:
        import torchrpc

        torchrpc.init_rpc(
            NAMES[rank], rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}",
            options=torchrpc.RpcOptions(num_worker_threads=4, rpc_timeout=60.0,
                                        init_timeout=60.0, shutdown_timeout=60.0),
        )
        store = torchrpc.api._current().store
        x = torch.arange(4, dtype=torch.float32)
        out = {}
        try:
            if rank == 1:
                # The very first rpc of this process: dial + handshake + cold caches.
                out["cold_first_us"] = _timed_call_us("w0", x)
            # Warm every cache of the echo call path without touching w1<->w2:
            # w1 and w2 call w0 (caller side), w0 calls w1 and w2 (callee side).
            if rank == 0:
                for to in ("w1", "w2"):
                    for _ in range(cfg.warm):
                        _timed_call_us(to, x)
            else:
                out["w0_steady_p50_us"] = _steady_p50_us("w0", x, cfg.warm, cfg.warm)
            store.add(KEY + "warm", 1)
            while int(store.add(KEY + "warm", 0)) < WORLD:
                time.sleep(0.01)
            if rank == 1:
                out["fresh_first_us"] = _timed_call_us("w2", x)  # w1 dials w2 here
                store.set(KEY + "w1_first_done", "1")
                store.wait([KEY + "w2_first_done"])
                out["fresh_steady_p50_us"] = _steady_p50_us("w2", x, 50, cfg.calls)
                if first_round:
                    out.update(_handshake_loop(cfg.n, cfg.hs_warmup))
            elif rank == 2:
                store.wait([KEY + "w1_first_done"])
                out["fresh_first_us"] = _timed_call_us("w1", x)  # w2 dials w1 here
                store.set(KEY + "w2_first_done", "1")
                out["fresh_steady_p50_us"] = _steady_p50_us("w1", x, 50, cfg.calls)
            results.put(("result", rank, out, ""))
        finally:
            torchrpc.shutdown(graceful=True, timeout=60.0)
    except BaseException:
        results.put(("result", rank, {}, traceback.format_exc()))
    results.put(("exit", rank))


def _fmt(v):
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=300, help="connections per measure (default 300)")
    ap.add_argument("--hs-warmup", type=int, default=20, help="untimed connections of each kind first")
    ap.add_argument("--warm", type=int, default=100, help="warm-up calls per caller/callee pair")
    ap.add_argument("--calls", type=int, default=300, help="timed later calls for the steady p50")
    ap.add_argument("--rounds", type=int, default=3,
                    help="fresh 3-worker worlds, for more first-call samples (default 3); "
                    "the connection loop runs in the first only")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--timeout", type=float, default=180.0)
    cfg = ap.parse_args(argv)

    import multiprocessing as mp

    import bench_rpc  # the launcher; imported here so the workers need not compile its scripts

    bench_rpc.WORLD_SIZE = WORLD  # run_workers starts bench_rpc.WORLD_SIZE processes
    ctx = mp.get_context("spawn")
    t0 = time.monotonic()
    rounds = []  # per round: {rank: out}
    for i in range(cfg.rounds):
        results = ctx.Queue()
        got, errors = {}, []

        def handle(msg, got=got, errors=errors):
            _, rank, out, err = msg
            if err:
                errors.append(f"w{rank}:\n{err}")
                return (10.0, "gave up after a worker failed")
            got[rank] = out
            return None

        bench_rpc.run_workers(ctx, _worker, (bench_rpc.free_ports(1)[0], cfg, i == 0, results),
                              results, "bench-hs", cfg.timeout, handle, errors,
                              timeout_error=f"did not finish within {cfg.timeout:.0f} s",
                              died_error="{name} died (exit code {code})", terminate=True)
        if errors or 1 not in got or 2 not in got:
            print(f"FAILED (round {i + 1}):", *errors, sep="\n", file=sys.stderr)
            return 1
        rounds.append(got)
    elapsed = time.monotonic() - t0

    w1 = rounds[0][1]
    c, h, k = w1["connect"], w1["connect_hs"], w1["client_crypto"]
    print(f"bench_handshake: torch {torch.__version__}, {os.cpu_count()} CPUs, loopback, "
          f"w1 -> w0, n={c['n']} each, {cfg.rounds} worlds of {WORLD} workers\n")
    rows = [
        ("connect + close (plain TCP)", c["p50_us"], c["p90_us"]),
        ("connect + handshake + close", h["p50_us"], h["p90_us"]),
        ("  difference = handshake cost", h["p50_us"] - c["p50_us"], h["p90_us"] - c["p90_us"]),
        ("  of which Python client crypto", k["p50_us"], k["p90_us"]),
    ]
    print(f"{'connection set-up':<36}{'p50 us':>9}{'p90 us':>9}")
    for name, p50, p90 in rows:
        print(f"{name:<36}{_fmt(p50):>9}{_fmt(p90):>9}")

    # First calls: one sample per world and direction; medians over the worlds.
    fresh = [(r[src]["fresh_first_us"], r[src]["fresh_steady_p50_us"])
             for r in rounds for src in (1, 2)]
    cold = [(r[1]["cold_first_us"], r[1]["w0_steady_p50_us"]) for r in rounds]
    med = statistics.median
    print(f"\n{'first rpc_sync (scripted echo)':<36}{'samples':>8}{'first us':>10}"
          f"{'later p50':>10}{'extra us':>10}")
    for name, pairs in (("fresh peer, warm caches (w1<->w2)", fresh),
                        ("very first rpc, cold (w1 -> w0)", cold)):
        print(f"{name:<36}{len(pairs):>8}{_fmt(med(f for f, _ in pairs)):>10}"
              f"{_fmt(med(p for _, p in pairs)):>10}{_fmt(med(f - p for f, p in pairs)):>10}")
    print("  fresh-peer samples, first/later us: "
          + ", ".join(f"{f:.0f}/{p:.0f}" for f, p in fresh))
    print(f"\n(medians over the samples; later p50: {cfg.calls} calls after 50 warm-up on the "
          f"same connection, w1 -> w0 from {cfg.warm} calls)\nelapsed {elapsed:.1f} s")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"rounds": [{str(k): v for k, v in r.items()} for r in rounds],
                       "elapsed_s": elapsed, "n": cfg.n}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
