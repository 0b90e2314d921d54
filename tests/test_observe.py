"""Seeing inside: remote events in the profiler's tables and traces, metrics (dict,
Prometheus text, HTTP), structured debug_info and python -m torchrpc.inspect."""

import json
import os
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest
import torch
from conftest import TRANSPORTS
from worlds import World

import scripted_ops
import torchrpc

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.jit.script
def traced_work(x: torch.Tensor) -> torch.Tensor:
    with torch.autograd.profiler.record_function("script_inner_range"):
        y = torch.mm(x, x)
    return y + 1


def python_work(x):
    with torch.profiler.record_function("python_inner_range"):
        return torch.sigmoid(x) * 2


# -- profiling -----------------------------------------------------------------


def ready():
    """Run on a worker so that it imports this module (its script functions)."""
    return True


REMOTE_OP = "#remote_op: "


def profiled_work():
    """Calls of every kind and form, each once; checks their results."""
    x = torch.randn(16, 16)
    a = torchrpc.rpc_sync("w1", traced_work, (x,))
    b = torchrpc.rpc_async("w2", python_work, (x,))
    c = torchrpc.rpc_async("w1", torch.add, (x, x))
    torch.futures.wait_all([b, c])
    d = torchrpc.remote("w1", torch.mul, (x, x)).to_here()
    assert torch.allclose(a, torch.mm(x, x) + 1) and torch.allclose(b.wait(), torch.sigmoid(x) * 2)
    assert torch.equal(c.wait(), x + x) and torch.equal(d, x * x)


def _tables(events, averages) -> dict:
    """What the tests check of a profile, in plain values."""
    remote = [e for e in events if REMOTE_OP in e.name]
    ranges = {}
    for e in events:
        if e.name.startswith(("rpc_sync#", "rpc_async#")) and REMOTE_OP not in e.name:
            ranges.setdefault(e.name, []).append(e.time_range)
    outside = []  # remote events of sync and async calls outside their call's range
    for e in remote:
        call = e.name.split(REMOTE_OP)[0]
        if call.startswith("rpc_remote#"):
            continue  # remote() returns before the owner runs the call
        # 1 ms of slack: the two clocks are read through different APIs.
        if not any(r.start - 1000 <= e.time_range.start and e.time_range.end <= r.end + 1000
                   for r in ranges.get(call, [])):
            outside.append(e.name)
    return {
        "rows": {a.key: (a.node_id, a.is_remote, a.count) for a in averages if REMOTE_OP in a.key},
        "events": sorted((e.name, e.node_id, e.is_remote) for e in remote),
        "parents": {e.name: e.cpu_parent.name if e.cpu_parent else None for e in remote},
        "outside": outside,
        "table": averages.table(max_name_column_width=200, row_limit=1000),
    }


def profile_each_way(trace_path):
    """The same calls under each profiler remote events should reach."""
    out = {}
    with torchrpc.profile() as prof:
        profiled_work()
    prof.export_chrome_trace(trace_path)
    out["torchrpc.profile"] = _tables(prof.events(), prof.key_averages())

    torchrpc.profile_remote(True)
    try:
        with torch.profiler.profile() as prof:
            profiled_work()
        out["torch.profiler.profile"] = _tables(prof.events(), prof.key_averages())
        with torch.autograd.profiler.profile() as prof:
            profiled_work()
        out["torch.autograd.profiler.profile"] = _tables(prof.function_events, prof.key_averages())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's own deprecation of it
            with torch.autograd.profiler_legacy.profile() as prof:
                profiled_work()
        out["torch.autograd.profiler_legacy.profile"] = _tables(prof.function_events,
                                                                prof.key_averages())
    finally:
        torchrpc.profile_remote(False)
    with torch.profiler.profile() as prof:  # remote profiling off: the caller's events only
        profiled_work()
    out["remote profiling off"] = _tables(prof.events(), prof.key_averages())
    return out


@pytest.fixture(scope="module", params=TRANSPORTS)
def profiled_tables(request, tmp_path_factory):
    """What profile_each_way saw on w0 calling w1 (script and builtin calls)
    and w2 (Python ones), and its Chrome trace: one world per transport,
    closed before the checks."""
    path = str(tmp_path_factory.mktemp("trace") / "trace.json")
    with World(3, options=[{}, {}, {"python_udf": True}], transport=request.param) as world:
        world.do(1, ready)
        world.do(2, ready)
        return world.do(0, profile_each_way, path, timeout=120), path


