"""One worker of tests/test_multihost.py, run inside a network namespace:

    ip netns exec NS python -m tests.programs.multihost_worker SCENARIO OUT_DIR

from the repository root, with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
and TORCHRPC_SECRET in the environment (init_method env://). It runs
SCENARIO's body for its rank and writes OUT_DIR/result-RANK.json:
{"ok": true, "result": {...}} or {"ok": false, "error": traceback}.

The test and the workers meet through small files in OUT_DIR (`signal` /
`wait_for`): e.g. rank 0 signals "ready_for_cut", the test pulls a cable
and signals "cut" with the time.monotonic() it did so (namespaces share
the clock). A watchdog ends the process after --max-seconds whatever
happens, so a worker outlives neither a hung call nor a killed test.
Checks are recorded, not asserted, so a failure reports everything the
worker saw; the test asserts.
"""

import argparse
import faulthandler
import json
import os
import signal as signal_mod
import sys
import threading
import time
import traceback
import warnings

import torch

import scripted_ops
import torchrpc
import torchrpc.autograd as dist_autograd

OUT = ""
RANK = -1


# -- functions every worker registers (same module, same qualified names) ----


@torch.jit.script
def affine(x: torch.Tensor, a: float) -> torch.Tensor:
    return x * a + 1.0


@torch.jit.script
def fetch_rref(r: torch.classes.torchrpc.RRef) -> torch.Tensor:
    v = r.to_here()
    assert isinstance(v, torch.Tensor)
    return v


@torch.jit.script
def rref_owner(r: torch.classes.torchrpc.RRef) -> str:
    return r.owner_name()


torchrpc.register(affine)
torchrpc.register(fetch_rref)
torchrpc.register(rref_owner)


# -- meeting the test ------------------------------------------------------------


def signal(name, payload=None):
    """Creates OUT/event-NAME (atomically) holding `payload` as JSON."""
    path = os.path.join(OUT, f"event-{name}")
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f)
    os.rename(path + ".tmp", path)


def wait_for(name, timeout):
    """The payload of event NAME; TimeoutError after `timeout` seconds."""
    path = os.path.join(OUT, f"event-{name}")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"w{RANK}: no event {name!r} after {timeout} s")
        time.sleep(0.01)
    with open(path) as f:
        return json.load(f)


