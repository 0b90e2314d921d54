"""Remote references across real worker processes: the protocol, forks
between any workers, TorchScript RRefs, failures, and leaks."""

import gc
import resource
import time
from typing import Any, List

import torch
from rpc_harness import assert_transport, run_workers, transports_used

import scripted_ops
import torchrpc

_held = {}  # per-process: references a test parks on a worker


@torch.jit.script
def rref_sum(r: torch.classes.torchrpc.RRef) -> torch.Tensor:
    v = r.to_here()
    assert isinstance(v, torch.Tensor)
    return v.sum()


@torch.jit.script
def sum_all(rs: List[torch.classes.torchrpc.RRef]) -> torch.Tensor:
    total = torch.zeros(1)
    for r in rs:
        v = r.to_here()
        assert isinstance(v, torch.Tensor)
        total = total + v.sum()
    return total


@torch.jit.script
def remote_echo(to: str, x: torch.Tensor) -> torch.classes.torchrpc.RRef:
    args: List[Any] = [x]
    return torch.ops.torchrpc.remote(to, "__torch__.scripted_ops.echo", args)


@torch.jit.script
def keep(rs: List[torch.classes.torchrpc.RRef]) -> List[torch.classes.torchrpc.RRef]:
    return rs


def _register():
    torchrpc.register(rref_sum)
    torchrpc.register(sum_all)
    torchrpc.register(keep)


def hold(key, rref):
    _held[key] = rref
    return rref.owner_name()


def drop(key):
    _held.pop(key, None)  # refcounting frees it at once: RRefs make no cycles


def pass_on(rref, to):
    """Forks an RRef onward from a user: A -> B -> C."""
    return torchrpc.rpc_sync(to, rref_sum, (rref,))


def make_dict(**kwargs):
    return dict(kwargs)


def relay_back(rref):
    return rref


class Box:
    def __init__(self, v):
        self.v = v

    def add(self, k):
        self.v += k
        return self.v


def counts():
    gc.collect()
    info = torchrpc.debug_info()
    return {k: info[k] for k in ("owned_values", "user_forks", "pending_children",
                                 "unconfirmed_users", "live_users")}