def _expected_remote_ops():
    """The callee operators torch names '<call range>#remote_op: <operator>',
    with the callee's rank."""
    script = f"rpc_sync#{traced_work.qualified_name}(w0 -> w1)"
    return {
        f"{script}{REMOTE_OP}aten::mm": 1,
        f"{script}{REMOTE_OP}script_inner_range": 1,
        f"rpc_async#python_work(w0 -> w2){REMOTE_OP}aten::sigmoid": 2,
        f"rpc_async#python_work(w0 -> w2){REMOTE_OP}python_inner_range": 2,
        f"rpc_async#aten::add(w0 -> w1){REMOTE_OP}aten::add": 1,
        f"rpc_remote#aten::mul(w0 -> w1){REMOTE_OP}aten::mul": 1,
    }


@pytest.mark.parametrize("how", ["torchrpc.profile", "torch.profiler.profile",
                                 "torch.autograd.profiler.profile",
                                 "torch.autograd.profiler_legacy.profile"])
def test_remote_events_are_in_the_profilers_tables(profiled_tables, how):
    tables = profiled_tables[0][how]
    for name, node in _expected_remote_ops().items():
        # Once each: a call's events are in its own profile only, and once.
        assert tables["rows"].get(name) == (node, True, 1), (name, sorted(tables["rows"]))
        assert tables["events"].count((name, node, True)) == 1, name
        assert name in tables["table"], tables["table"]
    assert "Node ID" in tables["table"]
    assert not tables["outside"], tables["outside"]
    # The callee's nesting is kept: its operators sit in the functions and
    # ranges that ran them there.
    script = f"rpc_sync#{traced_work.qualified_name}(w0 -> w1){REMOTE_OP}"
    assert tables["parents"][f"{script}aten::mm"] == f"{script}script_inner_range"
    udf = f"rpc_async#python_work(w0 -> w2){REMOTE_OP}"
    assert tables["parents"][f"{udf}aten::sigmoid"] == f"{udf}python_inner_range"


def test_without_remote_profiling_the_tables_hold_the_callers_events_only(profiled_tables):
    assert profiled_tables[0]["remote profiling off"]["rows"] == {}


