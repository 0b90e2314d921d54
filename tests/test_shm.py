"""The shared-memory transport, over real worker processes on one host.

What it promises (and these tests hold it to):
- RpcOptions(transports=...) picks the transports, in order of preference;
  None means TORCHRPC_TRANSPORTS, else ["shm", "tcp"], so same-host peers use
  shared memory by default. Peers with no transport in common cannot talk:
  their calls fail with a torchrpc error that says so.
- each direction has a ring (shm_ring_bytes; a larger message streams
  through it) and a tensor pool (shm_pool_bytes): a tensor is copied once
  into the pool, the receiver's tensor is a view of it, and the slot comes
  back when that tensor is freed, in any order; a dry pool (or a tensor too
  big for it) sends the bytes through the ring instead, never deadlocking.
- debug_info()["connections"][peer] tells, for connections this worker
  dialed, the transport and, for shm, pool_bytes / pool_in_use_bytes /
  pool_sends / pool_fallbacks.
- segments are memfds, never files in /dev/shm; a SIGKILLed or SIGSTOPped
  peer fails every call waiting on it (senders blocked on its full ring
  included) with PeerLostError within peer_timeout (+ slack), as on TCP.

Every test is bounded (run_workers' timeout, or hard_timeout with World), so
nothing can hang the suite.
"""

import gc
import os
import random
import signal
import socket
import threading
import time

import pytest
import torch
from rpc_harness import assert_transport, run_workers, transports_used
from worlds import World, future_outcome, hard_timeout

import scripted_ops
import torchrpc

SHM = {"python_udf": True, "transports": ["shm"]}
SMALL_RING = 1 << 16  # the smallest ring a worker accepts
POOLED = 256 << 10  # bytes of one tensor that surely goes through the pool (>= 16 KiB)
PEER_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 0.5
LOST_WITHIN = PEER_TIMEOUT + 1.0


# -- helpers (run in the workers) -----------------------------------------------------


def pool_stats(peer):
    """This worker's shm connection to `peer` (one it dialed) from debug_info()."""
    conns = torchrpc.debug_info()["connections"]
    assert peer in conns, f"{torchrpc.get_worker_info().name} has no connection to {peer}: {conns}"
    c = conns[peer]
    assert c["transport"] == "shm", c
    return c


def wait_pool_in_use(peer, want, within=10.0):
    """Polls pool_in_use_bytes for `peer` until it is `want`; returns the last stats."""
    deadline = time.monotonic() + within
    while True:
        gc.collect()
        c = pool_stats(peer)
        if c["pool_in_use_bytes"] == want or time.monotonic() > deadline:
            return c
        time.sleep(0.02)


def barrier(key, n):
    """Every one of the n workers has reached this point (over the rendezvous store)."""
    store = torchrpc.api._current().store
    store.add(key, 1)
    deadline = time.monotonic() + 60
    while store.add(key, 0) < n:
        assert time.monotonic() < deadline, f"barrier {key} never filled"
        time.sleep(0.01)


def pooled_tensor(seed, nbytes=POOLED):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, generator=g)


_kept = []  # tensors a callee holds on to (their pool slots stay taken)


def keep(t):
    """Holds `t` (a view of the caller's pool when it came through it); its checksum."""
    _kept.append(t)
    return int(t.sum())


def free_kept(seed, count=None):
    """Frees `count` (all: None) held tensors in a random order; how many are left."""
    rng = random.Random(seed)
    n = len(_kept) if count is None else count
    for _ in range(n):
        del _kept[rng.randrange(len(_kept))]
    gc.collect()
    return len(_kept)


def echo_payload(payload):
    return payload


# -- a message larger than the ring -------------------------------------------------------


def big_payload(seed):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(1 << 20, generator=g)  # 4 MiB
    rng = random.Random(seed)
    return {
        "big": big,
        "strided": big[1::3],  # a view: only its elements must arrive
        "ints": torch.arange(300_000, dtype=torch.int64) * seed,
        "text": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 << 20)),
        "list": [rng.random() for _ in range(100_000)],
        "small": torch.tensor([seed, -seed], dtype=torch.float64),
    }


def same_payload(a, b):
    return (a.keys() == b.keys()
            and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                    for k in a))