def settle(workers=("w0", "w1", "w2"), limit=10.0):
    """Waits until every worker's RRef tables are empty; returns the last counts."""
    deadline = time.monotonic() + limit
    while True:
        gc.collect()
        seen = {w: torchrpc.rpc_sync(w, counts) for w in workers}
        if all(not any(c.values()) for c in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def body_protocol(rank):
    _register()
    if rank != 0:
        return None
    x = torch.arange(4.0)
    out = {}
    r = torchrpc.remote("w1", scripted_ops.add, (x, x))
    out["script"] = r.to_here()
    out["meta"] = (r.is_owner(), r.owner_name(), r.owner().id)
    deadline = time.monotonic() + 5  # REMOTE_RET may trail the fetch's answer
    while not r.confirmed_by_owner() and time.monotonic() < deadline:
        time.sleep(0.001)
    out["confirmed"] = r.confirmed_by_owner()
    out["builtin"] = torchrpc.remote("w2", torch.mul, (x, 3)).to_here()
    out["python"] = torchrpc.remote("w1", make_dict, (), {"a": x}).to_here()
    try:
        r.local_value()
    except RuntimeError as e:
        out["local_value_error"] = str(e)
    # A -> B (fork), B -> C (fork from a user), and back to the owner.
    out["to_w2"] = torchrpc.rpc_sync("w2", rref_sum, (r,))
    out["w2_to_w1_owner"] = torchrpc.rpc_sync("w2", pass_on, (r, "w1"))
    out["w2_to_w0"] = torchrpc.rpc_sync("w2", pass_on, (r, "w0"))
    back = torchrpc.rpc_sync("w2", relay_back, (r,))
    out["relayed"] = (back.to_here(), back.owner_name())
    # Nested: an RRef to a list of RRefs, owned on w2.
    inner = [torchrpc.remote("w1", scripted_ops.echo, (x,)), torchrpc.RRef(x * 10)]
    outer = torchrpc.remote("w2", keep, (inner,))  # w2 owns a list of RRefs
    out["nested_values"] = [r.to_here() for r in outer.to_here()]
    out["nested_sum"] = torchrpc.rpc_sync("w2", sum_all, (inner,))
    # Proxies on a Python object.
    box = torchrpc.remote("w1", Box, (1,))
    out["proxy"] = (box.rpc_sync().add(2), box.rpc_async().add(3).wait(),
                    box.remote().add(4).to_here())
    # Failed creation raises on every use.
    bad = torchrpc.remote("w1", scripted_ops.param_get, ("missing",))
    errors = []
    for _ in range(2):
        try:
            bad.to_here()
        except Exception as e:
            errors.append(str(e))
    out["failed"] = errors
    slow = torchrpc.remote("w1", scripted_ops.sleep_ms, (3000,))
    t0 = time.monotonic()
    try:
        slow.to_here(timeout=0.2)
    except TimeoutError as e:
        out["timeout"] = (time.monotonic() - t0, str(e))
    # TorchScript creates one too.
    ts = remote_echo("w2", x)
    out["torchscript"] = (ts.to_here(), ts.is_owner(), ts.owner_name())
    # Calls on an RRef created moments ago (maybe not yet confirmed) work.
    quick = [torchrpc.remote("w1", scripted_ops.echo, (x + i,)) for i in range(20)]
    out["pipelined"] = [torchrpc.rpc_sync("w2", rref_sum, (q,)).item() for q in quick]
    # A fork sent straight back to the owner may overtake the call creating it.
    out["to_owner_at_once"] = [
        torchrpc.rpc_sync("w1", rref_sum, (torchrpc.remote("w1", scripted_ops.echo, (x,)),)).item()
        for _ in range(200)
    ]
    del r, back, inner, outer, box, bad, ts, quick
    slow.to_here()
    del slow
    out["settled"] = settle()
    return out


def test_rref_protocol_across_three_workers(transport):
    out = run_workers(body_protocol, 3, options={"python_udf": True}, timeout=180,
                      transport=transport)[0]
    x = torch.arange(4.0)
    assert torch.equal(out["script"], 2 * x)
    assert out["meta"] == (False, "w1", 1)
    assert out["confirmed"] is True
    assert torch.equal(out["builtin"], 3 * x)
    assert torch.equal(out["python"]["a"], x)
    assert "owner" in out["local_value_error"] and "w1" in out["local_value_error"]
    assert out["to_w2"].item() == out["w2_to_w1_owner"].item() == out["w2_to_w0"].item() == 12.0
    assert torch.equal(out["relayed"][0], 2 * x) and out["relayed"][1] == "w1"
    assert [t.tolist() for t in out["nested_values"]] == [x.tolist(), (10 * x).tolist()]
    assert out["nested_sum"].item() == x.sum().item() * 11
    assert out["proxy"] == (3, 6, 10)
    assert len(out["failed"]) == 2 and all("missing" in e for e in out["failed"])
    took, msg = out["timeout"]
    assert took < 1.5 and "to_here" in msg
    ts_value, ts_owner, ts_owner_name = out["torchscript"]
    assert torch.equal(ts_value, x) and ts_owner is False and ts_owner_name == "w2"
    assert out["pipelined"] == [x.sum().item() + 4 * i for i in range(20)]
    assert out["to_owner_at_once"] == [x.sum().item()] * 200
    for worker, c in out["settled"].items():
        assert not any(c.values()), (worker, c)


def body_soak(rank):
    _register()
    if rank != 0:
        return None
    x = torch.ones(16)
    rss = []
    for i in range(10_000):
        r = torchrpc.remote("w1", scripted_ops.echo, (x,))
        if i % 2 == 0:
            torchrpc.rpc_sync("w2", hold, ("k", r))  # fork to w2, parked
            torchrpc.rpc_sync("w2", drop, ("k",))
        del r
        if i in (2_000, 9_999):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return settle(limit=30.0), rss


def test_leak_soak_returns_every_count_to_zero(transport):
    # ~15 s per transport: the full 10,000 cycles on both, since shm adds its
    # own per-message state (ring frames, pool slots) that must not leak either.
    settled, rss = run_workers(body_soak, 3, options={"python_udf": True}, timeout=600,
                               transport=transport)[0]
    for worker, c in settled.items():
        assert not any(c.values()), (worker, c)
    assert rss[1] - rss[0] < 64 * 1024, rss  # KiB: flat, not growing with cycles


# -- the protocol as a state machine -------------------------------------------


def fetch_held(key):
    return _held[key].to_here()


def forward_held(key, to, new_key):
    """Passes a parked RRef on from this worker (a user or the owner) to `to`."""
    return torchrpc.rpc_sync(to, hold, (new_key, _held[key]))


def body_state_machine(rank):
    if rank != 0:
        return None
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                     run_state_machine_as_test)

    workers = st.sampled_from(["w1", "w2"])
    keys = st.sampled_from(["a", "b", "c"])

    class RRefProtocol(RuleBasedStateMachine):
        """Random create / fork / pass / drop / fetch across three workers."""

        def __init__(self):
            super().__init__()
            self.refs = []  # (RRef held here, value)
            self.parked = {}  # (worker, key) -> value
            self.counter = 0

        @rule(owner=st.sampled_from(["w0", "w1", "w2"]))
        def create(self, owner):
            self.counter += 1
            x = torch.tensor([float(self.counter)])
            r = torchrpc.RRef(x) if owner == "w0" else torchrpc.remote(owner, scripted_ops.echo, (x,))
            self.refs.append((r, self.counter))

        @precondition(lambda self: self.refs)
        @rule(data=st.data(), where=workers, key=keys)
        def park(self, data, where, key):
            r, v = data.draw(st.sampled_from(self.refs))
            torchrpc.rpc_sync(where, hold, ((key), r))
            self.parked[(where, key)] = v

        @precondition(lambda self: self.parked)
        @rule(data=st.data(), to=workers, new_key=keys)
        def relay(self, data, to, new_key):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            torchrpc.rpc_sync(where, forward_held, (key, to, new_key))
            self.parked[(to, new_key)] = self.parked[(where, key)]

        @precondition(lambda self: self.parked)
        @rule(data=st.data())
        def unpark(self, data):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            torchrpc.rpc_sync(where, drop, (key,))
            del self.parked[(where, key)]

        @precondition(lambda self: self.refs)
        @rule(data=st.data())
        def drop_local(self, data):
            self.refs.pop(data.draw(st.integers(0, len(self.refs) - 1)))

        @precondition(lambda self: self.refs)
        @rule(data=st.data())
        def fetch(self, data):
            r, v = data.draw(st.sampled_from(self.refs))
            assert r.to_here().item() == v

        @precondition(lambda self: self.parked)
        @rule(data=st.data())
        def fetch_parked(self, data):
            where, key = data.draw(st.sampled_from(sorted(self.parked)))
            assert torchrpc.rpc_sync(where, fetch_held, (key,)).item() == self.parked[(where, key)]

        @invariant()
        def owners_never_free_live_values(self):
            for r, v in self.refs[-2:]:  # cheap: the newest references still resolve
                assert r.to_here().item() == v

        def teardown(self):
            self.refs.clear()
            for where, key in list(self.parked):
                torchrpc.rpc_sync(where, drop, (key,))
            self.parked.clear()
            for worker, c in settle().items():
                assert not any(c.values()), (worker, c)

    run_state_machine_as_test(
        RRefProtocol,
        settings=settings(max_examples=12, stateful_step_count=15, deadline=None,
                          database=None),
    )
    return "ok"


