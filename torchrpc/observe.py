"""Counters and latency histograms of the running worker, as a dict and in
the Prometheus text exposition format (optionally served over HTTP)."""

import http.server
import threading
from typing import Dict, List, Optional

from torchrpc._handle import _current

__all__ = ["metrics", "metrics_text"]


def metrics() -> dict:
    """This worker's counters since init_rpc:

    - calls_sent / calls_served: one row per function and peer (worker name),
      with calls, errors and a latency histogram (caller: send to reply;
      callee: run time). Requests that are not calls (RRef and autograd
      control messages) are listed under their message type.
    - errors: failed calls by kind (timeout, peer_lost, remote, ...);
      timeouts: errors["timeout"].
    - queue_wait: time requests waited for a worker thread.
    - bytes: messages and bytes sent to and received from each peer.
    - handshake_failures: connections refused at the handshake;
      heartbeats_missed: connections closed because a peer went silent.
    - live_rrefs (owned values, user references) and autograd_contexts.
    """
    state = _current()
    m = state.agent.metrics()
    info = state.agent.debug_info()
    name = lambda rank: state.workers[rank].name if 0 <= rank < len(state.workers) else "local"  # noqa: E731
    for table in ("calls_sent", "calls_served"):
        for row in m[table]:
            row["peer"] = name(row["peer"])
    m["timeouts"] = m["errors"]["timeout"]
    m["bytes"] = {name(r): t for r, t in info["traffic"].items()}
    m["live_rrefs"] = {"owned": info["owned_values"], "users": info["live_users"]}
    m["autograd_contexts"] = info["autograd_contexts"]
    m["worker"] = state.self_info.name
    return m


def _labels(**labels) -> str:
    parts = []
    for key, value in labels.items():
        text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{key}="{text}"')
    return "{" + ",".join(parts) + "}"


def _histogram(lines: List[str], name: str, hist: dict, labels: Dict[str, str]):
    for bound, cumulative in hist["buckets"]:
        lines.append(f"{name}_bucket{_labels(**labels, le=repr(float(bound)))} {cumulative}")
    lines.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {hist['count']}")
    lines.append(f"{name}_sum{_labels(**labels)} {hist['sum_seconds']!r}")
    lines.append(f"{name}_count{_labels(**labels)} {hist['count']}")


def render_text(m: dict) -> str:
    """metrics() as Prometheus text (exposition format 0.0.4)."""
    w = m["worker"]
    lines: List[str] = []

    def family(name, kind, help_text):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    for table, role in (("calls_sent", "sent"), ("calls_served", "served")):
        family(f"torchrpc_calls_{role}_total", "counter", f"Calls {role}, by function and peer.")
        for r in m[table]:
            lines.append(f"torchrpc_calls_{role}_total{_labels(worker=w, function=r['function'], peer=r['peer'])} "
                         f"{r['calls']}")
        family(f"torchrpc_call_errors_{role}_total", "counter", f"Calls {role} that failed, by function and peer.")
        for r in m[table]:
            lines.append(f"torchrpc_call_errors_{role}_total"
                         f"{_labels(worker=w, function=r['function'], peer=r['peer'])} {r['errors']}")
        family(f"torchrpc_call_{role}_seconds", "histogram",
               "Caller: send to reply." if role == "sent" else "Callee: time to run and answer.")
        for r in m[table]:
            _histogram(lines, f"torchrpc_call_{role}_seconds", r["latency"],
                       {"worker": w, "function": r["function"], "peer": r["peer"]})
    family("torchrpc_errors_total", "counter", "Failed calls by kind.")
    for kind, n in m["errors"].items():
        lines.append(f"torchrpc_errors_total{_labels(worker=w, kind=kind)} {n}")
    family("torchrpc_queue_wait_seconds", "histogram", "Time requests waited for a worker thread.")
    _histogram(lines, "torchrpc_queue_wait_seconds", m["queue_wait"], {"worker": w})
    for key, help_text in (("bytes_sent", "Bytes sent to a peer."), ("bytes_received", "Bytes received from a peer."),
                           ("messages_sent", "Messages sent to a peer."),
                           ("messages_received", "Messages received from a peer.")):
        family(f"torchrpc_{key}_total", "counter", help_text)
        for peer, t in m["bytes"].items():
            lines.append(f"torchrpc_{key}_total{_labels(worker=w, peer=peer)} {t[key]}")
    family("torchrpc_handshake_failures_total", "counter", "Connections refused at the handshake.")
    lines.append(f"torchrpc_handshake_failures_total{_labels(worker=w)} {m['handshake_failures']}")
    family("torchrpc_heartbeats_missed_total", "counter", "Connections closed because the peer went silent.")
    lines.append(f"torchrpc_heartbeats_missed_total{_labels(worker=w)} {m['heartbeats_missed']}")
    family("torchrpc_live_rrefs", "gauge", "RRefs alive on this worker.")
    for role, n in m["live_rrefs"].items():
        lines.append(f"torchrpc_live_rrefs{_labels(worker=w, role=role)} {n}")
    family("torchrpc_autograd_contexts", "gauge", "Distributed autograd contexts alive on this worker.")
    lines.append(f"torchrpc_autograd_contexts{_labels(worker=w)} {m['autograd_contexts']}")
    return "\n".join(lines) + "\n"


def metrics_text() -> str:
    """metrics() in the Prometheus text format, for dashboards that scrape it."""
    return render_text(metrics())


class MetricsServer:
    """Serves metrics_text() at http://host:port/metrics (RpcOptions.metrics_port)."""

    def __init__(self, host: str, port: int):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                try:
                    body = metrics_text().encode()
                except Exception as e:  # RPC shut down meanwhile
                    self.send_error(503, str(e))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no line per scrape on stderr
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="torchrpc-metrics", daemon=True)
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def start_server(port: Optional[int], host: str) -> Optional[MetricsServer]:
    return None if port is None else MetricsServer(host, port)
