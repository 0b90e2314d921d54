"""torchrpc across real (simulated) hosts: three Linux network namespaces on a
bridge (tests/netns.py), one worker per namespace, each started with
`ip netns exec` and init_method env:// towards the first one's address.

    .venv/bin/python -m pytest -q tests/test_multihost.py     # as root

Scenarios (one test each, each on fresh namespaces):
1. calls, RRefs and distributed autograd between hosts, clean shutdown;
2. a pulled cable (worker 2's switch port down) during a pending call:
   PeerLostError within peer_timeout + 1 s, graceful shutdown names w2;
3. 30 ms delay and 5% loss on one link (tc netem, or a userspace
   impairing wire where the kernel has no netem): 50 calls never hang and
   never return a wrong value;
4. a worker holding another TORCHRPC_SECRET is refused (authentication)
   in both directions, and nothing it sends runs.

Needs root and working `ip netns add`; otherwise the module is skipped.
Worker bodies are in tests/programs/multihost_worker.py; they record what
they saw in OUT/result-RANK.json and this file asserts on it, so a failure
shows everything every worker saw (and the tail of its log).
"""

import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

import netns
from torchrpc.testing import tcp_endpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 3
MASTER_PORT = 29500  # every test has fresh namespaces: the port is free there
PEER_TIMEOUT = 2.0  # as multihost_worker.PEER_TIMEOUT
# Deadlines that only stop a hang: start-up (three torch imports on a shared
# 2-core machine) can take long under load; the checks that matter are the
# times the workers measure.
STARTUP_S = 120

if hasattr(os, "geteuid") and os.geteuid() != 0:
    pytest.skip("multi-host tests build network namespaces: run as root",
                allow_module_level=True)


@pytest.fixture(scope="module")
def namespaces_work():
    """Skips the module once if namespaces cannot be made here."""
    try:
        with netns.hosts(1, subnet="10.77.9"):
            pass
    except netns.NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")


@pytest.fixture
def net(namespaces_work):
    with contextlib.ExitStack() as stack:  # always torn down
        try:
            n = stack.enter_context(netns.hosts(WORLD, subnet="10.77.0"))
        except netns.NetnsUnavailable as e:
            pytest.skip(f"network namespaces unavailable: {e}")
        yield n


def _set_pdeathsig():
    # Workers die with the test process even if it is SIGKILLed.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class WorkerFailed(AssertionError):
    pass


