"""The RRef protocol under injected faults (RpcOptions(faults=...)).

Each worker's transport drops, delays and duplicates the RRef control
messages it sends (RREF_USER_DELETE, RREF_FORK_REQUEST, RREF_CHILD_ACCEPT
and their RREF_ACK replies). Those are retried until acknowledged and are
idempotent, so a random mix of create / fork / park / relay / fetch / drop
across three real workers must still fetch exactly the right values and
end with every worker's RRef tables empty. A dropped user call surfaces as
its timeout, never a hang.
"""

import gc
import time

import torch
from rpc_harness import run_workers
from test_rref import counts, drop, fetch_held, forward_held, hold

import scripted_ops
import torchrpc

WORKERS = ("w0", "w1", "w2")
# Every worker mangles the control messages it sends. Worker 0 (the driver,
# which makes every remote() call) also delays SCRIPT_REMOTE_CALL, so fork
# requests and fetches often reach an owner before the call creating the value.
CONTROL_FAULTS = ",".join([
    "RREF_USER_DELETE:drop:0.2",
    "RREF_USER_DELETE:dup:0.2",
    "RREF_FORK_REQUEST:dup:0.3",
    "RREF_CHILD_ACCEPT:delay:0.05",
    "RREF_ACK:drop:0.1",
])
FAULTS_OF_RANK = [
    CONTROL_FAULTS + ",SCRIPT_REMOTE_CALL:delay:0.02",
    CONTROL_FAULTS + ",RREF_CHILD_ACCEPT:drop:0.2",
    CONTROL_FAULTS + ",RREF_FORK_REQUEST:drop:0.2",
]
CALL_TIMEOUT = 20.0  # seconds: a fork waits for its confirmation (retried 1, 2, 4 s ...)
SETTLE_LIMIT = 30.0  # seconds: a dropped control message is retried after 1 to 8 s
TRACE = []
PROTOCOL_KEYS = ("owned_values", "user_forks", "pending_children", "unconfirmed_users")


@torchrpc.script
def fetch_value(r: torch.classes.torchrpc.RRef) -> torch.Tensor:
    """Runs where the RRef was forked to: fetches the value from its owner."""
    v = r.to_here()
    assert isinstance(v, torch.Tensor)
    return v


def value_of(n: int) -> torch.Tensor:
    return torch.arange(3.0) + 100.0 * n


# How a value is made on its owner: (function, args of the base tensor, expected).
MAKERS = {
    "echo": (scripted_ops.echo, lambda x: (x,), lambda x: x),
    "add": (scripted_ops.add, lambda x: (x, x), lambda x: x + x),
    "builtin": (torch.add, lambda x: (x, 1), lambda x: x + 1),
}


def settle_protocol(limit=SETTLE_LIMIT):
    """Polls every worker's debug_info until the RRef protocol's tables are
    empty there, or `limit` seconds pass; returns the last counts seen."""
    deadline = time.monotonic() + limit
    t0 = time.monotonic()
    last = None
    while True:
        gc.collect()
        seen = {w: torchrpc.rpc_sync(w, counts, timeout=5.0) for w in WORKERS}
        snap = {w: {k: v for k, v in c.items() if v} for w, c in seen.items()}
        if snap != last:
            TRACE.append((round(time.monotonic() - t0, 2), snap))
            last = snap
        done = all(c[k] == 0 for c in seen.values() for k in PROTOCOL_KEYS)
        if done or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def same(got, want):
    return got.dtype == want.dtype and torch.equal(got, want)


