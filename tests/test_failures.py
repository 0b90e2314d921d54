"""Dead, frozen and failing peers, rendezvous that never completes, and
cancellation.

What the transport promises (and these tests hold it to):
- heartbeats every RpcOptions.heartbeat_interval; a peer silent for
  RpcOptions.peer_timeout (SIGKILLed or SIGSTOPped) is declared lost:
  pending calls to it fail with PeerLostError naming it, and shutdown()
  returns within peer_timeout (+ slack), warning (RuntimeWarning) with the
  lost peers' names, or raising RpcShutdownError naming them with
  shutdown(raise_on_lost_peers=True);
- init_rpc raises RpcTimeoutError within init_timeout on every rank when a
  rank never arrives, naming the missing ranks, also on a non-host rank whose
  store (rank 0) never appears, and the process then exits cleanly;
- a worker that raises and exits between init_rpc and shutdown does not hold
  up the others' shutdown();
- torchrpc.cancel(fut) cancels a pending call (True if it never ran on the
  callee); a call's timeout sends CANCEL so the callee drops it if not started.

Workers run in spawned processes driven by commands over a Pipe (module-level
functions sent by reference); every test has a hard timeout (SIGALRM) and
kills its children when done, so nothing can hang the suite. Times are
compared across processes with time.monotonic() (CLOCK_MONOTONIC is
system-wide on Linux).
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from datetime import timedelta

import pytest
import torch
from rpc_harness import free_port, report_from_child, spawn_and_collect
from worlds import World, future_outcome, hard_timeout

import scripted_ops
import torchrpc

PEER_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 0.5
SLACK = 1.0
LOST_WITHIN = PEER_TIMEOUT + SLACK  # a lost peer's calls fail, and shutdown returns, within this
# Bounds an old build's graceful shutdown so a failing test still ends quickly;
# a correct one returns within LOST_WITHIN regardless.
SHUTDOWN_TIMEOUT = 4.0
INIT_TIMEOUT = 3.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- functions the workers call on each other ----------------------------------------


def udf_sleep(started_marker, seconds):
    """Marks that it started, then sleeps."""
    with open(started_marker, "w"):
        pass
    time.sleep(seconds)
    return seconds


def udf_write_marker(path):
    with open(path, "w") as f:
        f.write("ran")
    return path


def raise_boom():
    raise RuntimeError("boom: this worker fails right after init_rpc")


# -- commands (run in the workers) ---------------------------------------------------

_pending = []


def cmd_start_slow_calls(to, n, marker_dir, seconds):
    """Starts n slow Python calls to `to`; returns the paths their start markers get."""
    me = torchrpc.get_worker_info().name
    paths = []
    for i in range(n):
        path = os.path.join(marker_dir, f"{me}-{i}")
        _pending.append(torchrpc.rpc_async(to, udf_sleep, (path, seconds), timeout=60))
        paths.append(path)
    return paths


def _shutdown_measured(raise_on_lost_peers):
    out = {}
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if raise_on_lost_peers:
                torchrpc.shutdown(raise_on_lost_peers=True)
            else:
                torchrpc.shutdown()
            out["error"] = None
        except Exception as e:
            out["error"] = (type(e).__name__, str(e))
    out["seconds"] = time.monotonic() - t0
    out["ended_at"] = time.monotonic()
    out["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
    return out


def cmd_await_pending_then_shutdown(within, raise_on_lost_peers):
    """Waits (at most `within` s in all) for the calls cmd_start_slow_calls
    started; if all completed, shuts down and times it."""
    deadline = time.monotonic() + within
    outcomes = [future_outcome(f, max(0.0, deadline - time.monotonic())) for f in _pending]
    out = {"outcomes": outcomes, "shutdown": None}
    if all(o[0] != "pending" for o in outcomes):
        out["shutdown"] = _shutdown_measured(raise_on_lost_peers)
    return out


def cmd_shutdown(raise_on_lost_peers):
    return _shutdown_measured(raise_on_lost_peers)


def cmd_cancel_queued(marker_dir):
    """w1 has one worker thread: a 1.5 s call holds it while two more (a
    Python call that would write a marker, a script call that would store a
    parameter) wait in its queue; both are cancelled."""
    out = {}
    blocker = torchrpc.rpc_async("w1", scripted_ops.sleep_ms, (1500,))
    time.sleep(0.3)  # the blocker holds w1's only worker thread
    queued_py = torchrpc.rpc_async(
        "w1", udf_write_marker, (os.path.join(marker_dir, "cancelled-udf"),)
    )
    queued_script = torchrpc.rpc_async(
        "w1", scripted_ops.param_put, ("cancelled-script", torch.ones(1))
    )
    time.sleep(0.3)  # both have reached w1 and wait in its queue
    out["cancel_py"] = torchrpc.cancel(queued_py)
    out["cancel_script"] = torchrpc.cancel(queued_script)
    out["py"] = future_outcome(queued_py, 5.0)
    out["script"] = future_outcome(queued_script, 5.0)
    out["blocker"] = future_outcome(blocker, 5.0)
    out["blocker_value"] = blocker.wait() if out["blocker"][0] == "ok" else None
    out["cancel_completed"] = torchrpc.cancel(blocker)
    time.sleep(0.5)  # had a cancelled call run after the blocker, it would have by now
    out["script_ran"] = _param_exists("cancelled-script")
    return out


def cmd_timeout_drops_queued(marker_dir):
    """A call that times out (0.5 s) while queued behind a 2 s call on w1
    (one worker thread) must never run there."""
    blocker = torchrpc.rpc_async("w1", scripted_ops.sleep_ms, (2000,))
    time.sleep(0.3)
    t0 = time.monotonic()
    late_py = torchrpc.rpc_async(
        "w1", udf_write_marker, (os.path.join(marker_dir, "timed-out-udf"),), timeout=0.5
    )
    late_script = torchrpc.rpc_async(
        "w1", scripted_ops.param_put, ("timed-out-script", torch.ones(1)), timeout=0.5
    )
    out = {"py": future_outcome(late_py, 5.0), "script": future_outcome(late_script, 5.0), "sent_at": t0}
    out["blocker"] = future_outcome(blocker, 5.0)
    time.sleep(0.7)  # had a timed-out call run after the blocker, it would have by now
    out["script_ran"] = _param_exists("timed-out-script")
    return out


def _param_exists(name):
    try:
        torchrpc.rpc_sync("w1", scripted_ops.param_get, (name,), timeout=5)
        return True
    except torchrpc.RpcTimeoutError:
        raise
    except Exception:
        return False


# -- lost peers ---------------------------------------------------------------------


def _lost_peer(sig, tmp_path):
    """w0 and w1 have slow calls running on w2; w2 gets `sig`. Returns what
    w0 (default shutdown: warns) and w1 (raise_on_lost_peers=True) saw, and
    the monotonic time of the signal."""
    options = {"python_udf": True, "peer_timeout": PEER_TIMEOUT,
               "heartbeat_interval": HEARTBEAT_INTERVAL, "shutdown_timeout": SHUTDOWN_TIMEOUT}
    with World(3, options=options) as world:
        victim = world.pid(2)
        try:
            markers = []
            for r in (0, 1):
                markers += world.do(r, cmd_start_slow_calls, "w2", 3, str(tmp_path), 30.0)
            deadline = time.monotonic() + 10
            while not all(os.path.exists(m) for m in markers):
                assert time.monotonic() < deadline, "the slow calls never started on w2"
                time.sleep(0.02)
            signalled_at = time.monotonic()
            os.kill(victim, sig)
            wait = LOST_WITHIN + 3.0
            world.send(0, cmd_await_pending_then_shutdown, wait, False)
            world.send(1, cmd_await_pending_then_shutdown, wait, True)
            w0, w1 = world.recv_all((0, 1), wait + 3 * SHUTDOWN_TIMEOUT + 5)
            return w0, w1, signalled_at
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass


def _check_lost_peer(w0, w1, signalled_at):
    for name, out in (("w0", w0), ("w1", w1)):
        for kind, message, done_at, _ in out["outcomes"]:
            assert kind == "PeerLostError", f"{name}'s call to w2 ended as {kind}: {message}"
            assert "w2" in message, message
            took = done_at - signalled_at
            assert took < LOST_WITHIN, f"{name}'s call failed {took:.2f} s after w2 was lost"
    assert w0["shutdown"] is not None and w1["shutdown"] is not None
    s0, s1 = w0["shutdown"], w1["shutdown"]
    assert s0["seconds"] < LOST_WITHIN, f"w0's shutdown took {s0['seconds']:.2f} s"
    assert s1["seconds"] < LOST_WITHIN, f"w1's shutdown took {s1['seconds']:.2f} s"
    assert s0["error"] is None, f"w0's shutdown raised {s0['error']}"
    assert any(cat == "RuntimeWarning" and "w2" in msg for cat, msg in s0["warnings"]), (
        f"w0's shutdown did not warn about losing w2: {s0['warnings']}"
    )
    assert s1["error"] is not None and s1["error"][0] == "RpcShutdownError", s1
    assert "w2" in s1["error"][1], s1["error"]


@hard_timeout(45)
def test_sigkilled_peer_fails_pending_calls_and_shutdown_names_it(tmp_path):
    _check_lost_peer(*_lost_peer(signal.SIGKILL, tmp_path))


@hard_timeout(45)
def test_sigstopped_peer_is_declared_lost_by_heartbeat(tmp_path):
    _check_lost_peer(*_lost_peer(signal.SIGSTOP, tmp_path))


@hard_timeout(45)
def test_worker_raising_after_init_does_not_hold_up_shutdown():
    options = {"peer_timeout": PEER_TIMEOUT, "heartbeat_interval": HEARTBEAT_INTERVAL,
               "shutdown_timeout": SHUTDOWN_TIMEOUT}
    with World(3, options=options, after_ready={2: raise_boom}) as world:
        failing = world.procs[2]
        failing.join(timeout=10)
        assert failing.exitcode not in (None, 0), "w2 should have died of its exception"
        world.send(0, cmd_shutdown, False)
        world.send(1, cmd_shutdown, False)
        for r, out in zip((0, 1), world.recv_all((0, 1), 3 * SHUTDOWN_TIMEOUT + 5)):
            assert out["seconds"] < LOST_WITHIN, f"w{r}'s shutdown took {out['seconds']:.2f} s"
            assert out["error"] is None, f"w{r}'s shutdown raised {out['error']}"


# -- the store host (rank 0) lost -------------------------------------------------------
# Rank 0 hosts the rendezvous store. When it dies without shutdown(), the
# store goes with it: the survivors' graceful shutdown must treat that as one
# more sign of a lost peer (warn or RpcShutdownError naming w0, within
# peer_timeout), never as a timeout, and never wait for calls that can no
# longer be answered.


class AddOne(torch.nn.Module):
    def forward(self, x):
        return x + 1


_held = []


def cmd_hold_refs_and_ship_code():
    """On w0: RRefs owned by w1 and w2, and a ScriptModule shipped by value
    to w1 (accept_code) with a remote() of it there."""
    module = torch.jit.script(AddOne())
    assert torchrpc.rpc_sync("w1", module, (torch.ones(2),)).tolist() == [2.0, 2.0]
    _held.append(torchrpc.remote("w1", module, (torch.ones(2),)))
    for peer in ("w1", "w2"):
        _held.append(torchrpc.remote(peer, torch.add, (torch.ones(2), 1)))
    return [r.to_here().tolist() for r in _held]


def cmd_calls_to_the_host(marker_dir):
    """Slow calls to w0 without a timeout; returns the paths their start markers get."""
    me = torchrpc.get_worker_info().name
    paths = []
    for i in range(2):
        path = os.path.join(marker_dir, f"{me}-{i}")
        _pending.append(torchrpc.rpc_async("w0", udf_sleep, (path, 60.0), timeout=0))
        paths.append(path)
    return paths


def cmd_keep_calling_the_host():
    """A thread that keeps calling w0 (without a timeout) until a call
    fails: one of these sends may meet the connection as it breaks."""

    def keep_calling():
        while True:
            try:
                fut = torchrpc.rpc_async("w0", scripted_ops.sleep_ms, (60000,), timeout=0)
            except Exception:
                return
            _pending.append(fut)
            if fut.done():
                return
            time.sleep(0.002)

    threading.Thread(target=keep_calling, daemon=True).start()


def die_now():
    os._exit(0)


def _store_host_dies(transport, tmp_path, how, held=False, calls=False):
    """w0 (the store host) does what `held`/`calls` say, then dies (`how`:
    "exit" is os._exit, "kill" SIGKILL, "kill_in_shutdown" SIGKILL once w1
    and w2 wait in their graceful shutdown). Returns what w1 (default
    shutdown: warns) and w2 (raise_on_lost_peers=True) saw, and when w0 died."""
    options = {"python_udf": True, "peer_timeout": PEER_TIMEOUT,
               "heartbeat_interval": HEARTBEAT_INTERVAL, "shutdown_timeout": SHUTDOWN_TIMEOUT}
    per_rank = [options, {**options, "accept_code": True}, options]
    with World(3, options=per_rank, transport=transport) as world:
        if held:
            assert world.do(0, cmd_hold_refs_and_ship_code) == [[2.0, 2.0]] * 3
        if calls:
            markers = world.do(1, cmd_calls_to_the_host, str(tmp_path))
            markers += world.do(2, cmd_calls_to_the_host, str(tmp_path))
            deadline = time.monotonic() + 10
            while not all(os.path.exists(m) for m in markers):
                assert time.monotonic() < deadline, "the slow calls never started on w0"
                time.sleep(0.02)
            world.do(1, cmd_keep_calling_the_host)
            world.do(2, cmd_keep_calling_the_host)
            time.sleep(0.2)
        wait = LOST_WITHIN + 1.0
        if how == "kill_in_shutdown":
            world.send(1, cmd_shutdown, False)
            world.send(2, cmd_shutdown, True)
            time.sleep(0.5)  # both wait for w0 at the shutdown barrier
        died_at = time.monotonic()
        if how == "exit":
            world.send(0, die_now)
        else:
            os.kill(world.pid(0), signal.SIGKILL)
        if how != "kill_in_shutdown":
            world.send(1, cmd_await_pending_then_shutdown, wait, False)
            world.send(2, cmd_await_pending_then_shutdown, wait, True)
        w1, w2 = world.recv_all((1, 2), wait + 2 * SHUTDOWN_TIMEOUT + 5)
    return w1, w2, died_at


def _check_store_host_lost(w1, w2, died_at):
    shutdowns = []
    for name, out in (("w1", w1), ("w2", w2)):
        for kind, message, done_at, _ in out.get("outcomes", []):
            assert kind == "PeerLostError", f"{name}'s call to w0 ended as {kind}: {message}"
            took = done_at - died_at
            assert took < LOST_WITHIN, f"{name}'s call failed {took:.2f} s after w0 died"
        shutdown = out["shutdown"] if "outcomes" in out else out
        assert shutdown is not None, f"{name} still had calls to w0 pending: {out['outcomes']}"
        took = shutdown["ended_at"] - died_at
        assert took < LOST_WITHIN, f"{name}'s shutdown ended {took:.2f} s after w0 died: {shutdown}"
        shutdowns.append(shutdown)
    s1, s2 = shutdowns
    assert s1["error"] is None, f"w1's shutdown raised {s1['error']}"
    warned = [msg for cat, msg in s1["warnings"] if cat == "RuntimeWarning" and "lost peers" in msg]
    assert any("'w0'" in msg for msg in warned), f"w1 did not warn of losing w0: {s1['warnings']}"
    assert s2["error"] is not None and s2["error"][0] == "RpcShutdownError", s2
    assert "'w0'" in s2["error"][1], s2["error"]


@pytest.mark.parametrize("how,held,calls", [
    ("exit", False, False),
    ("exit", True, False),
    ("kill", True, True),
    ("kill_in_shutdown", True, False),
], ids=["exit", "exit_holding_rrefs_and_shipped_code", "sigkill_with_pending_calls",
        "sigkill_during_shutdown"])
@hard_timeout(45)
def test_store_host_lost_is_a_lost_peer_not_a_timeout(transport, tmp_path, how, held, calls):
    _check_store_host_lost(*_store_host_dies(transport, tmp_path, how, held, calls))


def _outside_store_child(rank, port, queue):
    """A worker whose store is hosted by someone else (as torchrun's agent
    does): it marks itself ready, waits until that store is gone, then shuts
    down gracefully."""

    def run():
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
        torchrpc.init_rpc(f"w{rank}", rank=rank, world_size=2,
                          init_method=f"tcp://127.0.0.1:{port}",
                          options=torchrpc.RpcOptions(peer_timeout=PEER_TIMEOUT,
                                                      shutdown_timeout=SHUTDOWN_TIMEOUT))
        store = torchrpc.api._current().store
        store.set(f"ready/{rank}", "1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                store.check(["ready/0"])
            except Exception:
                break
            time.sleep(0.05)
        return _shutdown_measured(False)

    report_from_child(rank, queue, run)


@hard_timeout(45)
def test_store_gone_while_every_worker_lives_is_an_error_of_its_own():
    port = free_port()
    hosting = [torch.distributed.TCPStore("127.0.0.1", port, 3, True, timedelta(seconds=20),
                                          wait_for_workers=False)]
    closed_at = []

    def close_when_ready():
        store = hosting.pop()
        store.wait(["torchrpc/current"])
        prefix = "torchrpc/" + store.get("torchrpc/current").decode()
        store.wait([f"{prefix}/ready/0", f"{prefix}/ready/1"])
        del store  # its last holder: the server goes
        closed_at.append(time.monotonic())

    closer = threading.Thread(target=close_when_ready, daemon=True)
    closer.start()
    results = spawn_and_collect(_outside_store_child, lambda r: (r, port), 2, timeout=30)
    closer.join(timeout=5)
    assert closed_at, "the workers never got ready"
    # The first to give up raises; a worker that then sees it leave has no
    # one left to wait for, and is done.
    errors = [out["error"] for out in results if out["error"] is not None]
    assert errors, results
    for error in errors:
        assert error[0] == "RpcError" and "store stopped answering" in error[1], error
    for rank, out in enumerate(results):
        took = out["ended_at"] - closed_at[0]
        assert took < LOST_WITHIN + 1.0, f"w{rank}'s shutdown ended {took:.2f} s after the store"


# -- rendezvous that never completes ----------------------------------------------------

_INIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torchrpc
    rank, world_size, port, init_timeout = (
        int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    t0 = time.monotonic()
    try:
        torchrpc.init_rpc(f"w{rank}", rank=rank, world_size=world_size,
                          init_method=f"tcp://127.0.0.1:{port}",
                          options=torchrpc.RpcOptions(init_timeout=init_timeout))
        out = {"error": None}
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e),
               "is_timeout": isinstance(e, torchrpc.RpcTimeoutError)}
    out["elapsed"] = time.monotonic() - t0
    out["caught_at"] = time.monotonic()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _init_alone(rank, world_size):
    """Runs init_rpc in a fresh interpreter with nobody else arriving; its
    report, exit code, and seconds from catching the error to exiting."""
    port = free_port()  # nothing listens here unless rank 0 hosts the store
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _INIT_SCRIPT, str(rank), str(world_size), str(port),
         str(INIT_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        stdout, stderr = proc.communicate(timeout=30)
        exited_at = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (exit code {proc.returncode}); stderr:\n{stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    return out, proc.returncode, exited_at - out["caught_at"], stderr


def _names_rank(message, rank):
    return re.search(rf"rank\D{{0,20}}?\b{rank}\b", message, re.IGNORECASE) is not None


# rank 1 alone: the host's store never appears; rank 0 alone: rank 1 never arrives.
@pytest.mark.parametrize("rank,missing", [(1, 0), (0, 1)], ids=["non_host_rank", "host_rank"])
@hard_timeout(30)
def test_init_times_out_naming_the_missing_rank(rank, missing):
    out, rc, exit_after, stderr = _init_alone(rank=rank, world_size=2)
    assert out["error"] == "RpcTimeoutError" and out["is_timeout"], out
    assert out["elapsed"] < INIT_TIMEOUT + 1.0, f"init_rpc gave up after {out['elapsed']:.2f} s"
    assert _names_rank(out["message"], missing), f"the message does not name rank {missing}: {out['message']}"
    assert rc == 0, f"exit code {rc}; stderr:\n{stderr[-3000:]}"
    assert exit_after < 10.0, f"the process took {exit_after:.2f} s to exit after the error"


# -- cancellation ---------------------------------------------------------------------------

_CANCEL_OPTIONS = [{"python_udf": True}, {"python_udf": True, "num_worker_threads": 1}]


@hard_timeout(40)
def test_cancel_drops_queued_calls(tmp_path):
    with World(2, options=_CANCEL_OPTIONS) as world:
        out = world.do(0, cmd_cancel_queued, str(tmp_path), timeout=30)
    assert out["cancel_py"] is True, out
    assert out["cancel_script"] is True, out
    for key in ("py", "script"):
        kind, message, _, is_rpc_error = out[key]
        assert kind not in ("ok", "pending"), f"cancelled {key} call ended as {kind}"
        assert is_rpc_error, f"cancelled {key} call failed with {kind}: {message}"
    assert out["blocker"][0] == "ok" and out["blocker_value"] == 1500, out["blocker"]
    assert out["cancel_completed"] is False, "cancel() of a completed call must return False"
    assert not (tmp_path / "cancelled-udf").exists(), "the cancelled Python call ran on w1"
    assert out["script_ran"] is False, "the cancelled script call ran on w1"


@hard_timeout(40)
def test_timed_out_call_is_dropped_by_the_callee(tmp_path):
    with World(2, options=_CANCEL_OPTIONS) as world:
        out = world.do(0, cmd_timeout_drops_queued, str(tmp_path), timeout=30)
    for key in ("py", "script"):
        kind, message, done_at, _ = out[key]
        assert kind == "RpcTimeoutError", f"{key} call ended as {kind}: {message}"
        took = done_at - out["sent_at"]
        assert took < 1.5, f"{key} timed out after {took:.2f} s"
    assert out["blocker"][0] == "ok", out["blocker"]
    assert not (tmp_path / "timed-out-udf").exists(), "w1 ran a Python call after its timeout"
    assert out["script_ran"] is False, "w1 ran a script call after its timeout"


# -- a busy peer is not a lost one ----------------------------------------------------------


def spin_holding_the_gil(seconds):
    """Pure Python for `seconds`: the GIL is busy, the worker's C++ is not."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def cmd_call_spinning_peer(seconds):
    import torchrpc

    value = torchrpc.rpc_sync("w1", spin_holding_the_gil, (seconds,), timeout=seconds + 10)
    return {"value": value, "lost": torchrpc.debug_info()["lost_peers"]}


@hard_timeout(40)
def test_heartbeats_flow_while_python_holds_the_gil():
    # w1 runs Python for three peer timeouts; its heartbeats (C++) keep flowing.
    options = {"python_udf": True, "peer_timeout": 1.0, "heartbeat_interval": 0.25}
    with World(2, options=options) as world:
        out = world.do(0, cmd_call_spinning_peer, 3.0, timeout=30)
    assert out["value"] > 0
    assert out["lost"] == {}, out["lost"]