def test_rref_protocol_state_machine(transport):
    assert run_workers(body_state_machine, 3, options={"python_udf": True}, timeout=300,
                       transport=transport)[0] == "ok"


def body_leak_report(rank):
    if rank == 1:
        _held["leak"] = torchrpc.remote("w0", scripted_ops.echo, (torch.ones(1),))
        _held["leak"].to_here()
    torchrpc.api._current().store.add("leak_ready", 1)
    while torchrpc.api._current().store.add("leak_ready", 0) < 2:
        time.sleep(0.01)
    used = transports_used()  # before shutdown() forgets the connections
    try:
        torchrpc.shutdown()
    except torchrpc.RpcError as e:
        return str(e), used
    return None, used


def test_graceful_shutdown_reports_leaked_rrefs(transport):
    (owner, owner_used), (user, user_used) = run_workers(
        body_leak_report, 2, options={"rref_leaks": "raise"}, transport=transport)
    assert_transport([owner_used, user_used], transport)
    assert "'w0'" in owner and "owned_values" in owner
    assert "'w1'" in user and "live_users" in user


# -- ScriptModules holding RRefs -------------------------------------------------


class Holder(torch.nn.Module):
    """A module whose attribute is an RRef; forward fetches it."""

    def __init__(self, r):
        super().__init__()
        self.r = r

    def forward(self) -> torch.Tensor:
        v = self.r.to_here()
        assert isinstance(v, torch.Tensor)
        return v + 1


def load_and_run(path):
    return torch.jit.load(path)()


def body_saved_module(rank):
    if rank != 0:
        return None
    import os
    import tempfile

    r = torchrpc.remote("w1", scripted_ops.echo, (torch.arange(3.0),))
    m = torch.jit.script(Holder(r.torchscript()))
    path = os.path.join(tempfile.mkdtemp(), "holder.pt")
    torch.jit.save(m, path)
    here = m()
    there = torchrpc.rpc_sync("w2", load_and_run, (path,))  # a fresh load on another worker
    del m, r
    return here, there, settle()


def test_script_module_holding_an_rref_survives_save_and_load(transport):
    here, there, settled = run_workers(body_saved_module, 3, options={"python_udf": True},
                                       transport=transport)[0]
    assert here.tolist() == there.tolist() == [1.0, 2.0, 3.0]
    for worker, c in settled.items():
        assert not any(c.values()), (worker, c)
