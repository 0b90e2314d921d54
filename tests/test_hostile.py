"""Hostile raw-socket clients against a live worker.

A 2-worker world runs in spawned child processes: w0 is the target, w1 a
real peer that makes ordinary calls. The test process learns w0's listen
address (its agent's `.address`) and pid, attacks that address with raw
sockets of its own, and then checks that w0 still serves w1 promptly, with
its descriptors, threads and memory where they were.

What the transport promises (and these tests hold it to):
- every TCP connection starts with a fixed-size mutual HMAC-SHA256
  challenge-response handshake, before any frame is read; a peer that sends
  anything else first, fails it, or does not finish within
  RpcOptions.handshake_timeout is closed, the worker having read at most the
  fixed handshake size;
- connections are served by a small fixed set of threads (epoll), a closed
  connection's descriptor is released at once, and running out of
  descriptors (EMFILE) is survived;
- a worker whose secret differs is refused with torchrpc.AuthenticationError,
  and the refusing worker says so on stderr.

The children run a command loop (a multiprocessing Pipe): the test sends a
module-level function and its arguments, the child runs it and sends back
the result. Every test has a hard timeout (SIGALRM) and every child is
killed when its world closes, so nothing can hang the suite.
"""

import os
import random
import resource
import socket
import time

import pytest
import torch
from worlds import World, hard_timeout

import torchrpc
from torchrpc import messages, python_udf
from torchrpc.testing import HEADER, join_frame, split_frame

HANDSHAKE_TIMEOUT = 1.0  # RpcOptions.handshake_timeout of the attacked worker
CLOSE_WITHIN = HANDSHAKE_TIMEOUT + 1.0  # a stalled connection must be gone by then
CALL_LIMIT = 2.0  # every normal call from w1 after an attack completes within this
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
PAYLOAD = 5  # index of payloadBytes in torchrpc.testing.HEADER


# -- commands (run in the workers) ----------------------------------------------


def cmd_calls(to, n, timeout):
    """n rpc_sync calls to `to`, each with `timeout`; their latencies."""
    latencies = []
    for i in range(n):
        t0 = time.monotonic()
        out = torchrpc.rpc_sync(to, torch.add, (torch.ones(2), i), timeout=timeout)
        latencies.append(time.monotonic() - t0)
        assert torch.equal(out, torch.ones(2) + i), out
    return latencies


def cmd_call_outcome(to, timeout):
    """One call to `to`: ("ok", seconds) or (error class name, message, seconds, is RpcError)."""
    t0 = time.monotonic()
    try:
        torchrpc.rpc_sync(to, torch.add, (torch.ones(2), 1), timeout=timeout)
        return ("ok", "", time.monotonic() - t0, False)
    except Exception as e:
        return (type(e).__name__, str(e), time.monotonic() - t0, isinstance(e, torchrpc.RpcError))


def cmd_lower_nofile(limit):
    """Lowers this process's RLIMIT_NOFILE soft limit; returns (old soft, open fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return soft, len(os.listdir("/proc/self/fd"))


# -- looking at a worker from outside ---------------------------------------------


def hold_connections(addr, n, seconds, pid, every):
    """Opens n connections to `addr` without a word (non-blocking: they
    complete in the background), holds them `seconds` while sampling
    proc_stats(pid) every `every` seconds, then closes them; the samples."""
    socks, samples = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(addr)
            socks.append(s)
        hold_until = time.monotonic() + seconds
        while time.monotonic() < hold_until:
            samples.append(proc_stats(pid))
            time.sleep(every)
    finally:
        for s in socks:
            s.close()
    return samples


def proc_stats(pid):
    """(open descriptors, threads, RSS bytes) of process `pid`."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * PAGE
    return fds, threads, rss


def rss(pid):
    return proc_stats(pid)[2]


