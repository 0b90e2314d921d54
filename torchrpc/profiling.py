"""RPCs under torch.profiler (Kineto).

Every call made while a profiler runs shows on the caller as a range named
"rpc_sync#<function>(<caller> -> <callee>)" (rpc_async#, rpc_remote#), with
"torchrpc::send#", "torchrpc::wait" and "torchrpc::receive#" ranges inside
it recorded by the C++ agent.

With remote profiling on, calls travel as RUN_WITH_PROFILING_REQ: the callee
records the events of that request (operators, TorchScript functions,
record_function ranges in script and Python functions) on the thread serving
it and sends them back with its clock readings. The caller shifts them onto
its own clock (offset = ((t1 - t0) + (t2 - t3)) / 2, as NTP does) and adds
them to the Chrome trace, one track per worker:

    with torchrpc.profile() as prof:          # torch.profiler.profile, plus remote events
        torchrpc.rpc_sync("w1", fn, (x,))
    prof.export_chrome_trace("trace.json")

or, around a plain torch.profiler.profile:

    torchrpc.profile_remote(True)
    with torch.profiler.profile() as prof:
        ...
    prof.export_chrome_trace("trace.json")
    torchrpc.add_remote_events("trace.json", torchrpc.remote_events())
"""

import contextlib
import json
import os
from typing import Dict, List, Optional

import torch

from torchrpc._handle import _current

__all__ = ["profile", "profile_remote", "remote_events", "add_remote_events"]

# Track ids for remote workers in a Chrome trace: above any real pid.
_REMOTE_PID_BASE = 1 << 30


def profile_remote(enabled: bool = True):
    """Makes calls sent while a profiler runs carry back the callee's events."""
    _current().agent.set_profile_remote(bool(enabled))


def remote_events() -> List[dict]:
    """The callee events gathered since the last call, on this worker's wall
    clock: dicts of worker, call, name, start_ns, end_ns."""
    out = []
    for call, _peer, sent_ns, received_ns, data in _current().agent.take_remote_profiles():
        d = json.loads(data)
        offset = ((d["received_ns"] - sent_ns) + (d["sent_ns"] - received_ns)) / 2
        for name, start, end in d["events"]:
            out.append({"worker": d["worker"], "call": call, "name": name,
                        "start_ns": start - offset, "end_ns": end - offset})
    return out


def add_remote_events(trace_path: str, events: List[dict]):
    """Adds `events` (remote_events()) to a Chrome trace written by
    export_chrome_trace, each worker on a track of its own."""
    with open(trace_path) as f:
        trace = json.load(f)
    base = trace.get("baseTimeNanoseconds", 0)
    pids: Dict[str, int] = {}
    added = []
    for e in events:
        pid = pids.setdefault(e["worker"], _REMOTE_PID_BASE + len(pids))
        added.append({"ph": "X", "cat": "torchrpc_remote", "name": e["name"], "pid": pid, "tid": 0,
                      "ts": (e["start_ns"] - base) / 1000.0, "dur": (e["end_ns"] - e["start_ns"]) / 1000.0,
                      "args": {"worker": e["worker"], "rpc": e["call"]}})
    for worker, pid in pids.items():
        added.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                      "args": {"name": f"torchrpc worker {worker} (remote)"}})
        added.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                      "args": {"sort_index": pid}})
    trace.setdefault("traceEvents", []).extend(added)
    tmp = f"{trace_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(trace, f)
    os.replace(tmp, trace_path)


class profile(torch.profiler.profile):
    """torch.profiler.profile that also records remote events (remote=True)
    and writes them into export_chrome_trace's file."""

    def __init__(self, *args, remote: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.remote = remote
        self.remote_events: List[dict] = []
        self._was_on: Optional[bool] = None

    def start(self):
        if self.remote:
            agent = _current().agent
            self._was_on = agent.profile_remote()
            agent.take_remote_profiles()  # not ours: made before this profile
            agent.set_profile_remote(True)
        super().start()

    def stop(self):
        super().stop()
        if self.remote and self._was_on is not None:
            self.remote_events += remote_events()
            _current().agent.set_profile_remote(self._was_on)
            self._was_on = None

    def export_chrome_trace(self, path: str):
        super().export_chrome_trace(path)
        if self.remote_events:
            add_remote_events(path, self.remote_events)


def call_range(kind: str, label: str, state, dst: int):
    """The caller's range for one call when a profiler runs (else a no-op)."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    name = f"{kind}#{label}({state.self_info.name} -> {state.workers[dst].name})"
    return torch.profiler.record_function(name)


def async_range(label: str, state, dst: int):
    """Starts rpc_async's range; returns a function that ends it (when the
    future completes), or None when no profiler runs."""
    if not torch.autograd._profiler_enabled():
        return None
    handle = torch.ops.profiler._record_function_enter_new(
        f"rpc_async#{label}({state.self_info.name} -> {state.workers[dst].name})", None)
    return lambda _fut=None: torch.ops.profiler._record_function_exit._RecordFunction(handle)
