"""Look inside a running worker from another shell:

    python -m torchrpc.inspect            # lists the workers running as you
    python -m torchrpc.inspect PID        # that worker's peers, requests in
                                          # flight, RRef tables, autograd
                                          # contexts and call counters
    python -m torchrpc.inspect PID --json # the same, as JSON

Every worker answers on a Unix socket, <dir>/<pid>.sock, where <dir> is
TORCHRPC_INSPECT_DIR or /tmp/torchrpc-inspect-<uid>: a directory only its
user can enter, and the worker also checks the connecting process's user
(SO_PEERCRED). It answers from a thread of its own, so a worker whose calls
are stuck still answers, as long as its Python is not holding the GIL.
"""

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import threading
from typing import List, Optional

__all__ = ["socket_dir", "query", "main"]


def socket_dir() -> str:
    return os.environ.get("TORCHRPC_INSPECT_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchrpc-inspect-{os.getuid()}")


def _socket_path(pid: int) -> str:
    return os.path.join(socket_dir(), f"{pid}.sock")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class InspectServer:
    """Answers each connection with this worker's state as one JSON document."""

    def __init__(self, snapshot):
        self._snapshot = snapshot  # () -> dict
        folder = socket_dir()
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if os.stat(folder).st_uid != os.getuid():
            raise PermissionError(f"torchrpc: {folder} belongs to another user")
        os.chmod(folder, 0o700)
        self.path = _socket_path(os.getpid())
        try:
            os.unlink(self.path)  # left by an earlier process with our pid
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="torchrpc-inspect", daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    if _peer_uid(conn) not in (os.getuid(), 0):
                        continue
                    conn.sendall(json.dumps(self._snapshot(), default=repr).encode())
                except Exception as e:  # shut down meanwhile; the client sees why
                    try:
                        conn.sendall(json.dumps({"error": str(e)}).encode())
                    except OSError:
                        pass

    def close(self):
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def query(pid: int, timeout: float = 10.0) -> dict:
    """The state of the worker with process id `pid`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(_socket_path(pid))
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def running_workers() -> List[int]:
    pids = []
    try:
        names = os.listdir(socket_dir())
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(".sock") and name[:-5].isdigit():
            pid = int(name[:-5])
            if os.path.exists(f"/proc/{pid}"):
                pids.append(pid)
    return sorted(pids)


def _table(rows: List[List[str]], head: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def render(state: dict) -> str:
    if "error" in state:
        return f"the worker answered with an error: {state['error']}"
    info, m = state["debug_info"], state["metrics"]
    out = [f"worker {state['worker']} (pid {state['pid']})", "", "peers:"]
    out.append(_table([[name, p["state"], p["transport"] or "-",
                        "-" if p["last_heard_s"] < 0 else f"{p['last_heard_s']:.2f} s ago", p["why"]]
                       for name, p in sorted(info["peers"].items())],
                      ["peer", "state", "transport", "last heard", "why"]))
    reqs = sorted(info["requests"], key=lambda r: -r["age_s"])
    out += ["", f"requests in flight: {len(reqs)}"]
    if reqs:
        out.append(_table([[("waiting on " if r["direction"] == "out" else "serving for ") + str(r["peer"]),
                            r["function"], r["state"], f"{r['age_s']:.2f} s", r["id"]] for r in reqs],
                          ["", "function", "state", "age", "message id"]))
    tables = info["rref_tables"]
    out += ["", f"RRefs: {info['owned_values']} owned here ({info['user_forks']} forks), "
                f"{info['live_users']} user references, {info['unconfirmed_users']} unconfirmed"]
    for o in tables["owned"][:20]:
        out.append(f"  owned {tuple(o['rref'])}: forks {[tuple(f[0]) for f in o['forks']]}"
                   + (f", being created by {o['creating']} call(s)" if o["creating"] else ""))
    out += ["", f"autograd contexts: {len(info['autograd'])}"]
    for c in info["autograd"][:20]:
        out.append(f"  context {c['context_id']} with {', '.join(c['workers']) or 'no other worker'}")
    out += ["", "calls sent:"]
    out.append(_table([[r["function"], r["peer"], r["calls"], r["errors"]] for r in m["calls_sent"]],
                      ["function", "peer", "calls", "errors"]))
    out += ["", "calls served:"]
    out.append(_table([[r["function"], r["peer"], r["calls"], r["errors"]] for r in m["calls_served"]],
                      ["function", "peer", "calls", "errors"]))
    errors = {k: v for k, v in m["errors"].items() if v}
    out += ["", f"errors: {errors or 'none'}; handshake failures: {m['handshake_failures']}; "
                f"peers gone silent: {m['heartbeats_missed']}"]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchrpc.inspect", description=__doc__.splitlines()[0])
    p.add_argument("pid", nargs="?", type=int, help="the worker's process id (omit to list workers)")
    p.add_argument("--json", action="store_true", help="print the raw state as JSON")
    a = p.parse_args(argv)
    if a.pid is None:
        pids = running_workers()
        if not pids:
            print(f"no torchrpc workers of this user are running (looked in {socket_dir()})")
            return 1
        for pid in pids:
            try:
                state = query(pid, timeout=2.0)
                print(f"{pid}  {state.get('worker', '?')}")
            except OSError as e:
                print(f"{pid}  (not answering: {e})")
        return 0
    try:
        state = query(a.pid)
    except OSError as e:
        print(f"cannot reach worker pid {a.pid} at {_socket_path(a.pid)}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=1) if a.json else render(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
