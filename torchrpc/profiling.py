"""RPCs under the profiler.

Every call made while a profiler runs shows on the caller as a range named
"rpc_sync#<function>(<caller> -> <callee>)" (rpc_async#, rpc_remote#), with
"torchrpc::send#", "torchrpc::wait" and "torchrpc::receive#" ranges inside
it recorded by the C++ agent.

With remote profiling on, calls travel as RUN_WITH_PROFILING_REQ: the callee
records the events of that request (operators, TorchScript functions,
record_function ranges in script and Python functions) on the thread serving
it and sends them back with its clock readings. The caller shifts them onto
its own clock (offset = ((t1 - t0) + (t2 - t3)) / 2, as NTP does) and puts
them in the profiler's own tables, named as torch's RPC profiling names them:
"rpc_sync#fn(w0 -> w1)#remote_op: aten::add", with node_id the callee's rank
and is_remote set:

    with torchrpc.profile() as prof:          # torch.profiler.profile, remote events on
        torchrpc.rpc_sync("w1", fn, (x,))
    print(prof.key_averages().table())        # the callee's operators too
    prof.export_chrome_trace("trace.json")    # and one track per worker

The same works around a plain torch.profiler.profile, the
torch.autograd.profiler.profile it wraps, and the legacy
torch.autograd.profiler_legacy.profile once torchrpc.profile_remote(True)
is set (the legacy profiler's Chrome export has them then; a Kineto
profiler's trace gets them through add_remote_events(path, remote_events())).

How they get into the tables: torch builds a profiler's events when the
profile is read, by parsing what the profiler recorded
(torch.autograd.profiler.profile._parse_kineto_results, and
torch.autograd.profiler_legacy._parse_legacy_records). Both are wrapped, the
first time remote profiling is turned on: after torch's parser, the remote
calls are placed by their caller range. A call belongs to the range of the
thread that sent it, to that callee, that was open when it was sent (the
latest such range started: ranges on one thread nest, and Python opens a
call's range right before sending). So each profile gets exactly its own
calls' events, whenever it is read, and the events of a call without a range
of its own (one sent from TorchScript) go to the Chrome trace only. Torch
itself offers no other way in: a Kineto profile takes events with a node id
only through its Python parser, and the C++ backend-event hook would be
written from the reply's thread while the profiler may be finishing.
"""

import bisect
import collections
import contextlib
import functools
import itertools
import json
import os
import threading
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.profiler_util import FunctionEvent

from torchrpc import _handle
from torchrpc._handle import _current

__all__ = ["profile", "profile_remote", "remote_events", "add_remote_events"]

# What torch's RPC profiling puts between a call's range and a callee event.
REMOTE_OP = "#remote_op: "
_CALL_KINDS = ("rpc_sync#", "rpc_async#", "rpc_remote#")
# Track ids for remote workers in a Chrome trace: above any real pid.
_REMOTE_PID_BASE = 1 << 30
# Answered calls kept for the tables and for remote_events(), each: beyond,
# the oldest go (as the agent keeps at most as many before they are taken).
_MAX_CALLS = 100_000
# Ids of the events added to the tables: apart from the profiler's own.
_event_ids = itertools.count(1 << 48)


class _Answered(NamedTuple):
    """One profiled call, answered: the callee's events on this worker's clock."""

    caller: str  # this worker's name
    worker: str  # the callee's
    node_id: int  # the callee's rank
    call: str  # the call, as the agent names it
    thread: int  # the thread that sent it (as profilers number threads)
    sent_ns: int
    events: List[Tuple[str, int, int, int]]  # name, start_ns, end_ns, callee thread


# Process-wide, as the profiler itself is: a profile may be read after
# torchrpc.shutdown(), so what its calls brought back must outlive the agent.
_lock = threading.Lock()
_for_tables: collections.deque = collections.deque(maxlen=_MAX_CALLS)
_for_traces: collections.deque = collections.deque(maxlen=_MAX_CALLS)


def profile_remote(enabled: bool = True):
    """Makes calls sent while a profiler runs carry back the callee's events,
    which then appear in that profiler's events() and key_averages()."""
    if enabled:
        _wrap_parsers()
    _current().agent.set_profile_remote(bool(enabled))


