"""A real OTLP/HTTP trace receiver for tests: decodes the protobuf requests the SDK's exporter posts.

Modes: ``ok`` answers 200, ``error`` answers 503, ``hang`` accepts the request and never answers. With an
``ssl_context`` it serves HTTPS on ``localhost``.

In its own process (the benchmarks): ``python -m dgdn_testing.otlp_receiver ok|hang`` prints its port, serves until
its stdin closes, and answers ``GET /stats`` with the request and span counts as JSON.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _attribute_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    events: list[str] = field(default_factory=list)


class OTLPReceiver:
    """Listens on 127.0.0.1:<free port>; ``endpoint`` is the traces URL to give the exporter.

    Example::

        with OTLPReceiver() as receiver:
            ...  # export to receiver.endpoint
            receiver.spans
    """

    def __init__(self, mode: str = "ok", ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.mode = mode
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.authorizations: list[Optional[str]] = []  # the Authorization header of each export request
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests += 1
                receiver.authorizations.append(self.headers.get("Authorization"))
                if receiver.mode == "hang":
                    receiver._release.wait(30)
                    return
                if receiver.mode == "error":
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver._decode(body)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = json.dumps({"requests": receiver.requests, "spans": len(receiver.spans)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        if ssl_context is not None:  # HTTPS; a client that fails the handshake is dropped at accept
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        scheme, host = ("https", "localhost") if ssl_context is not None else ("http", "127.0.0.1")
        self.endpoint = f"{scheme}://{host}:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _decode(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: _attribute_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={a.key: _attribute_value(a.value) for a in span.attributes},
                        resource=resource, status_code=span.status.code, events=[e.name for e in span.events],
                    ))

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]


if __name__ == "__main__":
    with OTLPReceiver(sys.argv[1] if len(sys.argv) > 1 else "ok") as running:
        print(running.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