def body_larger_than_ring(rank):
    peer = f"w{1 - rank}"
    payload = big_payload(rank + 1)
    barrier("both_up", 2)  # both directions at once
    back = torchrpc.rpc_sync(peer, echo_payload, (payload,), timeout=60)
    scripted = torchrpc.rpc_sync(peer, scripted_ops.echo, (payload["big"],), timeout=60)
    return {
        "python": same_payload(payload, back),
        "script": torch.equal(scripted, payload["big"]),
        "stats": pool_stats(peer),
    }


@pytest.mark.parametrize("pool_bytes", [64 << 20, 1 << 20], ids=["pool", "pool_too_small"])
def test_message_larger_than_the_ring_round_trips_both_ways(pool_bytes):
    options = {**SHM, "shm_ring_bytes": SMALL_RING, "shm_pool_bytes": pool_bytes}
    outs = run_workers(body_larger_than_ring, 2, options=options, timeout=120)
    for rank, out in enumerate(outs):
        assert out["python"], f"w{rank}'s Python payload came back changed"
        assert out["script"], f"w{rank}'s 4 MiB tensor came back changed"
        stats = out["stats"]
        assert stats["pool_bytes"] == pool_bytes, stats
        if pool_bytes >= 8 << 20:
            assert stats["pool_sends"] >= 2, stats  # the 4 MiB tensor, twice
        else:  # a 4 MiB tensor cannot fit in a 1 MiB pool: it streams through the ring
            assert stats["pool_fallbacks"] >= 2, stats


# -- many concurrent senders ------------------------------------------------------------

N_THREADS = 8
CALLS_PER_THREAD = 24
SIZES = [0, 1, 100, 4_000, 5_000, 70_000, 300_000]  # int32 elements: inline, pool, > ring


def tagged(tag, n):
    return torch.arange(n, dtype=torch.int32) ^ tag


def check_tagged(tag, t):
    """What a callee returns: its checksum of the tensor and the tensor plus one."""
    return tag, int(t.sum()), t + 1


def sender_thread(rank, index, peers, bad):
    rng = random.Random(rank * 100 + index)
    window = []
    for i in range(CALLS_PER_THREAD):
        peer = peers[i % len(peers)]
        tag = (rank << 20) | (index << 12) | i
        n = rng.choice(SIZES)
        x = tagged(tag, n)
        if i % 3 == 0:  # TorchScript too: no pickling on either side
            window.append(("script", tag, x, torchrpc.rpc_async(peer, scripted_ops.add_one, (x,))))
        else:
            window.append(("python", tag, x, torchrpc.rpc_async(peer, check_tagged, (tag, x))))
        if len(window) >= 4 or i == CALLS_PER_THREAD - 1:
            for kind, tag, x, fut in window:
                try:
                    got = fut.wait()
                except Exception as e:
                    bad.append((tag, f"{type(e).__name__}: {e}"))
                    continue
                if kind == "script":
                    ok = torch.equal(got, x + 1)
                else:
                    ok = got[0] == tag and got[1] == int(x.sum()) and torch.equal(got[2], x + 1)
                if not ok:
                    bad.append((tag, "wrong result"))
            window.clear()


