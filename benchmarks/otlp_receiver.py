"""A stand-in OTLP/HTTP trace collector for the benchmarks: ``python -m benchmarks.otlp_receiver live|hang``.

Binds a free port on 127.0.0.1, prints it on stdout and serves until its stdin is closed.

* ``live``: ``POST /v1/traces`` is answered 200 with an empty ``ExportTraceServiceResponse``; requests and spans
  are counted (spans only when ``opentelemetry-proto`` is installed); ``GET /stats`` returns the counts as JSON.
* ``hang``: connections are accepted and their requests read, but never answered (a collector that is stuck).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
except ImportError:  # pragma: no cover - a dev dependency
    ExportTraceServiceRequest = None

_counts = {"requests": 0, "spans": 0, "bytes": 0}
_lock = threading.Lock()


def _span_count(body: bytes) -> int:
    if ExportTraceServiceRequest is None:
        return 0
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        try:
            spans = _span_count(body)
        except Exception:  # a body that is not an export request still gets its 200; it is just not counted
            spans = 0
        with _lock:
            _counts["requests"] += 1
            _counts["spans"] += spans
            _counts["bytes"] += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if self.path != "/stats":
            self.send_error(404)
            return
        with _lock:
            body = json.dumps(_counts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _serve_live() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.shutdown()


def _hold(connection: socket.socket, held: list[socket.socket]) -> None:
    held.append(connection)  # keep it open and never answer
    try:
        while connection.recv(65536):
            pass
    except OSError:
        pass


def _serve_hang() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_hold, args=(connection, held), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    sys.stdin.read()
    listener.close()


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "live"
    if mode == "live":
        _serve_live()
    elif mode == "hang":
        _serve_hang()
    else:
        raise SystemExit(f"usage: python -m benchmarks.otlp_receiver live|hang (got {mode!r})")


if __name__ == "__main__":
    main()