def remote_events() -> List[dict]:
    """The callee events gathered since the last call, on this worker's wall
    clock: dicts of worker, call, name, start_ns, end_ns."""
    _gather()
    with _lock:
        calls = list(_for_traces)
        _for_traces.clear()
    return [{"worker": c.worker, "call": c.call, "name": name, "start_ns": start, "end_ns": end}
            for c in calls for name, start, end, _thread in c.events]


def _gather():
    """Moves what the agent got back into the Python-side lists (where a
    profile read later, even after shutdown, finds it)."""
    state = _handle._state
    if state is None:
        return
    taken = state.agent.take_remote_profiles()
    if not taken:
        return
    calls = [_answered(state.self_info.name, *t) for t in taken]
    with _lock:
        _for_tables.extend(calls)
        _for_traces.extend(calls)


def _answered(caller, call, peer, sent_ns, received_ns, thread, data) -> _Answered:
    d = json.loads(data)
    # Integral, so that the callee's nesting survives the shift exactly.
    offset = ((d["received_ns"] - sent_ns) + (d["sent_ns"] - received_ns)) // 2
    events = [(e[0], e[1] - offset, e[2] - offset, e[3] if len(e) > 3 else 0) for e in d["events"]]
    return _Answered(caller, d["worker"], peer, call, thread, sent_ns, events)


# -- the profiler's tables -----------------------------------------------------


def _wrap_parsers():
    """Wraps torch's two profile parsers (once) so that what they return
    includes the remote events of the profile's calls."""
    with _lock:  # wrapped twice, a profile would get its remote events twice
        _wrap_kineto_parser()
        _wrap_legacy_parser()


def _wrap_kineto_parser():
    kineto = torch.autograd.profiler.profile
    parse = getattr(kineto, "_parse_kineto_results", None)
    if parse is not None and not getattr(parse, "_torchrpc", False):

        @functools.wraps(parse)
        def parse_kineto(self, result, *args, **kwargs):
            events = parse(self, result, *args, **kwargs)
            return _with_remote(events, result.trace_start_ns(), self.use_device, legacy=False)

        parse_kineto._torchrpc = True
        kineto._parse_kineto_results = parse_kineto
    elif parse is None:
        _cannot_wrap("torch.autograd.profiler.profile._parse_kineto_results")


def _wrap_legacy_parser():
    import torch.autograd.profiler_legacy as legacy

    parse_records = getattr(legacy, "_parse_legacy_records", None)
    if parse_records is not None and not getattr(parse_records, "_torchrpc", False):

        @functools.wraps(parse_records)
        def parse_legacy(thread_records):
            events = parse_records(thread_records)
            # Times are in us from the profile's start mark (torch's parser checked it is there).
            start = next(r for r in itertools.chain.from_iterable(thread_records)
                         if r.name() == "__start_profile")
            return _with_remote(events, round(start.start_us() * 1000), None, legacy=True)

        parse_legacy._torchrpc = True
        legacy._parse_legacy_records = parse_legacy
    elif parse_records is None:
        _cannot_wrap("torch.autograd.profiler_legacy._parse_legacy_records")


def _cannot_wrap(what: str):
    warnings.warn(f"torchrpc: this torch has no {what}: remote events will reach Chrome "
                  "traces (add_remote_events) but not that profiler's tables",
                  RuntimeWarning, stacklevel=5)  # where remote profiling was turned on