def wait_for(predicate, within, step=0.05):
    """Polls predicate() until it is true or `within` seconds passed; its last value."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def assert_w1_serves(world, n=20):
    """w1 makes n normal calls to w0; each completes within CALL_LIMIT."""
    assert world.alive(0), "w0 died"
    latencies = world.do(1, cmd_calls, "w0", n, CALL_LIMIT, timeout=n * CALL_LIMIT + 30)
    assert max(latencies) < CALL_LIMIT, latencies
    return latencies


# -- raw sockets ----------------------------------------------------------------


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def connect(addr, timeout=2.0):
    return socket.create_connection(addr, timeout=timeout)


def send_quietly(sock, data):
    """sendall, ignoring a worker that already closed (reset, broken pipe)."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def closed_after(sock, started, within, tick=None):
    """Seconds from `started` until the worker closed `sock` (EOF or reset),
    or None if it was still open `within` seconds after `started`. Bytes the
    worker sends meanwhile (its side of a handshake) are read and ignored;
    tick(), if given, is called every 0.1 s while waiting."""
    deadline = started + within
    while True:
        if tick is not None:
            tick()
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(min(left, 0.1) if tick is not None else left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


def legacy_hello():
    """What a client that only knows the frame protocol would send first."""
    return messages.Handshake(worker_name="w1", worker_id=1, protocol_version=1).encode()


def huge_payload_header():
    """A 48-byte frame header with a valid magic, version, type and checksum
    over the header itself, declaring a 1 GiB payload."""
    frame = messages.PythonCall(
        id=11, pickled=torch.zeros(8, dtype=torch.uint8), tensors=[], is_async=False
    ).encode()
    parts = split_frame(frame)
    parts.header[PAYLOAD] = 1 << 30
    header = join_frame(parts._replace(payload=b"", descriptors=b"", storage=b""))
    assert len(header) == HEADER.size == 48
    return header


class _OpenOnUnpickle:
    """Unpickling this opens (creates) a file: proof that a payload was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def python_call_writing(path):
    """A well-formed PYTHON_CALL frame whose unpickling creates `path`."""
    pickled, tensors = python_udf.dumps((_OpenOnUnpickle(path), (), {}))
    frame = messages.PythonCall(id=21, pickled=pickled, tensors=tensors, is_async=False).encode()
    assert messages.decode(frame).TYPE == messages.MessageType.PYTHON_CALL
    return frame


# -- worlds of their own: e (descriptor exhaustion), g (secrets) ------------------


@hard_timeout(60)
def test_e_descriptor_exhaustion_is_survived():
    """w0 runs out of descriptors under a connection storm and keeps accepting:
    w1, which never called w0 before, can call it afterwards."""
    limit = 256
    # w0 admits more connections mid-handshake than it has descriptors, so the
    # burst below really runs it out of them (EMFILE) instead of being capped.
    opts = {"handshake_timeout": HANDSHAKE_TIMEOUT}
    w0_opts = dict(opts, max_pending_handshakes=4 * limit)
    raise_nofile(2048)
    with World(2, options=[w0_opts, opts]) as world:
        pid = world.pid(0)
        addr = world.address(0)
        _, fds_at_limit = world.do(0, cmd_lower_nofile, limit)
        assert fds_at_limit < limit - 100, f"w0 already has {fds_at_limit} descriptors open"
        fds0, threads0, rss0 = proc_stats(pid)

        cycles_done, budget = 0, time.monotonic() + 5.0
        for _ in range(600):
            if time.monotonic() > budget:
                break
            try:
                connect(addr, timeout=0.5).close()
                cycles_done += 1
            except OSError:
                pass
        peak_fds = max(fds for fds, _, _ in hold_connections(addr, 300, 1.5, pid, 0.02))
        assert world.alive(0), "w0 died under the connection storm"
        # Else the storm never came near the limit and the test proves nothing.
        assert peak_fds >= limit // 2, f"w0 held at most {peak_fds} descriptors during the burst"

        # w1's first connection to w0 ever: it must be accepted and served.
        first = world.do(1, cmd_call_outcome, "w0", 5.0, timeout=12)
        assert first[0] == "ok", f"w1 could not call w0 after the storm: {first}"
        assert_w1_serves(world)
        back = world.do(0, cmd_call_outcome, "w1", 5.0, timeout=12)
        assert back[0] == "ok", f"w0 could not call w1 after the storm: {back}"

        assert wait_for(lambda: proc_stats(pid)[0] - fds0 <= 5, 3.0), (
            f"w0 had {fds0} descriptors before the storm, {proc_stats(pid)[0]} after"
        )
        assert proc_stats(pid)[1] - threads0 <= 4
        assert rss(pid) - rss0 < 300 * MiB
        # cycles_done is informative only: connects may be refused while w0 is at its limit.
        print(f"{cycles_done} of 600 connect-and-close cycles connected; "
              f"w0 peaked at {peak_fds} descriptors (limit {limit})")


@hard_timeout(60)
def test_g_secrets(tmp_path):
    """w0 and w1 share a secret given two ways (RpcOptions(secret=...) and
    TORCHRPC_SECRET_FILE) and call each other; w2's TORCHRPC_SECRET differs:
    its call to w0 is refused with AuthenticationError, and w0 says so on stderr."""
    secret = "torchrpc-test-shared-secret"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    stderr0 = tmp_path / "w0.stderr"
    options = [{"secret": secret}, {}, {}]
    env = [
        {},
        {"TORCHRPC_SECRET_FILE": str(secret_file)},
        {"TORCHRPC_SECRET": "torchrpc-test-other-secret"},
    ]
    with World(3, options=options, env=env, stderr_paths=[str(stderr0), None, None]) as world:
        for src, dst in ((0, 1), (1, 0)):
            out = world.do(src, cmd_call_outcome, f"w{dst}", 5.0, timeout=30)
            assert out[0] == "ok", f"w{src} -> w{dst} (same secret): {out}"

        kind, message, took, is_rpc_error = world.do(2, cmd_call_outcome, "w0", 5.0, timeout=30)
        assert kind == "AuthenticationError", (kind, message)
        assert is_rpc_error and issubclass(torchrpc.AuthenticationError, torchrpc.RpcError)
        assert "authentication" in message.lower(), message
        assert took < 5.0, f"refusal took {took:.1f} s (a timeout, not a refusal)"

        def logged():
            text = stderr0.read_text(errors="replace") if stderr0.exists() else ""
            return [line for line in text.splitlines() if "authentic" in line.lower()]

        lines = wait_for(logged, 3.0)
        assert lines, "w0 logged nothing about the rejected connection:\n" + (
            stderr0.read_text(errors="replace") if stderr0.exists() else "(no stderr)"
        )
        assert world.alive(0)
        out = world.do(1, cmd_call_outcome, "w0", 5.0, timeout=30)
        assert out[0] == "ok", f"w1 -> w0 after the refusal: {out}"


# -- the shared world for cases a-d and f ------------------------------------------


@pytest.fixture(scope="module")
def world():
    opts = {"handshake_timeout": HANDSHAKE_TIMEOUT, "python_udf": True}
    with World(2, options=[opts, dict(opts)]) as w:
        assert_w1_serves(w, 5)  # w1 is connected before any attack
        w.base_rss = rss(w.pid(0))
        yield w


def check_rss_bounded(world, limit=300 * MiB):
    grown = rss(world.pid(0)) - world.base_rss
    assert grown < limit, f"w0's RSS grew by {grown / MiB:.0f} MiB over the attacks"


@hard_timeout(30)
def test_a_random_bytes_are_refused(world):
    rng = random.Random(1234)
    hello = legacy_hello()
    payloads = [
        rng.randbytes(8192),
        rng.randbytes(4096),
        HEADER.pack(0x43505254, 1, 0, 1, 1, 64, 0, 0, 0, 0, 0, 0) + rng.randbytes(4096),
        hello + rng.randbytes(4096),
        b"\0" * 6000,
    ]
    socks = []
    try:
        for data in payloads:
            s = connect(world.address(0))
            socks.append((s, time.monotonic()))
            send_quietly(s, data)
        for i, (s, started) in enumerate(socks):
            took = closed_after(s, started, CLOSE_WITHIN)
            assert took is not None, (
                f"connection {i} (garbage first) still open after {CLOSE_WITHIN} s"
            )
    finally:
        for s, _ in socks:
            s.close()
    assert_w1_serves(world)
    check_rss_bounded(world)


@hard_timeout(30)
def test_b_header_claiming_1gib_then_stall(world):
    pid = world.pid(0)
    before = rss(pid)
    header = huge_payload_header()
    variants = {"header first": header, "after a frame-protocol hello": legacy_hello() + header}
    socks = []
    try:
        for name, data in variants.items():
            s = connect(world.address(0))
            socks.append((name, s, time.monotonic()))
            send_quietly(s, data)  # ... and then nothing: the 1 GiB never comes
        peak = [before]

        def sample():
            peak[0] = max(peak[0], rss(pid))

        for name, s, started in socks:
            took = closed_after(s, started, CLOSE_WITHIN, tick=sample)
            assert took is not None, (
                f"stalled 1 GiB frame ({name}) still open after {CLOSE_WITHIN} s"
            )
        sample()
    finally:
        for _, s, _ in socks:
            s.close()
    grown = peak[0] - before
    assert grown < 50 * MiB, f"w0's RSS grew by {grown / MiB:.0f} MiB"
    assert_w1_serves(world)
    check_rss_bounded(world)


@hard_timeout(30)
def test_c_slow_client_is_closed_mid_handshake(world):
    socks = []
    try:
        s = connect(world.address(0))
        socks.append(("10 bytes then silence", s, time.monotonic()))
        s.sendall(os.urandom(10))
        s = connect(world.address(0))
        socks.append(("silent from the start", s, time.monotonic()))
        for name, s, started in socks:
            took = closed_after(s, started, CLOSE_WITHIN)
            assert took is not None, f"{name}: still open after {CLOSE_WITHIN} s"
    finally:
        for _, s, _ in socks:
            s.close()
    assert_w1_serves(world)
    check_rss_bounded(world)


@hard_timeout(45)
def test_d_thousand_idle_connections(world):
    n = 1000
    raise_nofile(n + 256)
    pid = world.pid(0)
    fds0, threads0, _ = proc_stats(pid)
    max_threads = max([threads0] + [t for _, t, _ in hold_connections(world.address(0), n, 2.0, pid, 0.05)])
    assert world.alive(0), "w0 died"
    assert max_threads - threads0 <= 4, (
        f"w0 went from {threads0} to {max_threads} threads while holding {n} idle connections"
    )

    def settled():
        fds, threads, _ = proc_stats(pid)
        return abs(fds - fds0) <= 5 and abs(threads - threads0) <= 4

    wait_for(settled, 3.0)
    fds, threads, _ = proc_stats(pid)
    assert abs(fds - fds0) <= 5, f"w0 had {fds0} descriptors before, {fds} after"
    assert abs(threads - threads0) <= 4, f"w0 had {threads0} threads before, {threads} after"
    assert_w1_serves(world)
    check_rss_bounded(world)


@hard_timeout(30)
def test_f_stranger_python_call_never_runs(world, tmp_path):
    markers = {
        "frame first": str(tmp_path / "marker-frame-first"),
        "after a frame-protocol hello": str(tmp_path / "marker-after-hello"),
    }
    data = {
        "frame first": python_call_writing(markers["frame first"]),
        "after a frame-protocol hello": legacy_hello()
        + python_call_writing(markers["after a frame-protocol hello"]),
    }
    socks = []
    try:
        for name in markers:
            s = connect(world.address(0))
            socks.append((name, s, time.monotonic()))
            send_quietly(s, data[name])
        for name, s, started in socks:
            took = closed_after(s, started, CLOSE_WITHIN)
            assert took is not None, f"stranger ({name}) still connected after {CLOSE_WITHIN} s"
    finally:
        for _, s, _ in socks:
            s.close()
    time.sleep(1.0)
    for name, path in markers.items():
        assert not os.path.exists(path), f"w0 unpickled a stranger's PYTHON_CALL ({name})"
    assert_w1_serves(world)
    check_rss_bounded(world)


@hard_timeout(20)
def test_rss_bounded_throughout(world):
    check_rss_bounded(world)
    assert_w1_serves(world, 5)