class Cluster:
    """WORLD workers of one scenario, one per namespace of `net`."""

    def __init__(self, net, scenario, out_dir, secrets_of_rank, max_seconds=180.0):
        self.net = net
        self.out = str(out_dir)
        self.procs = []
        self.may_vanish = set()
        for rank in range(WORLD):
            env = dict(os.environ)
            env.update(
                MASTER_ADDR=net.hosts[0].addr,
                MASTER_PORT=str(MASTER_PORT),
                RANK=str(rank),
                WORLD_SIZE=str(WORLD),
                TORCHRPC_SECRET=secrets_of_rank[rank],
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            )
            argv = net.exec_argv(rank, [
                sys.executable, "-m", "tests.programs.multihost_worker", scenario, self.out,
                "--max-seconds", str(max_seconds),
            ])
            log = open(os.path.join(self.out, f"w{rank}.log"), "wb")
            self.procs.append(subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig,
            ))
            log.close()

    # -- talking to the workers ---------------------------------------------------

    def signal(self, name, payload=None):
        path = os.path.join(self.out, f"event-{name}")
        with open(path + ".tmp", "w") as f:
            json.dump(payload, f)
        os.rename(path + ".tmp", path)

    def _result(self, rank):
        path = os.path.join(self.out, f"result-{rank}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def log_tail(self, rank, n=6000):
        try:
            with open(os.path.join(self.out, f"w{rank}.log"), "rb") as f:
                data = f.read()
            return data[-n:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def _check_workers(self):
        """Fails at once when a worker raised or died without a result."""
        for rank, p in enumerate(self.procs):
            r = self._result(rank)
            if r is not None and not r["ok"]:
                raise WorkerFailed(f"w{rank} raised:\n{r['error']}\n{self._logs()}")
            if r is None and p.poll() is not None and rank not in self.may_vanish:
                time.sleep(0.2)  # it may have written its result just now
                if self._result(rank) is None:
                    raise WorkerFailed(
                        f"w{rank} exited (rc {p.returncode}) without a result\n{self._logs()}")

    def _partial(self, rank):
        try:
            with open(os.path.join(self.out, f"partial-{rank}.json")) as f:
                return _fmt(json.load(f))
        except OSError:
            return "(none)"

    def _logs(self, stacks=False):
        if stacks:  # Python stacks of every live worker, into its log
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        return "\n".join(
            f"--- w{r}: partial result ---\n{self._partial(r)}\n"
            f"--- w{r}: log tail ---\n{self.log_tail(r)}"
            for r in range(WORLD))

    def wait_event(self, name, timeout):
        path = os.path.join(self.out, f"event-{name}")
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            self._check_workers()
            if time.monotonic() > deadline:
                raise WorkerFailed(
                    f"no event {name!r} after {timeout} s\n{self._logs(stacks=True)}")
            time.sleep(0.01)
        with open(path) as f:
            return json.load(f)

    def results(self, ranks, timeout):
        """{rank: result dict} for `ranks`, failing after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_workers()
            got = {r: self._result(r) for r in ranks}
            if all(v is not None for v in got.values()):
                return {r: v["result"] for r, v in got.items()}
            if time.monotonic() > deadline:
                missing = [f"w{r}" for r, v in got.items() if v is None]
                raise WorkerFailed(
                    f"no result from {missing} after {timeout} s\n{self._logs(stacks=True)}")
            time.sleep(0.02)

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def cluster(net, tmp_path):
    """cluster(scenario, secrets=None) starts the workers; all are killed after the test."""
    started = []

    def start(scenario, secrets_of_rank=None, max_seconds=180.0):
        if secrets_of_rank is None:
            secrets_of_rank = [secrets.token_hex(32)] * WORLD
        c = Cluster(net, scenario, tmp_path, secrets_of_rank, max_seconds)
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.kill()


def _fmt(x):
    return json.dumps(x, indent=1, default=repr)[:6000]


# -- 1. calls, RRefs, distributed autograd ---------------------------------------


def test_calls_rrefs_autograd_across_hosts(net, cluster, record_property):
    c = cluster("calls")
    res = c.results(range(WORLD), timeout=STARTUP_S)
    for rank, r in res.items():
        host = net.hosts[rank]
        address = r["init"]["address"]
        # Each worker listens on its namespace's own address, not loopback.
        assert address is None or tcp_endpoint(address)[0] == host.addr, (rank, address)
        failed = [ch for ch in r["checks"] if not ch["ok"]]
        assert not failed, f"w{rank} checks failed: {_fmt(failed)}"
        assert r["shutdown"]["ok"], f"w{rank} shutdown: {_fmt(r['shutdown'])}"
        assert not r["shutdown"]["warnings"], f"w{rank} shutdown warned: {_fmt(r['shutdown'])}"
    names = {ch["what"] for ch in res[0]["checks"]}
    assert "w2 to_here of w1's RRef" in names and "grad via w1 == 2" in names
    n_checks = sum(len(r["checks"]) for r in res.values())
    record_property("checks", n_checks)
    print(f"\n[multihost calls] {n_checks} checks passed; addresses "
          f"{[res[r]['init']['address'] for r in range(WORLD)]}")


# -- 2. partition ----------------------------------------------------------------


def test_partition_pending_call_fails_fast(net, cluster, record_property):
    c = cluster("partition")
    c.may_vanish.add(2)  # cut off: we never wait for it
    c.wait_event("ready_for_cut", timeout=STARTUP_S)
    net.cut(2)
    t_cut = time.monotonic()
    c.signal("cut", {"t": t_cut})
    res = c.results([0, 1], timeout=45)
    r0, r1 = res[0], res[1]
    assert all(o["ok"] for o in r0["before"].values()), _fmt(r0["before"])
    assert all(o["ok"] for o in r1["before"].values()), _fmt(r1["before"])
    assert not r0["pending_done_before_cut"]

    pending = r0["pending"]
    record_property("pending_failed_after_s", pending.get("after_cut_s"))
    record_property("w0_shutdown_s", r0["shutdown"]["seconds"])
    print(f"\n[multihost partition] pending call: {_fmt(pending)}\n"
          f"w0 shutdown: {_fmt(r0['shutdown'])}\nw1 shutdown: {_fmt(r1['shutdown'])}")
    assert pending["ok"] is False and pending["peer_lost"], (
        f"the call pending on w2 did not fail with PeerLostError: {_fmt(pending)}")
    assert pending["after_cut_s"] <= PEER_TIMEOUT + 1.0, (
        f"PeerLostError came {pending['after_cut_s']:.2f} s after the cut "
        f"(limit peer_timeout + 1 = {PEER_TIMEOUT + 1.0} s)")
    new = r0["new_call_to_w2"]
    assert new["ok"] is False and new["rpc_error"], f"call to lost w2: {_fmt(new)}"

    # w0 and w1 still work with each other.
    for key, r in (("w0_to_w1_after", r0), ("w1_to_w0_right_after_cut", r1),
                   ("w1_to_w0_after_detection", r1)):
        assert r[key]["ok"] is True, f"{key}: {_fmt(r[key])}"

    sd = r0["shutdown"]
    assert sd["seconds"] <= PEER_TIMEOUT + 1.0, f"w0 graceful shutdown took too long: {_fmt(sd)}"
    assert sd["ok"], f"w0 graceful shutdown raised: {_fmt(sd)}"
    assert any(w.startswith("RuntimeWarning") and "w2" in w for w in sd["warnings"]), (
        f"w0 graceful shutdown did not warn naming w2: {_fmt(sd)}")
    # w1 lost w2 too: its shutdown must not hang either.
    assert r1["shutdown"]["seconds"] <= PEER_TIMEOUT + 3.0, _fmt(r1["shutdown"])


# -- 3. delay and loss -------------------------------------------------------------


def test_delay_and_loss_never_hang_or_corrupt(net, cluster, record_property):
    net.prepare_impairment(1)
    c = cluster("delay_loss", max_seconds=240.0)
    c.wait_event("ready_for_impair", timeout=STARTUP_S)
    how = net.impair(1, delay_ms=30, loss_pct=5.0)
    c.signal("impaired", {"how": how})
    # 90 s: time for 16 calls to use their full timeout=5 (more fail below anyway).
    c.wait_event("calls_done", timeout=90)
    wire = net.wires.get(1)
    frames = dict(wire.stats) if wire else "see tc -s qdisc"
    net.restore(1)  # shut down on a clean link
    res = c.results(range(WORLD), timeout=60)
    r0 = res[0]
    assert r0["warmup"]["ok"] is True, _fmt(r0["warmup"])
    calls = r0["calls"]
    right = sum(1 for o in calls if o["ok"] == "right")
    wrong = [o for o in calls if o["ok"] == "wrong"]
    other = [o for o in calls if o["ok"] is False and not (o["timeout"] or o["peer_lost"])]
    slow = [o for o in calls if o["seconds"] > 5.0 + 1.5]
    record_property("completed", right)
    record_property("impairment", how)
    print(f"\n[multihost delay/loss via {how}, frames {frames}] {right}/{len(calls)} calls "
          f"completed in "
          f"{r0['run_seconds']:.1f} s; slowest {max(o['seconds'] for o in calls):.2f} s; "
          f"failures: {_fmt([o for o in calls if o['ok'] is not True and o['ok'] != 'right'])}")
    assert not wrong, f"wrong values: {_fmt(wrong)}"
    assert not other, f"failures other than RpcTimeoutError/PeerLostError: {_fmt(other)}"
    assert not slow, f"calls that outlived timeout=5 by > 1.5 s: {_fmt(slow)}"
    assert right >= 40, f"only {right}/50 calls completed"
    for rank, r in res.items():
        assert r["shutdown"]["ok"], f"w{rank} shutdown: {_fmt(r['shutdown'])}"


# -- 4. wrong secret ---------------------------------------------------------------


def test_wrong_secret_is_refused(net, cluster):
    good, bad = secrets.token_hex(32), secrets.token_hex(32)
    c = cluster("bad_secret", [good, good, bad])
    res = c.results(range(WORLD), timeout=STARTUP_S)
    summary = _fmt(res)
    for rank, r in res.items():
        assert r["init"]["ok"], f"w{rank} init_rpc failed: {summary}"
    r0, r1, r2 = res[0], res[1], res[2]
    for to in ("w0", "w1"):
        call = r2[f"call_{to}"]
        assert call["ok"] is False, f"w2 (wrong secret) could call {to}: {summary}"
        assert call["rpc_error"], f"w2 -> {to} did not raise an RpcError: {_fmt(call)}"
        assert "authent" in call["message"].lower(), (
            f"w2 -> {to}: message does not mention authentication: {_fmt(call)}")
    assert not r0["marker_from_w2_present"], f"w0 ran w2's call: {summary}"
    assert not r1["marker_from_w2_present"], f"w1 ran w2's call: {summary}"
    # The other direction: the worker with the odd secret must not run w0's call.
    assert r0["call_w2"]["ok"] is False and r0["call_w2"]["rpc_error"], summary
    assert not r2["marker_from_w0_present"], f"w2 ran w0's call: {summary}"
    # Workers that share the secret work with each other.
    assert r0["good_call"]["ok"] is True and r1["good_call"]["ok"] is True, summary