def _with_remote(events: list, base_ns: int, use_device, legacy: bool) -> list:
    """`events` (a parser's FunctionEvents, times in us from base_ns) plus the
    remote events of the calls whose ranges they hold, sorted as torch sorts."""
    try:
        added = _remote_function_events(events, base_ns, use_device, legacy)
    except Exception as e:  # the profile without remote events rather than no profile
        warnings.warn(f"torchrpc: remote events left out of the profile: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=2)
        return events
    if added:
        events.extend(added)
        events.sort(key=lambda evt: [evt.time_range.start, -evt.time_range.end])
    return events


def _remote_function_events(events, base_ns: int, use_device, legacy: bool) -> List[FunctionEvent]:
    _gather()
    ranges = _call_ranges(events, base_ns)
    if not ranges:
        return []
    with _lock:
        pending = list(_for_tables)
    placed, out = set(), []
    for c in pending:
        name = _range_of(ranges.get((c.thread, c.caller, c.worker)), c.sent_ns)
        if name is None:
            continue  # another profile's call, or one without a range
        placed.add(id(c))
        for evt_name, start, end, thread in c.events:
            full = f"{name}{REMOTE_OP}{evt_name}"
            out.append(FunctionEvent(
                id=next(_event_ids), name=full, trace_name=full, thread=thread,
                start_us=(start - base_ns) / 1000, end_us=(end - base_ns) / 1000,
                input_shapes=[], stack=[], use_device=use_device,
                is_remote=True, node_id=c.node_id, is_legacy=legacy,
            ))
    if placed:
        with _lock:
            kept = [c for c in _for_tables if id(c) not in placed]
            _for_tables.clear()
            _for_tables.extend(kept)
    return out


class _Ranges(NamedTuple):
    starts: List[int]  # sorted
    ends: List[Optional[int]]  # of the same ranges; None: not ended while the profiler ran
    names: List[str]


def _call_ranges(events, base_ns: int) -> Dict[tuple, _Ranges]:
    """The caller ranges of calls among `events`, by (thread, caller, callee),
    in wall-clock ns."""
    found: Dict[tuple, list] = {}
    for e in events:
        name = e.name
        if not name.startswith(_CALL_KINDS) or not name.endswith(")") or REMOTE_OP in name:
            continue
        caller, arrow, callee = name[name.rfind("(") + 1:-1].partition(" -> ")
        if not arrow:
            continue
        start = base_ns + round(e.time_range.start * 1000)
        end = base_ns + round(e.time_range.end * 1000)
        found.setdefault((e.thread, caller, callee), []).append(
            (start, end if end >= start else None, name))
    out = {}
    for key, rs in found.items():
        rs.sort(key=lambda r: r[0])
        out[key] = _Ranges([r[0] for r in rs], [r[1] for r in rs], [r[2] for r in rs])
    return out


def _range_of(ranges: Optional[_Ranges], sent_ns: int) -> Optional[str]:
    """The latest range started by `sent_ns` if it was still open then."""
    if ranges is None:
        return None
    i = bisect.bisect_right(ranges.starts, sent_ns) - 1
    if i < 0:
        return None
    end = ranges.ends[i]
    return ranges.names[i] if end is None or end >= sent_ns else None


# -- Chrome traces ---------------------------------------------------------------


def add_remote_events(trace_path: str, events: List[dict]):
    """Adds `events` (remote_events()) to a Chrome trace written by a Kineto
    profiler's export_chrome_trace, each worker on a track of its own (the
    legacy profiler's export has them already)."""
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
    """torch.profiler.profile with remote profiling on while it runs
    (remote=True): the callee events of its calls are in events() and
    key_averages(), and export_chrome_trace writes them on a track per worker."""

    def __init__(self, *args, remote: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.remote = remote
        self.remote_events: List[dict] = []
        self._was_on: Optional[bool] = None

    def start(self):
        if self.remote:
            _wrap_parsers()
            agent = _current().agent
            self._was_on = agent.profile_remote()
            remote_events()  # not ours: made before this profile
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


# -- the caller's ranges -----------------------------------------------------------


@contextlib.contextmanager
def _gathering_after(name: str):
    with torch.profiler.record_function(name):
        yield
    _gather()  # while the agent lives: the profile may be read after shutdown


def call_range(kind: str, label: str, state, dst: int):
    """The caller's range for one call when a profiler runs (else a no-op)."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return _gathering_after(f"{kind}#{label}({state.self_info.name} -> {state.workers[dst].name})")


def async_call(label: str, state, dst: int, send):
    """rpc_async under a profiler: the future `send()` returns, with the
    call's range open until that future completes."""
    handle = torch.ops.profiler._record_function_enter_new(
        f"rpc_async#{label}({state.self_info.name} -> {state.workers[dst].name})", None)
    try:
        fut = send()
    except BaseException:
        torch.ops.profiler._record_function_exit._RecordFunction(handle)
        raise
    # Ended by whichever thread completes the future, under this thread's
    # profiler (torch's own way: another thread has no profiler of its own,
    # and the legacy one would drop the end).
    with torch._C.DisableTorchFunctionSubclass():
        torch.ops.profiler._call_end_callbacks_on_jit_fut._RecordFunction(handle, fut)
    fut.add_done_callback(lambda _fut: _gather())
    return fut
