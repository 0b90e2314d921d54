"""Raw-socket ping-pong for bench_rpc.py's floors phase.

The floor under a small RPC round trip is the round trip of the same bytes
over the same kind of socket with nothing on top: `pingpong_impls` gives two
ping-pong loops, pure Python (socket.sendall / recv_into) and C
(benchmarks/pingpong.c, compiled at run time by `build_pingpong` and called
through ctypes, which releases the GIL); the faster one is the floor. One
process pings (serve=False: send, then receive), the other serves the same
number of iterations (receive, then send back).
"""

import ctypes
import os
import socket
import subprocess
import time
from typing import Callable, Dict, List, Optional, Tuple

PINGPONG_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pingpong.c")

# (connected blocking socket, iterations, bytes, serve) -> per-iteration latencies in us
PingPong = Callable[[socket.socket, int, int, bool], List[float]]


def build_pingpong(out_dir: str) -> Tuple[Optional[str], str]:
    """Compiles pingpong.c into out_dir: (path of the shared library, "") or
    (None, why not)."""
    out = os.path.join(out_dir, "pingpong.so")
    cmd = [os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", out, PINGPONG_C]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{' '.join(cmd)}: {e}"
    if p.returncode != 0:
        return None, f"{' '.join(cmd)} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}"
    return out, ""


def _python_pingpong(sock: socket.socket, iters: int, size: int, serve: bool) -> List[float]:
    buf = bytearray(size)
    view = memoryview(buf)
    lat = []
    clock = time.perf_counter_ns
    for _ in range(iters):
        t0 = clock()
        if not serve:
            sock.sendall(view)
        got = 0
        while got < size:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionResetError("ping-pong peer closed the socket")
            got += n
        if serve:
            sock.sendall(view)
        lat.append((clock() - t0) / 1e3)
    return lat


def _c_pingpong(so_path: str) -> PingPong:
    lib = ctypes.CDLL(so_path)
    lib.pingpong.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.POINTER(ctypes.c_double)]
    lib.pingpong.restype = ctypes.c_int

    def run(sock: socket.socket, iters: int, size: int, serve: bool) -> List[float]:
        lat = (ctypes.c_double * iters)()
        err = lib.pingpong(sock.fileno(), iters, size, int(serve), lat)
        if err:
            raise OSError(err, f"pingpong.c: {os.strerror(err)}")
        return list(lat)

    return run


def pingpong_impls(so_path: Optional[str]) -> Dict[str, PingPong]:
    """{"python": ..., "c": ...}; "c" only where so_path is given."""
    impls: Dict[str, PingPong] = {"python": _python_pingpong}
    if so_path:
        impls["c"] = _c_pingpong(so_path)
    return impls


def listen(family: int, addr, timeout: float) -> socket.socket:
    """A listening socket whose accept() gives up after `timeout` seconds."""
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(1)
    s.settimeout(timeout)
    return s


def accept(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    return _ready(conn)


def connect(family: int, addr, timeout: float) -> socket.socket:
    """Connects to a peer that may not be listening yet (retries until timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect(addr)
            return _ready(s)
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _ready(s: socket.socket) -> socket.socket:
    s.setblocking(True)  # the C loop needs a blocking descriptor
    if s.family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
