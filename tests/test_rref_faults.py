"""The RRef protocol under injected faults (RpcOptions(faults=...)).

Each worker's transport drops, delays and duplicates the RRef control
messages it sends (RREF_USER_DELETE, RREF_FORK_REQUEST, RREF_CHILD_ACCEPT
and their RREF_ACK replies). Those are retried until acknowledged (after
1 s, doubling up to 8 s) and are idempotent, so a random mix of create /
fork / park / relay / fetch / drop across three real workers must still
fetch exactly the right values and end with every worker's RRef tables
empty. A dropped user call surfaces as its timeout, never a hang.
"""

import collections
import faulthandler
import functools
import gc
import sys
import threading
import time

import pytest
import torch
from rpc_harness import run_workers
from test_rref import counts, drop, fetch_held, forward_held, hold

import scripted_ops
import torchrpc

WORKERS = ("w0", "w1", "w2")
# Every worker mangles the control messages it sends. Rates are chosen so that
# retries happen dozens of times a run while a chain of failed attempts long
# enough to pass SETTLE_LIMIT (six in a row: 1+2+4+8+8+8 s) stays
# negligibly rare: an attempt fails with probability 1-(1-0.1)(1-0.05) ~ 0.15.
CONTROL_FAULTS = ",".join([
    "RREF_USER_DELETE:drop:0.1",
    "RREF_USER_DELETE:dup:0.2",
    "RREF_FORK_REQUEST:dup:0.3",
    "RREF_CHILD_ACCEPT:delay:0.05",
    "RREF_ACK:drop:0.05",
    "RREF_ACK:dup:0.2",
])
FAULTS_OF_RANK = [
    # The driver makes every remote() call: delaying them lets fork requests
    # and fetches reach the owner before the call that creates the value.
    CONTROL_FAULTS + ",SCRIPT_REMOTE_CALL:delay:0.02",
    CONTROL_FAULTS + ",RREF_CHILD_ACCEPT:drop:0.1",
    CONTROL_FAULTS + ",RREF_FORK_REQUEST:drop:0.1",
]
# A call carrying an unconfirmed fork waits for the confirmation (at most 30 s
# on the callee) before it runs; no call may time out just for that.
CALL_TIMEOUT = 40.0
SETTLE_LIMIT = 30.0  # seconds for every table to empty once all is dropped
PROTOCOL_KEYS = ("owned_values", "user_forks", "pending_children", "unconfirmed_users")


@torchrpc.script
def fetch_value(r: torch.classes.torchrpc.RRef) -> torch.Tensor:
    """Runs where the RRef was forked to: fetches the value from its owner."""
    v = r.to_here()
    assert isinstance(v, torch.Tensor)
    return v


def value_of(n: int) -> torch.Tensor:
    return torch.arange(3.0) + 100.0 * n


# How a value is made on its owner: function, its args from a base tensor,
# and the value it must have.
MAKERS = {
    "echo": (scripted_ops.echo, lambda x: (x,), lambda x: x),
    "add": (scripted_ops.add, lambda x: (x, x), lambda x: x + x),
    "builtin": (torch.add, lambda x: (x, 1), lambda x: x + 1),
}


def same(got, want):
    return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)


def settle_protocol(limit=SETTLE_LIMIT):
    """Polls every worker's debug_info until the protocol's tables are empty
    everywhere or `limit` seconds pass. Returns the last counts and the
    history of the non-zero counts seen, as (seconds, counts)."""
    t0 = time.monotonic()
    history = []
    while True:
        gc.collect()
        seen = {w: torchrpc.rpc_sync(w, counts, timeout=5.0) for w in WORKERS}
        nonzero = {w: {k: v for k, v in c.items() if v} for w, c in seen.items()}
        if not history or history[-1][1] != nonzero:
            history.append((round(time.monotonic() - t0, 2), nonzero))
        done = all(c[k] == 0 for c in seen.values() for k in PROTOCOL_KEYS)
        if done or time.monotonic() - t0 > limit:
            return seen, history
        time.sleep(0.1)