def checkpoint(res):
    """Writes what this worker saw so far to OUT/partial-RANK.json, so that a
    test that gives up on a hung worker can still show how far it got."""
    path = os.path.join(OUT, f"partial-{RANK}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, default=repr)
    os.rename(path + ".tmp", path)


def outcome(fn, *args, **kwargs):
    """Runs fn and describes how it went (never raises)."""
    t0 = time.monotonic()
    try:
        value = fn(*args, **kwargs)
        return {"ok": True, "value": value, "seconds": time.monotonic() - t0}
    except BaseException as e:  # noqa: B036  (recorded for the test)
        return {"ok": False, "seconds": time.monotonic() - t0, **describe(e)}


def describe(e):
    return {
        "type": type(e).__name__,
        "message": str(e)[:2000],
        "rpc_error": isinstance(e, torchrpc.RpcError),
        "peer_lost": isinstance(e, torchrpc.PeerLostError),
        "timeout": isinstance(e, torchrpc.RpcTimeoutError),
    }


def init(**options):
    """init_rpc over env:// as w<RANK>; returns where it listens."""
    t0 = time.monotonic()
    torchrpc.init_rpc(
        f"w{RANK}", init_method="env://", options=torchrpc.RpcOptions(**options)
    )
    state = torchrpc._handle._state
    address = state.agent.address if state is not None else None
    return {"address": address, "init_seconds": time.monotonic() - t0}


def shutdown(**kwargs):
    """shutdown(**kwargs), with its duration, warnings and exception."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = outcome(torchrpc.shutdown, **kwargs)
    out.pop("value", None)
    out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return out


def same(a, b):
    return bool(a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6))


# -- scenarios ---------------------------------------------------------------------

SIZES = [4, 16 * 1024, 1024 * 1024]  # float32 elements: 16 B, 64 KiB, 4 MiB


def scenario_calls(rank, world):
    res = {"init": init(rpc_timeout=30.0, shutdown_timeout=30.0, init_timeout=90.0)}
    me = f"w{rank}"
    peers = [f"w{r}" for r in range(world) if r != rank]
    gen = torch.Generator().manual_seed(rank)
    checks = res["checks"] = []

    def check(what, ok, detail=""):
        checks.append({"what": what, "ok": bool(ok), "detail": str(detail)[:500]})

    for to in peers:
        check(f"{me}->{to} worker_name", torchrpc.rpc_sync(to, scripted_ops.worker_name) == to)
        for n in SIZES:
            x = torch.randn(n, generator=gen)
            y = torchrpc.rpc_sync(to, affine, (x, 3.0))
            check(f"{me}->{to} script affine n={n}", same(y, x * 3.0 + 1.0))
            z = torchrpc.rpc_sync(to, torch.add, (x, x))
            check(f"{me}->{to} torch.add n={n}", torch.equal(z, x + x))
    checkpoint(res)
    # Pipelined: 4 MiB both ways to every peer at once.
    x = torch.randn(SIZES[-1], generator=gen)
    futs = [torchrpc.rpc_async(to, torch.add, (x, float(i))) for i, to in enumerate(peers)]
    for i, f in enumerate(futs):
        check(f"{me}->{peers[i]} rpc_async 4 MiB", torch.equal(f.wait(), x + float(i)))

    if rank == 0:
        # RRefs across hosts: owned by w1, created by w0, fetched by w2.
        x = torch.randn(1000, generator=gen)
        r = torchrpc.remote("w1", affine, (x, 2.0))
        check("remote owner", r.owner_name() == "w1", r.owner_name())
        v = torchrpc.rpc_sync("w2", fetch_rref, (r,))
        check("w2 to_here of w1's RRef", same(v, x * 2.0 + 1.0))
        check("w2 sees owner w1", torchrpc.rpc_sync("w2", rref_owner, (r,)) == "w1")
        check("w0 to_here", same(r.to_here(), x * 2.0 + 1.0))
        big = torch.randn(SIZES[-1], generator=gen)
        r2 = torchrpc.remote("w2", torch.add, (big, 1.0))  # 4 MiB owned by w2
        v2 = torchrpc.rpc_sync("w1", fetch_rref, (r2,))
        check("w1 to_here of w2's 4 MiB RRef", torch.equal(v2, big + 1.0))
        del r, r2
        checkpoint(res)

        # Distributed autograd across hosts.
        t = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        with dist_autograd.context() as ctx:
            loss = torchrpc.rpc_sync("w1", torch.mul, (t, 2)).sum()
            dist_autograd.backward(ctx, [loss])
            g = dist_autograd.get_gradients(ctx)
            check("grad via w1 == 2", t in g and torch.equal(g[t], torch.full((3,), 2.0)),
                  g.get(t))
        with dist_autograd.context() as ctx:
            a = torchrpc.rpc_sync("w1", torch.mul, (t, 2))
            b = torchrpc.rpc_sync("w2", affine, (a, 3.0))  # 6 t + 1
            loss = (b * b).sum()  # d/dt = 2 (6t + 1) * 6
            dist_autograd.backward(ctx, [loss])
            g = dist_autograd.get_gradients(ctx)
            want = 12.0 * (6.0 * t.detach() + 1.0)
            check("grad via w1, w2 == 12 (6t + 1)", t in g and same(g[t], want), g.get(t))
        check("no autograd grads in .grad", t.grad is None)

    checkpoint({**res, "shutdown": "in progress"})
    res["shutdown"] = shutdown(graceful=True)
    return res


PEER_TIMEOUT = 2.0


def scenario_partition(rank, world):
    """Rank 2's cable is pulled while rank 0 waits on a 10 s call to it."""
    # shutdown_timeout > peer_timeout + 1: a shutdown that waits it out fails the test.
    opts = dict(peer_timeout=PEER_TIMEOUT, rpc_timeout=30.0, shutdown_timeout=4.0,
                init_timeout=90.0)
    res = {"init": init(**opts)}
    one = torch.ones(8)
    res["before"] = {
        to: outcome(lambda to=to: bool(torch.equal(
            torchrpc.rpc_sync(to, torch.add, (one, 1.0), timeout=10), one + 1)))
        for to in (f"w{r}" for r in range(world) if r != rank)
    }
    signal(f"before_done_{rank}")
    for r in range(world):
        wait_for(f"before_done_{r}", 90)

    if rank == 0:
        done_at = []
        fut = torchrpc.rpc_async("w2", scripted_ops.sleep_ms, (10_000,), timeout=0)
        fut.add_done_callback(lambda f: done_at.append(time.monotonic()))
        time.sleep(0.3)  # the request is on w2 by now
        res["pending_done_before_cut"] = fut.done()
        signal("ready_for_cut")
        t_cut = wait_for("cut", 60)["t"]
        limit = PEER_TIMEOUT + 1.0
        deadline = t_cut + limit + 4.0  # wait longer than the bound, to measure it
        while not fut.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if fut.done():
            out = outcome(fut.wait)
            out["after_cut_s"] = (done_at[0] if done_at else time.monotonic()) - t_cut
        else:
            out = {"ok": None, "still_pending_after_s": time.monotonic() - t_cut}
        out.pop("value", None)
        res["pending"] = out
        checkpoint(res)
        # A new call to the lost worker must fail too, not hang.
        res["new_call_to_w2"] = outcome(
            lambda: torchrpc.rpc_sync("w2", torch.add, (one, 1.0), timeout=3) is not None)
        checkpoint(res)
        res["w0_to_w1_after"] = outcome(lambda: bool(torch.equal(
            torchrpc.rpc_sync("w1", affine, (one, 2.0), timeout=5), one * 2 + 1)))
        signal("w0_done")
    elif rank == 1:
        t_cut = wait_for("cut", 60)["t"]
        res["w1_to_w0_right_after_cut"] = outcome(lambda: bool(torch.equal(
            torchrpc.rpc_sync("w0", torch.add, (one, 2.0), timeout=5), one + 2)))
        checkpoint(res)
        # And again once w2's loss must have been noticed everywhere.
        time.sleep(max(0.0, t_cut + PEER_TIMEOUT + 1.5 - time.monotonic()))
        res["w1_to_w0_after_detection"] = outcome(lambda: bool(torch.equal(
            torchrpc.rpc_sync("w0", affine, (one, 3.0), timeout=5), one * 3 + 1)))
        wait_for("w0_done", 60)
    else:
        wait_for("cut", 60)
        # Cut off: nothing to check here. Stay up (the test kills us) so that
        # nothing this process does at exit can reach the others.
        wait_for("never", 150)
    checkpoint({**res, "shutdown": "in progress"})
    res["shutdown"] = shutdown(graceful=True)
    return res


def scenario_delay_loss(rank, world):
    """Rank 0 makes 50 calls to rank 1, whose link delays and drops packets."""
    res = {"init": init(rpc_timeout=30.0, shutdown_timeout=60.0, init_timeout=90.0)}
    if rank == 0:
        x = torch.arange(256, dtype=torch.float32)
        res["warmup"] = outcome(lambda: bool(torch.equal(
            torchrpc.rpc_sync("w1", torch.add, (x, 1.0), timeout=10), x + 1)))
        signal("ready_for_impair")
        wait_for("impaired", 60)
        calls = []
        t0 = time.monotonic()
        for i in range(50):
            out = outcome(torchrpc.rpc_sync, "w1", torch.add, (x, float(i)), timeout=5)
            if out["ok"]:
                out["ok"] = "right" if torch.equal(out.pop("value"), x + float(i)) else "wrong"
            calls.append(out)
            res["calls"] = calls
            checkpoint(res)
        res["run_seconds"] = time.monotonic() - t0
        signal("calls_done")
    checkpoint({**res, "shutdown": "in progress"})
    res["shutdown"] = shutdown(graceful=True)
    return res


MARKER = "multihost_marker_from_w{}"


def marker_present(name):
    try:
        torch.ops.torchrpc.param_get(name)
        return True
    except Exception:
        return False


def scenario_bad_secret(rank, world):
    """Rank 2 holds another secret than ranks 0 and 1."""
    opts = dict(rpc_timeout=10.0, shutdown_timeout=5.0, init_timeout=90.0)
    res = {"init": outcome(init, **opts)}
    res["init"].pop("value", None)
    if not res["init"]["ok"]:
        # Let the others go on (and report) rather than wait for us.
        signal({0: "w0_called", 2: "w2_called"}.get(rank, "w1_gave_up"))
        return res
    one = torch.ones(4)
    if rank == 2:
        for to in ("w0", "w1"):
            res[f"call_{to}"] = outcome(
                torchrpc.rpc_sync, to, scripted_ops.param_put, (MARKER.format(2), one), timeout=5)
            res[f"call_{to}"].pop("value", None)
        checkpoint(res)
        signal("w2_called")
        wait_for("w0_called", 90)
        res["marker_from_w0_present"] = marker_present(MARKER.format(0))
    else:
        other = "w1" if rank == 0 else "w0"
        res["good_call"] = outcome(lambda: bool(torch.equal(
            torchrpc.rpc_sync(other, torch.add, (one, 1.0), timeout=5), one + 1)))
        if rank == 0:
            # The other direction: w2 must not run what w0 sends either.
            res["call_w2"] = outcome(
                torchrpc.rpc_sync, "w2", scripted_ops.param_put, (MARKER.format(0), one),
                timeout=5)
            res["call_w2"].pop("value", None)
            checkpoint(res)
            signal("w0_called")
        wait_for("w2_called", 90)
        time.sleep(0.5)  # a request that did get through has run by now
        res["marker_from_w2_present"] = marker_present(MARKER.format(2))
    checkpoint({**res, "shutdown": "in progress"})
    res["shutdown"] = shutdown(graceful=True)
    return res


SCENARIOS = {
    "calls": scenario_calls,
    "partition": scenario_partition,
    "delay_loss": scenario_delay_loss,
    "bad_secret": scenario_bad_secret,
}


def main():
    global OUT, RANK
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("out_dir")
    p.add_argument("--max-seconds", type=float, default=180.0)
    a = p.parse_args()
    OUT = a.out_dir
    RANK = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)

    def watchdog():
        time.sleep(a.max_seconds)
        sys.stderr.write(f"w{RANK}: watchdog: still running after {a.max_seconds} s, exiting\n")
        faulthandler.dump_traceback(all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    # `kill -USR1` prints every thread's Python stack to the log (the test
    # does so to workers it gives up on).
    faulthandler.register(signal_mod.SIGUSR1, all_threads=True)
    try:
        report = {"ok": True, "result": SCENARIOS[a.scenario](RANK, world)}
    except BaseException:  # noqa: B036
        report = {"ok": False, "error": traceback.format_exc()}
    path = os.path.join(OUT, f"result-{RANK}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, default=repr)
    os.rename(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip atexit: RPC was shut down above (or is beyond saving)


if __name__ == "__main__":
    main()