def body_concurrent(rank):
    n = 3
    peers = [f"w{r}" for r in range(n) if r != rank]
    barrier("start", n)
    bad = []
    threads = [threading.Thread(target=sender_thread, args=(rank, i, peers, bad))
               for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    hung = sum(t.is_alive() for t in threads)
    barrier("done", n)  # every worker's calls are answered: peers hold no slot of ours
    in_use = {p: wait_pool_in_use(p, 0) for p in peers}
    return {"bad": bad, "hung": hung, "calls": N_THREADS * CALLS_PER_THREAD, "stats": in_use,
            "used": transports_used()}


def test_many_concurrent_senders_all_answered():
    options = {**SHM, "shm_ring_bytes": SMALL_RING, "shm_pool_bytes": 2 << 20}
    outs = run_workers(body_concurrent, 3, options=options, timeout=240)
    assert_transport([o["used"] for o in outs], "shm")
    for rank, out in enumerate(outs):
        assert out["hung"] == 0, f"w{rank}: {out['hung']} sender threads never finished"
        assert out["bad"] == [], f"w{rank}: {len(out['bad'])} bad calls, e.g. {out['bad'][:5]}"
        for peer, stats in out["stats"].items():
            assert stats["pool_in_use_bytes"] == 0, (f"w{rank}", peer, stats)
            assert stats["pool_sends"] > 0, (f"w{rank}", peer, stats)


# -- pool slots: freed out of order, and a pool that runs dry --------------------------------


def send_kept(first_seed, count, nbytes=POOLED):
    """Sends `count` tensors for w1 to keep; True if every checksum matched."""
    ok = True
    for seed in range(first_seed, first_seed + count):
        t = pooled_tensor(seed, nbytes)
        ok = ok and torchrpc.rpc_sync("w1", keep, (t,), timeout=30) == int(t.sum())
    return ok


def dial_and_stats(peer):
    """Makes sure this worker has dialed `peer` (a call without tensors); its stats."""
    torchrpc.rpc_sync(peer, scripted_ops.worker_name)
    return pool_stats(peer)


def body_out_of_order(rank):
    if rank != 0:
        return None  # serves until w0 is done (graceful shutdown)
    n = 12
    out = {"before": dial_and_stats("w1")}
    out["sent_ok"] = send_kept(0, n)
    out["held"] = pool_stats("w1")
    out["half_left"] = torchrpc.rpc_sync("w1", free_kept, (7, n // 2))  # half, out of order
    deadline = time.monotonic() + 5
    while True:  # the freed slots come back
        out["half"] = pool_stats("w1")
        if (out["half"]["pool_in_use_bytes"] < out["held"]["pool_in_use_bytes"]
                or time.monotonic() > deadline):
            break
        time.sleep(0.02)
    torchrpc.rpc_sync("w1", free_kept, (8,))
    out["freed"] = wait_pool_in_use("w1", 0)
    return out


def test_tensors_freed_out_of_order_return_their_pool_slots():
    out = run_workers(body_out_of_order, 2, options=SHM, timeout=60)[0]
    n = 12
    assert out["sent_ok"], "a kept tensor arrived changed"
    before, held, half, freed = out["before"], out["held"], out["half"], out["freed"]
    assert before["pool_in_use_bytes"] == 0, before
    assert held["pool_sends"] - before["pool_sends"] == n, (before, held)
    assert held["pool_fallbacks"] == before["pool_fallbacks"], held
    assert held["pool_in_use_bytes"] >= n * POOLED, held  # w1 still holds all of them
    assert out["half_left"] == n // 2
    assert n // 2 * POOLED <= half["pool_in_use_bytes"] < held["pool_in_use_bytes"], (held, half)
    assert freed["pool_in_use_bytes"] == 0, freed


def body_pool_dry(rank):
    if rank != 0:
        return None  # serves until w0 is done (graceful shutdown)
    out = {}
    pool = dial_and_stats("w1")
    out["pool"] = pool
    held_max = pool["pool_bytes"] // POOLED  # at most this many fit at once
    n = held_max + 4
    out["sent_ok"] = send_kept(100, n)  # w1 keeps every one: the pool runs dry
    out["dry"] = pool_stats("w1")
    # More calls, tensors both ways, while the pool is dry.
    x = pooled_tensor(7)
    out["echo_ok"] = all(torch.equal(torchrpc.rpc_sync("w1", scripted_ops.echo, (x,)), x)
                         for _ in range(3))
    torchrpc.rpc_sync("w1", free_kept, (3,))
    out["freed"] = wait_pool_in_use("w1", 0)
    out["resent_ok"] = send_kept(200, 2)
    out["resumed"] = pool_stats("w1")
    torchrpc.rpc_sync("w1", free_kept, (4,))
    return out


def test_a_dry_pool_falls_back_to_the_ring_and_recovers():
    options = {**SHM, "shm_pool_bytes": 1 << 20}
    out = run_workers(body_pool_dry, 2, options=options, timeout=60)[0]
    pool, dry, freed, resumed = out["pool"], out["dry"], out["freed"], out["resumed"]
    assert pool["pool_bytes"] == 1 << 20, pool
    assert out["sent_ok"] and out["echo_ok"] and out["resent_ok"], out
    n = pool["pool_bytes"] // POOLED + 4
    assert dry["pool_fallbacks"] - pool["pool_fallbacks"] >= 4, dry  # no room for the rest
    assert 0 < dry["pool_sends"] - pool["pool_sends"] <= n, dry
    assert 0 < dry["pool_in_use_bytes"] <= dry["pool_bytes"], dry
    assert freed["pool_in_use_bytes"] == 0, freed
    assert resumed["pool_sends"] - freed["pool_sends"] == 2, (freed, resumed)  # the pool again
    assert resumed["pool_fallbacks"] == freed["pool_fallbacks"], (freed, resumed)


# -- lost peers: killed or frozen -------------------------------------------------------------

_calls = []  # (what, future or None, outcome list) started by cmd_start_calls


def sleep_marked(path, seconds):
    with open(path, "w"):
        pass
    time.sleep(seconds)
    return seconds


def cmd_start_slow_calls(marker_dir, n):
    paths = [os.path.join(marker_dir, f"slow-{i}") for i in range(n)]
    for p in paths:
        _calls.append(("slow", torchrpc.rpc_async("w1", sleep_marked, (p, 30.0), timeout=60)))
    return paths


def _blocked_sender(i, results):
    """Sends a tensor bigger than the pool and the ring: with w1 frozen, the
    ring fills and this sender waits for room (in rpc_async or after it)."""
    t0 = time.monotonic()
    try:
        fut = torchrpc.rpc_async("w1", scripted_ops.echo, (pooled_tensor(i, 4 << 20),),
                                 timeout=60)
        results[i] = ("sent", time.monotonic() - t0, fut)
    except Exception as e:
        results[i] = ("raised", time.monotonic() - t0, (type(e).__name__, str(e), time.monotonic()))


_senders = {}


def cmd_start_blocked_senders(n):
    for i in range(n):
        t = threading.Thread(target=_blocked_sender, args=(i, _senders), daemon=True)
        t.start()
        _calls.append(("sender", t))
    return n


def cmd_await_calls(within):
    """Outcome of every call started above, each due within `within` s."""
    deadline = time.monotonic() + within
    out = []
    for kind, what in _calls:
        if kind == "slow":
            out.append(("slow",) + future_outcome(what, deadline - time.monotonic())[:3])
    for kind, what in _calls:
        if kind != "sender":
            continue
        what.join(max(0.0, deadline - time.monotonic()))
        if what.is_alive():
            out.append(("sender", "hung in rpc_async", "", None))
    for i, (how, took, value) in sorted(_senders.items()):
        if how == "raised":
            out.append(("sender",) + value)
        else:
            out.append(("sender",) + future_outcome(value, deadline - time.monotonic())[:3])
    t0 = time.monotonic()
    try:
        torchrpc.rpc_sync("w1", scripted_ops.worker_name, timeout=10)
        after = ("ok", "")
    except Exception as e:
        after = (type(e).__name__, str(e))
    return {"outcomes": out, "after": after, "after_took": time.monotonic() - t0,
            "expected": len(_calls)}


def cmd_shutdown_timed():
    t0 = time.monotonic()
    try:
        torchrpc.shutdown(timeout=2 * LOST_WITHIN)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return time.monotonic() - t0, error


def dev_shm():
    return set(os.listdir("/dev/shm"))


def shm_mappings(pid):
    """(memfd mappings, /dev/shm files) that process `pid` has mapped or open."""
    with open(f"/proc/{pid}/maps") as f:
        maps = [line.split(None, 5)[-1].strip() for line in f if len(line.split(None, 5)) == 6]
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    names = maps + fds
    return ([n for n in names if n.startswith("/memfd:")],
            [n for n in names if n.startswith("/dev/shm/")])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
@hard_timeout(60)
def test_lost_peer_fails_pending_calls_and_blocked_senders(sig, tmp_path):
    options = {**SHM, "shm_ring_bytes": SMALL_RING, "shm_pool_bytes": 1 << 20,
               "peer_timeout": PEER_TIMEOUT, "heartbeat_interval": HEARTBEAT_INTERVAL}
    before = dev_shm()
    with World(2, options=options) as world:
        victim = world.pid(1)
        # World.close() resumes and kills w1 whatever happens here.
        markers = world.do(0, cmd_start_slow_calls, str(tmp_path), 3)
        deadline = time.monotonic() + 10
        while not all(os.path.exists(m) for m in markers):
            assert time.monotonic() < deadline, "the slow calls never started on w1"
            time.sleep(0.02)
        memfds, named = shm_mappings(world.pid(0))
        assert memfds, "w0 maps no memfd, yet talks to w1 over shm"
        assert not named, f"w0 uses files in /dev/shm: {named}"
        os.kill(victim, signal.SIGSTOP)  # w1 stops draining its ring
        stopped_at = time.monotonic()
        world.do(0, cmd_start_blocked_senders, 3)
        time.sleep(0.3)  # the senders fill the 64 KiB ring and wait for room
        if sig == signal.SIGKILL:
            os.kill(victim, signal.SIGKILL)
            signalled_at = time.monotonic()
        else:
            signalled_at = stopped_at  # frozen since then: heartbeats stopped
        out = world.do(0, cmd_await_calls, LOST_WITHIN + 3, timeout=LOST_WITHIN + 30)
        took_shutdown, shutdown_error = world.do(0, cmd_shutdown_timed, timeout=30)
    assert len(out["outcomes"]) == 6, out
    for what, kind, message, done_at in out["outcomes"]:
        assert kind == "PeerLostError", f"a {what} call to w1 ended as {kind}: {message}"
        assert "w1" in message, message
        took = done_at - signalled_at
        assert took < LOST_WITHIN, f"a {what} call failed {took:.2f} s after w1 was lost"
    assert out["after"][0] == "PeerLostError", out["after"]
    # A new call dials again: refused at once by a dead peer; a frozen one is
    # given up on when the handshake times out, as on TCP.
    assert out["after_took"] < (1.0 if sig == signal.SIGKILL else LOST_WITHIN), out["after_took"]
    assert took_shutdown < LOST_WITHIN, (took_shutdown, shutdown_error)
    left = dev_shm() - before
    assert not left, f"new entries in /dev/shm after the world ended: {sorted(left)}"


# -- which transport -------------------------------------------------------------------------


def body_report_transport(rank):
    torchrpc.rpc_sync(f"w{1 - rank}", scripted_ops.worker_name)
    return transports_used()


@pytest.mark.parametrize("transports, env, expected", [
    (None, None, "shm"),  # same host: shared memory by default
    (["tcp"], None, "tcp"),
    (["shm", "tcp"], None, "shm"),
    (["tcp", "shm"], None, "tcp"),  # the order is a preference
    (None, "tcp", "tcp"),  # TORCHRPC_TRANSPORTS when options leave it open
    (None, "shm,tcp", "shm"),
], ids=["default", "tcp", "shm,tcp", "tcp,shm", "env=tcp", "env=shm,tcp"])
def test_transport_choice(transports, env, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("TORCHRPC_TRANSPORTS", raising=False)
    else:
        monkeypatch.setenv("TORCHRPC_TRANSPORTS", env)  # spawned workers inherit it
    options = {} if transports is None else {"transports": transports}
    assert_transport(run_workers(body_report_transport, 2, options=options, timeout=60), expected)


def body_no_common_transport(rank):
    t0 = time.monotonic()
    try:
        torchrpc.rpc_sync(f"w{1 - rank}", scripted_ops.worker_name, timeout=30)
        error = None
    except Exception as e:
        error = (isinstance(e, torchrpc.RpcError), type(e).__name__, str(e))
    return error, time.monotonic() - t0


def test_no_common_transport_fails_clearly():
    outs = run_workers(body_no_common_transport, 2,
                       options=[{"transports": ["shm"]}, {"transports": ["tcp"]}],
                       graceful=False, timeout=60)
    for rank, (error, took) in enumerate(outs):
        assert error is not None, f"w{rank} reached w{1 - rank} with no transport in common"
        is_rpc_error, name, message = error
        assert is_rpc_error, f"w{rank} got {name}, not a torchrpc error: {message}"
        assert "transport" in message.lower(), message
        assert "shm" in message or "tcp" in message, message
        assert took < 10, f"w{rank}'s call took {took:.1f} s to fail"


# -- strangers on the shared-memory socket ---------------------------------------------


def cmd_first_call(to, timeout):
    """This worker's first call to `to`: (how it ended, seconds, the transport used)."""
    t0 = time.monotonic()
    try:
        torchrpc.rpc_sync(to, torch.add, (torch.ones(2), 1), timeout=timeout)
        how = "ok"
    except Exception as e:
        how = f"{type(e).__name__}: {e}"
    return how, time.monotonic() - t0, transports_used().get(to)


@hard_timeout(120)
def test_idle_strangers_on_the_shm_socket_do_not_lock_peers_out():
    # More idle connections than max_pending_handshakes (64): the oldest are
    # dropped to make room, so a worker's first shm dial still gets through.
    with World(2, options=SHM) as world:
        address = world.info[0]["address"]
        name = next(a for a in address.split(",") if a.startswith("shm://")).rsplit("/", 1)[1]
        strangers = []
        try:
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("\0" + name)
                strangers.append(s)
            time.sleep(0.5)
            how, took, transport = world.do(1, cmd_first_call, "w0", 10.0, timeout=30)
        finally:
            for s in strangers:
                s.close()
        assert how == "ok", how
        assert transport == "shm", transport
        assert took < 5.0, f"the first call took {took:.2f} s past 200 idle strangers"
        assert world.alive(0)