# The driver's recent steps, for the report of a stall (see watchdog).
_trace = collections.deque(maxlen=40)
STALL_S = 60.0  # no step takes this long: every call times out within CALL_TIMEOUT


def trace(*what):
    _trace.append((time.monotonic(), " ".join(map(str, what))))
    # Python stacks even if the process deadlocks holding the GIL.
    faulthandler.dump_traceback_later(STALL_S, exit=False)


def describe(r, v):
    return f"<RRef owned by {r.owner_name()} of {v[0].item():g}>"


def step(fn):
    """Marks a rule or invariant as running, so that teardown knows whether
    the example ended early (a failure holds references in its traceback:
    the tables cannot empty then, and the failure itself is the report)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        trace(fn.__name__, {k: v for k, v in kwargs.items() if k != "data"})
        self.busy = True
        fn(self, *args, **kwargs)
        self.busy = False

    return wrapper


def start_watchdog():
    """Should the driver make no progress for STALL_S seconds, writes to
    stderr its recent steps, its threads' stacks and every worker's counts,
    which the failure report then shows (the harness times the run out).
    Returns the function that stops it."""
    stop = threading.Event()

    def watch():
        while not stop.wait(2.0):
            if not _trace or time.monotonic() - _trace[-1][0] < STALL_S:
                continue
            now = time.monotonic()
            lines = [f"  {t - now:+.1f} s {what}" for t, what in list(_trace)]
            print("test_rref_faults: the driver stalled; its last steps:\n" + "\n".join(lines),
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            for w in WORKERS:
                try:
                    c = torchrpc.rpc_sync(w, counts, timeout=5.0)
                except Exception as e:  # noqa: BLE001 (a report, best effort)
                    c = repr(e)
                print(f"  {w}: {c}", file=sys.stderr, flush=True)
            return

    threading.Thread(target=watch, daemon=True, name="stall-watchdog").start()

    def stop_watchdog():
        stop.set()
        faulthandler.cancel_dump_traceback_later()

    return stop_watchdog


def body_faulty_state_machine(rank):
    if rank != 0:
        return None
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                     run_state_machine_as_test)

    peers = st.sampled_from(["w1", "w2"])
    keys = st.sampled_from(["a", "b"])
    stats = {"examples": 0, "settle_s": []}

    class FaultyRRefProtocol(RuleBasedStateMachine):
        """Create / fork / park / relay / fetch / drop while the transports
        drop, delay and duplicate the protocol's control messages."""

        def __init__(self):
            super().__init__()
            self.refs = []  # (RRef held by the driver w0, expected value)
            self.parked = {}  # (worker, key) -> expected value of the RRef parked there
            self.counter = 0
            self.busy = False
            stats["examples"] += 1
            trace("example", stats["examples"])

        @rule(owner=st.sampled_from(list(WORKERS)), how=st.sampled_from(sorted(MAKERS)))
        @step
        def create(self, owner, how):
            self.counter += 1
            fn, args, expect = MAKERS[how]
            x = value_of(self.counter)
            r = torchrpc.remote(owner, fn, args(x), timeout=CALL_TIMEOUT)
            self.refs.append((r, expect(x)))

        @precondition(lambda self: self.refs)
        @rule(data=st.data(), owner=st.sampled_from(list(WORKERS)))
        @step
        def create_from_rref(self, data, owner):
            """A remote() whose argument is an RRef: the owner of the new value
            gets a fork of the old one and fetches it before running."""
            r, v = data.draw(st.sampled_from(self.refs))
            trace("  of", describe(r, v))
            self.refs.append((torchrpc.remote(owner, fetch_value, (r,), timeout=CALL_TIMEOUT), v))

        @precondition(lambda self: self.refs)
        @rule(data=st.data(), to=peers)
        @step
        def fork(self, data, to):
            """Sends an RRef to another worker (maybe its owner), which fetches it."""
            r, v = data.draw(st.sampled_from(self.refs))
            trace("  sends", describe(r, v))
            got = torchrpc.rpc_sync(to, fetch_value, (r,), timeout=CALL_TIMEOUT)
            assert same(got, v), (to, r.owner_name(), got, v)

        @precondition(lambda self: self.refs)
        @rule(data=st.data(), where=peers, key=keys)
        @step
        def park(self, data, where, key):
            r, v = data.draw(st.sampled_from(self.refs))
            trace("  parks", describe(r, v))
            torchrpc.rpc_sync(where, hold, (key, r), timeout=CALL_TIMEOUT)
            self.parked[(where, key)] = v

        @precondition(lambda self: self.parked)
        @rule(data=st.data(), to=peers, new_key=keys)
        @step
        def relay(self, data, to, new_key):
            """A parked RRef forked onward by its holder (a user or the owner)."""
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            trace("  from", where, key)
            torchrpc.rpc_sync(where, forward_held, (key, to, new_key), timeout=CALL_TIMEOUT)
            self.parked[(to, new_key)] = self.parked[(where, key)]

        @precondition(lambda self: self.parked)
        @rule(data=st.data())
        @step
        def unpark(self, data):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            trace("  at", where, key)
            torchrpc.rpc_sync(where, drop, (key,), timeout=CALL_TIMEOUT)
            del self.parked[(where, key)]

        @precondition(lambda self: self.refs)
        @rule(data=st.data())
        @step
        def fetch(self, data):
            r, v = data.draw(st.sampled_from(self.refs))
            trace("  of", describe(r, v))
            got = r.to_here(timeout=CALL_TIMEOUT)
            assert same(got, v), (r.owner_name(), got, v)

        @precondition(lambda self: self.parked)
        @rule(data=st.data())
        @step
        def fetch_parked(self, data):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            trace("  at", where, key)
            got = torchrpc.rpc_sync(where, fetch_held, (key,), timeout=CALL_TIMEOUT)
            assert same(got, self.parked[(where, key)]), (where, key, got)

        @precondition(lambda self: self.refs)
        @rule(data=st.data())
        @step
        def drop_local(self, data):
            r, v = self.refs.pop(data.draw(st.integers(0, len(self.refs) - 1)))
            trace("  drops", describe(r, v))
            del r
            gc.collect()

        @invariant()
        @step
        def newest_value_still_resolves(self):
            if self.refs:
                r, v = self.refs[-1]
                assert same(r.to_here(timeout=CALL_TIMEOUT), v)

        def teardown(self):
            trace("teardown")
            self.refs.clear()
            for where, key in list(self.parked):
                trace("  unparks", where, key)
                try:
                    torchrpc.rpc_sync(where, drop, (key,), timeout=CALL_TIMEOUT)
                except Exception:
                    if not self.busy:
                        raise
            self.parked.clear()
            if self.busy:
                return  # a step failed: hypothesis reports that failure
            gc.collect()
            trace("  settles")
            t0 = time.monotonic()
            seen, history = settle_protocol()
            stats["settle_s"].append(round(time.monotonic() - t0, 1))
            for worker, c in seen.items():
                assert all(c[k] == 0 for k in PROTOCOL_KEYS), (
                    f"{worker} still has RRef protocol state {SETTLE_LIMIT} s after every "
                    f"reference was dropped: {seen}; non-zero counts over time: {history}"
                )

    stop_watchdog = start_watchdog()
    try:
        run_state_machine_as_test(
            FaultyRRefProtocol,
            settings=settings(
                max_examples=5, stateful_step_count=15, deadline=None, database=None,
                # Faults are random: a failure does not replay, so no shrinking.
                phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        stop_watchdog()
    return stats


def test_rref_protocol_state_machine_under_faults():
    t0 = time.monotonic()
    options = [{"python_udf": True, "faults": f} for f in FAULTS_OF_RANK]
    # run_workers kills the workers after `timeout` s: nothing can hang the suite.
    stats = run_workers(body_faulty_state_machine, 3, options=options, timeout=150)[0]
    print(f"{stats['examples']} examples in {time.monotonic() - t0:.1f} s; "
          f"seconds to settle: {stats['settle_s']}")
    assert stats["examples"] >= 1


# -- a dropped user call --------------------------------------------------------


def make_pair(x):
    return (x, x)


def body_dropped_calls(rank):
    if rank != 0:
        return None
    x = value_of(1)
    out = {}
    t0 = time.monotonic()
    try:
        torchrpc.rpc_sync("w1", scripted_ops.echo, (x,), timeout=1)
        out["call"] = ("returned", time.monotonic() - t0)
    except torchrpc.RpcTimeoutError as e:
        out["call"] = ("timeout", time.monotonic() - t0, str(e))
    r = torchrpc.remote("w1", scripted_ops.echo, (x,))  # SCRIPT_REMOTE_CALL: not dropped
    t0 = time.monotonic()
    try:
        r.to_here(timeout=1)
        out["fetch"] = ("returned", time.monotonic() - t0)
    except torchrpc.RpcTimeoutError as e:
        out["fetch"] = ("timeout", time.monotonic() - t0, str(e))
    del r
    # The connection still carries what is not dropped.
    out["python_call"] = torchrpc.rpc_sync("w1", make_pair, (x,), timeout=10)
    return out


def test_dropped_call_surfaces_as_its_timeout():
    options = [
        {"python_udf": True, "faults": "SCRIPT_CALL:drop:1.0,SCRIPT_RREF_FETCH_CALL:drop:1.0"},
        {"python_udf": True},
    ]
    out = run_workers(body_dropped_calls, 2, options=options, timeout=60)[0]
    kind, took, *_ = out["call"]
    assert kind == "timeout" and took < 2.0, out["call"]
    kind, took, *_ = out["fetch"]
    assert kind == "timeout" and took < 2.0, out["fetch"]
    a, b = out["python_call"]
    assert torch.equal(a, value_of(1)) and torch.equal(b, value_of(1))


# -- a remote() that times out while its RRef argument awaits confirmation ------


def body_late_creation(rank):
    if rank != 0:
        return None
    a = torchrpc.remote("w2", scripted_ops.echo, (value_of(1),))
    a.to_here()
    # w1 gets a fork of `a` and waits for w2's (delayed) RREF_ACK before it
    # registers the new value's fork; the caller gives up first, drops the
    # result, and its RREF_USER_DELETE reaches w1 before the registration.
    r = torchrpc.remote("w1", fetch_value, (a,), timeout=0.5)
    time.sleep(1.0)
    try:
        r.to_here(timeout=5)
        timed_out = False
    except torchrpc.RpcTimeoutError:
        timed_out = True
    del r, a
    time.sleep(3.0)  # the delayed acknowledgement lands and w1 runs the call
    seen, history = settle_protocol(limit=6.0)
    return timed_out, seen, history


def test_remote_that_timed_out_awaiting_confirmation_leaks_nothing():
    options = [{"python_udf": True}, {"python_udf": True},
               {"python_udf": True, "faults": "RREF_ACK:delay:2.0"}]
    timed_out, seen, history = run_workers(body_late_creation, 3, options=options, timeout=60)[0]
    assert timed_out
    for worker, c in seen.items():
        assert all(c[k] == 0 for k in PROTOCOL_KEYS), (worker, seen, history)


# -- a delayed send must not deadlock with the GIL -------------------------------


def body_delay_churn(rank):
    if rank != 0:
        return None
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 3.0:
        refs = [torchrpc.remote("w1", scripted_ops.echo, (torch.ones(1),)) for _ in range(50)]
        for r in refs:
            r.to_here()
        futs = []
        for i in range(len(refs)):
            # Delayed by the fault injector, which frees the message (and the
            # Python tensor in it) on its own thread ...
            futs.append(torchrpc.rpc_async("w1", scripted_ops.echo, (torch.ones(1),), timeout=10))
            # ... while dropping an RRef sends RREF_USER_DELETE with the GIL held.
            refs[i] = None
            sent += 1
        for f in futs:
            f.wait()
    return sent


def test_delayed_sends_do_not_deadlock_with_the_gil():
    # A deadlocked w0 never reports: run_workers times out (20 s) and kills it.
    options = [{"faults": "SCRIPT_CALL:delay:0.001"}, {}]
    assert run_workers(body_delay_churn, 2, options=options, timeout=20)[0] > 0