def test_profiled_run_has_remote_events_on_each_workers_track(profiled_tables):
    trace = json.load(open(profiled_tables[1]))
    events = trace["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    by_name = {}
    for e in events:
        if e.get("ph") == "X":
            by_name.setdefault(e["name"], []).append(e)

    def track_of(name):
        return {tracks.get(e["pid"]) for e in by_name.get(name, [])}

    assert track_of("script_inner_range") == {"torchrpc worker w1 (remote)"}, track_of("script_inner_range")
    assert track_of("python_inner_range") == {"torchrpc worker w2 (remote)"}, track_of("python_inner_range")
    assert "torchrpc worker w1 (remote)" in track_of("aten::mm")
    # Once: not also among the caller's own events under the tables' names.
    assert not [n for n in by_name if REMOTE_OP in n]
    assert len(by_name["script_inner_range"]) == 1
    # Each remote event lies within its call's range on the caller
    # (1 ms of slack: the two clocks are read through different APIs).
    sync_call = [e for e in events if e.get("name", "").startswith("rpc_sync#") and "(w0 -> w1)" in e["name"]]
    async_call = [e for e in events if e.get("name", "").startswith("rpc_async#") and "(w0 -> w2)" in e["name"]]
    assert len(sync_call) == 1 and len(async_call) == 1, [e["name"] for e in sync_call + async_call]
    for call, inner in ((sync_call[0], "script_inner_range"), (async_call[0], "python_inner_range")):
        for e in by_name[inner]:
            assert call["ts"] - 1000 <= e["ts"] and e["ts"] + e["dur"] <= call["ts"] + call["dur"] + 1000, (call, e)
    # The caller's own parts of the call.
    assert any(n.startswith("torchrpc::send#") for n in by_name)
    assert any(n.startswith("torchrpc::receive") for n in by_name)


# -- metrics -----------------------------------------------------------------------


@torch.jit.script
def boom(x: torch.Tensor) -> torch.Tensor:
    if bool(x.sum() > 0):
        raise ValueError("positive")
    return x


def scripted_traffic():
    x = torch.ones(4)
    for _ in range(7):
        torchrpc.rpc_sync("w1", scripted_ops.add, (x, x))
    futs = [torchrpc.rpc_async("w1", scripted_ops.mul, (x, x)) for _ in range(3)]
    for f in futs:
        f.wait()
    failed = 0
    for _ in range(2):
        try:
            torchrpc.rpc_sync("w1", boom, (x,))
        except Exception:
            failed += 1
    try:
        torchrpc.rpc_sync("w1", scripted_ops.sleep_ms, (3000,), timeout=0.3)
    except torchrpc.RpcTimeoutError:
        failed += 1
    return failed


def my_metrics():
    return torchrpc.metrics(), torchrpc.metrics_text(), torchrpc.metrics_port()


def _row(rows, function, peer):
    found = [r for r in rows if r["function"] == function and r["peer"] == peer]
    return found[0] if found else None


def test_metrics_count_the_calls_made_and_parse_as_prometheus_text():
    from prometheus_client.parser import text_string_to_metric_families

    with World(2, options=[{"metrics_port": 0}, {}]) as world:
        world.do(1, ready)
        assert world.do(0, scripted_traffic, timeout=60) == 3
        time.sleep(3.5)  # the sleeping call finishes on w1
        sent, text, port = world.do(0, my_metrics)
        served, _, _ = world.do(1, my_metrics)
        add, mul, boom_name = (scripted_ops.add.qualified_name, scripted_ops.mul.qualified_name,
                               boom.qualified_name)
        assert _row(sent["calls_sent"], add, "w1")["calls"] == 7
        assert _row(sent["calls_sent"], add, "w1")["errors"] == 0
        assert _row(sent["calls_sent"], mul, "w1")["calls"] == 3
        assert _row(sent["calls_sent"], boom_name, "w1")["errors"] == 2
        assert _row(sent["calls_sent"], add, "w1")["latency"]["count"] == 7
        assert sent["timeouts"] == 1 and sent["errors"]["timeout"] == 1
        assert _row(served["calls_served"], add, "w0")["calls"] == 7
        assert _row(served["calls_served"], mul, "w0")["calls"] == 3
        assert _row(served["calls_served"], boom_name, "w0")["errors"] == 2
        assert sent["bytes"]["w1"]["bytes_sent"] > 0 and served["bytes"]["w0"]["bytes_received"] > 0
        assert served["queue_wait"]["count"] >= 13

        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        assert samples[("torchrpc_calls_sent_total",
                        (("function", add), ("peer", "w1"), ("worker", "w0")))] == 7
        assert families["torchrpc_call_sent_seconds"].type == "histogram"
        assert samples[("torchrpc_errors_total", (("kind", "timeout"), ("worker", "w0")))] == 1
        # The same text over HTTP.
        assert port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        http_families = {f.name for f in text_string_to_metric_families(body)}
        assert "torchrpc_calls_sent" in http_families or "torchrpc_calls_sent_total" in http_families


# -- debug info and inspect ------------------------------------------------------


def start_stuck_call():
    global _stuck
    _stuck = torchrpc.rpc_async("w1", scripted_ops.sleep_ms, (8000,))
    return True


def structured_info():
    return torchrpc.debug_info()


def _inspect(pid):
    return subprocess.run([sys.executable, "-m", "torchrpc.inspect", str(pid)], capture_output=True,
                          text=True, timeout=60)


def test_inspect_shows_a_stuck_request_in_flight():
    with World(2) as world:
        world.do(0, start_stuck_call)
        time.sleep(1.0)
        caller = _inspect(world.pid(0))
        callee = _inspect(world.pid(1))
        assert caller.returncode == 0, caller.stderr
        sleep_name = scripted_ops.sleep_ms.qualified_name
        waiting = [line for line in caller.stdout.splitlines() if "waiting on w1" in line]
        assert waiting and sleep_name in waiting[0], caller.stdout
        assert "connected" in caller.stdout
        serving = [line for line in callee.stdout.splitlines() if "serving for w0" in line]
        assert serving and sleep_name in serving[0] and "running" in serving[0], callee.stdout
        info = world.do(0, structured_info)
        assert info["peers"]["w1"]["state"] == "connected"
        assert info["peers"]["w1"]["last_heard_s"] >= 0
        out = [r for r in info["requests"] if r["direction"] == "out"]
        assert out and out[0]["function"] == sleep_name and out[0]["age_s"] > 0.5
        listing = subprocess.run([sys.executable, "-m", "torchrpc.inspect"], capture_output=True, text=True,
                                 timeout=60)
        assert f"{world.pid(0)}  w0" in listing.stdout and f"{world.pid(1)}  w1" in listing.stdout