def body_faulty_state_machine(rank):
    if rank != 0:
        return None
    from hypothesis import HealthCheck, settings
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
            self.refs = []  # (RRef held by the driver, expected value)
            self.parked = {}  # (worker, key) -> expected value of the RRef parked there
            self.counter = 0
            stats["examples"] += 1

        @rule(owner=st.sampled_from(list(WORKERS)), how=st.sampled_from(sorted(MAKERS)))
        def create(self, owner, how):
            self.counter += 1
            fn, args, expect = MAKERS[how]
            x = value_of(self.counter)
            r = torchrpc.remote(owner, fn, args(x), timeout=CALL_TIMEOUT)
            self.refs.append((r, expect(x)))

        @precondition(lambda self: self.refs)
        @rule(data=st.data(), to=peers)
        def fork(self, data, to):
            """Sends an RRef to another worker (maybe its owner), which fetches it."""
            r, v = data.draw(st.sampled_from(self.refs))
            got = torchrpc.rpc_sync(to, fetch_value, (r,), timeout=CALL_TIMEOUT)
            assert same(got, v), (to, r.owner_name(), got, v)

        @precondition(lambda self: self.refs)
        @rule(data=st.data(), where=peers, key=keys)
        def park(self, data, where, key):
            r, v = data.draw(st.sampled_from(self.refs))
            torchrpc.rpc_sync(where, hold, (key, r), timeout=CALL_TIMEOUT)
            self.parked[(where, key)] = v

        @precondition(lambda self: self.parked)
        @rule(data=st.data(), to=peers, new_key=keys)
        def relay(self, data, to, new_key):
            """A parked RRef forked onward by its holder (a user or the owner)."""
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            torchrpc.rpc_sync(where, forward_held, (key, to, new_key), timeout=CALL_TIMEOUT)
            self.parked[(to, new_key)] = self.parked[(where, key)]

        @precondition(lambda self: self.parked)
        @rule(data=st.data())
        def unpark(self, data):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            torchrpc.rpc_sync(where, drop, (key,), timeout=CALL_TIMEOUT)
            del self.parked[(where, key)]

        @precondition(lambda self: self.refs)
        @rule(data=st.data())
        def fetch(self, data):
            r, v = data.draw(st.sampled_from(self.refs))
            got = r.to_here(timeout=CALL_TIMEOUT)
            assert same(got, v), (r.owner_name(), got, v)

        @precondition(lambda self: self.parked)
        @rule(data=st.data())
        def fetch_parked(self, data):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            got = torchrpc.rpc_sync(where, fetch_held, (key,), timeout=CALL_TIMEOUT)
            assert same(got, self.parked[(where, key)]), (where, key, got)

        @precondition(lambda self: self.refs)
        @rule(data=st.data())
        def drop_local(self, data):
            r, _ = self.refs.pop(data.draw(st.integers(0, len(self.refs) - 1)))
            del r
            gc.collect()

        @invariant()
        def newest_value_still_resolves(self):
            if self.refs:
                r, v = self.refs[-1]
                assert same(r.to_here(timeout=CALL_TIMEOUT), v)

        def teardown(self):
            self.refs.clear()
            for where, key in list(self.parked):
                torchrpc.rpc_sync(where, drop, (key,), timeout=CALL_TIMEOUT)
            self.parked.clear()
            gc.collect()
            t0 = time.monotonic()
            seen = settle_protocol()
            stats["settle_s"].append(round(time.monotonic() - t0, 2))
            if time.monotonic() - t0 > 3: stats.setdefault("slow", []).append(list(TRACE))
            TRACE.clear()
            for worker, c in seen.items():
                assert all(c[k] == 0 for k in PROTOCOL_KEYS), (
                    f"{worker} still has RRef protocol state {SETTLE_LIMIT} s after every "
                    f"reference was dropped: {seen}"
                )

    run_state_machine_as_test(
        FaultyRRefProtocol,
        settings=settings(max_examples=5, stateful_step_count=15, deadline=None,
                          database=None, suppress_health_check=list(HealthCheck)),
    )
    return stats


def test_rref_protocol_state_machine_under_faults():
    t0 = time.monotonic()
    options = [{"python_udf": True, "faults": f} for f in FAULTS_OF_RANK]
    stats = run_workers(body_faulty_state_machine, 3, options=options, timeout=180)[0]
    print(f"examples: {stats['examples']}, settle seconds: {stats['settle_s']}, {stats.get('slow')}"
          f"took {time.monotonic() - t0:.1f} s")
    assert stats["examples"] >= 1
    assert time.monotonic() - t0 < 180


def body_dropped_calls(rank):
    x = value_of(1)
    out = {}
    if rank == 0:  # sends no SCRIPT_CALL and no SCRIPT_RREF_FETCH_CALL at all
        t0 = time.monotonic()
        try:
            torchrpc.rpc_sync("w1", scripted_ops.echo, (x,), timeout=1)
            out["call"] = ("returned", time.monotonic() - t0)
        except torchrpc.RpcTimeoutError as e:
            out["call"] = ("timeout", time.monotonic() - t0, str(e))
        r = torchrpc.remote("w1", scripted_ops.echo, (x,))  # not dropped
        t0 = time.monotonic()
        try:
            r.to_here(timeout=1)
            out["fetch"] = ("returned", time.monotonic() - t0)
        except torchrpc.RpcTimeoutError as e:
            out["fetch"] = ("timeout", time.monotonic() - t0, str(e))
        # The connection is still good for what is not dropped.
        out["python_call"] = torchrpc.rpc_sync("w1", make_pair, (x,), timeout=10)
        del r
    return out


def make_pair(x):
    return (x, x)


def test_dropped_call_surfaces_as_its_timeout():
    options = [
        {"python_udf": True, "faults": "SCRIPT_CALL:drop:1.0,SCRIPT_RREF_FETCH_CALL:drop:1.0"},
        {"python_udf": True},
    ]
    out = run_workers(body_dropped_calls, 2, options=options, timeout=60)[0]
    kind, took, *msg = out["call"]
    assert kind == "timeout" and took < 2.0, out["call"]
    kind, took, *msg = out["fetch"]
    assert kind == "timeout" and took < 2.0, out["fetch"]
    a, b = out["python_call"]
    assert torch.equal(a, value_of(1)) and torch.equal(b, value_of(1))
