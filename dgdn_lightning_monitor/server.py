"""The HTTP endpoint that serves ``/metrics`` from a registry, with a clear error when the port is taken."""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any, Optional
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# How often the serving loop checks for shutdown; stopping waits up to this long (the library's default is
# 0.5 s, which would be most of the run-end budget).
_POLL_INTERVAL_S = 0.05


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per scrape on stderr would drown the training output


def _address_family(addr: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class PortInUseError(OSError):
    """The metrics port is already taken by another process (or another Trainer in this one)."""


class MetricsServer:
    """Serves a registry on ``http://addr:port/metrics`` from a daemon thread.

    Args:
        registry: what to serve.
        addr: interface to bind; ``0.0.0.0`` for all (so a Prometheus container can reach it).
        port: TCP port; ``0`` picks a free one.

    Example::

        server = MetricsServer(registry, "127.0.0.1", 0)
        server.start()
        print(server.url)  # http://127.0.0.1:43121/metrics
        server.stop()
    """

    def __init__(self, registry: CollectorRegistry, addr: str = "0.0.0.0", port: int = 8000) -> None:
        self.registry = registry
        self.addr = addr
        self.port = port
        self._httpd = None
        self._thread: Optional[threading.Thread] = None
        self.bound_port: Optional[int] = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> Optional[str]:
        if self.bound_port is None:
            return None
        host = self.addr
        if host in ("0.0.0.0", "", "::"):
            host = socket.gethostname() if host == "" else ("localhost" if host == "0.0.0.0" else "[::1]")
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.bound_port}/metrics"

    def start(self) -> None:
        if self._httpd is not None:
            return
        class Server(ThreadingWSGIServer):
            address_family = _address_family(self.addr, self.port)

        try:
            httpd = make_server(self.addr, self.port, make_wsgi_app(self.registry), Server,
                                handler_class=_QuietHandler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    errno.EADDRINUSE,
                    f"MonitoringCallback cannot serve metrics: port {self.port} on {self.addr} is already in use. "
                    f"Pass another port, or port=0 to pick a free one.",
                ) from error
            raise
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": _POLL_INTERVAL_S},
                                  name="dgdn-metrics-server", daemon=True)
        thread.start()
        self._httpd, self._thread = httpd, thread
        self.bound_port = int(httpd.server_address[1])

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever has left its loop (within one poll interval)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=2.0)
